"""Record-level privacy accounting for one hospital.

Every noisy DP-SGD step on a hospital's data is a release of information about its
patients. This module decides how much noise a run needs so that ALL releases on a
dataset, over all rounds and all runs, stay within the hospital's (epsilon, delta)
budget, and it keeps the ledger that proves it. The epsilon arithmetic is Opacus'
own accountant (RDP or PRV); the ledger persists its history, which a fresh Opacus
PrivacyEngine per round would otherwise forget.
"""

import functools
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from opacus.accountants import create_accountant

from results import read_json, write_json

MAX_NOISE_MULTIPLIER = 1e6  # as in Opacus' get_noise_multiplier
CALIBRATION_PRECISION = 1e-3  # relative precision of the calibrated noise multiplier
# Below this share of the budget left, a new run is declined rather than trained with
# noise so large that it could not learn anything.
MIN_BUDGET_LEFT = 0.01

# Opacus' RDP accountant warns when its bound could be tightened with larger orders:
# the epsilon is then an over-estimate (safe), which happens while calibrating.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


class BudgetExhausted(Exception):
    """Training would take a hospital's cumulative epsilon past its budget."""


def epsilon_spent(history, delta, accountant):
    """Cumulative epsilon at `delta` of the (noise_multiplier, sample_rate, steps)
    mechanisms in `history`, composed by Opacus' accountant. Remembered per process
    (0.1 s a time with RDP at sample rates near 0.5, asked three times a round)."""
    return _epsilon(tuple(tuple(entry) for entry in history), delta, accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(history, delta, accountant):
    if not history:
        return 0.0
    engine = create_accountant(mechanism=accountant)
    engine.history = list(history)
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q) = -inf at q = 1, correctly
        return float(engine.get_epsilon(delta=delta))


def calibrate_noise_multiplier(budget, delta, sample_rate, steps, accountant, prior=()):
    """The smallest noise multiplier (to 0.1%) for which `steps` more noisy steps at
    `sample_rate`, on top of the `prior` releases, keep epsilon within `budget`.

    The search is Opacus' get_noise_multiplier, which cannot take prior releases.

    Remembered per process: in a simulation many hospitals of the same size ask the
    same question, and one answer takes 1-2 s at sample rates near 0.5 (measured).
    """
    prior = tuple(tuple(release) for release in prior)
    return _calibrate(budget, delta, sample_rate, steps, accountant, prior)


@functools.lru_cache(maxsize=1024)
def _calibrate(budget, delta, sample_rate, steps, accountant, prior):
    prior = list(prior)
    spent = epsilon_spent(prior, delta, accountant)
    if spent >= budget * (1 - MIN_BUDGET_LEFT):
        raise BudgetExhausted(
            f"epsilon spent {spent:.4f} of the budget of {budget:g}, less than "
            f"{MIN_BUDGET_LEFT:.0%} left"
        )

    def epsilon_with(sigma):
        return epsilon_spent([*prior, (sigma, sample_rate, steps)], delta, accountant)

    low, high = 0.0, 10.0
    while epsilon_with(high) > budget:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise BudgetExhausted(f"budget {budget:g} too small for {steps} more steps")
    while high - low > CALIBRATION_PRECISION * high:
        middle = (low + high) / 2
        if epsilon_with(middle) > budget:
            low = middle
        else:
            high = middle
    return high


class PrivacyLedger:
    """All DP releases made from one dataset, and the budget they are held to, in a
    JSON file named after the dataset's fingerprint, rewritten atomically after
    every release.

    The file survives the process: a client restarted mid-training (in deployment
    each message may run in a fresh process) resumes from what was already spent.
    """

    def __init__(self, directory, fingerprint, budget, delta, accountant):
        self.budget, self.delta, self.accountant = budget, delta, accountant
        self.path = Path(directory) / f"ledger-{fingerprint[:16]}.json"
        if self.path.exists():
            self.data = read_json(self.path)
            if self.data["fingerprint"] != fingerprint:
                raise ValueError(f"{self.path} belongs to another dataset")
        else:
            self.data = {"fingerprint": fingerprint, "plans": {}, "releases": []}

    @property
    def history(self):
        """(noise_multiplier, sample_rate, steps) per release, consecutive equal
        mechanisms merged, as Opacus' accountants keep it."""
        merged = []
        for r in self.data["releases"]:
            mechanism = (r["noise_multiplier"], r["sample_rate"])
            if merged and merged[-1][:2] == mechanism:
                merged[-1] = (*mechanism, merged[-1][2] + r["steps"])
            else:
                merged.append((*mechanism, r["steps"]))
        return merged

    @property
    def steps(self):
        return sum(r["steps"] for r in self.data["releases"])

    def epsilon(self, extra=()):
        """Cumulative epsilon of every release, plus `extra` mechanisms if given."""
        return epsilon_spent([*self.history, *extra], self.delta, self.accountant)

    def noise_for_round(self, run_id, sample_rate, steps, planned_steps):
        """The noise multiplier for a round of `steps` noisy steps, or BudgetExhausted.

        The multiplier is calibrated once per run, when it first trains, for all
        its `planned_steps` on top of what earlier runs spent, and kept in the
        ledger so that every round of the run uses the same one.
        """
        key = str(run_id)
        if key not in self.data["plans"]:
            sigma = calibrate_noise_multiplier(
                self.budget,
                self.delta,
                sample_rate,
                planned_steps,
                self.accountant,
                self.history,
            )
            self.data["plans"][key] = {
                "noise_multiplier": sigma,
                "sample_rate": sample_rate,
                "planned_steps": planned_steps,
                "epsilon_budget": self.budget,
                "delta": self.delta,
                "accountant": self.accountant,
            }
            write_json(self.path, self.data)
        sigma = self.data["plans"][key]["noise_multiplier"]
        after = self.epsilon([(sigma, sample_rate, steps)])
        if after > self.budget:
            raise BudgetExhausted(
                f"this round would bring epsilon to {after:.3f}, past the budget of {self.budget:g}"
            )
        return sigma

    def record(self, run_id, server_round, noise_multiplier, sample_rate, steps):
        """Append one release (one round's training) and persist it."""
        self.data["releases"].append(
            {
                "run_id": str(run_id),
                "round": server_round,
                "noise_multiplier": noise_multiplier,
                "sample_rate": sample_rate,
                "steps": steps,
                "utc": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        self.data["releases"][-1]["epsilon_after"] = self.epsilon()
        write_json(self.path, self.data)
