"""The results contract: what every run leaves in its run directory, written so
that a reader never sees a half-written file.

    metrics.json  settings, per-round global metrics and per-hospital privacy,
                  final metrics, and the privacy summary (status "running" until
                  the last round is in, then "finished")
    model.pt      final global weights plus what is needed to rebuild the model
                  (model.save_model / model.load_model)
    hospitals/    simulation on bundled data only: each simulated hospital's state
                  (privacy ledger, status, evaluations); in deployment, and in
                  simulations on your own data, hospitals keep it in their state
                  directories (default_state_root)
"""

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

METRICS_FILE = "metrics.json"
MODEL_FILE = "model.pt"


# Where simulated hospitals keep their state (hospital-<i>/ inside it): set on the
# machine that runs them (simulation.py does), never by the server.
HOSPITALS_DIR_VARIABLE = "SECUREHEALTH_HOSPITALS_DIR"


def simulated_hospitals_dir(cfg: SimpleNamespace) -> Path:
    """Where simulation.py's hospitals keep their privacy ledgers: inside the run
    directory for bundled data (generated or public patients: each run is a fresh
    demonstration), but for your own csv data a lasting folder, so that every
    simulation on real patients spends from the same budgets. An operator's own
    HOSPITALS_DIR_VARIABLE takes precedence."""
    if os.environ.get(HOSPITALS_DIR_VARIABLE):
        return Path(os.environ[HOSPITALS_DIR_VARIABLE]).resolve()
    if cfg.dataset == "csv":
        return default_state_root() / "simulation"
    return Path(cfg.run_dir) / "hospitals"


def default_state_root() -> Path:
    """Where hospitals keep their state unless told otherwise: an absolute path that
    does not depend on the working directory, so that a ledger is not lost by
    starting from elsewhere ($XDG_STATE_HOME/securehealth-ml, by default
    ~/.local/state/securehealth-ml)."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base).resolve() / "securehealth-ml"


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to path via a temporary file and a rename, so that the file is
    always either the old or the new complete version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_directory(cfg: SimpleNamespace, run_id: int) -> Path:
    """Where a run's results go: the run_dir setting (simulation.py and server.py
    always set it), else runs/flower-run-<id> for a bare `flwr run`."""
    return Path(cfg.run_dir or f"runs/flower-run-{run_id}").resolve()


def new_run_dir(requested: str, result_file: str = METRICS_FILE) -> Path:
    """Create the run directory: `requested`, or a new runs/<UTC timestamp>/. A
    directory that already holds a run's `result_file` is refused: results are
    never overwritten."""
    if requested:
        run_dir = Path(requested).resolve()
        if (run_dir / result_file).exists():
            raise FileExistsError(f"run_dir {run_dir} already holds a run; choose a new one")
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs", stamp).resolve()
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = Path("runs", f"{stamp}-{suffix}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def mark_stopped(
    run_dir: Path, status: str, reason: str | None = None, replacing: tuple[str, ...] = ("running",)
) -> None:
    """Leave a clear status (and why, if known) in metrics.json when the server
    could not, or in place of a status in `replacing` that the real cause explains."""
    path = Path(run_dir) / METRICS_FILE
    if path.exists():
        metrics = read_json(path)
        if metrics["status"] in replacing:
            metrics["status"] = status
            if reason:
                metrics["error"] = reason
            write_json(path, metrics)


def finished_run_argument(
    description: str | None,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Path, argparse.Namespace]:
    """`--run-dir DIR` of a script that works on a finished run: (the directory, the
    parsed arguments), or exit 2 with one line saying it holds none.
    `add_arguments(parser)` adds the script's own flags."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True, help="a finished run's directory")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.exists() or read_json(metrics)["status"] != "finished":
        parser.exit(2, f"{parser.prog}: error: {run_dir} holds no finished run\n")
    return run_dir, args
