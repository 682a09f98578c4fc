"""A hospital's privacy report: what it tells the server after each message, and its check.

The hospital builds a `PrivacyReport` from its ledger and sends it as Flower metrics
(`to_metrics`); the server rebuilds it with `PrivacyReport.read`, which accepts it
only if every field has its type and range and it agrees with what the server knows.
"""

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from typing import Any, Self, get_type_hints

from securehealth.text import quoted, untrusted

REASON_LIMIT = 1000  # characters of a hospital's stated reason kept
RELEASES_LIMIT = 1_000_000  # characters of a report's list of releases (~10,000 of them)
NAME_LIMIT = 40  # characters of a release's mechanism ("dp-sgd", "operating-point")


class Adjacency(StrEnum):
    """Which two data sets count as neighbours: what the guarantee hides.

    As dp-accounting's `NeighboringRelation`: replace-one protects a patient's record
    from being told apart from any other record (the patient count is released);
    add-remove protects a patient's presence.
    """

    REPLACE_ONE = "replace-one"
    ADD_REMOVE = "add-remove"


class Accountant(StrEnum):
    """Which accountant computed a hospital's epsilon."""

    PLD = "pld"  # dp-accounting's privacy loss distribution accountant


class ReportStatus(StrEnum):
    """What a hospital did with the server's message."""

    TRAINED = "trained"  # a training round: it trained and sent its noisy update
    REFUSED = "refused"  # a training round: it declined (budget, hostile model, ...)
    RELEASED = "released"  # the operating point: it sent its DP score histograms
    DECLINED = "declined"  # the operating point: it sent nothing

    @property
    def spends(self) -> bool:
        """Whether a hospital with this status has released something about its patients."""
        return self in (ReportStatus.TRAINED, ReportStatus.RELEASED)


TRAINING_STATUSES = (ReportStatus.TRAINED, ReportStatus.REFUSED)
OPERATING_POINT_STATUSES = (ReportStatus.RELEASED, ReportStatus.DECLINED)


class UnsoundReport(ValueError):
    """A report the server cannot accept; the message says why, for the run's record."""


@dataclass(frozen=True)
class ReportedRelease:
    """One release on the hospital's patients, as its report lists it."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    adjacency: Adjacency
    mechanism: str
    this_run: bool

    @property
    def sound(self) -> bool:
        """Whether its figures are in range (a release anyone could account for)."""
        return (
            self.round >= 0
            and self.noise_multiplier >= 0
            and 0 <= self.sample_rate <= 1
            and self.steps >= 0
            and len(self.mechanism) <= NAME_LIMIT
        )


@dataclass(frozen=True)
class PrivacyReport:
    """A hospital's privacy spending after one message: scalars only, never data.

    `epsilon` is cumulative over every release on the hospital's patients (all of
    them in `releases`, so that anyone can recompute it); the noise multiplier,
    sample rate and steps are this run's; `ledger_reset` says when and why its
    operator started its ledger afresh, if ever.
    """

    hospital: int
    patients: int
    status: ReportStatus
    reason: str
    epsilon: float
    epsilon_budget: float
    delta: float
    adjacency: Adjacency
    accountant: Accountant
    noise_multiplier: float
    sample_rate: float
    steps: int
    ledger_reset: str
    releases: tuple[ReportedRelease, ...]

    def to_metrics(self) -> dict[str, int | float | str]:
        """The report as Flower metrics: scalars, the releases as one JSON text."""
        metrics = {field.name: getattr(self, field.name) for field in fields(self)}
        metrics["releases"] = json.dumps([asdict(release) for release in self.releases])
        return {name: str(v) if isinstance(v, StrEnum) else v for name, v in metrics.items()}

    def as_record(self) -> dict[str, Any]:
        """The report as metrics.json records it: the hospital is the key, not a field."""
        record = asdict(self)
        del record["hospital"]
        return record

    @classmethod
    def read(
        cls,
        metrics: dict[str, Any],
        *,
        hospital: int,
        num_examples: int,
        previous: Self | None,
        max_patients: int,
        statuses: tuple[ReportStatus, ...] = TRAINING_STATUSES,
    ) -> Self:
        """Rebuild a report a hospital sent, accepting it only if it is sound.

        Parameters
        ----------
        metrics : dict
            The metrics of the hospital's reply, as received: anything at all.
        hospital : int
            The number the hospital was admitted as.
        num_examples : int
            The FedAvg weight its reply claims: its patients if it trained, else 0.
        previous : PrivacyReport or None
            Its latest accepted report in this run: epsilon never goes down.
        max_patients : int
            The operator's cap on one hospital's patients (its weight).
        statuses : tuple of ReportStatus
            What a reply to this message may say the hospital did.

        Returns
        -------
        PrivacyReport
            The report, its reason stripped of control characters and cut short.

        Raises
        ------
        UnsoundReport
            A field is missing, unexpected, of the wrong type or out of range, or the
            report disagrees with its admission, its weight or its earlier reports.
        """
        values = _typed_fields(cls, metrics, "its report", "its report's ")
        values["releases"] = _read_releases(values["releases"])
        report = cls(**values)
        report._check(hospital, num_examples, previous, max_patients, statuses)
        # Shown on consoles and in report.md: without the control characters it may hold.
        return replace(
            report,
            reason=untrusted(report.reason, REASON_LIMIT),
            ledger_reset=untrusted(report.ledger_reset, REASON_LIMIT),
        )

    def _check(self, hospital, num_examples, previous, max_patients, statuses) -> None:
        """Raise UnsoundReport where the report disagrees with the server's knowledge."""
        if self.hospital != hospital:
            raise UnsoundReport(
                f"its report claims hospital {self.hospital}, but it was admitted as {hospital}"
            )
        checks = [
            (
                self.status in statuses,
                f"status {quoted(str(self.status))} is not one of {', '.join(statuses)}",
            ),
            (
                1 <= self.patients <= max_patients,
                f"patient count {self.patients} is outside 1..{max_patients} (max_patients, "
                f"the operator's cap on one hospital's weight)",
            ),
            (self.epsilon >= 0, "epsilon is negative"),
            (self.epsilon_budget > 0, "epsilon_budget is not positive"),
            (0 < self.delta < 1, "delta is not between 0 and 1"),
            (self.noise_multiplier >= 0, "noise_multiplier is negative"),
            (0 <= self.sample_rate <= 1, "sample_rate is not between 0 and 1"),
            (self.steps >= 0, "steps is negative"),
            (len(self.reason) <= REASON_LIMIT, f"reason is over {REASON_LIMIT} characters"),
            (
                len(self.ledger_reset) <= REASON_LIMIT,
                f"ledger_reset is over {REASON_LIMIT} characters",
            ),
            (
                all(release.sound for release in self.releases),
                "releases hold a negative noise multiplier, steps or round, a sample "
                "rate outside 0..1, or a mechanism's name that is no name",
            ),
        ]
        for sound, problem in checks:
            if not sound:
                raise UnsoundReport(f"its report's {problem}")
        if self.status.spends and self.epsilon == 0:
            raise UnsoundReport(f"it {self.status}, yet its report says it spent no epsilon")
        weight = self.patients if self.status == ReportStatus.TRAINED else 0
        if num_examples != weight:
            raise UnsoundReport(
                f"it weights its update by {num_examples} patients but reports "
                f"{self.patients} ({self.status})"
            )
        if previous is not None and self.epsilon < previous.epsilon - 1e-9:
            raise UnsoundReport(
                f"its report says epsilon {self.epsilon:.4g}, less than the "
                f"{previous.epsilon:.4g} it reported before"
            )


