"""The one-run canary audit (audit.py): a lower bound on how much privacy a training lost.

From what an attacker sees, for the product and for deliberately broken versions of it
(VARIANTS) that the audit must catch, each trained with fresh ledgers in a scratch folder
through the product's own code. Entry points: `run`, `check_settings`, `plot`; the method is
described in docs/how-to/privacy-audit.md.
"""

import functools
import math
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from opacus.optimizers import DPOptimizer
from torch import nn

from securehealth import data, settings
from securehealth.config import Settings
from securehealth.hospital import Hospital
from securehealth.model import build_model, get_weights, set_weights
from securehealth.privacy import dpsgd
from securehealth.privacy.accountant import calibrate_noise_multiplier
from securehealth.privacy.ledger import PrivacyLedger
from securehealth.tools import lower_bounds
from securehealth.tools.canaries import (
    BLACK_BOX_CANARIES,
    CANARIES,
    MAX_CANARIES,
    MIN_CANARIES,
    AuditError,
)
from securehealth.tools.federation import federate

MAX_ROUNDS = 100  # each variant trains every round in this process
CONFIDENCE = 0.95
AUDITED_HOSPITAL = 0
# Large enough that, next to it, the canary row's gradient on the MLP is negligible
# (a ten-thousandth of its norm after clipping).
CANARY_MARK = 1e4
# The grid of dp-accounting's PLDs here (its accountant's default).
PLD_DISCRETIZATION = 1e-4


class CanaryModel(nn.Module):
    """The product's MLP (`body`) plus one weight per white-box canary.

    These are Dirac canaries in gradient space (Steinke, Nasr and Jagielski, section 6). A row
    is a patient's features, then a canary's number and its mark: mark 0 for a patient,
    +-CANARY_MARK for a canary in one version or the other. A canary's weight adds nothing to
    the output (traced minus its detached self) but receives the canary's gradient, which
    clipping turns into max_grad_norm along that weight, whatever the model has learnt.
    """

    def __init__(self, features: int, hidden_layers: tuple[int, ...], canaries: int):
        super().__init__()
        self.features = features
        self.body = build_model(features, hidden_layers)
        self.canary_weights = nn.Embedding(canaries, 1)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """The MLP's logits for the rows' features; the canary weights add nothing to them."""
        number, mark = rows[:, self.features].long(), rows[:, self.features + 1]
        traced = (self.canary_weights(number).squeeze(-1) * mark).unsqueeze(-1)
        return self.body(rows[:, : self.features]) + traced - traced.detach()


