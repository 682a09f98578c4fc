"""What a person sees: a line per round while a run trains, and the closing summary
(global test metrics, and every hospital's privacy spending against its budget)."""

import time

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

from results import METRICS_FILE, read_json


def round_line(record, cfg):
    epsilons = [h["epsilon"] for h in record["hospitals"].values()]
    max_epsilon = max(epsilons, default=0.0)
    g = record["global"]
    line = (
        f"Round {record['round']:>3}/{cfg.rounds}  AUC {g['auc']:.3f}  "
        f"accuracy {g['accuracy']:.3f}  max epsilon {max_epsilon:.3f} / {cfg.epsilon:g}"
    )
    trained = record["hospitals_trained"]
    if trained < cfg.num_clients:
        line += f"  [yellow]({trained}/{cfg.num_clients} hospitals trained)[/]"
    for reason in record["failures"]:
        line += f"\n  [red]a hospital failed:[/] {escape(reason)}"
    return line


def follow(process, run_dir, cfg, console):
    """Show each round as the server records it, until the run has finished (its
    results are complete; Flower's shutdown need not be waited for) or `process`
    ended; return the last metrics.json (None if the server never wrote one)."""
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
                progress.update(task, completed=shown, description="Federated training")
            if finished or (metrics and metrics["status"] != "running"):
                return metrics
            time.sleep(0.2)


def print_summary(metrics, run_dir, console=None):
    console = console or Console()
    final, privacy = metrics["final"]["global"], metrics["privacy"]

    model_table = Table(title="Global model on the server's reference test set")
    for name in ("AUC", "Accuracy", "Sensitivity", "Specificity"):
        model_table.add_column(name, justify="right")
    model_table.add_row(
        *(f"{final[k]:.3f}" for k in ("auc", "accuracy", "sensitivity", "specificity"))
    )
    console.print(model_table)

    privacy_table = Table(
        title=f"Privacy spent per hospital ({privacy['accountant'].upper()} accountant)"
    )
    columns = (
        "Hospital",
        "Training patients",
        "Epsilon spent",
        "Budget",
        "Delta",
        "Noise multiplier",
        "Sample rate",
        "Steps",
    )
    for name in columns:
        privacy_table.add_column(name, justify="right")
    for hospital, p in privacy["hospitals"].items():
        if "epsilon" not in p:
            privacy_table.add_row(hospital, *["-"] * 7, style="red")
            continue
        style = "red" if p["epsilon"] > privacy["target_epsilon"] else None
        privacy_table.add_row(
            hospital,
            str(p["patients"]),
            f"{p['epsilon']:.4f}",
            f"{privacy['target_epsilon']:g}",
            f"{p['delta']:g}",
            f"{p['noise_multiplier']:.4f}",
            f"{p['sample_rate']:.4f}",
            str(p["steps"]),
            style=style,
        )
    console.print(privacy_table)
    failed_rounds = [r["round"] for r in metrics["rounds"] if r["failures"]]
    if failed_rounds:
        console.print(
            f"[red]Hospitals failed in rounds {failed_rounds}[/]: the model was averaged "
            f"without them there (reasons above and in metrics.json)."
        )
    console.print(
        f"Each hospital's training patients are protected by record-level "
        f"(epsilon, delta)-differential privacy, cumulative over all "
        f"{len(metrics['rounds'])} rounds: epsilon as in the table, delta "
        f"{privacy['delta']:g}. Results: {run_dir}"
    )
