"""Empirical epsilon lower bounds from one training run's guessed canaries.

The largest epsilon under which an auditor's correct guesses of its canaries' coins would be too
unlikely, by two analyses (ANALYSES): Steinke, Nasr and Jagielski's (NeurIPS 2023), assuming
only (epsilon, delta)-DP, and Mahloujifar, Melis and Chaudhuri's Gaussian one (ICML 2025).
Entry points: `audit_guesses`, `epsilon_lower_bound`, `gaussian_premise_holds`.
"""

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import special, stats

ANALYSES = ("epsilon-delta", "gaussian")
# The share of the canaries whose coins the auditor guesses: those with the highest
# and lowest scores, half each. Fixed before any audit, by simulating Gaussian canary
# scores at the separation of the self-test's half-noise variant (docs/how-to/privacy-audit.md):
# fewer guesses are too few to count, more are mostly coin flips. One share, so that
# the whole confidence rests on one test.
GUESS_SHARE = 0.1


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Steinke, Nasr and Jagielski's bound on the chance of `correct` or more right guesses.

    Out of `guesses` under (epsilon, delta)-DP (their Theorem 5.2):
    P[Binomial(guesses, p) >= correct] +
    2 * canaries * delta * max_i P[correct - i <= Binomial(guesses, p) < correct] / i,
    where p = e^eps / (1 + e^eps) is the best accuracy eps-DP allows one guess.
    """
    p = special.expit(epsilon)
    tail = stats.binom.sf(correct - 1, guesses, p)
    if delta == 0 or correct == 0:
        return float(tail)
    shortfall = np.arange(1, correct + 1)
    just_below = np.cumsum(stats.binom.pmf(correct - shortfall, guesses, p))
    return float(min(1.0, tail + 2 * canaries * delta * np.max(just_below / shortfall)))


Tradeoff = Callable[[float], float]


def gaussian_tradeoff(mu: float) -> Tradeoff:
    """mu-Gaussian DP's privacy curve, as between N(0, 1) and N(mu, 1).

    The least type II error of any test between a canary's two versions at type I error alpha.
    """
    return lambda alpha: float(stats.norm.cdf(stats.norm.ppf(1 - alpha) - mu))


def rejects(
    canaries: int, guesses: int, correct: int, tradeoff: Tradeoff, significance: float
) -> bool:
    """Whether `correct` right out of `guesses` is too unlikely under the privacy curve.

    Too unlikely, at `significance`, with `canaries` canaries, for a mechanism whose privacy
    curve is at least `tradeoff`.

    Mahloujifar, Melis and Chaudhuri's bound (their Theorem 9 and its algorithm):
    starting from the shares of right and wrong guesses scaled by the significance,
    each right guess fewer is traded against the least wrong ones the privacy curve
    allows with it (tradeoff(1 - right)); the observation is rejected if the shares
    reached exceed the share of guesses made.
    """
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
    """Whether a privacy profile lies within the Gaussian mechanism exactly (epsilon, delta)-DP.

    That is the premise under which the Gaussian analysis refutes the mechanism's own claim:
    the Gaussian curve is what DP-SGD's many composed steps approach (Dong, Roth and Su's
    central limit theorem), and the analysis is valid as a bound where the mechanism's own
    curve lies within it. Checked wherever the Gaussian's delta is at least PREMISE_DELTA, to
    within PREMISE_TOLERANCE.

    Parameters
    ----------
    delta_for_epsilon : callable
        The mechanism's privacy profile, a PLD's get_delta_for_epsilon.
    epsilon, delta : float
        The mechanism's claim.
    """
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
    """The largest epsilon that `correct` right out of `guesses` refutes at `confidence`.

    0 if none; under `analysis` (see ANALYSES), to within 1e-4 below. A lower bound is
    evidence, not a guarantee: a correct implementation's bound stays below its claimed
    epsilon (with the stated confidence), and a broken one's may rise above it.

    Raises
    ------
    ValueError
        The counts are not 0 <= correct <= guesses <= canaries, the analysis is unknown, or
        the Gaussian one is asked for with delta 0.
    """
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
    """(guesses, correct) when the auditor guesses the coins of the extreme scores.

    Coin 1 for the highest-scoring `share` / 2 of the canaries, coin 0 for as many of the
    lowest-scoring.
    """
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
    """The lower bound at `confidence` from the auditor's guesses of the extreme scores' coins.

    The auditor guesses coin 1 for the highest-scoring `share` / 2 of the canaries and coin 0
    for as many of the lowest.

    Returns
    -------
    dict
        "epsilon": the lower bound (`epsilon_lower_bound`); "guesses" and "correct": the
        guesses behind it.
    """
    scores, coins = np.asarray(scores, dtype=float), np.asarray(coins, dtype=int)
    order = np.argsort(scores, kind="stable")
    half = max(1, math.floor(share * len(coins) / 2))
    correct = int((coins[order[-half:]] == 1).sum() + (coins[order[:half]] == 0).sum())
    epsilon = epsilon_lower_bound(len(coins), 2 * half, correct, delta, confidence, analysis)
    return {"epsilon": epsilon, "guesses": 2 * half, "correct": correct}