@dataclass
class Canaries:
    """The canaries and their secret coins, which the auditor must guess.

    White-box canaries stand for a curious server without SecAgg+, which sees every round's
    update of the audited hospital; black-box ones are records with a chosen diagnosis, for
    anyone holding model.pt (a figure, not part of the verdict).
    """

    white_coins: np.ndarray  # one per white-box canary
    black_coins: np.ndarray  # one per black-box canary
    black_inputs: np.ndarray  # the black-box canaries' features
    black_labels: np.ndarray  # add-remove: the diagnosis each carries when there
    adjacency: str

    @classmethod
    def draw(cls, white: int, black: int, features: np.ndarray, adjacency: str) -> "Canaries":
        """Draw the coins from secret randomness, and the black-box records.

        The records are features of real patients shuffled column by column (plausible
        values, no real patient), with diagnoses by coin.
        """
        rng = np.random.default_rng(dpsgd.secret_seed())
        inputs = np.stack([rng.choice(column, black) for column in features.T], axis=1)
        return cls(
            white_coins=rng.integers(0, 2, white),
            black_coins=rng.integers(0, 2, black),
            black_inputs=inputs.astype(np.float32),
            black_labels=rng.integers(0, 2, black).astype(np.float32),
            adjacency=adjacency,
        )

    @property
    def white(self) -> int:
        """The number of white-box canaries."""
        return len(self.white_coins)

    @staticmethod
    def unmarked(x: np.ndarray) -> np.ndarray:
        """Patients' rows for the canary model: no canary marked."""
        return np.hstack([x, np.zeros((len(x), 2), np.float32)])

    def audited_rows(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The audited hospital's training rows: its patients plus its canaries.

        Under replace-one adjacency a canary is always there, in the version its coin chose
        (opposite gradients; opposite diagnoses), so that the patient count never depends
        on a coin, as the guarantee requires; under add-remove the coin decides whether it
        is there at all.
        """
        replace = self.adjacency == "replace-one"
        white = np.arange(self.white) if replace else np.flatnonzero(self.white_coins == 1)
        sign = 2.0 * self.white_coins[white] - 1 if replace else np.ones(len(white))
        white_rows = np.zeros((len(white), x.shape[1] + 2), np.float32)
        white_rows[:, -2], white_rows[:, -1] = white, CANARY_MARK * sign
        black = np.arange(len(self.black_coins)) if replace else np.flatnonzero(self.black_coins)
        black_y = self.black_coins[black] if replace else self.black_labels[black]
        return (
            np.vstack([self.unmarked(x), white_rows, self.unmarked(self.black_inputs[black])]),
            np.concatenate([y, np.ones(len(white)), black_y]).astype(np.float32),
        )

    @staticmethod
    def white_box_scores(updates: list[np.ndarray]) -> np.ndarray:
        """Each canary's weight summed over the audited hospital's round updates.

        Its clipped gradient pushes it up in the version of coin 1.
        """
        return np.sum(updates, axis=0).reshape(-1)

    def black_box_scores(self, model: CanaryModel) -> np.ndarray:
        """The final model's score for each black-box record.

        Its logit (replace-one: coin 1 is diagnosis 1), or its confidence in the record's own
        diagnosis (add-remove: coin 1 is "trained on").
        """
        model.eval()
        with torch.no_grad():
            logits = model(torch.as_tensor(self.unmarked(self.black_inputs))).squeeze(-1).numpy()
        return logits if self.adjacency == "replace-one" else logits * (2 * self.black_labels - 1)


class _HalfNoiseOptimizer(dpsgd.FiniteDPOptimizer):
    """Broken: adds half the noise it is given."""

    def __init__(self, *args, noise_multiplier, **kwargs):
        super().__init__(*args, noise_multiplier=noise_multiplier / 2, **kwargs)


class _NoiselessOptimizer(dpsgd.FiniteDPOptimizer):
    """Broken: adds no noise."""

    def __init__(self, *args, noise_multiplier, **kwargs):
        super().__init__(*args, noise_multiplier=0.0, **kwargs)


class _OneRoundLedger(PrivacyLedger):
    """Broken: calibrates the noise for one round, every round, composing only that round.

    So each round claims the whole budget.
    """

    def noise_for_round(self, run_id, sample_rate, steps, planned_steps, *limit, **reserve):
        """The noise for one round's steps at the whole budget, the earlier rounds forgotten."""
        self.releases.clear()
        return calibrate_noise_multiplier(
            self.budget, self.delta, sample_rate, steps, self.adjacency
        )


class _ShuffledBatches(dpsgd.PoissonBatches):
    """Broken: each pass is a fresh shuffle cut into batches, not Poisson sampling.

    The batches are of the expected size, every row in exactly one of them.
    """

    def __iter__(self):
        yield from np.array_split(self.random.permutation(self.n), self.steps)


@dataclass(frozen=True)
class Variant:
    """A way of training the audit's federation: the product, or a broken version.

    Each broken version changes one thing inside DP-SGD or its accounting, the settings and
    run files as the product's; they live here only, never behind a setting.
    """

    description: str
    ledger: type[PrivacyLedger] = PrivacyLedger
    optimizer: type[DPOptimizer] = dpsgd.FiniteDPOptimizer
    batches: type[dpsgd.PoissonBatches] = dpsgd.PoissonBatches
    noise_used: float = 1.0  # the share of the recorded noise DP-SGD really adds
    # True: the self-test requires the audit to catch it; None: reported only.
    must_fail: bool | None = True


VARIANTS = {
    "product": Variant("The product as it is", must_fail=False),
    "half-noise": Variant(
        "Broken: half the noise added", optimizer=_HalfNoiseOptimizer, noise_used=0.5
    ),
    "no-noise": Variant("Broken: no noise added", optimizer=_NoiselessOptimizer, noise_used=0),
    "one-round-accounting": Variant(
        "Broken: noise for one round used for all", ledger=_OneRoundLedger
    ),
    "shuffled-batches": Variant(
        "Shuffled fixed batches, not Poisson sampling", batches=_ShuffledBatches, must_fail=None
    ),
}


class AuditedHospital(Hospital):
    """A hospital of the audit's federation, training the canary model as `variant` trains.

    It trains a round as the product does (`Hospital.train_round`: its ledger's noise
    calibration, Opacus DP-SGD, Poisson sampling), sampling at the rate and for the steps of
    its `patients` real patients (the canaries ride along), so that the mechanism audited is
    the hospital's own.
    """

    def __init__(self, hospital, cfg, run_id, state_dir, rows, canaries, variant, patients):
        super().__init__(hospital, cfg, run_id, state_dir, patients=rows)
        self.canaries, self.variant, self.patients = canaries, variant, patients
        self.ledger = variant.ledger(state_dir, cfg.epsilon, cfg.delta, cfg.adjacency)

    @property
    def sampled_patients(self) -> int:
        """The real patients, whose rate and steps the hospital samples at."""
        return self.patients

    def _new_model(self):
        """The canary model, in place of the product's MLP."""
        return CanaryModel(self.x.shape[1] - 2, self.cfg.hidden_layers, self.canaries)

    def _train(self, model, sigma, sampling):
        """DP-SGD with the variant's optimizer and batches."""
        return dpsgd.train_private(
            model,
            self.x,
            self.y,
            self.cfg,
            sigma,
            sampling=sampling,
            optimizer_class=self.variant.optimizer,
            batches_class=self.variant.batches,
        )


def independent_pld(history: list[tuple[float, float, int]], adjacency: str):
    """The privacy loss distribution of (noise_multiplier, sample_rate, steps) releases.

    From dp-accounting directly rather than through the product's accountant; remembered per
    history.
    """
    return _pld(tuple(tuple(release) for release in history), adjacency)


@functools.lru_cache(maxsize=16)
def _pld(history, adjacency):
    """The composed PLD of a history, a tuple so that it can be remembered."""
    from dp_accounting.pld import privacy_loss_distribution
    from dp_accounting.privacy_accountant import NeighboringRelation

    relation = {
        "replace-one": NeighboringRelation.REPLACE_ONE,
        "add-remove": NeighboringRelation.ADD_OR_REMOVE_ONE,
    }[adjacency]
    composed = None
    for sigma, sample_rate, steps in history:
        release = privacy_loss_distribution.from_gaussian_mechanism(
            sigma,
            value_discretization_interval=PLD_DISCRETIZATION,
            sampling_prob=sample_rate,
            neighboring_relation=relation,
        ).self_compose(int(steps))
        composed = release if composed is None else composed.compose(release)
    return composed


@functools.lru_cache(maxsize=16)
def claim_pld(epsilon: float, delta: float, sample_rate: float, steps: int, adjacency: str):
    """The privacy loss distribution a claim stands for, calibrated with dp-accounting.

    DP-SGD at the sample rate and for the steps a hospital released, with the noise that makes
    it exactly (epsilon, delta)-DP, calibrated here with dp-accounting directly (a bug in the
    product's accountant would otherwise shape the claim it is judged by).
    """
    from dp_accounting import dp_event, mechanism_calibration, pld
    from dp_accounting.privacy_accountant import NeighboringRelation

    relation = {
        "replace-one": NeighboringRelation.REPLACE_ONE,
        "add-remove": NeighboringRelation.ADD_OR_REMOVE_ONE,
    }[adjacency]
    sigma = mechanism_calibration.calibrate_dp_mechanism(  # on a coarser grid: 1 s, not 60
        lambda: pld.PLDAccountant(relation, value_discretization_interval=10 * PLD_DISCRETIZATION),
        lambda noise: dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise)), steps
        ),
        epsilon,
        delta,
        mechanism_calibration.LowerEndpointAndGuess(0.05, 1.0),
        tol=1e-3,
    )
    return independent_pld([(sigma, sample_rate, steps)], adjacency)


