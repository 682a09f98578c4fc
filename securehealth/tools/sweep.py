"""The privacy-utility curve (sweep.py), and its accounted search (--search-budget, search.py).

Each point trains the federation in this process, with the real hospitals
(securehealth.hospital.Hospital: Opacus DP-SGD, calibrated noise, privacy ledger) and the
registry's aggregation, in the in-process FedAvg loop (federation.py). Entry point: `main`.
"""

import argparse
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from securehealth import data, display, settings
from securehealth.config import Settings
from securehealth.results import RunDirError, new_run_dir, write_atomic, write_json
from securehealth.tools.search import DEFAULT_GRID

# The training stack (PyTorch, Opacus) and matplotlib are imported where they are
# used, so that --help and a refused command answer at once.


def dp_federation_metrics(cfg: Settings, state_root: Path) -> dict[str, float | None]:
    """The federated DP model's metrics on the reference test set, trained here.

    The hospitals' ledgers go under `state_root`.
    """
    from securehealth.model import clinical_metrics, predict_risk
    from securehealth.tools.federation import dp_federation

    model, threshold = dp_federation(cfg, state_root)
    test_x, test_y, _ = data.reference_test_set(cfg)
    return clinical_metrics(test_y, predict_risk(model, test_x), threshold)


def _mean_std(results, key):
    """The mean and standard deviation of `key` over `results`."""
    values = [r[key] for r in results]
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def plot(sweep: dict[str, Any], path: Path) -> None:
    """Plot each epsilon's scores, with their spread and the references without DP, to `path`."""
    from matplotlib.figure import Figure

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


def table(sweep: dict[str, Any]) -> str:
    """The sweep's markdown table: each epsilon's and reference's ROC-AUC and accuracy."""
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


def main(description: str, argv: list[str] | None = None) -> int:
    """`python sweep.py`: the privacy-utility curve, or the accounted search (--search-budget).

    The curve goes to sweep.json, sweep.png and sweep.md in a new run directory. Returns the
    exit status.
    """
    parser = _parser(description)
    cfg, args = settings.parse(parser, argv, simulation=True)
    epsilons = args.epsilons
    data.locate(cfg)
    if args.search_budget is not None:
        return search_command(cfg, args, parser)
    run_dir = _check_sweep(cfg, args, parser)
    seeds = [cfg.seed + i for i in range(args.seeds)]
    console = display.make_console()
    results, references = _train_points(cfg, epsilons, seeds, console)
    sweep = _summarise(cfg, seeds, results, references)
    _write_sweep(cfg, seeds, sweep, run_dir, console)
    return 0


def _parser(description: str) -> argparse.ArgumentParser:
    """sweep.py's command line: the run's settings and the sweep's own flags."""
    parser = settings.make_parser(description)
    parser.add_argument(
        "--epsilons", type=settings.epsilon_list, default="0.5,1,2,4,8", help="budgets to train at"
    )
    parser.add_argument(
        "--seeds", type=settings.positive_int, default=3, help="seeds to average over"
    )
    parser.add_argument(
        "--search-budget",
        type=settings.positive_float,
        help="instead of the curve, an accounted hyper-parameter search that spends up to "
        "this epsilon of each hospital's lifetime budget (its lasting ledger, on your "
        "own patients) on the --grid's candidates, and says which scored best",
    )
    parser.add_argument(
        "--grid",
        default=DEFAULT_GRID,
        help='the search\'s candidates, e.g. "learning_rate=0.1,0.3 hidden_layers=,16" '
        "(every combination)",
    )
    settings.add_unaccounted_flag(parser)
    return parser


def _check_sweep(cfg: Settings, args: Any, parser: argparse.ArgumentParser) -> Path:
    """The sweep's new run directory, once its settings and data pass (else a usage error)."""
    try:
        settings.check_accounted(
            cfg,
            args.unaccounted_privacy_spend,
            "the sweep (on your own patients, --search-budget is its accounted search)",
        )
        data.check_all(cfg)
        return new_run_dir(cfg.run_dir, "sweep.json", args.overwrite)
    except (settings.SettingsError, data.DataError, RunDirError) as error:
        parser.error(str(error))


def _train_points(cfg, epsilons, seeds, console):
    """Each seed's metrics: per epsilon, and per reference (without DP)."""
    from securehealth.tools import baselines

    results, references = {e: [] for e in epsilons}, {"FedAvg, no DP": [], "Pooled data, no DP": []}
    with Progress(console=console) as progress, tempfile.TemporaryDirectory() as scratch:
        task = progress.add_task("Training", total=len(seeds) * (len(epsilons) + 1))
        for seed in seeds:
            seeded = settings.resolve({**vars(cfg), "seed": seed})
            hospitals, judge = baselines.training_rows_and_judge(seeded)
            references["FedAvg, no DP"].append(judge(baselines.fedavg_no_dp(seeded, hospitals)))
            references["Pooled data, no DP"].append(
                judge(baselines.pooled_no_dp(seeded, hospitals))
            )
            progress.advance(task)
            for epsilon in epsilons:
                point = settings.resolve({**vars(seeded), "epsilon": epsilon})
                state_root = Path(scratch, f"{seed}-{epsilon}")
                results[epsilon].append(dp_federation_metrics(point, state_root))
                progress.advance(task)
    return results, references


