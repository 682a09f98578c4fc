"""The one-run canary audit (audit.py): how much privacy a training must at least
have lost, measured with canaries, for the product and for two deliberately broken
versions of it that the audit must catch.

Each variant trains the audit's own federation, on the run's bundled or generated
data, with fresh privacy ledgers in a scratch folder (no real hospital's budget is
touched), through the product's own code: `Hospital.train_round` (its ledger's
noise calibration, Opacus DP-SGD, Poisson sampling). The audited hospital's training
rows get two sets of canaries, each canary's version chosen by a secret fair coin:

- white-box (a curious server without SecAgg+, which sees every round's update of
  the hospital): Dirac canaries in gradient space (Steinke, Nasr and Jagielski,
  section 6). The audit model is the product's MLP plus one weight per canary that
  never changes the model's output; a canary's row marks its own weight, and
  clipping turns its gradient into exactly max_grad_norm along that weight, whatever
  the model has learnt. Scored by the sum over rounds of that weight's updates.
- black-box (anyone holding model.pt): records with a chosen diagnosis, scored by
  the final model's predicted logit for them.

Under replace-one adjacency (the product's default) a canary is always there, in
one of two versions (opposite gradients; opposite diagnoses), so the patient count
never depends on a coin, as the guarantee requires; under add-remove a coin decides
whether it is there at all.

The verdict (`verdict`) rests on whether the guesses refute each claim itself (the
whole privacy curve its ledger accounts for, and its (epsilon, delta); see
lower_bounds.claim_refuted) and on the epsilon of the noise each training really
used, recomputed here with dp-accounting directly; the lower bounds are the figures.

The broken variants live here and in the tests only, never behind a setting:
- no noise: the ledger calibrates and records the noise, but none is added;
- one-round accounting: the noise is calibrated for one round and used for every
  round, and only the latest round is composed, so every round claims the budget.
"""

import functools
import math
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from model import build_model, get_weights, set_weights
from securehealth import data, settings
from securehealth.hospital import Hospital
from securehealth.privacy import dpsgd
from securehealth.privacy.accountant import calibrate_noise_multiplier
from securehealth.privacy.ledger import PrivacyLedger
from securehealth.tools import lower_bounds
from securehealth.tools.federation import federate

CANARIES = 2000  # white-box canaries; the audit's power grows with them
MIN_CANARIES, MAX_CANARIES = 10, 5000  # the rows are dense: 5000 take ~0.3 GB
MAX_ROUNDS = 100  # each variant trains every round in this process
BLACK_BOX_CANARIES = 100  # records: each one more also changes the model itself
CONFIDENCE = 0.95
AUDITED_HOSPITAL = 0
# The product's claim may be this much (relatively) below the epsilon recomputed here:
# its own accountant's grid differs.
ACCOUNTING_TOLERANCE = 0.01
# Far enough above its claim that the audit plainly sees a training without noise.
FAR_ABOVE = 3.0
# Where the claimed privacy curve is evaluated (delta is below 1e-15 beyond), and
# the PLD's grid (pessimistic: a coarser one only makes the claim look weaker).
PROFILE_EPSILONS = np.linspace(0, 20, 401)
PLD_DISCRETIZATION = 1e-3
# Large enough that, next to it, the canary row's gradient on the MLP is negligible
# (a ten-thousandth of its norm after clipping).
CANARY_MARK = 1e4


class AuditError(Exception):
    """The audit cannot run at these settings; the message says why."""