Patients = list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]


def train_variant(
    cfg: Settings, name: str, canaries: Canaries, patients: Patients, state_root: Path
) -> tuple[dict[str, Any], list[np.ndarray], CanaryModel]:
    """Train the audit's federation as variant `name`.

    Returns
    -------
    facts : dict
        What the audited hospital claims, and what its noise really spent.
    updates : list of np.ndarray
        Its canary weights' update in each round.
    model : CanaryModel
        The final model.

    Raises
    ------
    AuditError
        The audited hospital declined to train in every round.
    """
    variant = VARIANTS[name]
    # The audit is of DP-SGD: its hospitals reserve no operating point, so that their
    # training spends the whole budget (the operating point's histograms are a plain
    # Gaussian mechanism, checked against dp-accounting in tests/test_operating_point).
    cfg = settings.resolve({**vars(cfg), "decision_threshold": "0.5"})
    hospitals = _audit_hospitals(cfg, name, canaries, patients, state_root, variant)
    torch.manual_seed(cfg.seed)  # the server's initial model
    model = CanaryModel(patients[0][0][0].shape[1], cfg.hidden_layers, canaries.white)
    updates, reports = [], []

    def audited_round(weights, server_round):
        new, trained, report = hospitals[AUDITED_HOSPITAL].train_round(weights, server_round)
        updates.append(new[-1] - weights[-1])  # the canary weights' update
        reports.append(report)
        return new, trained

    others = [lambda w, r, h=h: h.train_round(w, r)[:2] for h in hospitals[1:]]
    set_weights(model, federate(get_weights(model), [audited_round, *others], cfg))
    audited = hospitals[AUDITED_HOSPITAL]
    trained = [r for r in reports if r["status"] == "trained"]
    if not trained:
        raise AuditError(
            f"in the audit's {name} training, its hospital {AUDITED_HOSPITAL} "
            f"({audited.patients} patients) declined to train: {reports[0]['reason']}"
        )
    return _facts(cfg, name, variant, audited, trained), updates, model


