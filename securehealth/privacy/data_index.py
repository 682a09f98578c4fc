"""This machine's index of which privacy ledger accounts for which data file.

One set of patients has one budget. A simulation on a hospital's CSV file and a
deployed hospital (client.py) on the same file keep their ledgers in different
state directories; without this index each would spend a full budget on the same
patients. The index, in the user's state root (results.default_state_root), names
the ledger of every data file a hospital has trained on, by the file's path and by
its contents (a copy is the same patients): a second ledger is refused, naming the
first. It also tells a lost ledger from a new one (PrivacyLedger's traces).
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


class DataClaimed(Exception):
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
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            path = root / INDEX_FILE
            index = read_json(path) if path.exists() else {"files": []}
            before = repr(index)
            yield index
            if repr(index) != before:
                write_json(path, index)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _other_ledger(index, data_file, digest, ledger):
    for entry in index["files"]:
        if (entry["path"] == str(data_file) or entry["sha256"] == digest) and entry[
            "ledger"
        ] != str(ledger):
            return entry
    return None


def claim(data_file: str | Path, ledger: Path, record: bool = True) -> None:
    """Raise DataClaimed unless `ledger` (a ledger file's path) may account for the
    patients in `data_file`: no other ledger on this machine accounts for that file
    or for a copy of it. Records the claim unless `record` is False (a launcher's
    check before it starts)."""
    data_file, ledger = Path(data_file).resolve(), Path(ledger).resolve()
    digest = content_digest(data_file)
    with _index() as index:
        other = _other_ledger(index, data_file, digest, ledger)
        if other:
            same = (
                "is"
                if other["path"] == str(data_file)
                else f"has the same contents as {other['path']}, which is"
            )
            raise DataClaimed(
                f"the data file {data_file} {same} already accounted in the privacy "
                f"ledger {other['ledger']}: its patients have one budget on this "
                f"machine, so use that ledger's state directory ({_how_to_use(other)})"
            )
        known = any(e["path"] == str(data_file) and e["sha256"] == digest for e in index["files"])
        if record and not known:
            index["files"].append(
                {
                    "path": str(data_file),
                    "sha256": digest,
                    "ledger": str(ledger),
                    "first_used": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            )


def _how_to_use(entry):
    state_dir = Path(entry["ledger"]).parent
    return (
        f"client.py --state-dir {state_dir}; for simulation.py, "
        f"{HOSPITALS_DIR_VARIABLE}={state_dir.parent} with the hospital numbered as in "
        f"{state_dir.name}"
    )


def files_of(ledger: Path) -> list[str]:
    """The data files the index says `ledger` accounts for."""
    ledger = Path(ledger).resolve()
    root = default_state_root()
    if not (root / INDEX_FILE).exists():
        return []
    with _index() as index:
        return sorted({e["path"] for e in index["files"] if e["ledger"] == str(ledger)})
