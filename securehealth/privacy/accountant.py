"""The epsilon arithmetic of DP-SGD releases, with dp-accounting's PLD accountant.

The privacy loss distribution (PLD) accountant is the tight one, and the only one of
dp-accounting's that handles replace-one adjacency for the Poisson-sampled Gaussian
mechanism of DP-SGD. Entry points: epsilon_spent, calibrate_noise_multiplier. What is
accounted, and why replace-one: docs/explanation/privacy-guarantee.md.
"""

import functools
from collections.abc import Iterable, Sequence

from securehealth.privacy.report import Accountant

# dp-accounting is imported where an epsilon is computed, not here: it pulls in
# scipy.signal (0.8 s), and most of a hospital's Flower messages (the SecAgg+ stages,
# each a fresh process) compute none.
ADJACENCIES = ("replace-one", "add-remove")  # dp-accounting's REPLACE_ONE, ADD_OR_REMOVE_ONE
ACCOUNTANT = Accountant.PLD  # dp-accounting's privacy loss distribution accountant
# PLD's grid for privacy-loss values. Its estimate is pessimistic (an upper bound) at
# any grid; 1e-3 is 7x faster than the default 1e-4 and adds about 1e-4 to epsilon.
PLD_DISCRETIZATION = 1e-3
CALIBRATION_TOLERANCE = 1e-3  # of the noise multiplier, absolute
MAX_NOISE_MULTIPLIER = 1e6  # as in Opacus' get_noise_multiplier
# The least noise calibration goes down to: the PLD of smaller multipliers takes
# seconds to minutes, and only budgets far beyond any meaningful epsilon (over 100
# at the defaults) would allow less.
MIN_NOISE_MULTIPLIER = 0.25
# Below this share of the budget left, a new run is declined rather than trained with
# noise so large that it could not learn anything.
MIN_BUDGET_LEFT = 0.01


class BudgetExhausted(Exception):
    """Training would take a hospital's cumulative epsilon past its budget."""


class NoiseBeyondLimit(BudgetExhausted):
    """The budget holds only with more noise than the limit asked for.

    `least_epsilon` (cumulative) is a budget with which the limit itself would do; None
    where the limit is below the least noise calibration goes down to, so no budget
    would.
    """

    def __init__(self, least_epsilon: float | None):
        super().__init__(
            f"a budget of at least {least_epsilon:.3g} is needed"
            if least_epsilon is not None
            else "no budget suffices"
        )
        self.least_epsilon = least_epsilon


def _event(history):
    """The DP event of DP-SGD releases: (noise_multiplier, sample_rate, steps) each."""
    from dp_accounting import dp_event

    return dp_event.ComposedDpEvent(
        [
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(sigma)),
                int(steps),
            )
            for sigma, sample_rate, steps in history
        ]
    )


def _accountant(adjacency):
    """dp-accounting's PLD accountant for `adjacency`."""
    from dp_accounting import pld
    from dp_accounting.privacy_accountant import NeighboringRelation

    relation = {
        "replace-one": NeighboringRelation.REPLACE_ONE,
        "add-remove": NeighboringRelation.ADD_OR_REMOVE_ONE,
    }[adjacency]
    return pld.PLDAccountant(
        neighboring_relation=relation,
        value_discretization_interval=PLD_DISCRETIZATION,
    )


def epsilon_spent(history: Iterable[Sequence[float]], delta: float, adjacency: str) -> float:
    """Cumulative epsilon at `delta` of the releases in `history`, under `adjacency`.

    `history` holds each release's (noise_multiplier, sample_rate, steps). Remembered
    per process: each costs 10-100 ms, and a round asks the same question several times.
    """
    return _epsilon(tuple(tuple(entry) for entry in history), delta, adjacency)


@functools.lru_cache(maxsize=4096)
def _epsilon(history, delta, adjacency):
    """epsilon_spent's computation, remembered (its arguments made hashable)."""
    if not history:
        return 0.0
    accountant = _accountant(adjacency)
    accountant.compose(_event(history))
    return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(
    budget: float,
    delta: float,
    sample_rate: float,
    steps: int,
    adjacency: str,
    prior: Iterable[Sequence[float]] = (),
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> float:
    """The smallest noise multiplier for more noisy steps that keeps epsilon within `budget`.

    dp-accounting's own calibration search, to CALIBRATION_TOLERANCE. Remembered per
    process: in a simulation many hospitals of the same size ask the same question. A
    run calibrates once, when it first trains (see PrivacyLedger).

    Parameters
    ----------
    budget : float
        The cumulative epsilon allowed.
    delta : float
        The delta at which epsilon is computed.
    sample_rate : float
        The Poisson sample rate of the new steps.
    steps : int
        The number of new noisy steps.
    adjacency : str
        "replace-one" or "add-remove".
    prior : iterable of (noise_multiplier, sample_rate, steps)
        The releases already made.
    max_noise_multiplier : float
        The most noise allowed.

    Returns
    -------
    float
        The noise multiplier.

    Raises
    ------
    BudgetExhausted
        Where less than MIN_BUDGET_LEFT of the budget is left.
    NoiseBeyondLimit
        Where the budget needs more noise than `max_noise_multiplier`.
    """
    prior = tuple(tuple(release) for release in prior)
    return _calibrate(budget, delta, sample_rate, steps, adjacency, prior, max_noise_multiplier)


def nearly_spent(spent: float, budget: float) -> bool:
    """Whether an epsilon of `spent` leaves less than MIN_BUDGET_LEFT of `budget`.

    That is too little for any further training: calibration refuses it.
    """
    return spent >= budget * (1 - MIN_BUDGET_LEFT)


@functools.lru_cache(maxsize=1024)
def _calibrate(budget, delta, sample_rate, steps, adjacency, prior, max_noise_multiplier):
    """calibrate_noise_multiplier's search, remembered (its arguments made hashable)."""
    spent = epsilon_spent(prior, delta, adjacency)
    if nearly_spent(spent, budget):
        raise BudgetExhausted(
            f"epsilon spent {spent:.4f} of the budget of {budget:g}, less than "
            f"{MIN_BUDGET_LEFT:.0%} left"
        )

    def epsilon_with(sigma):
        return epsilon_spent([*prior, (sigma, sample_rate, steps)], delta, adjacency)

    if max_noise_multiplier < MIN_NOISE_MULTIPLIER:  # calibration never goes below it
        raise NoiseBeyondLimit(None)
    least = epsilon_with(max_noise_multiplier)
    if least > budget:
        raise NoiseBeyondLimit(least)
    # A bracket [low, high] of the answer, found by doubling from sigma 1: PLDs of
    # small multipliers are large and slow, so the search starts where they are not.
    low, high = 1.0, 1.0
    while epsilon_with(high) > budget:
        low, high = high, 2 * high
    while high == low or epsilon_with(low) <= budget:
        if low <= MIN_NOISE_MULTIPLIER:
            return low  # within budget; less noise would only make the PLD huge
        low /= 2
    from dp_accounting import mechanism_calibration

    return mechanism_calibration.calibrate_dp_mechanism(
        lambda: _accountant(adjacency),
        lambda sigma: _event([*prior, (sigma, sample_rate, steps)]),
        budget,
        delta,
        mechanism_calibration.ExplicitBracketInterval(low, high),
        tol=CALIBRATION_TOLERANCE,
    )