def _audit_hospitals(cfg, name, canaries, patients, state_root, variant):
    """The audit's hospitals: the audited one with its canaries, the others unmarked."""
    hospitals = []
    for h, ((x, y), (held_x, held_y)) in enumerate(patients):
        train = canaries.audited_rows(x, y) if h == AUDITED_HOSPITAL else (canaries.unmarked(x), y)
        rows = (train, (canaries.unmarked(held_x), held_y))
        hospitals.append(
            AuditedHospital(
                h,
                cfg,
                f"audit-{name}",
                state_root / f"hospital-{h}",
                rows,
                canaries.white,
                variant,
                len(y),
            )
        )
    return hospitals


def _facts(cfg, name, variant, audited, trained):
    """What the audited hospital claims, and the epsilon of the noise it really added."""
    with audited.ledger.transaction():
        sigma = audited.ledger.releases[-1]["noise_multiplier"]  # the same every round
    sample_rate, steps = audited.sampling()
    used = sigma * variant.noise_used
    return {
        "variant": name,
        "description": variant.description,
        "must_fail": variant.must_fail,
        "patients": audited.patients,
        "sample_rate": sample_rate,
        "steps": steps * len(trained),
        "noise_multiplier": used,
        "rounds_trained": len(trained),
        "claimed_epsilon": trained[-1]["epsilon"],
        # Not part of the verdict (an attacker does not know it): the epsilon of the
        # noise really added, had the batches been Poisson-sampled.
        "epsilon_of_noise_used": independent_pld(
            [(used, sample_rate, steps * len(trained))], cfg.adjacency
        ).get_epsilon_for_delta(cfg.delta)
        if used > 0 and variant.batches is dpsgd.PoissonBatches
        else (math.inf if used == 0 else None),
    }