class CanaryModel(nn.Module):
    """The product's MLP (`body`) plus one weight per white-box canary. A row's last
    `canaries` columns are zero for a patient and mark one canary's weight for a
    canary row. The canary weights add nothing to the output (traced minus its
    detached self) but receive the canary's gradient."""

    def __init__(self, features: int, hidden_layers: tuple[int, ...], canaries: int):
        super().__init__()
        self.features = features
        self.body = build_model(features, hidden_layers)
        self.canary_weights = nn.Linear(canaries, 1, bias=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        traced = self.canary_weights(rows[:, self.features :])
        return self.body(rows[:, : self.features]) + traced - traced.detach()


@dataclass
class Canaries:
    """The canaries and their secret coins, which the auditor must guess."""

    white_coins: np.ndarray  # one per white-box canary
    black_coins: np.ndarray  # one per black-box canary
    black_inputs: np.ndarray  # the black-box canaries' features
    black_labels: np.ndarray  # add-remove: the diagnosis each carries when there
    adjacency: str

    @classmethod
    def draw(
        cls, white: int, black: int, features: np.ndarray, adjacency: str, seed: int
    ) -> "Canaries":
        """Coins and black-box records: features of real patients, shuffled column
        by column (plausible values, no real patient), with diagnoses by coin."""
        rng = np.random.default_rng(seed)
        inputs = np.stack([rng.choice(column, black) for column in features.T], axis=1).astype(
            np.float32
        )
        return cls(
            white_coins=rng.integers(0, 2, white),
            black_coins=rng.integers(0, 2, black),
            black_inputs=inputs,
            black_labels=rng.integers(0, 2, black).astype(np.float32),
            adjacency=adjacency,
        )

    @property
    def white(self) -> int:
        return len(self.white_coins)

    def unmarked(self, x: np.ndarray) -> np.ndarray:
        """Patients' rows for the canary model: no canary marked."""
        return np.hstack([x, np.zeros((len(x), self.white), np.float32)])

    def audited_rows(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The audited hospital's training rows: its patients plus its canaries in the
        versions the coins chose."""
        replace = self.adjacency == "replace-one"
        white = np.flatnonzero(self.white_coins == 1) if not replace else np.arange(self.white)
        sign = 2.0 * self.white_coins[white] - 1 if replace else np.ones(len(white))
        white_rows = np.zeros((len(white), x.shape[1] + self.white), np.float32)
        white_rows[np.arange(len(white)), x.shape[1] + white] = CANARY_MARK * sign
        black = np.arange(len(self.black_coins)) if replace else np.flatnonzero(self.black_coins)
        black_y = self.black_coins[black] if replace else self.black_labels[black]
        return (
            np.vstack([self.unmarked(x), white_rows, self.unmarked(self.black_inputs[black])]),
            np.concatenate([y, np.ones(len(white)), black_y]).astype(np.float32),
        )

    def white_box_scores(self, updates: list[np.ndarray]) -> np.ndarray:
        """Each canary's weight summed over the audited hospital's round updates: its
        clipped gradient pushes it up in the version of coin 1."""
        return np.sum(updates, axis=0).reshape(-1)

    def black_box_scores(self, model: CanaryModel) -> np.ndarray:
        """The final model's logit for each record (replace-one: coin 1 is diagnosis
        1), or its confidence in the record's own diagnosis (add-remove: coin 1 is
        "trained on")."""
        model.eval()
        with torch.no_grad():
            logits = model(torch.as_tensor(self.unmarked(self.black_inputs))).squeeze(-1).numpy()
        return logits if self.adjacency == "replace-one" else logits * (2 * self.black_labels - 1)


class _NoiselessLedger(PrivacyLedger):
    """Broken (b): calibrates and records the noise as usual, and adds none."""

    def noise_for_round(self, *args, **kwargs):
        self.accounted = super().noise_for_round(*args, **kwargs)
        return 0.0

    def record(self, run_id, server_round, noise_multiplier, sample_rate, steps):
        super().record(run_id, server_round, self.accounted, sample_rate, steps)


class _OneRoundLedger(PrivacyLedger):
    """Broken (c): calibrates the noise for one round, every round, and composes
    only the round at hand, so each round claims the whole budget."""

    def noise_for_round(self, run_id, sample_rate, steps, planned_steps, *limit):
        self.releases.clear()
        return calibrate_noise_multiplier(
            self.budget, self.delta, sample_rate, steps, self.adjacency
        )


# name: (what it is, its ledger, whether the noise it accounts is really added)
VARIANTS = {
    "product": ("The product as it is", PrivacyLedger, True),
    "no-noise": ("Broken: no noise added", _NoiselessLedger, False),
    "one-round-accounting": ("Broken: noise for one round used for all", _OneRoundLedger, True),
}


class AuditedHospital(Hospital):
    """A hospital of the audit's federation: the product's training of a round, on
    the canary model, accounted in `ledger_class`."""

    def __init__(self, hospital, cfg, run_id, state_dir, patients, canaries, ledger_class):
        super().__init__(hospital, cfg, run_id, state_dir, patients=patients)
        self.canaries = canaries
        self.ledger = ledger_class(state_dir, cfg.epsilon, cfg.delta, cfg.adjacency)

    def _model(self, parameters):
        model = CanaryModel(self.x.shape[1] - self.canaries, self.cfg.hidden_layers, self.canaries)
        set_weights(model, parameters)
        return model


def independent_pld(history: list[tuple[float, float, int]], adjacency: str):
    """The privacy loss distribution of (noise_multiplier, sample_rate, steps)
    releases, computed from dp-accounting directly rather than through the product's
    accountant, so that a bug there cannot hide here. Remembered: the product's noise
    used and its accounted releases are the same history (0.75 s each)."""
    return _pld(tuple(tuple(release) for release in history), adjacency)


@functools.lru_cache(maxsize=16)
def _pld(history, adjacency):
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


def train_variant(
    cfg: SimpleNamespace,
    variant: str,
    canaries: Canaries,
    patients: list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]],
    state_root: Path,
) -> tuple[dict[str, Any], list[np.ndarray], CanaryModel]:
    """Train the audit's federation as `variant`: (what the audited hospital claims
    and really spent, its canary weights' update in each round, the final model)."""
    _, ledger_class, adds_noise = VARIANTS[variant]
    rows = []
    for h, ((x, y), (held_x, held_y)) in enumerate(patients):
        train = canaries.audited_rows(x, y) if h == AUDITED_HOSPITAL else (canaries.unmarked(x), y)
        rows.append((train, (canaries.unmarked(held_x), held_y)))
    hospitals = [
        AuditedHospital(
            h,
            cfg,
            f"audit-{variant}",
            state_root / f"hospital-{h}",
            r,
            canaries.white,
            ledger_class,
        )
        for h, r in enumerate(rows)
    ]
    torch.manual_seed(cfg.seed)  # the server's initial model
    model = CanaryModel(patients[0][0][0].shape[1], cfg.hidden_layers, canaries.white)
    updates, reports = [], []

    def audited_round(weights, server_round):
        new, trained, report = hospitals[AUDITED_HOSPITAL].train_round(weights, server_round)
        updates.append(new[-1] - weights[-1])  # the canary weights' update
        reports.append(report)
        return new, trained

    others = [lambda w, r, h=h: h.train_round(w, r)[:2] for h in hospitals[1:]]
    set_weights(
        model, federate(get_weights(model), [audited_round, *others], cfg.rounds, cfg.aggregation)
    )
    audited = hospitals[AUDITED_HOSPITAL]
    n = len(audited.y)
    trained = [r for r in reports if r["status"] == "trained"]
    if not trained:
        raise AuditError(
            f"in the audit's {variant} training, its hospital {AUDITED_HOSPITAL} ({n} rows: "
            f"patients and canaries) declined to train: {reports[0]['reason']}"
        )
    last = trained[-1]
    with audited.ledger.transaction():
        accounted = audited.ledger.history
        sigma = audited.ledger.releases[-1]["noise_multiplier"]  # the same every round
    sample_rate, steps = dpsgd.sample_rate_and_steps(n, cfg)
    used = [(sigma, sample_rate, steps * len(trained))] if adds_noise else []
    facts = {
        "variant": variant,
        "description": VARIANTS[variant][0],
        "patients": n,
        "noise_multiplier": sigma if adds_noise else 0.0,
        "rounds_trained": len(trained),
        "claimed_epsilon": last["epsilon"],
        # Recomputed here, not by the product's accountant, from the noise handed to
        # DP-SGD: a bug in the accounting shows as a claim below it; one inside the
        # training, only in the lower bounds.
        "epsilon_of_noise_used": independent_pld(used, cfg.adjacency).get_epsilon_for_delta(
            cfg.delta
        )
        if used
        else math.inf,
        "accounted": accounted,
    }
    return facts, updates, model


