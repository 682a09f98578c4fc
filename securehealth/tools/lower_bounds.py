"""Empirical epsilon lower bounds from one training run: how much privacy a run must
at least have lost, given how well an auditor guessed its canaries.

A one-run audit inserts m canaries, each in one of two versions chosen by a fair
coin (present or absent; or, for replace-one, one of two records), trains once, and
guesses the coins of the canaries it is surest about. If the training is
(epsilon, delta)-DP, many correct guesses are unlikely; a lower bound is the largest
epsilon under which the guesses observed would be too unlikely (p-value at most
1 - confidence). Two analyses of the same guesses:

- "epsilon-delta": Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
  Training Run" (NeurIPS 2023), Theorem 5.2: assumes only (epsilon, delta)-DP.
- "gaussian": Mahloujifar, Melis and Chaudhuri, "Auditing f-Differential Privacy in
  One Run" (ICML 2025): assumes the whole privacy curve of the Gaussian mechanism
  that is (epsilon, delta)-DP, the curve DP-SGD's many composed steps approach
  (Dong, Roth and Su's central limit theorem). Tighter; valid as a bound where the
  training's own curve lies within that Gaussian one (`gaussian_premise_holds`).

A lower bound is evidence, not a guarantee: a correct implementation's bound stays
below its claimed epsilon (with the stated confidence), and a broken one's may rise
above it.
"""

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import special, stats

ANALYSES = ("epsilon-delta", "gaussian")
# The share of the canaries whose coins the auditor guesses: those with the highest
# and lowest scores, half each. Fixed before any audit, by simulating Gaussian canary
# scores at the separation of the self-test's half-noise variant (see the README):
# fewer guesses are too few to count, more are mostly coin flips. One share, so that
# the whole confidence rests on one test.
GUESS_SHARE = 0.1


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Steinke, Nasr and Jagielski's bound on the chance of `correct` or more right
    out of `guesses` under (epsilon, delta)-DP: P[Binomial(guesses, p) >= correct] +
    2 * canaries * delta * max_i P[correct - i <= Binomial(guesses, p) < correct] / i,
    where p = e^eps / (1 + e^eps) is the best accuracy eps-DP allows one guess."""
    p = special.expit(epsilon)
    tail = stats.binom.sf(correct - 1, guesses, p)
    if delta == 0 or correct == 0:
        return float(tail)
    shortfall = np.arange(1, correct + 1)
    just_below = np.cumsum(stats.binom.pmf(correct - shortfall, guesses, p))
    return float(min(1.0, tail + 2 * canaries * delta * np.max(just_below / shortfall)))


Tradeoff = Callable[[float], float]


def gaussian_tradeoff(mu: float) -> Tradeoff:
    """mu-Gaussian DP's privacy curve: the least type II error of any test between a
    canary's two versions at type I error alpha, as between N(0, 1) and N(mu, 1)."""
    return lambda alpha: float(stats.norm.cdf(stats.norm.ppf(1 - alpha) - mu))


def rejects(
    canaries: int, guesses: int, correct: int, tradeoff: Tradeoff, significance: float
) -> bool:
    """Whether `correct` right out of `guesses` (of `canaries`) is too unlikely, at
    `significance`, for a mechanism whose privacy curve is at least `tradeoff`.

    Mahloujifar, Melis and Chaudhuri's bound (their Theorem 9 and its algorithm):
    starting from the shares of right and wrong guesses scaled by the significance,
    each right guess fewer is traded against the least wrong ones the privacy curve
    allows with it (tradeoff(1 - right)); the observation is rejected if the shares
    reached exceed the share of guesses made."""
    right = significance * correct / canaries
    wrong = significance * (guesses - correct) / canaries
    for fewer in range(correct - 1, -1, -1):
        least_wrong = max(wrong, tradeoff(1 - right))
        if least_wrong == wrong:
            break  # from here on neither share can change
        right = min(1.0, right + fewer / (guesses - fewer) * (least_wrong - wrong))
        wrong = least_wrong
    return right + wrong > guesses / canaries


def gaussian_delta(mu: float, epsilon: np.ndarray) -> np.ndarray:
    """delta(epsilon) of mu-Gaussian DP (Dong, Roth and Su)."""
    return stats.norm.cdf(-epsilon / mu + mu / 2) - np.exp(epsilon) * stats.norm.cdf(
        -epsilon / mu - mu / 2
    )