def audit_variant(
    cfg: Settings, name: str, canaries: Canaries, patients: Patients, state_root: Path
) -> dict[str, Any]:
    """Train variant `name` and audit it: its claim, each threat model's bounds, its verdict.

    One test decides, fixed in advance: the white-box canaries' lower bound at CONFIDENCE
    (lower_bounds.GUESS_SHARE of the canaries guessed), by the Gaussian analysis where the
    claim lies within the Gaussian curve at its (epsilon, delta), else by the (epsilon,
    delta) one. The variant passes if that bound is at most its claim.
    """
    facts, updates, model = train_variant(cfg, name, canaries, patients, state_root)
    scores = {
        "white-box": canaries.white_box_scores(updates),
        "black-box": canaries.black_box_scores(model),
    }
    coins = {"white-box": canaries.white_coins, "black-box": canaries.black_coins}
    facts["threat_models"] = {
        threat: {
            "canaries": len(coins[threat]),
            **{
                analysis: lower_bounds.audit_guesses(
                    scores[threat], coins[threat], cfg.delta, CONFIDENCE, analysis
                )
                for analysis in lower_bounds.ANALYSES
            },
        }
        for threat in scores
    }
    # The Gaussian analysis refutes the claim only where what the claim stands for
    # (DP-SGD at the sample rate and steps released, at the claimed epsilon) lies
    # within the Gaussian curve at that (epsilon, delta); elsewhere the (epsilon,
    # delta) analysis decides.
    claimed = claim_pld(  # to 3 decimals: variants claiming 0.9999 and 1 share it (5 s)
        round(facts["claimed_epsilon"], 3),
        cfg.delta,
        facts["sample_rate"],
        facts["steps"],
        cfg.adjacency,
    )
    premise = lower_bounds.gaussian_premise_holds(
        claimed.get_delta_for_epsilon, facts["claimed_epsilon"], cfg.delta
    )
    facts["analysis"] = "gaussian" if premise else "epsilon-delta"
    facts["lower_bound"] = facts["threat_models"]["white-box"][facts["analysis"]]["epsilon"]
    facts["verdict"] = "PASS" if facts["lower_bound"] <= facts["claimed_epsilon"] else "FAIL"
    return facts


def check_settings(cfg: Settings, white: int) -> None:
    """Check that the audit can run with these settings and `white` white-box canaries.

    Raises
    ------
    AuditError
        More than MAX_ROUNDS rounds, or canaries outside MIN_CANARIES to MAX_CANARIES.
    """
    if cfg.rounds > MAX_ROUNDS:
        raise AuditError(
            f"the audit trains every round {len(VARIANTS)} times in this process: use at "
            f"most {MAX_ROUNDS} rounds, not {cfg.rounds}"
        )
    if not MIN_CANARIES <= white <= MAX_CANARIES:
        raise AuditError(f"canaries must be {MIN_CANARIES} to {MAX_CANARIES}, got {white}")


def run(cfg: Settings, white: int = CANARIES, black: int = BLACK_BOX_CANARIES) -> dict[str, Any]:
    """The audit of every variant on the data `cfg` names, with its verdict.

    Parameters
    ----------
    cfg : Settings
        The settings audited: the run's, or the command's.
    white, black : int
        White-box and black-box canaries in the audited hospital.

    Returns
    -------
    dict
        The method, confidence, guess share and settings, each variant's audit
        (`audit_variant`), and the outcome and summary (`verdict`).

    Raises
    ------
    AuditError
        The settings or canaries are out of range, or a variant could not train.
    data.DataError
        A hospital's rows cannot be read.
    """
    check_settings(cfg, white)
    torch.set_num_threads(1)
    patients = [data.hospital_data(cfg, h) for h in range(cfg.num_clients)]
    # The canaries join the audited hospital's rows; the server's cap on one
    # hospital's FedAvg weight must not refuse them (it limits weight, not privacy).
    rows = len(patients[AUDITED_HOSPITAL][0][1]) + white + black
    cfg = settings.resolve({**vars(cfg), "max_patients": max(cfg.max_patients, rows)})
    features = patients[AUDITED_HOSPITAL][0][0]
    canaries = Canaries.draw(white, black, features, cfg.adjacency)
    with tempfile.TemporaryDirectory() as scratch:
        variants = {
            name: audit_variant(cfg, name, canaries, patients, Path(scratch, name))
            for name in VARIANTS
        }
    result = {
        "method": "one-run canary audit (Steinke, Nasr and Jagielski 2023; Gaussian "
        "analysis of Mahloujifar, Melis and Chaudhuri 2025)",
        "confidence": CONFIDENCE,
        "guess_share": lower_bounds.GUESS_SHARE,
        "delta": cfg.delta,
        "adjacency": cfg.adjacency,
        "audited_hospital": AUDITED_HOSPITAL,
        "dataset": cfg.dataset,
        "rounds": cfg.rounds,
        "variants": variants,
    }
    result.update(verdict(variants))
    return result


