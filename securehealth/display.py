"""What a person sees: a line per round while a run trains, and the closing summary.

`follow` shows the rounds as the server records them; `print_summary` prints the global
test metrics and every hospital's privacy spending against its budget; `print_plan`
prints what a run would spend. report.md shares the text and table helpers.
"""

import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from securehealth.config import Settings
from securehealth.results import METRICS_FILE, RunStatus, read_json

if TYPE_CHECKING:
    from securehealth.forecast import Forecast


def markdown_table(rows: list[list[Any]]) -> str:
    """Return a Markdown table of `rows`, the header first (report.md, the benchmarks)."""
    header, *body = rows
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(_cell, row)) + " |" for row in body])


def _cell(value: Any) -> str:
    """A table cell's text, kept to its cell: a "|" escaped, line breaks as spaces.

    Names come from data dictionaries, so they may hold either.
    """
    return " ".join(str(value).split()).replace("|", "\\|")


def make_console() -> Console:
    """Where launchers print; to a file or pipe with room for the tables."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


PRIVACY_COLUMNS = (
    "Hospital",
    "Training patients",
    "Epsilon spent",
    "Budget",
    "Delta",
    "Noise multiplier",
    "Sample rate",
    "Steps (run)",
    "Last release",
)


def privacy_title(privacy: dict[str, Any]) -> str:
    """Return the privacy table's title: the adjacency its epsilons hold for, and the accountant."""
    return (
        f"Privacy spent per hospital ({privacy['adjacency']} adjacency; "
        f"dp-accounting's {str(privacy['accountant']).upper()} accountant)"
    )


def guarantee_text(privacy: dict[str, Any]) -> str:
    """The guarantee in words, for the summary and report.md."""
    meaning = {
        "replace-one": "replacing any one patient's record by any other record changes "
        "the probability of anything the hospital released by at most a factor e^epsilon "
        "(its patient count is released, so this is the relation that holds)",
        "add-remove": "adding or removing any one patient changes the probability of "
        "anything the hospital released by at most a factor e^epsilon; this assumes the "
        "hospital's patient count is public knowledge, since it is released",
    }
    return (
        f"Each hospital's training patients are protected by record-level (epsilon, "
        f"delta)-differential privacy, epsilon as in the table and delta "
        f"{privacy['delta']:g}, cumulative over every round of every run on them: "
        f"{meaning.get(privacy['adjacency'], 'see each hospital for its adjacency')}, "
        f"except with probability delta."
    )


def privacy_cells(hospital: str, p: dict[str, Any]) -> list[str]:
    """Return one hospital's row of the privacy table (summary and report.md), as text.

    Parameters
    ----------
    hospital : str
        The hospital's name, shown in the first column.
    p : dict
        The hospital's entry in metrics.json's `privacy.hospitals`.

    Returns
    -------
    list of str
        One cell per column of PRIVACY_COLUMNS; dashes for a hospital that never reported.
    """
    if "epsilon" not in p:
        return [hospital, *["-"] * 7, p["status"]]
    return [
        hospital,
        str(p["patients"]),
        f"{p['epsilon']:.4f}",
        f"{p['epsilon_budget']:g}",
        f"{p['delta']:g}",
        f"{p['noise_multiplier']:.4f}",
        f"{p['sample_rate']:.4f}",
        str(p["steps"]),
        p["status"],
    ]


