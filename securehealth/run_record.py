"""The run's record, metrics.json: settings, rounds, final figures and the privacy summary.

`RunRecord` rewrites the file after every change (see results.py), so that a reader
always sees the run as it stands.
"""

import os
import socket
import time
from pathlib import Path
from typing import Any

from securehealth.privacy.report import PrivacyReport
from securehealth.results import METRICS_FILE, RunStatus, started_at, write_json

# What a hospital reports about its own privacy spending, as metrics.json records it:
# epsilon is cumulative over every release on its patients (all listed in
# `releases`); noise multiplier, sample rate and steps are this run's; ledger_reset
# says when and why its operator started its ledger afresh, if ever.
PRIVACY_KEYS = (
    "epsilon",
    "epsilon_budget",
    "delta",
    "adjacency",
    "accountant",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "releases",
    "ledger_reset",
)


class RunRecord:
    """metrics.json of one run, kept in `results` and saved on every change."""

    def __init__(self, cfg, run_dir, data):
        self.cfg, self.path = cfg, Path(run_dir) / METRICS_FILE
        self.started = time.monotonic()
        self.results = {
            "status": RunStatus.RUNNING,
            # Who records it: while it says "running", a reader that finds this
            # process gone marks the run interrupted (current_status).
            "recorder": {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_at": started_at(os.getpid()),
            },
            "hospitals_connected": 0,
            "refused_nodes": [],
            "config": vars(cfg),
            "data": data,
            "rounds": [],
            "final": None,
            "privacy": None,
        }
        self.save()

    def save(self) -> None:
        """Write `results` to metrics.json."""
        write_json(self.path, self.results)

    def add_round(
        self, server_round: int, metrics: dict[str, Any], outcome: dict[str, Any]
    ) -> None:
        """Record a finished round and save.

        Parameters
        ----------
        server_round : int
            The round's number, from 1.
        metrics : dict
            The global model's metrics after the round.
        outcome : dict
            What happened to each hospital's update: hospitals_trained, failures,
            rejected, hospitals and, if so, why the round's sum was discarded.
        """
        self.results["rounds"].append(
            {
                "round": server_round,
                "seconds": round(time.monotonic() - self.started, 3),
                "global": metrics,
                **outcome,
            }
        )
        self.save()

    def discard_round(self, server_round: int, reason: str) -> None:
        """Note that the round's combined update was discarded, and why; saved with the round."""
        self.results.setdefault("discarded_rounds", []).append(
            {"round": server_round, "reason": reason}
        )

    def finish(self, reports: dict[str, PrivacyReport], final: dict[str, Any]) -> None:
        """Record the final model's figures and the privacy summary; the caller sets the status.

        Parameters
        ----------
        reports : dict
            Each hospital's latest accepted report, by hospital number as text.
        final : dict
            The final model's figures at the run's decision threshold.
        """
        self.results["final"] = {"global": final}
        reported = [reports[h] for h in sorted(reports)]
        self.results["privacy"] = {
            "target_epsilon": self.cfg.epsilon,
            # Each hospital has its own delta: the statement holds with the largest.
            "delta": max((r.delta for r in reported), default=self.cfg.delta),
            # Each hospital states its own guarantee; shown once when they agree.
            "adjacency": common_value([r.adjacency for r in reported]),
            "accountant": common_value([r.accountant for r in reported]),
            # Noise comes from a PRNG seeded from OS entropy, not a CSPRNG.
            "secure_rng": False,
            "hospitals": {
                str(h): (
                    _privacy_summary(reports[str(h)])
                    if str(h) in reports
                    else {"status": "no report"}  # it failed in every round
                )
                for h in range(self.cfg.num_clients)
            },
        }
        self.save()


def _privacy_summary(report: PrivacyReport) -> dict[str, Any]:
    """Return a hospital's privacy as the run's summary records it: its report, less its reason."""
    record = report.as_record()
    return {key: record[key] for key in (*PRIVACY_KEYS, "patients", "status")}


def common_value(values: list[Any]) -> Any:
    """Return the value all hospitals reported, "per hospital" if they differ (None without any)."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else ("per hospital" if distinct else None)