def verdict(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The audit's outcome, PASS, FAIL or INCONCLUSIVE, and its summary in words.

    PASS if the product's lower bound is at most its claim and every broken variant's is
    above its own; FAIL if the product's is above its claim; INCONCLUSIVE if the audit missed
    a broken variant (too weak to be evidence).
    """
    product = variants["product"]
    missed = [
        v["description"] for v in variants.values() if v["must_fail"] and v["verdict"] == "PASS"
    ]
    bound = (
        f"lower bound {product['lower_bound']:.3g} ({product['analysis']} analysis) at "
        f"{CONFIDENCE:.0%} confidence for a claimed epsilon of "
        f"{product['claimed_epsilon']:.3g}"
    )
    if product["verdict"] == "FAIL":
        outcome, why = "FAIL", f"the canaries refute the product's claim ({bound})"
    elif missed:
        outcome = "INCONCLUSIVE"
        why = (
            f"the product held to its claim ({bound}), but the audit did not catch: "
            f"{'; '.join(missed)}; at these settings it is too weak to be evidence (more "
            f"canaries or rounds make it stronger)"
        )
    else:
        caught = ", ".join(
            f"{v['description'].removeprefix('Broken: ')} {v['lower_bound']:.3g}"
            for v in variants.values()
            if v["must_fail"]
        )
        outcome = "PASS"
        why = f"the product held to its claim ({bound}); the broken variants' bounds: {caught}"
    return {"outcome": outcome, "summary": f"{outcome}: {why}"}


def plot(result: dict[str, Any], path: Path) -> None:
    """Each variant's lower bounds against its claimed (and true) epsilon."""
    figure = Figure(figsize=(9, 4.2), layout="tight")
    axes = figure.subplots()
    names = list(result["variants"])
    positions = np.arange(len(names))
    width = 0.2
    for offset, (threat, analysis, color) in enumerate(
        (
            ("white-box", "gaussian", "C0"),
            ("white-box", "epsilon-delta", "C9"),
            ("black-box", "gaussian", "C1"),
            ("black-box", "epsilon-delta", "C8"),
        )
    ):
        axes.bar(
            positions + (offset - 1.5) * width,
            [result["variants"][n]["threat_models"][threat][analysis]["epsilon"] for n in names],
            width,
            color=color,
            label=f"lower bound, {threat}, {analysis} analysis",
        )
    for i, name in enumerate(names):
        v = result["variants"][name]
        axes.hlines(
            v["claimed_epsilon"],
            i - 0.45,
            i + 0.45,
            colors="black",
            label=None if i else "claimed epsilon",
        )
        if v["epsilon_of_noise_used"] is not None and math.isfinite(v["epsilon_of_noise_used"]):
            axes.hlines(
                v["epsilon_of_noise_used"],
                i - 0.45,
                i + 0.45,
                colors="red",
                linestyles="--",
                label=None if i else "epsilon of the noise used",
            )
    axes.set_xticks(
        positions,
        [textwrap.fill(result["variants"][n]["description"], 24) for n in names],
        fontsize="small",
    )
    axes.set(
        ylabel=f"epsilon (delta {result['delta']:g})",
        title=f"One-run canary audit: lower bounds at {result['confidence']:.0%} confidence",
    )
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.savefig(path, dpi=150)