def round_line(record: dict[str, Any], cfg: Settings) -> str:
    """Return one round's line (Rich markup), for the console while a run trains.

    The global metrics, the largest epsilon spent (against that hospital's own budget),
    and any hospital that declined or failed, with its reason, on lines of their own.

    Parameters
    ----------
    record : dict
        One entry of metrics.json's `rounds`.
    cfg : Settings
        The run's settings (`rounds` and `num_clients` are read).

    Returns
    -------
    str
        The line, with Rich markup; data from the hospitals is escaped.
    """
    g = record["global"]
    line = (
        f"Round {record['round']:>3}/{cfg.rounds}  AUC {g['auc']:.3f}  accuracy {g['accuracy']:.3f}"
    )
    if record["hospitals"]:
        top = max(record["hospitals"].values(), key=lambda h: h["epsilon"])
        line += f"  max epsilon {top['epsilon']:.3f} / {top['epsilon_budget']:g}"
    trained = record["hospitals_trained"]
    if trained < cfg.num_clients:
        line += f"  [yellow]({trained}/{cfg.num_clients} hospitals trained)[/]"
    for hospital, report in record["hospitals"].items():
        if report["status"] != "trained":
            line += f"\n  [yellow]hospital {hospital} declined:[/] {escape(report['reason'])}"
    for reason in record["failures"]:
        line += f"\n  [red]a hospital failed:[/] {escape(reason)}"
    for rejection in record.get("rejected", []):
        line += (
            f"\n  [red]hospital {rejection['hospital']}'s update rejected:[/] "
            f"{escape(rejection['reason'])}"
        )
    if record.get("discarded"):
        line += f"\n  [red]round discarded, budgets spent:[/] {escape(record['discarded'])}"
    return line


def idle_rounds(metrics: dict[str, Any]) -> list[int]:
    """Return the rounds in which no hospital trained, so the global model did not change.

    Discarded rounds, in which the hospitals did train, are reported apart.
    """
    return [
        r["round"]
        for r in metrics["rounds"]
        if r["hospitals_trained"] == 0 and not r.get("discarded")
    ]


def shortfalls(metrics: dict[str, Any]) -> list[str]:
    """Return what went wrong in a finished run, in words (empty if nothing did)."""
    failed = [r["round"] for r in metrics["rounds"] if r["failures"]]
    rejected = [r["round"] for r in metrics["rounds"] if r.get("rejected")]
    discarded = [r["round"] for r in metrics["rounds"] if r.get("discarded")]
    found = []
    if metrics.get("refused_nodes"):
        nodes = ", ".join(f"node {n['node']} ({n['reason']})" for n in metrics["refused_nodes"])
        found.append(f"nodes that were not admitted as hospitals: {nodes}")
    if discarded:
        found.append(
            f"rounds {discarded} were discarded after the hospitals trained: their model "
            f"was not used, yet the hospitals' ledgers count them as spent"
        )
    if failed:
        found.append(f"hospitals failed in rounds {failed}: the model was averaged without them")
    if rejected:
        found.append(
            f"updates were rejected in rounds {rejected}: the model was averaged without them"
        )
    for hospital, p in (metrics.get("privacy") or {}).get("hospitals", {}).items():
        if p.get("ledger_reset"):
            found.append(f"hospital {hospital}: {p['ledger_reset']}")
    if idle_rounds(metrics):
        found.append(
            f"no hospital trained in rounds {idle_rounds(metrics)}: the model did not change"
        )
    return found


def follow(
    process: subprocess.Popen[bytes], run_dir: Path, cfg: Settings, console: Console
) -> dict[str, Any] | None:
    """Show each round as the server records it, until the run has finished or `process` ended.

    The run has finished once its results are complete; Flower's shutdown need not be
    waited for.

    Parameters
    ----------
    process : subprocess.Popen
        The running simulation or server.
    run_dir : Path
        The run directory, whose metrics.json is read as the server rewrites it.
    cfg : Settings
        The run's settings (`rounds` and `num_clients` are read).
    console : Console
        Where the rounds and the progress bar are shown.

    Returns
    -------
    dict or None
        The last metrics.json read; None if the server never wrote one.
    """
    path = run_dir / METRICS_FILE
    metrics, shown = None, 0
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("Starting Flower (SuperLink, Ray)", total=cfg.rounds)
        while True:
            finished = process.poll() is not None
            if path.exists():
                metrics = read_json(path)
                for record in metrics["rounds"][shown:]:
                    progress.console.print(round_line(record, cfg))
                shown = len(metrics["rounds"])
                connected = metrics["hospitals_connected"]
                waiting = f"Waiting for hospitals: {connected}/{cfg.num_clients} admitted"
                description = "Federated training" if connected == cfg.num_clients else waiting
                progress.update(task, completed=shown, description=description)
            if finished or (metrics and metrics["status"] != RunStatus.RUNNING):
                return metrics
            time.sleep(0.2)


