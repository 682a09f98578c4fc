"""The results contract: what every run leaves in its run directory, written so
that a reader never sees a half-written file.

    metrics.json  settings, per-round global metrics and per-hospital privacy,
                  final metrics, and the privacy summary (status "running" until
                  the last round is in, then "finished")
    model.pt      final global weights plus what is needed to rebuild the model
                  (model.save_model / model.load_model)
    privacy/      each hospital's privacy ledger (simulation only: in deployment
                  a hospital keeps its ledger at home)
"""

import argparse
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

METRICS_FILE = "metrics.json"
MODEL_FILE = "model.pt"


def write_atomic(path, data):
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


def write_json(path, obj):
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_directory(cfg, run_id):
    """Where a run's results go: the run_dir setting (simulation.py and server.py
    always set it), else runs/flower-run-<id> for a bare `flwr run`."""
    return Path(cfg.run_dir or f"runs/flower-run-{run_id}").resolve()


def new_run_dir(requested):
    """Create the run directory: `requested`, or a new runs/<UTC timestamp>/. A
    directory that already holds a run is refused: results are never overwritten."""
    if requested:
        run_dir = Path(requested).resolve()
        if (run_dir / METRICS_FILE).exists():
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


def mark_stopped(run_dir, status):
    """Leave a clear status in metrics.json when the server could not."""
    path = Path(run_dir) / METRICS_FILE
    if path.exists():
        metrics = read_json(path)
        if metrics["status"] == "running":
            metrics["status"] = status
            write_json(path, metrics)


def finished_run_argument(description, argv=None):
    """`--run-dir DIR` of a script that works on a finished run: the directory, or
    exit 2 with one line saying it holds none."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True, help="a finished run's directory")
    run_dir = Path(parser.parse_args(argv).run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.exists() or read_json(metrics)["status"] != "finished":
        parser.exit(2, f"{parser.prog}: error: {run_dir} holds no finished run\n")
    return run_dir
