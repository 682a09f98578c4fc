"""Who counts in a deployed run, and what the server accepts from them.

Before any hospital trains, the server asks every connected node to be admitted:
the node answers with its hospital number, whether it agrees with the settings that
can void a round (secure aggregation), and, where the operator enrolled hospital
keys, its signature of the server's challenge with its key (authorisation.py). A
node joins the run only as a hospital it has proven to be, once per number; all
others are refused and named, and never receive a training message. Every report a
hospital sends afterwards is checked against its admitted number, the operator's
patient cap and its own earlier reports (`report_problem`).
"""

import json
import math
import secrets
from logging import WARNING
from typing import Any

from flwr.app import Message, MessageType
from flwr.common import GetPropertiesIns, log

from securehealth.authorisation import identity_proven
from securehealth.flower import getpropertiesins_to_recorddict, recorddict_to_getpropertiesres
from securehealth.text import quoted, untrusted

NOT_ADMITTED = "not-admitted"  # the notice to a refused node: why it is not in the run
ADMISSION_TIMEOUT = 120  # seconds for a node to answer (it starts a ClientApp process)
STATUSES = ("trained", "refused")  # what a training reply may say it did
REASON_LIMIT = 1000  # characters of a hospital's stated reason kept
RELEASES_LIMIT = 1_000_000  # characters of a report's list of releases (~10,000 of them)
RELEASE_FIELDS = {
    "round": int,
    "noise_multiplier": float,
    "sample_rate": float,
    "steps": int,
    "adjacency": str,
    "mechanism": str,
    "this_run": bool,
}