# Clinical metrics in the order clinicians read them: (key, column title).
METRICS = (
    ("auc", "AUC"),
    ("accuracy", "Accuracy"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("precision", "Precision"),
    ("f1", "F1"),
    ("brier", "Brier"),
)


def plan_table(outlook: "Forecast") -> Table:
    """Return a table of what each hospital would train with and spend (simulation.py --plan)."""
    table = Table(title="What each hospital would train with and spend (nothing is spent)")
    for column in (
        "Hospital",
        "Patients",
        "Sample rate",
        "Steps/round",
        "Noise",
        "Spent before",
        "This run spends",
    ):
        table.add_column(column, justify="right")
    for plan in outlook.plans:
        trains = plan.noise_multiplier is not None
        table.add_row(
            str(plan.hospital),
            str(plan.patients),
            f"{plan.sample_rate:.3f}",
            str(plan.steps_per_round),
            f"{plan.noise_multiplier:.3f}" if trains else "-",
            f"{plan.epsilon_spent:.3f} / {plan.budget:g}",
            f"{plan.epsilon_after - plan.epsilon_spent:.3f}" if trains else "nothing",
        )
    return table


def print_plan(cfg: Settings, outlook: "Forecast", ledgers: Path | None, console: Console) -> None:
    """Print what a run would train with and spend per hospital (simulation.py --plan).

    The forecast's warning, if any, is printed above it.

    Parameters
    ----------
    cfg : Settings
        The run's settings.
    outlook : Forecast
        The forecast of each hospital's training and spending.
    ledgers : Path or None
        The folder of the hospitals' lasting ledgers, or None where each run starts
        them afresh (a demonstration).
    console : Console
        Where the plan is printed.
    """
    from securehealth.forecast import NOISE_TO_SIGNAL_LIMIT, SPENT_BUDGET_ADVICE

    console.print(
        f"Plan: {cfg.num_clients} hospitals, {cfg.rounds} rounds, epsilon budget "
        f"{cfg.epsilon:g} per hospital (delta {cfg.delta:g}, {cfg.adjacency})"
    )
    console.print(plan_table(outlook))
    lines = ["Noise: the multiplier of each step's noise."]
    if ledgers is not None:
        lines.append(
            f"Ledgers in {ledgers}: a run's noise is calibrated to spend all that is left "
            f"of each budget (the operating point's release included), "
            + (
                "so after it no further run can train on these patients."
                if all(plan.empties_budget for plan in outlook.plans)
                else "down to the least noise calibration goes to: a hospital whose run "
                "spends less than what is left keeps the rest for a later run."
            )
        )
        if any(plan.budget_spent for plan in outlook.plans):
            lines.append(SPENT_BUDGET_ADVICE + ".")
    else:
        lines.append(
            "Demonstration data (generated, or shipped with this code, by its "
            "fingerprint): every run's hospitals start with fresh ledgers in its run "
            "directory, and nothing lasting is spent."
        )
    if outlook.training == 0:
        lines.append("A run with these settings would be refused: no hospital can train.")
    elif outlook.warning is None:
        lines.append(
            f"Forecast: the DP noise is {outlook.noise_to_signal:.3f} of the largest signal, "
            f"at most {NOISE_TO_SIGNAL_LIMIT:g}: a useful model is forecast."
        )
    console.print(escape(" ".join(lines)), soft_wrap=True)


def fmt(value: float | None) -> str:
    """A metric to three decimals, or "n/a" where there is none."""
    return "n/a" if value is None else f"{value:.3f}"


def metrics_text(metrics: dict[str, Any]) -> str:
    """Return one line of clinical metrics, e.g. for a hospital's own evaluation."""
    return ", ".join(f"{title} {fmt(metrics[key])}" for key, title in METRICS)


def metrics_table(title: str, rows: Iterable[tuple[str, dict[str, Any]]]) -> Table:
    """Return a table of clinical metrics, one row per (label, metrics)."""
    table = Table(title=title)
    table.add_column("Model", justify="left")
    for _, name in METRICS:
        table.add_column(name, justify="right")
    for label, values in rows:
        table.add_row(label, *(fmt(values[key]) for key, _ in METRICS))
    return table


def operating_point_text(metrics: dict[str, Any]) -> str:
    """Return how the run's decision threshold was chosen, and what it does on the reference set.

    The confusion counts, the prevalence and the majority-class baseline, in words.
    """
    final, point = metrics["final"]["global"], metrics.get("operating_point")
    if point is None:
        how = "fixed by the decision_threshold setting"
    elif point["chosen"]:
        how = (
            f"chosen for the {point['target']} from {point['histograms']} hospitals' "
            f"DP score histograms"
        )
    else:
        how = f"provisional: {point['reason']}"
    patients = final["true_positives"] + final["false_negatives"]
    return (
        f"Decision threshold {final['threshold']:.3g} ({how}). On the reference set: "
        f"{final['true_positives']} of {patients} sick patients found, "
        f"{final['false_positives']} false alarms among "
        f"{final['false_positives'] + final['true_negatives']} healthy ones; prevalence "
        f"{final['prevalence']:.1%}, so calling everyone "
        f"{'healthy' if final['prevalence'] < 0.5 else 'sick'} would be "
        f"{max(final['prevalence'], 1 - final['prevalence']):.1%} accurate."
    )


def print_summary(metrics: dict[str, Any], run_dir: str, console: Console | None = None) -> None:
    """Print a finished run's closing summary: its metrics, privacy spending and warnings.

    Parameters
    ----------
    metrics : dict
        The run's metrics.json.
    run_dir : str
        The run directory, named as where the results and report.md are.
    console : Console, optional
        Where to print; a new Console if not given.
    """
    console = console or Console()
    final, privacy, data = metrics["final"]["global"], metrics["privacy"], metrics["data"]
    console.print(
        metrics_table(
            f"Global model on the server's reference test set ({data['test_patients']} "
            f"patients; decision threshold {final['threshold']:.3g})",
            [("Federated, DP", final), *metrics.get("baselines", {}).items()],
        )
    )
    console.print(escape(operating_point_text(metrics)))
    gaps = [g["subgroup"] for g in final.get("subgroups", []) if g["gaps"]]
    if gaps:
        console.print(
            f"[yellow]Subgroup gaps:[/] {escape(', '.join(gaps))} (figures well below all "
            f"reference patients'; report.md, Subgroups)"
        )

    privacy_table = Table(title=privacy_title(privacy))
    for name in PRIVACY_COLUMNS:
        privacy_table.add_column(name, justify="right")
    for hospital, p in privacy["hospitals"].items():
        overspent = "epsilon" not in p or p["epsilon"] > p["epsilon_budget"]
        privacy_table.add_row(*privacy_cells(hospital, p), style="red" if overspent else None)
    console.print(privacy_table)
    for problem in shortfalls(metrics):
        console.print(f"[red]Warning:[/] {escape(problem)} (reasons above and in metrics.json).")
    console.print(
        f"{guarantee_text(privacy)} Results, with the report for the privacy officer "
        f"and the clinicians (report.md): {run_dir}"
    )
    if metrics.get("warnings"):
        console.print(
            f"[bold yellow]Finished with warnings:[/] {escape('; '.join(metrics['warnings']))}. "
            f"Do not use this model for patients as it stands (see report.md)."
        )
