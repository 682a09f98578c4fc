"""The privacy audit of a finished run (audit.py --run-dir): canaries and membership inference.

The one-run canary audit (canary_audit.py) with the run's settings, and the loss-threshold
membership-inference attack (Yeom et al., 2018) on the run's model and on two models trained here
without DP, set beside the most any attack can achieve at the run's epsilon. Entry point:
`run_audit`; the command line is audit_cli.py.
"""

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from securehealth import data, settings
from securehealth.model import build_model, load_model
from securehealth.privacy import dpsgd
from securehealth.report import (
    AUDIT_FILE,
    AUDIT_PLOT,
)
from securehealth.results import (
    METRICS_FILE,
    MODEL_FILE,
    read_json,
    write_json,
)
from securehealth.tools import canary_audit
from securehealth.tools.canaries import CANARIES

REPETITIONS = 200  # bootstrap draws of members and non-members
LONG_TRAINING = 10  # the memorising contrast trains this many times longer


def attack_scores(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The loss-threshold attack's membership score: minus each patient's loss."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x)).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.as_tensor(y), reduction="none"
        )
    return -loss.numpy()


def attack(
    model: torch.nn.Module,
    members: tuple[np.ndarray, np.ndarray],
    non_members: tuple[np.ndarray, np.ndarray],
    repetitions: int = REPETITIONS,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """The loss-threshold attack's AUC and best advantage, with their bootstrap intervals.

    Parameters
    ----------
    model : torch.nn.Module
        The model attacked.
    members, non_members : tuple of (np.ndarray, np.ndarray)
        Features and labels of patients it trained on, and of patients it did not.
    repetitions : int
        Bootstrap draws of as many members as non-members (both with replacement).
    seed : int
        Seed of the draws.

    Returns
    -------
    dict
        "auc" and "advantage" (max TPR - FPR), each the mean over the draws and its 95%
        bootstrap interval ("mean", "low", "high").
    """
    (mx, my), (nx, ny) = members, non_members
    member_scores, other_scores = attack_scores(model, mx, my), attack_scores(model, nx, ny)
    rng = np.random.default_rng(seed)
    n = len(other_scores)
    aucs, advantages = [], []
    for _ in range(repetitions):
        scores = np.concatenate([rng.choice(member_scores, n), rng.choice(other_scores, n)])
        truth = np.r_[np.ones(n), np.zeros(n)]
        false_positive, true_positive, _ = roc_curve(truth, scores)
        aucs.append(roc_auc_score(truth, scores))
        advantages.append(np.max(true_positive - false_positive))
    return {"auc": _summary(aucs), "advantage": _summary(advantages)}


def _summary(values):
    """The mean of `values` and their 95% percentile interval."""
    low, high = np.percentile(values, [2.5, 97.5])
    return {"mean": float(np.mean(values)), "low": float(low), "high": float(high)}


def bound(epsilon: float, delta: float) -> dict[str, float]:
    """The most any membership-inference attack can achieve against (epsilon, delta)-DP.

    Its ROC curve lies under TPR <= e^eps FPR + delta and 1 - FPR <= e^eps (1 - TPR) + delta.

    Returns
    -------
    dict
        "advantage": the largest advantage (TPR - FPR); "auc": the largest ROC-AUC.
    """
    e = math.exp(epsilon)
    false_positive = np.linspace(0, 1, 100_001)
    true_positive = np.minimum.reduce(
        [
            np.ones_like(false_positive),
            e * false_positive + delta,
            1 - (1 - delta - false_positive) / e,
        ]
    )
    return {
        "advantage": (e - 1 + 2 * delta) / (e + 1),
        "auc": float(np.trapezoid(true_positive, false_positive)),
    }


def membership_inference(run_dir: Path) -> dict[str, Any]:
    """Attack the run's model and the two contrasts trained here without DP.

    Parameters
    ----------
    run_dir : Path
        A finished run's directory (its metrics.json and model.pt).

    Returns
    -------
    dict
        The attack, the members and non-members counted, the run's epsilon and delta, the
        bound, each model's results (`attack`) and the verdict in words.
    """
    metrics = read_json(run_dir / METRICS_FILE)
    cfg = settings.resolve(metrics["config"])
    torch.set_num_threads(1)
    hospitals = [data.hospital_data(cfg, h) for h in range(cfg.num_clients)]
    members = tuple(np.concatenate([h[0][i] for h in hospitals]) for i in (0, 1))
    non_members = tuple(np.concatenate([h[1][i] for h in hospitals]) for i in (0, 1))
    epsilon = max(p["epsilon"] for p in metrics["privacy"]["hospitals"].values() if "epsilon" in p)
    delta = metrics["privacy"]["delta"]

    model, _ = load_model(run_dir / MODEL_FILE)
    models = {"Federated, DP (this run)": model}
    for label, epochs in (
        ("Pooled, no DP, same schedule", 1),
        (f"Pooled, no DP, trained {LONG_TRAINING}x longer", LONG_TRAINING),
    ):
        torch.manual_seed(cfg.seed)
        contrast = build_model(members[0].shape[1], cfg.hidden_layers)
        dpsgd.train_plain(contrast, *members, cfg, epochs * cfg.rounds * cfg.local_epochs)
        models[label] = contrast

    result = {
        "attack": "loss threshold (Yeom et al., 2018)",
        "members": len(members[1]),
        "non_members": len(non_members[1]),
        "repetitions": REPETITIONS,
        "epsilon": epsilon,
        "delta": delta,
        "bound": bound(epsilon, delta),
        "models": {name: attack(m, members, non_members) for name, m in models.items()},
    }
    dp = result["models"]["Federated, DP (this run)"]["auc"]
    result["verdict"] = (
        f"The attack reached ROC-AUC {dp['mean']:.3f} (95% interval {dp['low']:.3f} to "
        f"{dp['high']:.3f}; 0.5 is chance) against the DP model. The guarantee the "
        f"hospitals paid for, epsilon {epsilon:.3g} and delta {delta:g}, caps every "
        f"possible attack at ROC-AUC {result['bound']['auc']:.3f} and advantage "
        f"{result['bound']['advantage']:.3f}. "
        + (
            "This attack stayed within the cap, as it must. "
            if dp["high"] <= result["bound"]["auc"]
            else "THIS ATTACK EXCEEDED THE CAP: the accounting or the training is wrong. "
        )
        + "An attack near chance does not prove privacy; the cap is the guarantee."
    )
    return result


def run_audit(run_dir: Path, canaries: int = CANARIES) -> dict[str, Any]:
    """Audit a finished run: the canary audit with its settings, and the attack on its model.

    The result is also written to the run's audit.json, and the canary audit's plot beside it.

    Parameters
    ----------
    run_dir : Path
        The finished run's directory.
    canaries : int
        White-box canaries in the audited hospital.

    Returns
    -------
    dict
        "canary_audit" (canary_audit.run) and "membership_inference" (membership_inference).

    Raises
    ------
    AuditError
        The canary audit cannot run at the run's settings.
    data.DataError
        A hospital's rows cannot be read (in a deployment, they stayed home).
    """
    run_dir = Path(run_dir)
    cfg = settings.resolve(read_json(run_dir / METRICS_FILE)["config"])
    result = {
        "canary_audit": canary_audit.run(cfg, canaries),
        "membership_inference": membership_inference(run_dir),
    }
    write_json(run_dir / AUDIT_FILE, result)
    canary_audit.plot(result["canary_audit"], run_dir / AUDIT_PLOT)
    return result
