"""The privacy-utility curve: the federated DP model's ROC-AUC and accuracy on the
server's reference test set at several privacy budgets, averaged over seeds, beside
FedAvg and the pooled model without DP.

    python sweep.py [--epsilons 0.5,1,2,4,8] [--seeds 3] [--name value ...]

Each point trains the federation in this process: the real hospital (client.py's
HospitalClient: Opacus DP-SGD, calibrated noise, privacy ledger) and Flower's own
FedAvg average, without the runtime's processes, which would cost 20 s a point.
Writes sweep.json, sweep.md and sweep.png into a new run directory.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate
from matplotlib.figure import Figure
from rich.progress import Progress

import baselines
import data_utils
import reporting
import settings
from client import HospitalClient
from model import build_model, clinical_metrics, get_weights, predict_risk, set_weights
from results import new_run_dir, write_atomic, write_json


def federate(cfg, state_root):
    """The federated DP model's metrics on the reference test set, trained here."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)  # the server's initial model
    schema = data_utils.load_schema(cfg)
    model = build_model(len(schema.input_names), cfg.hidden_layers)
    weights = get_weights(model)
    hospitals = [
        HospitalClient(h, cfg, "sweep", Path(state_root) / f"hospital-{h}")
        for h in range(cfg.num_clients)
    ]
    for server_round in range(1, cfg.rounds + 1):
        updates = [h.fit(weights, {"server_round": server_round})[:2] for h in hospitals]
        trained = [(w, n) for w, n in updates if n > 0]
        weights = aggregate(trained) if trained else weights
    set_weights(model, weights)
    test_x, test_y, _ = data_utils.reference_test_set(cfg)
    return clinical_metrics(test_y, predict_risk(model, test_x), cfg.decision_threshold)


def _mean_std(results, key):
    values = [r[key] for r in results]
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def plot(sweep, path):
    figure = Figure(figsize=(9.5, 4.5), layout="tight")
    axes = figure.subplots()
    epsilons = [p["epsilon"] for p in sweep["points"]]
    for key, label, color in (("auc", "ROC-AUC", "C0"), ("accuracy", "Accuracy", "C1")):
        axes.errorbar(
            epsilons,
            [p[key]["mean"] for p in sweep["points"]],
            yerr=[p[key]["std"] for p in sweep["points"]],
            marker="o",
            capsize=4,
            color=color,
            label=f"{label}, federated with DP",
        )
        for name, style in (("FedAvg, no DP", ":"), ("Pooled data, no DP", "--")):
            axes.axhline(
                sweep["references"][name][key]["mean"],
                linestyle=style,
                color=color,
                alpha=0.7,
                label=f"{label}, {name}",
            )
    axes.set_xscale("log")
    axes.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    axes.set_xticks([], minor=True)
    axes.set(
        title=f"Privacy against utility ({sweep['dataset']}, mean and spread over "
        f"{sweep['seeds']} seeds)",
        xlabel="Privacy budget epsilon per hospital (delta "
        f"{sweep['delta']:g}; smaller is more private)",
        ylabel="Score on the reference test set (0 to 1)",
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    figure.savefig(path, dpi=150)


def table(sweep):
    rows = ["| Epsilon | ROC-AUC | Accuracy |", "|---|---|---|"]
    for p in sweep["points"]:
        rows.append(
            f"| {p['epsilon']:g} | {p['auc']['mean']:.3f} ± {p['auc']['std']:.3f} | "
            f"{p['accuracy']['mean']:.3f} ± {p['accuracy']['std']:.3f} |"
        )
    for name, r in sweep["references"].items():
        rows.append(
            f"| {name} | {r['auc']['mean']:.3f} ± {r['auc']['std']:.3f} | "
            f"{r['accuracy']['mean']:.3f} ± {r['accuracy']['std']:.3f} |"
        )
    return "\n".join(rows)


def main(argv=None):
    parser = settings.make_parser(__doc__)
    parser.add_argument("--epsilons", default="0.5,1,2,4,8", help="budgets to train at")
    parser.add_argument("--seeds", type=int, default=3, help="seeds to average over")
    settings.add_unaccounted_flag(parser)
    cfg, args = settings.parse(parser, argv, simulation=True)
    try:
        epsilons = sorted(float(e) for e in args.epsilons.split(","))
        if not epsilons or min(epsilons) <= 0 or args.seeds < 1:
            raise ValueError
    except ValueError:
        parser.error("--epsilons needs positive numbers, e.g. 0.5,1,2, and --seeds >= 1")
    if cfg.data_dir:
        cfg.data_dir = str(Path(cfg.data_dir).resolve())
    try:
        settings.check_accounted(cfg, args.unaccounted_privacy_spend, "the sweep")
        data_utils.check_all(cfg)
        run_dir = new_run_dir(cfg.run_dir)
    except (settings.SettingsError, data_utils.DataError, FileExistsError) as error:
        parser.error(str(error))
    seeds = [cfg.seed + i for i in range(args.seeds)]
    console = reporting.make_console()
    results, references = {e: [] for e in epsilons}, {"FedAvg, no DP": [], "Pooled data, no DP": []}
    with Progress(console=console) as progress, tempfile.TemporaryDirectory() as scratch:
        task = progress.add_task("Training", total=len(seeds) * (len(epsilons) + 1))
        for seed in seeds:
            seeded = settings.resolve({**vars(cfg), "seed": seed})
            references["FedAvg, no DP"].append(baselines.fedavg_no_dp(seeded))
            references["Pooled data, no DP"].append(baselines.pooled_no_dp(seeded))
            progress.advance(task)
            for epsilon in epsilons:
                point = settings.resolve({**vars(seeded), "epsilon": epsilon})
                results[epsilon].append(federate(point, Path(scratch, f"{seed}-{epsilon}")))
                progress.advance(task)
    sweep = {
        "dataset": cfg.dataset,
        "delta": cfg.delta,
        "seeds": len(seeds),
        "config": vars(cfg),
        "points": [
            {"epsilon": e, "auc": _mean_std(r, "auc"), "accuracy": _mean_std(r, "accuracy")}
            for e, r in results.items()
        ],
        "references": {
            name: {"auc": _mean_std(r, "auc"), "accuracy": _mean_std(r, "accuracy")}
            for name, r in references.items()
        },
    }
    write_json(run_dir / "sweep.json", sweep)
    plot(sweep, run_dir / "sweep.png")
    write_atomic(
        run_dir / "sweep.md",
        (
            f"# Privacy against utility: {cfg.dataset}\n\n"
            f"Mean ± spread over {len(seeds)} seeds.\n\n"
            f"{table(sweep)}\n\n![Sweep](sweep.png)\n"
        ).encode(),
    )
    console.print(table(sweep))
    console.print(f"Table and plot: {run_dir / 'sweep.md'}, {run_dir / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