def _read_releases(text: str) -> tuple[ReportedRelease, ...]:
    """The releases a report lists, from their JSON text; UnsoundReport if malformed."""
    if len(text) > RELEASES_LIMIT:
        raise UnsoundReport(f"its report's releases are over {RELEASES_LIMIT} characters")
    try:
        releases = json.loads(text)
    except (ValueError, RecursionError):  # deep nesting exhausts the decoder
        raise UnsoundReport("its report's releases are not valid JSON") from None
    if not isinstance(releases, list):
        raise UnsoundReport("its report's releases are not a list")
    for release in releases:
        if not isinstance(release, dict):
            raise UnsoundReport("its report's releases hold an entry that is not an object")
    what, field = "its report's release", "its report's release "
    return tuple(
        ReportedRelease(**_typed_fields(ReportedRelease, r, what, field)) for r in releases
    )


def _typed_fields(cls: type, given: dict[str, Any], what: str, field: str) -> dict[str, Any]:
    """`given`'s values for the fields of dataclass `cls`, each checked against its type.

    An int is accepted for a float; a float must be finite; an enum field takes one
    of its values. Raises UnsoundReport, naming `what` was sent or the `field` prefix.
    """
    types = get_type_hints(cls)
    names = [field.name for field in fields(cls)]
    unexpected = sorted(map(str, set(given) - set(names)))
    if unexpected:
        named = ", ".join(map(quoted, unexpected))[:200]
        raise UnsoundReport(f"{what} has fields no hospital sends: {named}")
    values = {}
    for name in names:
        kind = types[name]
        kind = str if getattr(kind, "__origin__", None) is tuple else kind  # releases: JSON
        values[name] = _typed_value(f"{field}{name}", given.get(name), kind)
    return values


def _typed_value(field: str, value: Any, kind: type) -> Any:
    """`value` as `kind`, or UnsoundReport naming the field."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    base = str if issubclass(kind, StrEnum) else kind
    if not isinstance(value, base) or isinstance(value, bool) != (kind is bool):
        raise UnsoundReport(f"{field} is {type(value).__name__}, not {base.__name__}")
    if kind is float and not math.isfinite(float(value)):
        raise UnsoundReport(f"{field} is not a finite number")
    if issubclass(kind, StrEnum):
        if value not in set(kind):
            raise UnsoundReport(f"{field} {quoted(value)} is not one of {', '.join(kind)}")
        return kind(str(value))
    return value
