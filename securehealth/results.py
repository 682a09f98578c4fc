"""The results contract: what every run leaves in its run directory, never half-written.

metrics.json, model.pt and, for simulations on bundled data, hospitals/ (see
docs/reference/run-directory.md), written atomically (write_atomic); new_run_dir and
check_new_output keep one run's files from mixing with another's.
"""

import argparse
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from securehealth.config import Settings

METRICS_FILE = "metrics.json"
MODEL_FILE = "model.pt"
EXIT_WARNINGS = 3  # a launcher's exit code for a run that finished with warnings


class RunStatus(StrEnum):
    """Where a run stands: metrics.json's "status"."""

    RUNNING = "running"
    # Ran to its end; "with warnings" where its model may be unusable, or was trained
    # by fewer hospitals than it started with (clinical.usefulness_warnings).
    FINISHED = "finished"
    FINISHED_WITH_WARNINGS = "finished with warnings"
    FAILED = "failed"
    STOPPED = "stopped"  # through Flower's Control API (`flwr stop`)
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM, or its process found gone later


def has_finished(status: str) -> bool:
    """Whether a run with this status (any text) ran to its end, with warnings or without."""
    return status in (RunStatus.FINISHED, RunStatus.FINISHED_WITH_WARNINGS)


# Where simulated hospitals keep their state (hospital-<i>/ inside it): set on the
# machine that runs them (simulation.py does), never by the server; optional.
HOSPITALS_DIR_VARIABLE = "SECUREHEALTH_HOSPITALS_DIR"
# Where simulated hospitals on a demonstration's data keep this run's state:
# simulation.py sets it to the run directory's hospitals/, never to a lasting folder.
DEMO_HOSPITALS_DIR_VARIABLE = "SECUREHEALTH_DEMO_HOSPITALS_DIR"


def simulated_hospitals_dir(demonstration: bool, run_dir: str | Path) -> Path:
    """Where simulation.py's hospitals keep their privacy ledgers (hospital-<i>/ inside).

    In the run directory where every hospital's data is a demonstration's
    (data/demonstration.py: each run starts afresh, spending nothing lasting); else a
    lasting folder, so that every simulation on real patients spends from the same
    budgets (lasting_hospitals_dir).
    """
    return Path(run_dir) / "hospitals" if demonstration else lasting_hospitals_dir()


def lasting_hospitals_dir() -> Path:
    """The lasting folder of simulated hospitals' privacy ledgers.

    It is the operator's own HOSPITALS_DIR_VARIABLE, else one in the state root.
    """
    if os.environ.get(HOSPITALS_DIR_VARIABLE):
        return Path(os.environ[HOSPITALS_DIR_VARIABLE]).resolve()
    return default_state_root() / "simulation"


def default_state_root() -> Path:
    """Where hospitals keep their state unless told otherwise: an absolute path.

    It does not depend on the working directory, so that a ledger is not lost by
    starting from elsewhere ($XDG_STATE_HOME/securehealth-ml, by default
    ~/.local/state/securehealth-ml).
    """
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base).resolve() / "securehealth-ml"


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to path via a temporary file and a rename.

    The file is always either the old or the new complete version.
    """
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
    """Write obj to path as indented JSON, atomically (write_atomic)."""
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: Path) -> Any:
    """The JSON value in the file at path."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_directory(cfg: Settings, run_id: int) -> Path:
    """Where a run's results go, as an absolute path.

    It is the run_dir setting (simulation.py and server.py always set it), else
    runs/flower-run-<id> for a bare `flwr run`.
    """
    return Path(cfg.run_dir or f"runs/flower-run-{run_id}").resolve()


# Everything a run of simulation.py, server.py, audit.py, sweep.py or benchmark.py
# leaves in its run directory: what --overwrite may delete, and nothing else.
RUN_CONTENTS = frozenset(
    {
        *("metrics.json", "model.pt", "report.md", "authorisation.json", "audit.json"),
        *("audit.md", "audit.png"),
        *("epsilon_per_round.png", "performance_per_round.png", "roc_curve.png"),
        *("sweep.json", "sweep.md", "sweep.png", "benchmark.json", "benchmark.md"),
        *("search.json", "search.md"),
        *("flower", "hospitals"),
    }
)


