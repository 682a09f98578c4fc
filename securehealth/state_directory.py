"""A hospital's state directory: the files it keeps between runs, named in this one place.

A hospital's privacy ledger, its register of run authorisations used, its key, its
status for its operator and its own evaluations live in the directory its operator
chose (client.py --state-dir); a demonstration's run keeps a fresh ledger in
demo-runs/<run id>/ inside it. `StateDirectory` owns the paths and the status file.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securehealth.results import read_json, write_json

LEDGER_FILE = "privacy-ledger.json"  # every release on the hospital's patients
REGISTER_FILE = "authorisations.json"  # the run authorisations it has used, each once
AUTH_KEY = "hospital.key"  # its identity for servers that admit only enrolled hospitals
STATUS_FILE = "status.json"  # what it did last, for its operator (client.py shows it)
EVALUATION_FILE = "evaluation.json"  # each global model's figures on its held-out patients
DEMO_RUNS_DIR = "demo-runs"  # a demonstration's runs: a fresh ledger per run
# What a status file says was spent, and where: kept whenever another status replaces
# it, as a trace the ledger relies on if the ledger is lost.
SPENT_TRACE = ("epsilon", "ledger", "lasting")


@dataclass(frozen=True)
class StateDirectory:
    """One hospital's state directory, and the files in it."""

    path: Path

    @property
    def ledger_file(self) -> Path:
        """The hospital's lasting privacy ledger."""
        return self.path / LEDGER_FILE

    @property
    def register_file(self) -> Path:
        """The register of run authorisations the hospital has used."""
        return self.path / REGISTER_FILE

    @property
    def key_file(self) -> Path:
        """The hospital's private key (client.py make-key)."""
        return self.path / AUTH_KEY

    @property
    def status_file(self) -> Path:
        """What the hospital did last, for its operator."""
        return self.path / STATUS_FILE

    @property
    def demo_runs(self) -> Path:
        """Where a demonstration's runs keep their fresh ledgers, one folder per run."""
        return self.path / DEMO_RUNS_DIR

    def demo_run(self, run_id: int) -> Path:
        """The folder of one demonstration run's ledger and evaluations."""
        return self.demo_runs / str(int(run_id))

    def spent_trace(self) -> dict[str, Any]:
        """What the status file says was spent, and where ({} where it says nothing)."""
        try:
            before = read_json(self.status_file) if self.status_file.exists() else {}
            return {key: before[key] for key in SPENT_TRACE if key in before}
        except (OSError, ValueError, TypeError):
            return {}

    def write_status(self, status: dict[str, Any]) -> None:
        """Replace the status file with `status`, keeping the spent trace it held."""
        write_json(self.status_file, {**self.spent_trace(), **status})