# The Gaussian analysis' premise is checked where the Gaussian curve's delta is at
# least this (further out lies a tail no one-run audit of these sizes reaches), to
# within this relative tolerance (a PLD's pessimistic discretization alone adds some
# 0.1%; at the defaults, DP-SGD's delta is at most 1.0008 times the Gaussian's).
PREMISE_DELTA = 1e-7
PREMISE_TOLERANCE = 0.01
PREMISE_STEP = 0.025  # of epsilon between the points compared


def gaussian_premise_holds(
    delta_for_epsilon: Callable[[list[float]], Sequence[float]], epsilon: float, delta: float
) -> bool:
    """Whether a mechanism whose privacy profile is `delta_for_epsilon` (a PLD's
    get_delta_for_epsilon) lies within the Gaussian mechanism that is exactly
    (epsilon, delta)-DP: the premise under which the Gaussian analysis refutes the
    mechanism's own claim. Checked wherever the Gaussian's delta is at least
    PREMISE_DELTA, to within PREMISE_TOLERANCE."""
    mu = gaussian_mu(epsilon, delta)
    end = 2 * epsilon + 1
    while gaussian_delta(mu, end) >= PREMISE_DELTA:  # out to where the check stops
        end *= 2
    epsilons = np.arange(0, end, PREMISE_STEP)
    gaussian = gaussian_delta(mu, epsilons)
    checked = gaussian >= PREMISE_DELTA
    profile = np.asarray(delta_for_epsilon(list(epsilons[checked])))
    return bool(np.all(profile <= gaussian[checked] * (1 + PREMISE_TOLERANCE)))


def gaussian_mu(epsilon: float, delta: float) -> float:
    """mu of the Gaussian mechanism that is exactly (epsilon, delta)-DP."""
    from dp_accounting import get_sigma_gaussian

    return 1 / get_sigma_gaussian(epsilon, delta)


def epsilon_lower_bound(
    canaries: int,
    guesses: int,
    correct: int,
    delta: float,
    confidence: float = 0.95,
    analysis: str = "epsilon-delta",
) -> float:
    """The largest epsilon that `correct` right out of `guesses` refutes at
    `confidence` (0 if none), under `analysis` (see ANALYSES), to within 1e-4 below."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(
            f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}"
        )
    significance = 1 - confidence
    if analysis == "epsilon-delta":

        def refuted(epsilon):
            return p_value(canaries, guesses, correct, epsilon, delta) <= significance
    elif analysis == "gaussian":
        if delta <= 0:
            raise ValueError(
                "the gaussian analysis needs delta > 0: no Gaussian mechanism has delta 0"
            )

        def refuted(epsilon):
            tradeoff = gaussian_tradeoff(gaussian_mu(epsilon, delta))
            return rejects(canaries, guesses, correct, tradeoff, significance)
    else:
        raise ValueError(f"analysis must be one of {ANALYSES}, got {analysis!r}")

    low = 1e-9  # refuted; `high` never is
    if not refuted(low):
        return 0.0
    high = 1.0
    while refuted(high):
        low, high = high, 2 * high
    while high - low > 1e-4:
        middle = (low + high) / 2
        low, high = (middle, high) if refuted(middle) else (low, middle)
    return low


def _guesses(scores, coins, share):
    """(guesses, correct) when the auditor guesses coin 1 for the highest-scoring
    `share` / 2 of the canaries and coin 0 for the lowest-scoring as many."""
    order = np.argsort(scores, kind="stable")
    half = max(1, math.floor(share * len(coins) / 2))
    correct = int((coins[order[-half:]] == 1).sum() + (coins[order[:half]] == 0).sum())
    return 2 * half, correct


def audit_guesses(
    scores: Sequence[float],
    coins: Sequence[int],
    delta: float,
    confidence: float = 0.95,
    analysis: str = "epsilon-delta",
    share: float = GUESS_SHARE,
) -> dict[str, float | int]:
    """The lower bound at `confidence` when the auditor guesses coin 1 for the
    highest-scoring `share` / 2 of the canaries and coin 0 for as many of the lowest;
    returns it with the guesses behind it."""
    scores, coins = np.asarray(scores, dtype=float), np.asarray(coins, dtype=int)
    order = np.argsort(scores, kind="stable")
    half = max(1, math.floor(share * len(coins) / 2))
    correct = int((coins[order[-half:]] == 1).sum() + (coins[order[:half]] == 0).sum())
    epsilon = epsilon_lower_bound(len(coins), 2 * half, correct, delta, confidence, analysis)
    return {"epsilon": epsilon, "guesses": 2 * half, "correct": correct}
