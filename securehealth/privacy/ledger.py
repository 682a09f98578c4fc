"""Record-level privacy accounting for one hospital.

Every noisy DP-SGD step on a hospital's patients is a release of information about
them. This module decides how much noise a run needs so that ALL releases on the
hospital's patients, over all rounds, runs and versions of its data, stay within
its (epsilon, delta) budget, and it keeps the ledger that proves it.

What is guaranteed is stated for what is released. Each hospital's update comes
with its exact number of training patients (the FedAvg weight; the sample rate and
step count follow from it), so the neighbouring datasets that matter have the same
size: one patient's record replaced by any other (`replace-one`). `add-remove` is
available for a hospital whose patient count is public knowledge anyway.

The epsilon arithmetic is Google's dp-accounting: its privacy loss distribution
(PLD) accountant, the tight one, and the only one of its accountants that handles
replace-one adjacency for the Poisson-sampled Gaussian mechanism of DP-SGD.
"""

import fcntl
import math
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from securehealth.privacy import data_index
from securehealth.privacy.accountant import (
    ACCOUNTANT,
    ADJACENCIES,
    MAX_NOISE_MULTIPLIER,
    BudgetExhausted,
    NoiseBeyondLimit,
    calibrate_noise_multiplier,
    epsilon_spent,
)
from securehealth.results import DEMO_RUNS_DIR, STATUS_FILE, read_json, write_json

LEDGER_FILE = "privacy-ledger.json"
LOCK_FILE = "privacy-ledger.lock"
LEDGER_FORMAT = 2
MAX_RESET_REASON = 300  # characters of an operator's reason for starting a ledger afresh
# What a release was: a round of DP-SGD, or an operating point's noisy score
# histograms (operating_point.py). Both are accounted as Poisson-sampled Gaussian
# mechanisms (the histograms: sample rate 1, one step); earlier releases name none.
DP_SGD, OPERATING_POINT = "dp-sgd", "operating-point"
# The share of what is left of a hospital's budget that an operating point's release
# would cost alone; training is calibrated for the rest, and the two composed (PLD)
# stay within the budget.
OPERATING_POINT_SHARE = 0.4


class LedgerError(Exception):
    """The privacy ledger cannot be used (not writable, held by another training,
    unreadable); the message says how to fix it."""