def audit_variant(
    cfg: SimpleNamespace,
    variant: str,
    canaries: Canaries,
    patients: list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]],
    state_root: Path,
) -> dict[str, Any]:
    """Train `variant` and audit it: its claims and each threat model's lower bounds."""
    facts, updates, model = train_variant(cfg, variant, canaries, patients, state_root)
    scores = {
        "white-box": canaries.white_box_scores(updates),
        "black-box": canaries.black_box_scores(model),
    }
    coins = {"white-box": canaries.white_coins, "black-box": canaries.black_coins}
    accounted = independent_pld(facts["accounted"], cfg.adjacency)
    claimed_curve = lower_bounds.profile_tradeoff(
        PROFILE_EPSILONS, accounted.get_delta_for_epsilon(list(PROFILE_EPSILONS))
    )
    # The verdict tests the claim once per threat model: each at half the risk.
    each = 1 - (1 - CONFIDENCE) / len(scores)
    facts["threat_models"] = {
        threat: {
            "canaries": len(coins[threat]),
            **{
                analysis: lower_bounds.audit_guesses(
                    scores[threat], coins[threat], cfg.delta, CONFIDENCE, analysis
                )
                for analysis in lower_bounds.ANALYSES
            },
            "claim_refuted": lower_bounds.claim_refuted(
                scores[threat],
                coins[threat],
                claimed_curve,
                facts["claimed_epsilon"],
                cfg.delta,
                each,
            ),
        }
        for threat in scores
    }
    return facts


def check_settings(cfg: SimpleNamespace, white: int) -> None:
    """AuditError unless the audit can run with these settings and canaries."""
    if cfg.rounds > MAX_ROUNDS:
        raise AuditError(
            f"the audit trains every round three times in this process: use at most "
            f"{MAX_ROUNDS} rounds, not {cfg.rounds}"
        )
    if not MIN_CANARIES <= white <= MAX_CANARIES:
        raise AuditError(f"canaries must be {MIN_CANARIES} to {MAX_CANARIES}, got {white}")


