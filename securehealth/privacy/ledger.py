"""Record-level privacy accounting for one hospital: its privacy ledger and budget.

Every noisy DP-SGD step on a hospital's patients is a release about them. PrivacyLedger
sets the noise a run needs so that all releases, over all rounds, runs and versions of
the data, stay within the hospital's (epsilon, delta) budget, and keeps the proof.
What is guaranteed, and why replace-one: docs/explanation/privacy-guarantee.md.
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
from securehealth.results import read_json, write_json
from securehealth.state_directory import DEMO_RUNS_DIR, LEDGER_FILE, StateDirectory

LOCK_FILE = "privacy-ledger.lock"
LEDGER_FORMAT = 2
MAX_RESET_REASON = 300  # characters of an operator's reason for starting a ledger afresh
# What a release was: a round of DP-SGD, or an operating point's noisy score
# histograms (operating_point.py). Both are accounted as Poisson-sampled Gaussian
# mechanisms (the histograms: sample rate 1, one step); a release naming none is DP-SGD.
DP_SGD, OPERATING_POINT = "dp-sgd", "operating-point"
# The share of what is left of a hospital's budget that an operating point's release
# would cost alone; training is calibrated for the rest, and the two composed (PLD)
# stay within the budget.
OPERATING_POINT_SHARE = 0.4


class LedgerError(Exception):
    """The privacy ledger cannot be used; the message says how to fix it.

    It is not writable, held by another training, or unreadable.
    """


class PrivacyLedger:
    """Every DP release a hospital has made from its patients, and the budget they are held to.

    Kept in one JSON file in the hospital's own state directory. One budget covers
    everything the hospital has trained on, across runs and versions of its data, since
    nothing in the rows can prove that two datasets share no patient. A ledger is never
    reset: one missing where the hospital left traces of earlier releases is refused
    until its operator starts a new one (`reset`). Its guarantee (delta, adjacency) may
    become stricter, never looser. Use it inside `transaction()`, which holds it
    exclusively and reads it afresh. See docs/explanation/privacy-guarantee.md.
    """

    def __init__(self, state_dir, budget, delta, adjacency, lasting=False, data_file=None):
        """A hospital's ledger in `state_dir`, held to `budget` at `delta` under `adjacency`.

        A `lasting` ledger (a deployed hospital's, or a simulated one's on your own
        data; not a tool's scratch ledger) is known to this machine's index
        (data_index.py) once it releases anything, and claims there `data_file`, the
        file of the hospital's own patients, when it first accounts for it.

        Raises
        ------
        LedgerError
            Where the state directory cannot be written.
        """
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
        """Hold the ledger exclusively, read afresh, for a read-check-train-record sequence.

        Another training on the same hospital waits up to `timeout` s.

        Raises
        ------
        LedgerError
            Where another training holds it longer, it is missing where traces of it
            remain or is damaged, or the settings' guarantee is looser than its own.
        """
        with self._locked(timeout):
            try:
                self.data = self._read()
                self._check_guarantee()
                yield self
            finally:
                self.data = None

    @contextmanager
    def _locked(self, timeout):
        """Hold the ledger's lock file exclusively, writing this process's id in it."""
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
        """Start a new, empty ledger where this hospital's is missing, on its operator's word.

        `reason` and the time go into the new ledger, and into every later report. A
        ledger that exists is never reset.

        Raises
        ------
        LedgerError
            Where `reason` is empty or longer than MAX_RESET_REASON, or the ledger exists.
        """
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
        """An empty ledger, holding the releases of any ledger-*.json files (_earlier_ledgers)."""
        return {
            "format": LEDGER_FORMAT,
            "datasets": [],
            "plans": {},
            "resets": [],
            **self._earlier_ledgers(),
        }

    def _traces(self) -> list[str]:
        """What shows that this hospital has spent from its budget before (empty if nothing).

        Its status file in the state directory, and this machine's ledger index.
        """
        found = []
        status = StateDirectory(self.directory).status_file
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
        """The ledger as stored, or a new one where there is none and no trace of one."""
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
        """Refuse a looser guarantee than the one already accounted for; adopt a stricter one."""
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
        """The releases in ledger files of format 1 (ledger-*.json), and their guarantee.

        Format 1 kept one file per training split; its releases were accounted for
        add-remove at their smallest delta, a guarantee that may then only get
        stricter. Those files are left as they are.
        """
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
        """Write the ledger."""
        write_json(self.path, self.data)

    def note_dataset(self, fingerprint: str, patients: int, everyone: str = "") -> None:
        """Record a version of the hospital's data the first time it is trained on.

        Its releases compose with all earlier ones. The hospital's data file is claimed
        in this machine's index once per version (a version noted without a claim is
        claimed when next used).

        Parameters
        ----------
        fingerprint : str
            The fingerprint of its training rows (data.fingerprint).
        patients : int
            Its number of training patients.
        everyone : str
            The fingerprint of all its patients (data.patients_fingerprint).

        Raises
        ------
        data_index.DataClaimed
            Where another ledger on this machine accounts for the hospital's data file
            or its patients.
        LedgerError
            Where this machine's ledger index cannot be kept.
        """
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
        """Every release recorded, in order."""
        return self.data["releases"]

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Every release's (noise_multiplier, sample_rate, steps), as the accountant composes them.

        Consecutive equal mechanisms are merged.
        """
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
        """The noise multiplier for a round of `steps` noisy steps of run `run_id`.

        Calibrated once per run, when it first trains, for all its `planned_steps` on
        top of everything the ledger already holds, and kept in the ledger so that
        every round of the run uses the same one. Each round is checked again: other
        runs may have spent from the same patients meanwhile.

        With `operating_point` the run also reserves its operating point's release
        (operating_point.py): its noise is calibrated first, so that it alone would
        cost OPERATING_POINT_SHARE of what is left of the budget, and training is
        calibrated for the rest, composed with it; every round keeps room for it.

        Parameters
        ----------
        run_id : int or str
            The run.
        sample_rate : float
            The Poisson sample rate of the run's steps.
        steps : int
            This round's noisy steps.
        planned_steps : int
            All the run's noisy steps, for its calibration.
        max_noise_multiplier : float
            The most noise the run may add (schedule.noise_limit).
        operating_point : bool
            Whether the run reserves an operating point's release.

        Raises
        ------
        BudgetExhausted
            Where the round would take epsilon past the budget (NoiseBeyondLimit: only
            more noise than `max_noise_multiplier` would keep it within).
        LedgerError
            Where a lasting ledger's first plan cannot be noted in this machine's index.
        """
        key = str(run_id)
        if key not in self.data["plans"]:
            self._plan_run(key, sample_rate, planned_steps, max_noise_multiplier, operating_point)
        sigma = self.data["plans"][key]["noise_multiplier"]
        after = self.epsilon([(sigma, sample_rate, steps), *self._reserved(key)])
        if after > self.budget:
            raise BudgetExhausted(
                f"this round would bring epsilon to {after:.3f}, past the budget of {self.budget:g}"
            )
        return sigma

    def _plan_run(self, key, sample_rate, planned_steps, max_noise_multiplier, operating_point):
        """Calibrate run `key` and keep its plan in the ledger (see noise_for_round)."""
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

    def planned_noise(
        self,
        sample_rate: float,
        planned_steps: int,
        max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
        operating_point: bool = False,
    ) -> float:
        """The noise multiplier a new run would train with, planning nothing: for a forecast.

        As noise_for_round would plan it.

        Raises
        ------
        BudgetExhausted
            Where the hospital could not train in it (NoiseBeyondLimit: not within
            `max_noise_multiplier`).
        """
        with self.transaction():
            return self._calibrate_run(
                sample_rate, planned_steps, max_noise_multiplier, operating_point
            )[0]

    def epsilon_after_run(
        self, noise_multiplier: float, sample_rate: float, planned_steps: int, operating_point: bool
    ) -> float:
        """The cumulative epsilon after a new run trained with `noise_multiplier`.

        With `noise_multiplier` as planned_noise gave it, and the operating point's
        release the run would reserve: the budget, unless the noise had to stop at the
        least calibration goes to.
        """
        with self.transaction():
            reserved = []
            if operating_point:
                reserved = [(self._operating_point_noise(self.budget - self.epsilon()), 1.0, 1)]
            return self.epsilon([*reserved, (noise_multiplier, sample_rate, planned_steps)])

    def _calibrate_run(self, sample_rate, planned_steps, max_noise_multiplier, operating_point):
        """(noise multiplier, [the operating point's release it reserves]) of a new run.

        On top of everything the ledger holds (see noise_for_round).
        """
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
        """The noise multiplier of an operating point's release, given `left` of the budget.

        The release alone would cost OPERATING_POINT_SHARE of `left` (accounted as one
        Gaussian release, sample rate 1).
        """
        if left <= 0:
            raise BudgetExhausted(f"no budget is left (epsilon budget {self.budget:g})")
        return calibrate_noise_multiplier(
            OPERATING_POINT_SHARE * left, self.delta, 1.0, 1, self.adjacency
        )

    def _least_budget(self, training: list[tuple[float, float, int]]) -> float:
        """The least budget within which `training` and its operating point's release fit.

        Cumulative, to 1e-3 of it, by bisection from what the training alone needs.
        """
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
        """Whether run `run_id` has released its operating point."""
        return any(
            r["run_id"] == str(run_id) and r.get("mechanism") == OPERATING_POINT
            for r in self.releases
        )

    def operating_point_noise(self, run_id: int | str) -> float:
        """The noise multiplier for run `run_id`'s operating point's release.

        A run makes it once, after it trained with one reserved (noise_for_round).

        Raises
        ------
        BudgetExhausted
            Where the run reserved none, released it already, or it would take epsilon
            past the budget.
        """
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
        """Append one release and persist it.

        `mechanism` says what it is: a round's training (DP_SGD) or an operating
        point's histograms (OPERATING_POINT).
        """
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
    """What a hospital's status file says its lasting ledger `lasting_ledger` had spent.

    A trace the ledger relies on if it is lost.

    Returns
    -------
    dict
        {"epsilon", "ledger"}, or {}: the status's own figures, unless they are a
        demonstration run's (its ledger in demo-runs/), which keeps the lasting ones
        under "lasting".
    """
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
    """A hospital's ledger, checked before a launcher (client.py, simulation.py) starts anything.

    A problem is then one line there rather than a failed round. The ledger is started
    afresh first if its operator said so, then must be readable with a guarantee no
    looser than cfg's; this machine's ledger index must be writable and, for a
    hospital's own data file, name no other ledger for its patients.

    Parameters
    ----------
    state_dir : str or Path
        The hospital's state directory.
    cfg : Settings
        The run's settings (epsilon, delta, adjacency).
    data_file : str or Path, optional
        The hospital's own data file.
    reset_reason : str, optional
        The operator's reason to start a new ledger (--reset-ledger).
    everyone : str
        The fingerprint of all the file's patients (data.patients_fingerprint).

    Returns
    -------
    PrivacyLedger
        The ledger.

    Raises
    ------
    LedgerError
        The first problem found, in one line.
    """
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
    """The LedgerError of an unreadable or damaged ledger."""
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
    """The time, UTC, to the microsecond."""
    return datetime.now(UTC).isoformat(timespec="microseconds")