class PrivacyLedger:
    """Every DP release a hospital has made from its patients, in one JSON file in the
    hospital's own state directory, and the budget they are held to.

    One budget covers everything the hospital has trained on, across runs and
    versions of its data: every release composes with every other. Nothing the
    server sets (seed, test_fraction, a new run) and no change of the data file (a
    patient more, relabelled identifiers) starts a fresh one, since nothing in the
    rows can prove that two datasets share no patient. The ledger lists each version
    of the data it has seen.

    A ledger is never reset. One that is missing where the hospital has left traces
    of earlier releases (its status file, this machine's ledger index) is refused:
    the budget already spent is unknown. Its operator may then start a new one
    deliberately (`reset`, client.py and simulation.py --reset-ledger), which records
    when and why in the new ledger and in every later report.

    The guarantee it accounts for (delta, adjacency) is fixed by the first release:
    it may later become stricter (a smaller delta; replace-one instead of
    add-remove), never looser, which would re-price what was already spent.

    Use it inside `transaction()`: it holds an exclusive lock on the ledger and reads
    it afresh, so that concurrent trainings on one hospital never lose a release.
    """

    def __init__(self, state_dir, budget, delta, adjacency, lasting=False, data_file=None):
        """A `lasting` ledger (a deployed hospital's, or a simulated one's on your own
        data; not a tool's scratch ledger) is known to this machine's index
        (data_index.py) once it releases anything, and claims there `data_file`, the
        file of the hospital's own patients, when it first accounts for it."""
        self.budget, self.delta, self.adjacency = budget, delta, adjacency
        self.lasting, self.data_file = lasting, data_file
        self.directory = Path(state_dir)
        self.path = self.directory / LEDGER_FILE
        self.data = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / LOCK_FILE, "a"):
                pass
        except OSError as error:
            raise LedgerError(
                f"cannot keep the privacy ledger in {self.directory} ({error.strerror}): "
                f"give the hospital a writable state directory (client.py --state-dir)"
            ) from None

    @contextmanager
    def transaction(self, timeout: float = 600) -> Iterator[Self]:
        """Hold the ledger exclusively, read afresh, for a read-check-train-record
        sequence. Another training on the same hospital waits up to `timeout` s."""
        with self._locked(timeout):
            try:
                self.data = self._read()
                self._check_guarantee()
                yield self
            finally:
                self.data = None

    @contextmanager
    def _locked(self, timeout):
        with open(self.directory / LOCK_FILE, "r+") as lock:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        holder = lock.read().strip() or "another process"
                        raise LedgerError(
                            f"the privacy ledger {self.path} is held by {holder} for more "
                            f"than {timeout:g} s: another training on this hospital's "
                            f"patients is running; wait for it to finish"
                        ) from None
                    time.sleep(0.2)
            try:
                lock.seek(0)
                lock.truncate()
                lock.write(f"process {os.getpid()}")
                lock.flush()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def reset(self, reason: str) -> None:
        """Start a new, empty ledger where this hospital's ledger is missing, on its
        operator's word: `reason` and the time go into the new ledger, and into every
        later report. A ledger that exists is never reset."""
        if not 0 < len(reason.strip()) <= MAX_RESET_REASON:
            raise LedgerError(
                f"say why the ledger is started afresh, in 1 to {MAX_RESET_REASON} "
                f'characters: --reset-ledger "why"'
            )
        with self._locked(timeout=600):
            if self.path.exists():
                raise LedgerError(
                    f"the privacy ledger {self.path} exists, and a budget is never reset "
                    f"while its ledger exists: leave out --reset-ledger"
                )
            self.data = self._new()
            self.data["resets"].append({"utc": _now(), "reason": reason.strip()})
            self._save()
            self.data = None

    def _new(self):
        return {
            "format": LEDGER_FORMAT,
            "datasets": [],
            "plans": {},
            "resets": [],
            **self._earlier_ledgers(),
        }

    def _traces(self) -> list[str]:
        """What in the state directory and on this machine shows that this hospital
        has spent from its budget before (empty for a new hospital)."""
        found = []
        status = self.directory / STATUS_FILE
        try:
            spent = lasting_trace(read_json(status), self.path) if status.exists() else {}
            spent = spent.get("epsilon", 0)
        except (OSError, ValueError, AttributeError):
            spent = 0
        if isinstance(spent, (int, float)) and spent > 0:
            found.append(f"its status file {status} records epsilon {spent:.4g} spent")
        return found + data_index.traces(self.path)

    @property
    def resets(self) -> list[dict[str, str]]:
        """When and why this hospital's operator started the ledger afresh."""
        return self.data.get("resets", [])

    def reset_notice(self) -> str:
        """The ledger's resets in words, for every report ("" if it never was)."""
        if not self.resets:
            return ""
        last = self.resets[-1]
        times = f" ({len(self.resets)} times)" if len(self.resets) > 1 else ""
        return (
            f"the privacy ledger was started afresh{times} by the hospital's operator on "
            f"{last['utc'][:19]}Z: {last['reason']!r}; releases before that are not in "
            f"its epsilon"
        )

    def _read(self):
        if not self.path.exists():
            traces = self._traces()
            if traces:
                raise LedgerError(
                    f"this hospital's privacy ledger {self.path} is missing, but "
                    f"{'; '.join(traces)}: the budget already spent on its patients is "
                    f"unknown. Restore the ledger from a backup; only if it is lost for "
                    f'good, start a new one deliberately with --reset-ledger "why" '
                    f"(client.py, simulation.py), which records when and why in every "
                    f"later report"
                )
            return self._new()
        try:
            data = read_json(self.path)
            if data.get("format") != LEDGER_FORMAT:
                raise LedgerError(
                    f"{self.path} is not a privacy ledger of this version (format "
                    f"{data.get('format')!r}, expected {LEDGER_FORMAT}); never delete a "
                    f"ledger: keep it and ask the product's maintainers"
                )
            _check_structure(data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise _damaged(f"the privacy ledger {self.path}", error) from None
        return data

    def _check_guarantee(self):
        """Refuse a looser guarantee than the one already accounted for; adopt a
        stricter one."""
        held = self.data["guarantee"]
        if held and (
            self.delta > held["delta"]
            or (held["adjacency"] == "replace-one" and self.adjacency != "replace-one")
        ):
            raise LedgerError(
                f"this hospital's privacy ledger {self.path} accounts for delta "
                f"{held['delta']:g} and {held['adjacency']} adjacency; a looser guarantee "
                f"(delta {self.delta:g}, {self.adjacency}) would re-price what was already "
                f"spent: set delta and adjacency back"
            )
        self.data["guarantee"] = {"delta": self.delta, "adjacency": self.adjacency}

    def _earlier_ledgers(self):
        """The releases recorded by the first version of this product (one
        ledger-*.json per training split), and the guarantee they were accounted
        for (add-remove, their smallest delta), which may then only get stricter.
        Their files are left as they are."""
        try:
            earlier = [read_json(path) for path in sorted(self.directory.glob("ledger-*.json"))]
            releases = [
                {"adjacency": "add-remove", **release}  # what they were calibrated for
                for ledger in earlier
                for release in ledger["releases"]
            ]
            deltas = [float(p["delta"]) for ledger in earlier for p in ledger["plans"].values()]
            for release in releases:
                _mechanism(release)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise _damaged(f"an earlier privacy ledger in {self.directory}", error) from None
        guarantee = {"delta": min(deltas), "adjacency": "add-remove"} if deltas else None
        return {"guarantee": guarantee, "releases": sorted(releases, key=lambda r: r["utc"])}

    def _save(self):
        write_json(self.path, self.data)

    def note_dataset(self, fingerprint: str, patients: int, everyone: str = "") -> None:
        """Record a version of the hospital's data (its training rows, `fingerprint`)
        the first time it is trained on; its releases compose with all earlier ones.
        Raises data_index.DataClaimed if another ledger on this machine accounts for
        the hospital's data file or its patients (`everyone`: all of them,
        data.patients_fingerprint). Claimed once per version (a version noted by an
        earlier release of the product, before the index, is claimed when next used)."""
        noted = next((d for d in self.data["datasets"] if d["fingerprint"] == fingerprint), None)
        if noted is not None and (self.data_file is None or noted.get("claimed")):
            return
        if self.data_file is not None:
            try:
                data_index.claim(self.data_file, self.path, rows=everyone)
            except data_index.DataClaimed:
                raise
            except data_index.IndexProblem as error:
                raise LedgerError(str(error)) from None
        if noted is None:
            noted = {"fingerprint": fingerprint, "patients": patients, "first_used": _now()}
            self.data["datasets"].append(noted)
        if self.data_file is not None:
            noted["claimed"] = True

    @property
    def releases(self) -> list[dict[str, Any]]:
        return self.data["releases"]

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """(noise_multiplier, sample_rate, steps) of every release, consecutive equal
        mechanisms merged (what the accountant composes)."""
        merged = []
        for release in self.releases:
            sigma, sample_rate, steps = _mechanism(release)
            if merged and merged[-1][:2] == (sigma, sample_rate):
                merged[-1] = (sigma, sample_rate, merged[-1][2] + steps)
            else:
                merged.append((sigma, sample_rate, steps))
        return merged

    def epsilon(self, extra: Iterable[tuple[float, float, int]] = ()) -> float:
        """Cumulative epsilon of every release, plus `extra` mechanisms if given."""
        return epsilon_spent([*self.history, *extra], self.delta, self.adjacency)

    def noise_for_round(
        self,
        run_id: int | str,
        sample_rate: float,
        steps: int,
        planned_steps: int,
        max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
        operating_point: bool = False,
    ) -> float:
        """The noise multiplier for a round of `steps` noisy steps, or BudgetExhausted
        (NoiseBeyondLimit if the budget needs more than `max_noise_multiplier`).

        Calibrated once per run, when it first trains, for all its `planned_steps` on
        top of everything the ledger already holds, and kept in the ledger so that
        every round of the run uses the same one. Each round is checked again: other
        runs may have spent from the same patients meanwhile.

        With `operating_point` the run also reserves its operating point's release
        (operating_point.py): its noise is calibrated first, so that it alone would
        cost OPERATING_POINT_SHARE of what is left of the budget, and training is
        calibrated for the rest, composed with it; every round keeps room for it.
        """
        key = str(run_id)
        if key not in self.data["plans"]:
            sigma, reserved = self._calibrate_run(
                sample_rate, planned_steps, max_noise_multiplier, operating_point
            )
            self.data["plans"][key] = {
                "noise_multiplier": sigma,
                "sample_rate": sample_rate,
                "planned_steps": planned_steps,
                "epsilon_budget": self.budget,
                "delta": self.delta,
                "adjacency": self.adjacency,
                "accountant": ACCOUNTANT,
                "utc": _now(),
                **({"operating_point_noise": reserved[0][0]} if reserved else {}),
            }
            if self.lasting:  # before a run releases: an index that cannot be kept stops it
                try:
                    data_index.releasing(self.path)
                except data_index.IndexProblem as error:
                    raise LedgerError(str(error)) from None
            self._save()
        sigma = self.data["plans"][key]["noise_multiplier"]
        after = self.epsilon([(sigma, sample_rate, steps), *self._reserved(key)])
        if after > self.budget:
            raise BudgetExhausted(
                f"this round would bring epsilon to {after:.3f}, past the budget of {self.budget:g}"
            )
        return sigma

    def planned_noise(
        self,
        sample_rate: float,
        planned_steps: int,
        max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
        operating_point: bool = False,
    ) -> float:
        """The noise multiplier a new run would train with (as noise_for_round would
        plan it), planning nothing: for a forecast before a run. BudgetExhausted
        (NoiseBeyondLimit) where the hospital could not train in it."""
        with self.transaction():
            return self._calibrate_run(
                sample_rate, planned_steps, max_noise_multiplier, operating_point
            )[0]

    def epsilon_after_run(
        self, noise_multiplier: float, sample_rate: float, planned_steps: int, operating_point: bool
    ) -> float:
        """The cumulative epsilon after a new run trained with `noise_multiplier` (as
        planned_noise gave it) and released the operating point it would reserve:
        the budget, unless the noise had to stop at the least calibration goes to."""
        with self.transaction():
            reserved = []
            if operating_point:
                reserved = [(self._operating_point_noise(self.budget - self.epsilon()), 1.0, 1)]
            return self.epsilon([*reserved, (noise_multiplier, sample_rate, planned_steps)])

    def _calibrate_run(self, sample_rate, planned_steps, max_noise_multiplier, operating_point):
        """(noise multiplier, [the operating point's release it reserves]) of a new
        run, on top of everything the ledger holds (see noise_for_round)."""
        reserved = []
        if operating_point:
            left = self.budget - self.epsilon()
            reserved = [(self._operating_point_noise(left), 1.0, 1)]
        try:
            sigma = calibrate_noise_multiplier(
                self.budget,
                self.delta,
                sample_rate,
                planned_steps,
                self.adjacency,
                [*self.history, *reserved],
                max_noise_multiplier,
            )
        except NoiseBeyondLimit as refusal:
            if not reserved or refusal.least_epsilon is None:
                raise
            training = [(max_noise_multiplier, sample_rate, planned_steps)]
            raise NoiseBeyondLimit(self._least_budget(training)) from None
        return sigma, reserved

    def _operating_point_noise(self, left: float) -> float:
        """The noise multiplier of an operating point's release that alone would cost
        OPERATING_POINT_SHARE of `left`, the budget left (accounted as one Gaussian
        release, sample rate 1)."""
        if left <= 0:
            raise BudgetExhausted(f"no budget is left (epsilon budget {self.budget:g})")
        return calibrate_noise_multiplier(
            OPERATING_POINT_SHARE * left, self.delta, 1.0, 1, self.adjacency
        )

    def _least_budget(self, training: list[tuple[float, float, int]]) -> float:
        """The least budget (cumulative, to 1e-3 of it) within which `training` and
        the operating point's release it would reserve both fit, by bisection from
        what the training alone needs."""
        spent = self.epsilon()

        def fits(budget):
            noise = self._operating_point_noise(budget - spent)
            return self.epsilon([*training, (noise, 1.0, 1)]) <= budget

        low = self.epsilon(training)
        high = (low - OPERATING_POINT_SHARE * spent) / (1 - OPERATING_POINT_SHARE)
        while not fits(high):  # composition at one delta may exceed the sum a little
            low, high = high, 2 * high
        while high - low > 1e-3 * high:
            middle = (low + high) / 2
            low, high = (low, middle) if fits(middle) else (middle, high)
        return high

    def _reserved(self, run_id: str) -> list[tuple[float, float, int]]:
        """The operating point's release that run `run_id` planned and has not made."""
        noise = self.data["plans"][run_id].get("operating_point_noise")
        if noise is None or self.operating_point_released(run_id):
            return []
        return [(noise, 1.0, 1)]

    def operating_point_released(self, run_id: int | str) -> bool:
        return any(
            r["run_id"] == str(run_id) and r.get("mechanism") == OPERATING_POINT
            for r in self.releases
        )

    def operating_point_noise(self, run_id: int | str) -> float:
        """The noise multiplier for run `run_id`'s operating point's release, which a
        run makes once, after it trained with one reserved (noise_for_round); else
        BudgetExhausted saying why not."""
        plan = self.data["plans"].get(str(run_id), {})
        if "operating_point_noise" not in plan:
            raise BudgetExhausted(
                "this hospital reserved no operating point in this run (it did not train "
                "in it, or the run set a fixed decision threshold)"
            )
        if self.operating_point_released(run_id):
            raise BudgetExhausted("this run's operating point was released already")
        noise = plan["operating_point_noise"]
        after = self.epsilon([(noise, 1.0, 1)])
        if after > self.budget:
            raise BudgetExhausted(
                f"the operating point would bring epsilon to {after:.3f}, past the budget "
                f"of {self.budget:g}"
            )
        return noise

    def record(
        self,
        run_id: int | str,
        server_round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        mechanism: str = DP_SGD,
    ) -> None:
        """Append one release (one round's training, or an operating point's
        histograms: `mechanism`) and persist it."""
        release = {
            "run_id": str(run_id),
            "round": server_round,
            "mechanism": mechanism,
            "noise_multiplier": noise_multiplier,
            "sample_rate": sample_rate,
            "steps": steps,
            "adjacency": self.adjacency,
            "utc": _now(),
        }
        self.releases.append(release)
        release["epsilon_after"] = self.epsilon()
        self._save()


def lasting_trace(status: dict[str, Any], lasting_ledger: Path) -> dict[str, Any]:
    """What a hospital's status file says its lasting ledger `lasting_ledger` had spent
    ({"epsilon", "ledger"}, or {}): the status's own figures, unless they are a
    demonstration run's (its ledger in demo-runs/), which keeps the lasting ones
    under "lasting". A trace the ledger relies on if it is lost."""
    if "lasting" in status:
        return dict(status["lasting"])
    if Path(str(status.get("ledger", ""))).is_relative_to(lasting_ledger.parent / DEMO_RUNS_DIR):
        return {}
    return {key: status[key] for key in ("epsilon", "ledger") if key in status}


def add_reset_flag(parser: Any) -> None:
    """The launchers' --reset-ledger (an argparse parser or group)."""
    parser.add_argument(
        "--reset-ledger",
        metavar="WHY",
        help="start a new privacy ledger where this hospital's ledger is lost (never "
        "where one exists): WHY and the time are kept in it and shown in every later "
        "report",
    )


def check_before_start(
    state_dir: str | Path,
    cfg: Any,
    data_file: str | Path | None = None,
    reset_reason: str | None = None,
    everyone: str = "",
) -> "PrivacyLedger":
    """A hospital's ledger, checked before a launcher (client.py, simulation.py)
    starts anything, so that a problem is one line there rather than a failed round:
    started afresh first if its operator said so (`reset_reason`), then readable and
    its guarantee no looser than cfg's, this machine's ledger index writable, and,
    for a hospital's own `data_file` (whose patients have the fingerprint
    `everyone`), the only ledger on this machine that accounts for them. Raises
    LedgerError."""
    ledger = PrivacyLedger(state_dir, cfg.epsilon, cfg.delta, cfg.adjacency)
    if reset_reason is not None:
        ledger.reset(reset_reason)
    with ledger.transaction(timeout=5):
        pass
    try:
        data_index.check_writable()
        if data_file is not None:
            data_index.claim(data_file, ledger.path, rows=everyone, record=False)
    except data_index.IndexProblem as error:
        raise LedgerError(str(error)) from None
    return ledger


def _mechanism(release):
    """(noise_multiplier, sample_rate, steps) of a recorded release, checked."""
    sigma, rate, steps = release["noise_multiplier"], release["sample_rate"], release["steps"]
    if not (math.isfinite(sigma) and sigma > 0 and 0 < rate <= 1 and int(steps) == steps >= 0):
        raise ValueError(f"impossible release {release!r}")
    return float(sigma), float(rate), int(steps)


def _damaged(ledger, error):
    return LedgerError(
        f"{ledger} is unreadable or damaged ({error!r}): this hospital does not train "
        f"until it is restored from a backup"
    )


def _check_structure(data):
    """Raise (KeyError, TypeError, ValueError) unless `data` is a sound ledger."""
    guarantee = data["guarantee"]
    if guarantee is not None and not (
        0 < guarantee["delta"] < 1 and guarantee["adjacency"] in ADJACENCIES
    ):
        raise ValueError(f"impossible guarantee {guarantee!r}")
    if not isinstance(data["datasets"], list) or not isinstance(data["releases"], list):
        raise TypeError("datasets and releases must be lists")
    for reset in data.get("resets", []):
        if not (isinstance(reset["utc"], str) and isinstance(reset["reason"], str)):
            raise TypeError(f"impossible reset {reset!r}")
    for release in data["releases"]:
        _mechanism(release)
        str(release["run_id"])
        if release.get("mechanism", DP_SGD) not in (DP_SGD, OPERATING_POINT):
            raise ValueError(f"impossible release {release!r}")
    for plan in data["plans"].values():
        _mechanism({**plan, "steps": plan["planned_steps"]})


def _now():
    return datetime.now(UTC).isoformat(timespec="microseconds")