class RunDirError(Exception):
    """A run directory that cannot be used: not empty, or not writable."""


def new_run_dir(requested: str, result_file: str = METRICS_FILE, overwrite: bool = False) -> Path:
    """Create the run directory: `requested`, or a new runs/<UTC timestamp>/.

    A folder with anything in it is refused, so that no result is overwritten and none
    mixes with another run's.

    Parameters
    ----------
    requested : str
        The folder asked for; "" for a new timestamped one.
    result_file : str
        The file that a run of the calling script leaves in its directory.
    overwrite : bool
        Whether a previous run in the folder (its result_file says so) is deleted
        first; anything else in it is still refused.

    Returns
    -------
    Path
        The run directory, absolute, created and writable.

    Raises
    ------
    RunDirError
        When the folder is not empty and `overwrite` is not given; holds a training run
        that a tool's `overwrite` would delete, files that are not a run's, or no run;
        is a file; or cannot be created or written.
    """
    if requested:
        run_dir = Path(requested).resolve()
        if run_dir.is_dir() and any(run_dir.iterdir()):
            _clear_for_overwrite(run_dir, result_file, overwrite)
    else:
        run_dir = _timestamped_run_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir {run_dir} is a file, not a folder; choose a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()  # writable, not only creatable
    except OSError as error:
        raise RunDirError(
            f"cannot write to run_dir {run_dir}: {error.strerror or error}; choose a folder "
            "you can write to"
        ) from None
    return run_dir


def _clear_for_overwrite(run_dir: Path, result_file: str, overwrite: bool) -> None:
    """Delete the previous run in the non-empty run_dir, or raise RunDirError (new_run_dir)."""
    if not overwrite:
        raise RunDirError(
            f"run_dir {run_dir} is not empty: choose a new one, or pass --overwrite "
            "to replace the run in it"
        )
    if result_file != METRICS_FILE and (run_dir / METRICS_FILE).exists():
        raise RunDirError(
            f"run_dir {run_dir} holds a training run ({METRICS_FILE}): --overwrite "
            "would delete it; choose an empty or new folder"
        )
    others = sorted(e.name for e in run_dir.iterdir() if e.name not in RUN_CONTENTS)
    if others or not _holds_result(run_dir / result_file):
        what = (
            f"files that are not a run's ({', '.join(others)})"
            if others
            else (f"no run (no {result_file} of one)")
        )
        raise RunDirError(
            f"run_dir {run_dir} holds {what}: --overwrite replaces only a previous "
            "run; choose an empty or new folder"
        )
    _delete_contents(run_dir)


def _timestamped_run_dir() -> Path:
    """A new runs/<UTC timestamp>/ that does not exist yet, with a suffix where needed."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = Path("runs", stamp).resolve()
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path("runs", f"{stamp}-{suffix}").resolve()
    return run_dir


def _holds_result(path: Path) -> bool:
    """Whether path is a run's result file (a JSON object), not just a file of that name."""
    try:
        return not path.is_symlink() and isinstance(read_json(path), dict)
    except (OSError, ValueError):
        return False


def _delete_contents(folder: Path) -> None:
    """Delete everything in folder, for --overwrite; RunDirError where it cannot."""
    try:
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as error:
        raise RunDirError(f"cannot empty run_dir {folder} for --overwrite: {error}") from None


