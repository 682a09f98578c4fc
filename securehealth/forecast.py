"""Before a run trains: whether its model can be useful at all, and what each hospital would spend.

The forecast (`forecast`, `forecast_here`) uses only what each hospital knows before it trains,
never the values in its rows: its number of training patients, the sample rate and steps that
number sets, and the noise multiplier its privacy ledger would plan (`plan_hospital`; nothing is
planned or spent by asking). Its figure is a noise-to-signal ratio (`noise_to_signal`); its
derivation and the measurements behind its limit are in docs/how-to/forecast.md.
"""

import functools
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from securehealth import data, operating_point
from securehealth.config import Settings
from securehealth.privacy.accountant import BudgetExhausted, NoiseBeyondLimit, nearly_spent
from securehealth.privacy.ledger import PrivacyLedger
from securehealth.privacy.schedule import noise_limit, sample_rate_and_steps, weight_count
from securehealth.results import HOSPITALS_DIR_VARIABLE

# What to do when the simulated hospitals' lasting budgets are spent.
SPENT_BUDGET_ADVICE = (
    "A hospital's ledger keeps its patients' budget for life and is never reset: for a "
    f"new cohort of patients point ${HOSPITALS_DIR_VARIABLE} at a new folder; raise "
    "--epsilon only if every hospital's privacy policy allows it; rehearse on a synthetic "
    "twin of your data (simulation.py --make-twin FOLDER), which spends nothing lasting"
)

# Above this noise-to-signal ratio the forecast warns that the model is unlikely to be useful.
# How useful a model is also depends on how separable the data are, which nobody sees before
# training, so the limit is measured: at the defaults, over 16 federations of 5 seeds each on four
# data sets at several budgets and sizes, every one whose median AUC fell below 0.6 had a ratio of
# 0.36 or more, and every one at 0.29 or less reached 0.60 or more (docs/how-to/forecast.md).
NOISE_TO_SIGNAL_LIMIT = 0.3


@dataclass(frozen=True)
class HospitalPlan:
    """What one hospital would train with in the run.

    That is its training patients, sample rate and noisy steps per round, and its noise
    multiplier (None where it cannot train in the run, `reason` saying why); with the epsilon its
    ledger holds already, of its `budget`.
    """

    hospital: int
    patients: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float | None
    reason: str = ""
    epsilon_spent: float = 0.0
    budget: float = 1.0
    epsilon_after: float | None = None  # where asked for (spend=True) and it can train

    @property
    def budget_spent(self) -> bool:
        """Whether it cannot train because its ledger holds (nearly) all its budget."""
        return self.noise_multiplier is None and nearly_spent(self.epsilon_spent, self.budget)

    @property
    def empties_budget(self) -> bool:
        """Whether the run would leave it too little budget for another.

        Its noise is calibrated to spend all that is left. Also true where `epsilon_after` is
        None (not asked for, or it cannot train).
        """
        return self.epsilon_after is None or nearly_spent(self.epsilon_after, self.budget)


@dataclass(frozen=True)
class Forecast:
    """A run's forecast, from its hospitals' plans.

    `noise_to_signal` is its noise against the largest signal its updates could carry (infinite
    when no hospital can train).
    """

    noise_to_signal: float
    plans: tuple[HospitalPlan, ...]

    @property
    def training(self) -> int:
        """How many of the hospitals can train in the run."""
        return sum(p.noise_multiplier is not None for p in self.plans)

    @property
    def warning(self) -> str | None:
        """One line where the model is unlikely to be useful or some hospitals cannot train.

        Each hospital that cannot train is named, with why; None where neither applies.
        """
        noisy = self.noise_to_signal > NOISE_TO_SIGNAL_LIMIT
        if not noisy and self.training == len(self.plans):
            return None
        parts = []
        if self.training < len(self.plans):
            why = "; ".join(
                f"hospital {p.hospital}: {p.reason}"
                for p in self.plans
                if p.noise_multiplier is None
            )
            if not self.training:
                return f"forecast: no hospital can train in this run, so nothing is learnt ({why})"
            parts.append(
                f"only {self.training} of the {len(self.plans)} hospitals can train in this run "
                f"({why})"
            )
        parts.append(
            f"the DP noise on the model's updates is {self.noise_to_signal:.2f} of the largest "
            f"signal they can carry"
            + (
                f", above {NOISE_TO_SIGNAL_LIMIT:g}, where measured runs' median AUC fell below "
                f"0.6: the model is unlikely to be useful (more patients or hospitals, a "
                f"larger epsilon or a smaller model would help)"
                if noisy
                else f" (at most {NOISE_TO_SIGNAL_LIMIT:g} forecasts a useful model)"
            )
        )
        return "forecast: " + "; ".join(parts)

    def refusal(self, ledgers: Path) -> str:
        """The refusal of a run in which no hospital can train.

        That is the warning and, where budgets are spent, where their ledgers (in `ledgers`) are
        and what to do.
        """
        if not any(plan.budget_spent for plan in self.plans):
            return self.warning
        return f"{self.warning}. Their ledgers are in {ledgers}. {SPENT_BUDGET_ADVICE}"