def _summarise(cfg, seeds, results, references):
    """What sweep.json holds: each point's and reference's mean and spread over the seeds."""
    return {
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


def _write_sweep(cfg, seeds, sweep, run_dir, console):
    """Write sweep.json, sweep.png and sweep.md, and print the table."""
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


def search_command(cfg: Settings, args: Any, parser: argparse.ArgumentParser) -> int:
    """`--search-budget`: the accounted hyper-parameter search (search.py).

    It pays from the lasting ledgers of your own patients' hospitals (scratch ones for a
    demonstration's), its cost said before it starts, and writes search.json and search.md
    into a new run directory. Returns the exit status.
    """
    from securehealth.tools import search

    console = display.make_console()
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as held:
        candidates, read, homes, lasting, before, run_dir = _prepare_search(
            cfg, args, parser, scratch, held
        )
        console.print(search_cost(cfg, candidates, args.search_budget, before, lasting))
        with Progress(console=console) as progress:
            task = progress.add_task("Searching", total=len(candidates))
            outcome = search.run_search(
                cfg,
                candidates,
                args.search_budget,
                homes,
                lasting,
                [copy for copy, _ in read],
                lambda: progress.advance(task),
            )
    _write_search(cfg, args, before, lasting, outcome, run_dir, console)
    return 0


def _prepare_search(cfg, args, parser, scratch, held):
    """Check the search, and read each hospital's file once (held open by `held`).

    Returns the candidates, the files as read, the ledgers' folders, which ledgers are
    lasting, each hospital's epsilon before the search and the new run directory; any
    problem is a usage error.
    """
    from securehealth.data.demonstration import is_demonstration
    from securehealth.privacy.ledger import LedgerError
    from securehealth.simulated_ledgers import check_lasting_ledgers, state_dirs
    from securehealth.tools import search

    try:
        candidates = search.parse_grid(args.grid, cfg)
        data.check_all(cfg)
        # Each file read once: judged and trained on the same bytes throughout.
        own = [data.own_file(cfg, h) for h in range(cfg.num_clients)]
        read = [held.enter_context(data.read_once(path, cfg)) for path in own]
        demonstrations = [
            is_demonstration(path, content) for path, (_, content) in zip(own, read, strict=True)
        ]
        check_lasting_ledgers(cfg, None, demonstrations)
        homes = [
            home or Path(scratch, f"hospital-{h}")
            for h, home in enumerate(state_dirs(cfg, demonstrations))
        ]
        before = search.spent_before(homes, cfg)
        search.check_affordable(cfg, before, args.search_budget, len(candidates))
        run_dir = new_run_dir(cfg.run_dir, "search.json", args.overwrite)
    except (settings.SettingsError, data.DataError, LedgerError, RunDirError) as error:
        parser.error(str(error))
    lasting = [not demo for demo in demonstrations]
    return candidates, read, homes, lasting, before, run_dir


def _write_search(cfg, args, before, lasting, outcome, run_dir, console):
    """Write search.json and search.md, and print the table."""
    from securehealth.tools import search

    chosen = search.best(outcome.trials)
    result = {
        "config": vars(cfg),
        "search_budget": args.search_budget,
        "epsilon_before": before,
        "epsilon_of_the_search_alone": outcome.epsilon_alone,
        "lasting": lasting,
        "trials": [vars(trial) for trial in outcome.trials],
        "best": None if chosen is None else chosen.changes,
    }
    write_json(run_dir / "search.json", result)
    text = search_table(outcome, chosen)
    write_atomic(run_dir / "search.md", f"# Accounted search: {cfg.dataset}\n\n{text}\n".encode())
    console.print(text)
    console.print(f"Written: {run_dir / 'search.md'}, {run_dir / 'search.json'}")


def search_cost(
    cfg: Settings,
    candidates: list[dict[str, Any]],
    budget: float,
    before: list[float],
    lasting: list[bool],
) -> str:
    """What the search will spend, per hospital, said before it starts."""
    ledgers = [
        f"hospital {h}: {spent:.3f} spent, at most {spent + budget:.3f} after, of "
        f"{cfg.epsilon:g}" + ("" if kept else " (a demonstration: scratch ledger)")
        for h, (spent, kept) in enumerate(zip(before, lasting, strict=True))
    ]
    return (
        f"The search trains {len(candidates)} candidates, each scored from the hospitals' "
        f"DP histograms, and raises each hospital's cumulative epsilon by at most "
        f"{budget:g} ({budget / len(candidates):.3g} a candidate): " + "; ".join(ledgers)
    )


def search_table(outcome: Any, chosen: Any) -> str:
    """The search's table: each candidate's score and epsilons after, and the search's cost.

    The epsilons after are what each hospital's ledger held after the candidate; the cost is
    what the search's releases cost on their own.
    """
    rows = ["| Candidate | Score (DP ROC-AUC) | Epsilon after, per hospital |", "|---|---|---|"]
    for trial in outcome.trials:
        settings_text = " ".join(f"{k}={v}" for k, v in trial.changes.items())
        score = f"n/a ({trial.unscored})" if trial.score is None else f"{trial.score:.3f}"
        spent = ", ".join(f"{e:.3f}" for e in trial.epsilon_after)
        rows.append(
            f"| {settings_text}{' (best)' if trial is chosen else ''} | {score} | {spent} |"
        )
    alone = ", ".join(f"{e:.3f}" for e in outcome.epsilon_alone)
    advice = (
        "No candidate scored better than chance (see why above): give the search more "
        "of the budget, or fewer candidates."
        if chosen is None
        else "Train with: "
        + " ".join(f"--{k.replace('_', '-')} {v or repr('')}" for k, v in chosen.changes.items())
    )
    cost = (
        f"The search's releases on their own: epsilon {alone} per hospital (the ledgers "
        f"compose them with everything else; the table shows the cumulative figures)."
    )
    return "\n".join(rows) + "\n\n" + cost + "\n\n" + advice
