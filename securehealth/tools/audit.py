"""The privacy audit (audit.py): the one-run canary audit (canary_audit.py), on its
own (`--self-test`) or with a finished run's settings, and, for a finished run, the
loss-threshold membership-inference attack (Yeom et al., 2018) on the run's model
and on two models trained here without DP, set beside the most any attack can
achieve at the run's epsilon."""

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from model import build_model, load_model
from securehealth import data, display, settings
from securehealth.privacy import dpsgd
from securehealth.report import (
    AUDIT_FILE,
    AUDIT_PLOT,
    audit_table,
    canary_audit_section,
    write_report,
)
from securehealth.results import (
    METRICS_FILE,
    MODEL_FILE,
    RunDirError,
    finished_run_argument,
    new_run_dir,
    read_json,
    write_atomic,
    write_json,
)
from securehealth.tools import canary_audit

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
    """AUC and best advantage (max TPR - FPR) of the attack: mean and 95% bootstrap
    interval over draws of as many members as non-members (both with replacement)."""
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
    low, high = np.percentile(values, [2.5, 97.5])
    return {"mean": float(np.mean(values)), "low": float(low), "high": float(high)}


def bound(epsilon: float, delta: float) -> dict[str, float]:
    """The most any membership-inference attack can achieve against (epsilon, delta)-
    DP: its ROC curve lies under TPR <= e^eps FPR + delta and
    1 - FPR <= e^eps (1 - TPR) + delta. Returns the largest advantage and AUC."""
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
    """Attack the run's model and the two contrasts."""
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


def run_audit(run_dir: Path, canaries: int = canary_audit.CANARIES) -> dict[str, Any]:
    """The canary audit with the run's settings and the membership-inference attack
    on its model; written to the run's audit.json and plot, and returned."""
    run_dir = Path(run_dir)
    cfg = settings.resolve(read_json(run_dir / METRICS_FILE)["config"])
    result = {
        "canary_audit": canary_audit.run(cfg, canaries),
        "membership_inference": membership_inference(run_dir),
    }
    write_json(run_dir / AUDIT_FILE, result)
    canary_audit.plot(result["canary_audit"], run_dir / AUDIT_PLOT)
    return result


def self_test(description: str, argv: list[str]) -> int:
    """`--self-test`: the canary audit on bundled or generated data, in a new run
    directory (audit.json, audit.md, audit.png); exit 0 only if it passes."""
    parser = settings.make_parser(description)
    _add_audit_flags(parser)
    cfg, args = settings.parse(parser, argv, simulation=True)
    data.locate(cfg)
    try:
        if cfg.dataset == "csv":
            raise settings.SettingsError(
                "the self-test trains on bundled or generated data only: choose another "
                "dataset, or audit a finished csv run with --run-dir"
            )
        canary_audit.check_settings(cfg, args.canaries)
        run_dir = new_run_dir(cfg.run_dir, AUDIT_FILE, args.overwrite)
    except (settings.SettingsError, canary_audit.AuditError, RunDirError) as error:
        parser.error(str(error))
    console = display.make_console()
    try:
        with console.status(
            f"Training the product and {len(canary_audit.VARIANTS) - 1} variants with canaries"
        ):
            result = canary_audit.run(cfg, args.canaries)
    except (canary_audit.AuditError, data.DataError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    write_json(run_dir / AUDIT_FILE, {"canary_audit": result})
    canary_audit.plot(result, run_dir / AUDIT_PLOT)
    page = "\n\n".join(["# Privacy self-test", *canary_audit_section(result)]) + "\n"
    write_atomic(run_dir / "audit.md", page.encode())
    console.print(audit_table(result))
    console.print(result["summary"])
    console.print(f"Table and plot: {run_dir / 'audit.md'}, {run_dir / AUDIT_PLOT}")
    return 0 if result["outcome"] == "PASS" else 1


def _add_audit_flags(parser):
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="audit the product and deliberately broken versions of it on bundled or "
        "generated data; exit 0 only if the audit passes the product and catches each "
        "broken version",
    )
    parser.add_argument(
        "--canaries",
        type=settings.positive_int,
        default=canary_audit.CANARIES,
        help=f"white-box canaries in the audited hospital [default: {canary_audit.CANARIES}]",
    )


def _add_run_audit_flags(parser):
    settings.add_unaccounted_flag(parser)
    _add_audit_flags(parser)


def main(description: str, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--self-test" in argv:
        return self_test(description, argv)
    run_dir, args = finished_run_argument(description, argv, _add_run_audit_flags)
    console = display.make_console()
    try:
        cfg = settings.resolve(read_json(run_dir / METRICS_FILE)["config"])
        settings.check_accounted(cfg, args.unaccounted_privacy_spend, "the audit")
    except settings.SettingsError as error:
        print(f"audit.py: error: {error}", file=sys.stderr)
        return 2
    try:
        with console.status("Auditing: canaries, and membership inference on the model"):
            result = run_audit(run_dir, args.canaries)
    except data.DataError as error:  # e.g. a deployment: the rows stayed home
        print(f"audit.py: error: the audit needs every hospital's rows: {error}", file=sys.stderr)
        return 2
    except canary_audit.AuditError as error:
        print(f"audit.py: error: {error}", file=sys.stderr)
        return 2
    write_report(run_dir)  # again, with the audit in it
    console.print(audit_table(result["canary_audit"]))
    console.print(result["canary_audit"]["summary"])
    console.print(result["membership_inference"]["verdict"])
    return 1 if result["canary_audit"]["outcome"] == "FAIL" else 0
