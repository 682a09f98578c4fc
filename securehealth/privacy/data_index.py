"""This machine's index of lasting privacy ledgers: one set of patients, one budget.

It names the ledger of every data file a hospital has trained on (by path, contents and
training rows), so that a second ledger for the same patients is refused (claim), and
records which ledgers have released anything (releasing, traces). Lasting ledgers only:
not the scratch ledgers of the tools or of bundled-data simulations.
"""

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from securehealth.results import (
    HOSPITALS_DIR_VARIABLE,
    default_state_root,
    read_json,
    write_json,
)

INDEX_FILE = "data-ledgers.json"
LOCK_FILE = "data-ledgers.lock"


class IndexProblem(Exception):
    """The ledger index refuses or cannot be kept; the message says how to fix it."""


class DataClaimed(IndexProblem):
    """The data file is accounted in another privacy ledger; the message names it."""


def content_digest(data_file: Path) -> str:
    """SHA-256 of a data file's bytes."""
    digest = hashlib.sha256()
    with open(data_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _index() -> Iterator[dict[str, Any]]:
    """The index, held exclusively and saved afterwards if changed."""
    root = default_state_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / LOCK_FILE, "a")
    except OSError as error:
        raise IndexProblem(
            f"cannot keep this machine's ledger index in {root} ({error.strerror}): make "
            f"it writable, or set XDG_STATE_HOME to a folder this user can write"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            path = root / INDEX_FILE
            index = read_json(path) if path.exists() else {}
            index.setdefault("files", [])
            index.setdefault("ledgers", {})
            before = repr(index)
            yield index
            if repr(index) != before:
                write_json(path, index)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _now():
    """The time, UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def claim(data_file: str | Path, ledger: Path, rows: str = "", record: bool = True) -> None:
    """Claim the patients in `data_file` for `ledger`, unless another ledger accounts for them.

    Parameters
    ----------
    data_file : str or Path
        The hospital's data file.
    ledger : Path
        The ledger file's path.
    rows : str
        The fingerprint of the file's training rows, if known (a copy written with
        other line endings holds the same rows).
    record : bool
        Whether to record the claim; False for a launcher's check before it starts.

    Raises
    ------
    DataClaimed
        Where another ledger on this machine that exists or has released anything
        accounts for that file, a copy of it, or the same rows.
    IndexProblem
        Where the index cannot be kept.
    """
    data_file, ledger = Path(data_file).resolve(), Path(ledger).resolve()
    digest = content_digest(data_file)
    with _index() as index:
        for entry in index["files"]:
            same = (
                "is"
                if entry["path"] == str(data_file)
                else f"holds the same patients as {entry['path']}, which is"
                if entry["sha256"] == digest or (rows and entry.get("rows") == rows)
                else None
            )
            other = entry["ledger"]
            if same and other != str(ledger) and _lives(index, other):
                raise DataClaimed(
                    f"the data file {data_file} {same} already accounted in the privacy "
                    f"ledger {other}: its patients have one budget on this machine, so use "
                    f"that ledger's state directory ({_how_to_use(other)})"
                )
        entry = {"path": str(data_file), "sha256": digest, "rows": rows, "ledger": str(ledger)}
        known = [{k: e.get(k, "") for k in entry} for e in index["files"]]
        if record and entry not in known:
            index["files"].append({**entry, "first_used": _now()})


def _lives(index, ledger):
    """Whether `ledger` exists, or the index records it releasing."""
    return ledger in index["ledgers"] or Path(ledger).exists()


def _how_to_use(ledger):
    """How to run with `ledger`'s state directory, for a refusal's message."""
    state_dir = Path(ledger).parent
    return (
        f"client.py --state-dir {state_dir}; for simulation.py, "
        f"{HOSPITALS_DIR_VARIABLE}={state_dir.parent} with the hospital numbered as in "
        f"{state_dir.name}"
    )


def check_writable() -> None:
    """Raise IndexProblem unless this machine's ledger index can be kept."""
    with _index():
        pass


def releasing(ledger: Path) -> None:
    """Record, before its first release, that `ledger` releases.

    The record is kept for good: a trace of it, should it be lost.
    """
    with _index() as index:
        index["ledgers"].setdefault(str(Path(ledger).resolve()), {"first_release": _now()})


def traces(ledger: Path) -> list[str]:
    """What the index says of `ledger` having released before (empty if nothing)."""
    ledger = Path(ledger).resolve()
    if not (default_state_root() / INDEX_FILE).exists():
        return []
    with _index() as index:
        known = index["ledgers"].get(str(ledger))
        files = sorted({e["path"] for e in index["files"] if e["ledger"] == str(ledger)})
    if not known:
        return []
    accounts = f" (for {', '.join(files)})" if files else ""
    return [
        f"this machine's ledger index records releases from it since "
        f"{known['first_release']}{accounts}"
    ]
