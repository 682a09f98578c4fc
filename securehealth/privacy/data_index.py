"""This machine's index of hospitals' lasting privacy ledgers: which have released
anything, and which data file each accounts for.

One set of patients has one budget. A simulation on a hospital's CSV file and a
deployed hospital (client.py) on the same file keep their ledgers in different
state directories; without this index each would spend a full budget on the same
patients. The index, in the user's state root (results.default_state_root), names
the ledger of every data file a hospital has trained on, by the file's path, its
contents (a copy is the same patients) and its training rows (so is a copy written
with other line endings): a second ledger is refused, naming the first. It also
records which ledgers have released anything, so that a lost ledger is told from a
new one even where its whole state directory is gone (PrivacyLedger's traces).

Lasting ledgers only: those of deployed hospitals and of simulations on your own
csv data, not the scratch ledgers of the tools or of bundled-data simulations.
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
    return datetime.now(UTC).isoformat(timespec="seconds")


def claim(data_file: str | Path, ledger: Path, rows: str = "", record: bool = True) -> None:
    """Raise DataClaimed unless `ledger` (a ledger file's path) may account for the
    patients in `data_file` (whose training rows have the fingerprint `rows`, if
    given): no other ledger on this machine that exists or has released anything
    accounts for that file, a copy of it, or the same rows. Records the claim unless
    `record` is False (a launcher's check before it starts)."""
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
    return ledger in index["ledgers"] or Path(ledger).exists()


def _how_to_use(ledger):
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
    """Record, before its first release, that `ledger` releases (kept for good: a
    trace of it, should it be lost)."""
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