def run(
    cfg: SimpleNamespace, white: int = CANARIES, black: int = BLACK_BOX_CANARIES
) -> dict[str, Any]:
    """The audit of all three variants on the data `cfg` names, with its verdict."""
    check_settings(cfg, white)
    torch.set_num_threads(1)
    patients = [data.hospital_data(cfg, h) for h in range(cfg.num_clients)]
    # The canaries join the audited hospital's rows; the server's cap on one
    # hospital's FedAvg weight must not refuse them (it limits weight, not privacy).
    rows = len(patients[AUDITED_HOSPITAL][0][1]) + white + black
    cfg = settings.resolve({**vars(cfg), "max_patients": max(cfg.max_patients, rows)})
    features = patients[AUDITED_HOSPITAL][0][0]
    canaries = Canaries.draw(white, black, features, cfg.adjacency, cfg.seed)
    with tempfile.TemporaryDirectory() as scratch:
        variants = {
            name: audit_variant(cfg, name, canaries, patients, Path(scratch, name))
            for name in VARIANTS
        }
    result = {
        "method": "one-run canary audit (Steinke, Nasr and Jagielski 2023; Gaussian "
        "analysis of Mahloujifar, Melis and Chaudhuri 2025)",
        "confidence": CONFIDENCE,
        "delta": cfg.delta,
        "adjacency": cfg.adjacency,
        "audited_hospital": AUDITED_HOSPITAL,
        "dataset": cfg.dataset,
        "rounds": cfg.rounds,
        "variants": variants,
    }
    result.update(verdict(variants))
    return result


def headline(variant: dict[str, Any], threat: str = "white-box") -> float:
    """The tighter (Gaussian) lower bound of `threat`."""
    return variant["threat_models"][threat]["gaussian"]["epsilon"]


def _refuted(variant, threat):
    return variant["threat_models"][threat]["claim_refuted"]["refuted"]


def verdict(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """PASS if no threat model refutes the product's claim and its claim is that of
    the noise it used, while the white-box canaries refute the broken accounting's
    claim (its lower bound above it) and the noiseless training's (lower bound at
    least FAR_ABOVE times it); FAIL if the product's claim is refuted or below its
    noise's epsilon; INCONCLUSIVE if the audit missed a broken variant."""
    product, broken, noiseless = (
        variants[v] for v in ("product", "one-round-accounting", "no-noise")
    )
    checks = {
        "product_within_claim": not any(_refuted(product, t) for t in product["threat_models"]),
        "product_accounting_matches_noise": product["claimed_epsilon"]
        >= product["epsilon_of_noise_used"] * (1 - ACCOUNTING_TOLERANCE),
        "broken_accounting_caught": _refuted(broken, "white-box")
        and headline(broken) > broken["claimed_epsilon"],
        "no_noise_far_above": _refuted(noiseless, "white-box")
        and headline(noiseless) >= FAR_ABOVE * noiseless["claimed_epsilon"],
    }
    if not checks["product_within_claim"]:
        outcome = "FAIL"
        why = (
            f"the canaries refute the product's claim (epsilon "
            f"{product['claimed_epsilon']:.3g}; lower bound {headline(product):.3g}): the "
            f"training or its accounting is wrong"
        )
    elif not checks["product_accounting_matches_noise"]:
        outcome = "FAIL"
        why = (
            f"the product claims epsilon {product['claimed_epsilon']:.3g}, but the noise it "
            f"trained with spends {product['epsilon_of_noise_used']:.3g}: its accounting is "
            f"wrong"
        )
    elif not all(checks.values()):
        outcome = "INCONCLUSIVE"
        missed = [
            what
            for key, what in (
                ("broken_accounting_caught", "the broken accounting"),
                ("no_noise_far_above", "the training without noise"),
            )
            if not checks[key]
        ]
        why = (
            f"the product held to its claim, but the audit did not catch "
            f"{' or '.join(missed)}: at these settings it is too weak to be evidence "
            f"(more canaries or rounds, or a smaller epsilon, make it stronger)"
        )
    else:
        outcome = "PASS"
        why = (
            f"the canaries do not refute the product's claim of epsilon "
            f"{product['claimed_epsilon']:.3g} (its Gaussian lower bound "
            f"{headline(product):.3g}); they refute the broken accounting's claim of "
            f"{broken['claimed_epsilon']:.3g} (lower bound {headline(broken):.3g}) and the "
            f"noiseless training's (lower bound {headline(noiseless):.3g})"
        )
    return {"checks": checks, "outcome": outcome, "summary": f"{outcome}: {why}"}


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
        if math.isfinite(v["epsilon_of_noise_used"]):
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
