"""Train the diagnosis model across simulated hospitals on this machine:

    python simulation.py [--name value ...]   (names and defaults: config.py)

It runs the same ServerApp (server.py) and ClientApp (client.py) as a real
deployment, on Flower's simulation runtime: a local SuperLink in simulation mode
with one simulated SuperNode per hospital on Ray, submitted with `flwr run`.
Results land in the run directory (see results.py); Flower's own logs in its
flower/ folder.
"""

import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

import reporting
import runtime
import settings
from results import METRICS_FILE, read_json, write_json


def new_run_dir(requested):
    """The run directory, which must not hold an earlier run (no overwriting)."""
    if requested:
        run_dir = Path(requested).resolve()
        if (run_dir / METRICS_FILE).exists():
            raise settings.SettingsError(
                f"run_dir {run_dir} already holds a run; choose a new directory"
            )
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs", stamp).resolve()
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = Path("runs", f"{stamp}-{suffix}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def interrupt(signal_number, frame):
    """SIGTERM and SIGHUP stop a run like Ctrl-C: Flower stopped, status recorded."""
    raise KeyboardInterrupt


def main(argv=None):
    for signal_number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signal_number, interrupt)
    parser = settings.make_parser(__doc__)
    cfg, _ = settings.parse(parser, argv)
    try:
        run_dir = new_run_dir(cfg.run_dir)
    except settings.SettingsError as error:
        parser.error(str(error))
    cfg.run_dir = str(run_dir)
    flwr_home = run_dir / "flower"
    console = Console()
    console.print(
        f"[bold]SecureHealth-ML[/] simulation: {cfg.num_clients} hospitals, "
        f"{cfg.rounds} rounds, privacy budget epsilon {cfg.epsilon:g} "
        f"(delta {cfg.delta:g}) per hospital"
    )
    federation = [f"num-supernodes={cfg.num_clients}", "client-resources-num-cpus=1"]
    try:
        with (
            runtime.superlink(flwr_home, "--simulation", "--insecure") as address,
            runtime.flwr_run(flwr_home, address, cfg, federation) as process,
        ):
            metrics = reporting.follow(process, run_dir, cfg, console)
    except KeyboardInterrupt:
        mark_stopped(run_dir, "interrupted")
        console.print(f"[red]Interrupted.[/] Flower was stopped; partial results in {run_dir}")
        return 130
    except runtime.FlowerError as error:
        console.print(f"[red]Flower failed:[/] {error}")
        return 1
    if not metrics or metrics["status"] != "finished":
        mark_stopped(run_dir, "failed")
        console.print(
            f"[red]The run did not finish.[/] Last lines of Flower's log "
            f"({flwr_home / 'flwr-run.log'}):\n{runtime.log_tail(flwr_home / 'flwr-run.log')}"
        )
        return 1
    reporting.print_summary(metrics, run_dir, console)
    return 1 if any(r["failures"] for r in metrics["rounds"]) else 0


def mark_stopped(run_dir, status):
    """Leave a clear status in metrics.json when the server could not."""
    path = run_dir / METRICS_FILE
    if path.exists():
        metrics = read_json(path)
        if metrics["status"] == "running":
            metrics["status"] = status
            write_json(path, metrics)


if __name__ == "__main__":
    sys.exit(main())