def mark_stopped(
    run_dir: Path,
    status: RunStatus,
    reason: str | None = None,
    replacing: tuple[RunStatus, ...] = (RunStatus.RUNNING,),
) -> None:
    """Leave a clear status, and why if known, in a run's metrics.json.

    It is for a run whose server could not record how it ended, or whose recorded
    status the real cause explains better.

    Parameters
    ----------
    run_dir : Path
        The run's directory; nothing is written where it has no metrics.json.
    status : RunStatus
        The status to record.
    reason : str, optional
        Why, recorded as metrics.json's "error".
    replacing : tuple[RunStatus, ...]
        The recorded statuses it replaces; any other stays as it is.
    """
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
    """Parse `--run-dir DIR` of a script that works on a finished run.

    Parameters
    ----------
    description : str or None
        The script's description, for --help.
    argv : list[str], optional
        The arguments to parse; else the command line's.
    add_arguments : Callable[[argparse.ArgumentParser], None], optional
        `add_arguments(parser)` adds the script's own flags.

    Returns
    -------
    tuple[Path, argparse.Namespace]
        The run directory and the parsed arguments.

    Raises
    ------
    SystemExit
        Exit code 2 with one line where the directory holds no finished run or its
        metrics.json is damaged (and argparse's own exits).
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True, help="a finished run's directory")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    metrics = run_dir / METRICS_FILE
    try:
        status = current_status(run_dir) if metrics.exists() else None
    except (OSError, ValueError, TypeError, KeyError):
        parser.exit(
            2,
            f"{parser.prog}: error: {metrics} is damaged (not a run's metrics): restore it "
            f"from a backup, or run the training again\n",
        )
    if status is None or not has_finished(status):
        how = f" (its run is {status})" if status else ""
        parser.exit(2, f"{parser.prog}: error: {run_dir} holds no finished run{how}\n")
    return run_dir, args


def spreadsheet_safe(cell: object) -> object:
    """A CSV cell that a spreadsheet shows and never runs.

    Text that starts with = + - @, a tab or a carriage return (a formula to Excel,
    LibreOffice and Google Sheets) gets a leading apostrophe (OWASP, CSV injection).
    Numbers stay numbers.
    """
    if isinstance(cell, str) and cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + cell
    return cell


def check_new_output(path: Path, overwrite: bool) -> None:
    """Raise RunDirError unless a tool's output file may be written at `path`.

    Parameters
    ----------
    path : Path
        The output file.
    overwrite : bool
        Whether an existing file may be replaced.

    Raises
    ------
    RunDirError
        When `path` is inside a run directory (a folder with a run's metrics.json: its
        files are the run's own), exists without `overwrite`, or is not a file.
    """
    path = Path(path).resolve()
    if (path.parent / METRICS_FILE).exists():
        raise RunDirError(
            f"{path} is inside the run directory {path.parent}, whose files are the run's "
            f"own: write it elsewhere"
        )
    if path.exists() and not overwrite:
        raise RunDirError(f"{path} exists: choose a new file, or pass --overwrite to replace it")
    if path.exists() and not path.is_file():
        raise RunDirError(f"{path} is not a file")


def started_at(pid: int) -> int | None:
    """When the process pid started, in clock ticks since boot; None where it has ended.

    With the pid it names one process, even once the pid is used again. None also where
    the process is a zombie or /proc cannot say.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])  # fields 3 and 22: state, starttime


def current_status(run_dir: Path) -> str:
    """The run's status in its metrics.json, marking a dead run "interrupted" first.

    A run that says "running" though the process recording it has ended (kill -9, a
    power cut) is marked "interrupted" there, with why. A run recorded on another
    machine, or where /proc cannot tell, is taken at its word.
    """
    metrics = read_json(Path(run_dir) / METRICS_FILE)
    recorder = metrics.get("recorder")
    if metrics["status"] != RunStatus.RUNNING or not recorder or recorder["started_at"] is None:
        return metrics["status"]
    pid = recorder["pid"]
    if recorder["host"] != socket.gethostname() or started_at(pid) == recorder["started_at"]:
        return metrics["status"]
    mark_stopped(
        run_dir,
        RunStatus.INTERRUPTED,
        f"the process that ran it (pid {pid}) ended without recording how (it was killed, "
        f"or its machine stopped)",
    )
    return RunStatus.INTERRUPTED