class Admission:
    """The run's members: connected nodes admitted as hospitals 0..num_clients-1."""

    def __init__(self, grid, cfg, run_id, enrolled_keys=None):
        self.grid, self.cfg, self.run_id = grid, cfg, run_id
        self.enrolled_keys = enrolled_keys or {}  # hospital number -> its public key
        self.members = {}  # node id -> hospital number
        self.disagreeing = {}  # node id -> (hospital number, why it cannot take part)
        self.refused = {}  # node id -> why it is not a hospital of this run
        # node id -> why not yet: its number is held by another node, which may be a
        # crashed process of the same hospital that Flower has not noticed yet
        self.waiting = {}

    def refresh(self) -> None:
        """Ask every connected node not yet judged to be admitted, and judge it."""
        connected = set(self.grid.get_node_ids())
        for judged in (self.members, self.waiting):
            for node in [n for n in judged if n not in connected]:
                del judged[node]  # gone; a restarted hospital is asked again
        new = connected - set(self.members) - set(self.disagreeing) - set(self.refused)
        if not new:
            return
        challenges = {node: secrets.token_hex(16) for node in new}
        questions = [
            Message(
                getpropertiesins_to_recorddict(
                    GetPropertiesIns(
                        {
                            "challenge": challenges[node],
                            "secure_aggregation": self.cfg.secure_aggregation,
                        }
                    )
                ),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in sorted(new)
        ]
        for reply in self.grid.send_and_receive(questions, timeout=ADMISSION_TIMEOUT):
            node = reply.metadata.src_node_id
            if reply.has_error():
                failed = untrusted(reply.error.reason, REASON_LIMIT)
                self._refuse(node, f"its admission check failed: {failed}")
                continue
            try:
                answer = dict(recorddict_to_getpropertiesres(reply.content).properties)
                self._judge(node, answer, challenges[node])
            except Exception as error:  # a trust boundary: a node may answer anything
                self._refuse(node, f"its admission answer is malformed ({type(error).__name__})")
        # Nodes that did not answer in time are asked again at the next refresh.
        self._tell_refused([node for node in sorted(new) if node in self.refused])

    def _tell_refused(self, nodes: list[int]) -> None:
        """Tell each refused node why, so that its client.py stops instead of waiting
        for a run it is not part of (node.hospital_mod); no answer is awaited."""
        notices = [
            Message(
                getpropertiesins_to_recorddict(
                    GetPropertiesIns({NOT_ADMITTED: self.refused[node][:REASON_LIMIT]})
                ),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in nodes
        ]
        if notices:
            self.grid.push_messages(notices)

    def _judge(self, node, answer, challenge):
        hospital = answer.get("hospital")
        if not isinstance(hospital, int) or not 0 <= hospital < self.cfg.num_clients:
            return self._refuse(
                node, f"it claims hospital {quoted(hospital)}, not one of this run's"
            )
        if self.enrolled_keys and not identity_proven(
            self.enrolled_keys[hospital],
            str(answer.get("proof", "")),
            challenge,
            self.run_id,
            node,
            hospital,
        ):
            return self._refuse(
                node,
                f"it claims to be hospital {hospital} but did not prove it with hospital "
                f"{hospital}'s enrolled key",
            )
        holder = next((n for n, h in self.members.items() if h == hospital), None)
        if holder is not None:  # asked again at every refresh, until the holder is gone
            reason = f"it claims hospital {hospital}, which is in the run already as node {holder}"
            if self.waiting.get(node) != reason:
                log(WARNING, "Not admitting node %d yet: %s", node, reason)
            self.waiting[node] = reason
            return
        self.waiting.pop(node, None)
        if answer.get("problem"):
            reason = untrusted(answer["problem"], REASON_LIMIT)
            self.disagreeing[node] = (hospital, reason)
            log(WARNING, "Hospital %d (node %d) cannot take part: %s", hospital, node, reason)
        else:
            self.members[node] = hospital

    def _refuse(self, node, reason):
        self.refused[node] = reason
        log(WARNING, "Refused node %d: %s", node, reason)

    def complete(self) -> bool:
        return sorted(self.members.values()) == list(range(self.cfg.num_clients))

    def refusals(self) -> list[dict[str, Any]]:
        """For metrics.json: every node that was not admitted, and why."""
        refused = sorted({**self.refused, **self.waiting}.items())
        return [{"node": str(n), "reason": r} for n, r in refused] + [
            {"node": str(n), "hospital": h, "reason": r}
            for n, (h, r) in sorted(self.disagreeing.items())
        ]

    def hospitals(self) -> list[int]:
        """The nodes known to be this run's hospitals, admitted or not (they are told
        when the run ends)."""
        return sorted({*self.members, *self.disagreeing})


def report_problem(
    report: dict[str, Any],
    num_examples: int,
    hospital: int,
    previous: dict[str, Any] | None,
    max_patients: int,
    statuses: tuple[str, ...] = STATUSES,
) -> str | None:
    """Why a hospital's training report cannot be accepted (None if it can): a field
    of the wrong type or out of range, another hospital's number, more patients than
    the operator's cap, an epsilon below what it reported before (`previous`, its
    earlier report in this run, or None), or a malformed list of releases."""
    expected = {
        "hospital": int,
        "patients": int,
        "status": str,
        "reason": str,
        "epsilon": float,
        "epsilon_budget": float,
        "delta": float,
        "adjacency": str,
        "accountant": str,
        "noise_multiplier": float,
        "sample_rate": float,
        "steps": int,
        "ledger_reset": str,
        "releases": str,
    }
    unexpected = sorted(set(report) - set(expected))
    if unexpected:
        return f"its report has fields no hospital sends: {', '.join(map(str, unexpected))[:200]}"
    for key, kind in expected.items():
        problem = _type_problem(key, report.get(key), kind)
        if problem:
            return f"its report's {problem}"
    if report["hospital"] != hospital:
        return f"its report claims hospital {report['hospital']}, but it was admitted as {hospital}"
    checks = [
        (
            report["status"] in statuses,
            f"status {quoted(report['status'])} is not one of {statuses}",
        ),
        (1 <= report["patients"] <= max_patients, _patients_problem(report, max_patients)),
        (report["epsilon"] >= 0, "epsilon is negative"),
        (report["epsilon_budget"] > 0, "epsilon_budget is not positive"),
        (0 < report["delta"] < 1, "delta is not between 0 and 1"),
        (report["noise_multiplier"] >= 0, "noise_multiplier is negative"),
        (0 <= report["sample_rate"] <= 1, "sample_rate is not between 0 and 1"),
        (report["steps"] >= 0, "steps is negative"),
        (len(report["reason"]) <= REASON_LIMIT, f"reason is over {REASON_LIMIT} characters"),
        (
            len(report["ledger_reset"]) <= REASON_LIMIT,
            f"ledger_reset is over {REASON_LIMIT} characters",
        ),
    ]
    for sound, problem in checks:
        if not sound:
            return f"its report's {problem}"
    trained = report["status"] == "trained"
    if report["status"] in ("trained", "released") and report["epsilon"] == 0:
        return f"it {report['status']}, yet its report says it spent no epsilon"
    if num_examples != (report["patients"] if trained else 0):
        return (
            f"it weights its update by {num_examples} patients but reports "
            f"{report['patients']} ({report['status']})"
        )
    if previous is not None and report["epsilon"] < previous["epsilon"] - 1e-9:
        return (
            f"its report says epsilon {report['epsilon']:.4g}, less than the "
            f"{previous['epsilon']:.4g} it reported before"
        )
    return _releases_problem(report["releases"])


def _patients_problem(report, max_patients):
    return (
        f"patient count {report['patients']} is outside 1..{max_patients} (max_patients, "
        f"the operator's cap on one hospital's weight)"
    )


def _type_problem(key, value, kind):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        return f"{key} is {type(value).__name__}, not {kind.__name__}"
    if kind is float and not math.isfinite(value):
        return f"{key} is not a finite number"
    return None


def _releases_problem(text):
    if len(text) > RELEASES_LIMIT:
        return f"its report's releases are over {RELEASES_LIMIT} characters"
    try:
        releases = json.loads(text)
    except (ValueError, RecursionError):  # deep nesting exhausts the decoder
        return "its report's releases are not valid JSON"
    if not isinstance(releases, list):
        return "its report's releases are not a list"
    for release in releases:
        if not isinstance(release, dict) or set(release) != set(RELEASE_FIELDS):
            return f"its report's releases hold an entry without exactly {sorted(RELEASE_FIELDS)}"
        for key, kind in RELEASE_FIELDS.items():
            problem = _type_problem(key, release[key], kind)
            if problem:
                return f"its report's release {problem}"
    return None