def noise_to_signal(plans: Sequence[HospitalPlan], rounds: int, weights: int) -> float:
    """The run's noise against the largest signal its updates could carry (inf if none trains).

    Over the hospitals that can train, with hospital i's training patients n_i, FedAvg weight
    w_i = n_i / sum(n), sample rate q_i, steps per round s_i and noise multiplier sigma_i, over
    R rounds and W weights:

        sqrt(W * sum_i w_i^2 * s_i * (sigma_i / (q_i * n_i))^2) / (sqrt(R) * sum_i w_i * s_i)

    A step's noise, sigma * C / (q * n) on every weight, adds up as a random walk; its signal, at
    most C, adds up in a line (docs/how-to/forecast.md derives it).
    """
    training = [p for p in plans if p.noise_multiplier is not None]
    if not training:
        return math.inf
    everyone = sum(p.patients for p in training)
    noise = signal = 0.0
    for p in training:
        share = p.patients / everyone
        per_step = p.noise_multiplier / (p.sample_rate * p.patients)
        noise += share**2 * p.steps_per_round * per_step**2
        signal += share * p.steps_per_round
    return math.sqrt(weights * noise) / (math.sqrt(rounds) * signal)


def plan_hospital(
    cfg: Settings,
    hospital: int,
    patients: int,
    weights: int,
    ledger: PrivacyLedger,
    spend: bool = False,
) -> HospitalPlan:
    """What `hospital` would train with in a run of cfg's settings.

    Parameters
    ----------
    cfg : Settings
        The run's settings.
    hospital : int
        The hospital's number.
    patients : int
        Its training patients.
    weights : int
        The model's number of weights.
    ledger : PrivacyLedger
        Its privacy ledger, asked only (nothing is planned or spent).
    spend : bool
        Also work out the epsilon its ledger would hold after the run: one more dp-accounting
        evaluation, for a plan, not for every run's forecast.

    Returns
    -------
    HospitalPlan
        Its plan; without a noise multiplier, and with the reason, where it cannot train.
    """
    sample_rate, steps = sample_rate_and_steps(patients, cfg)
    with ledger.transaction():
        spent = ledger.epsilon()
    planned = functools.partial(
        HospitalPlan,
        hospital,
        patients,
        sample_rate,
        steps,
        epsilon_spent=spent,
        budget=cfg.epsilon,
    )
    releases_threshold = operating_point.Target.parse(cfg.decision_threshold) is not None
    limit = noise_limit(patients, weights, cfg)
    sigma, reason = _planned_noise(cfg, ledger, sample_rate, steps, limit, releases_threshold)
    if sigma is None:
        return planned(None, reason)
    after = (
        ledger.epsilon_after_run(sigma, sample_rate, cfg.rounds * steps, releases_threshold)
        if spend
        else None
    )
    return planned(sigma, epsilon_after=after)


def _planned_noise(cfg, ledger, sample_rate, steps, limit, releases_threshold):
    """The noise multiplier the ledger would plan for the run and "", or None and why not."""
    try:
        sigma = ledger.planned_noise(
            sample_rate, cfg.rounds * steps, limit, operating_point=releases_threshold
        )
    except NoiseBeyondLimit as refusal:
        return None, (
            f"the noise its budget needs would move the model further than max_update_norm "
            f"{cfg.max_update_norm:g} a round ({refusal})"
        )
    except BudgetExhausted as refusal:
        return None, str(refusal)
    return sigma, ""


def forecast(cfg: Settings, plans: Sequence[HospitalPlan], weights: int) -> Forecast:
    """The run's forecast from its hospitals' plans."""
    return Forecast(noise_to_signal(plans, cfg.rounds, weights), tuple(plans))


def forecast_here(
    cfg: Settings, state_dirs: Sequence[Path | None] | None, spend: bool = False
) -> Forecast:
    """The forecast for a federation whose hospitals' data this machine holds, as in simulation.py.

    Parameters
    ----------
    cfg : Settings
        The run's settings.
    state_dirs : Sequence[Path | None] or None
        The hospitals' state directories, homes of their ledgers, one per hospital: None for
        one that starts afresh (a demonstration's); None for all to start afresh.
    spend : bool
        Each plan also says what the run would spend (plan_hospital).
    """
    weights = weight_count(len(data.load_schema(cfg).input_names), cfg.hidden_layers)
    with tempfile.TemporaryDirectory() as fresh:
        given = state_dirs or [None] * cfg.num_clients
        homes = [home or Path(fresh) / str(h) for h, home in enumerate(given)]
        plans = [
            plan_hospital(
                cfg,
                hospital,
                len(data.hospital_data(cfg, hospital)[0][1]),
                weights,
                PrivacyLedger(state_dir, cfg.epsilon, cfg.delta, cfg.adjacency),
                spend,
            )
            for hospital, state_dir in enumerate(homes)
        ]
    return forecast(cfg, plans, weights)
