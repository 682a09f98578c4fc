"""The server's strategy, `HospitalFedAvg`: FedAvg over the admitted hospitals (admission.py).

Each update is checked before it counts, the global model is evaluated on the server's
own reference test set after every round, and every round is recorded (run_record.py).
It never computes a hospital's epsilon: each hospital accounts for its own data and
reports what it has spent; the strategy checks and records those reports.
"""

import math
import re
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.common import (
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    log,
    ndarrays_to_parameters,
)
from flwr.server import ClientManager
from flwr.server.strategy import FedAvg

from securehealth import clinical, data, operating_point
from securehealth.aggregation import ServerMomentum, combine
from securehealth.model import (
    arrays_like,
    build_model,
    clinical_metrics,
    get_weights,
    predict_risk,
    save_model,
    set_weights,
    weights_problem,
)
from securehealth.privacy.report import (
    OPERATING_POINT_STATUSES,
    REASON_LIMIT,
    PrivacyReport,
    ReportStatus,
    UnsoundReport,
)
from securehealth.results import MODEL_FILE
from securehealth.run_record import RunRecord
from securehealth.text import untrusted

# Rounds whose updates may be thrown away (by hospitals that cannot be told apart
# under SecAgg+) before the run stops: each one costs every hospital that trained
# in it a round of its budget.
DISCARDS_BEFORE_STOP = 2


class AggregationError(RuntimeError):
    """A round ended without a usable update: the run must stop, not pretend."""


@dataclass
class RoundOutcome:
    """What became of one round's replies: the record of the round, and what decides its fate.

    Built by `HospitalFedAvg.aggregate_fit` as it reads the replies, and read once the
    round's global model is evaluated.
    """

    server_round: int
    reports: dict[str, PrivacyReport] = field(default_factory=dict)  # hospital -> its report
    failures: list[str] = field(default_factory=list)  # what failed hospitals said
    rejections: list[dict[str, str]] = field(default_factory=list)  # hospital, reason
    accepted: int = 0  # updates that went into the round's model
    discarded: str | None = None  # why the round's updates were thrown away, if they were
    weights_capped: dict[str, list[int]] = field(default_factory=dict)  # [claimed, used]

    @property
    def all_declined(self) -> bool:
        """Whether every hospital that answered declined to train (and none failed)."""
        return (
            not self.accepted
            and bool(self.reports)
            and all(r.status != ReportStatus.TRAINED for r in self.reports.values())
        )

    def as_record(self) -> dict[str, Any]:
        """Return the round's outcome as metrics.json records it beside the global metrics."""
        return {
            "hospitals_trained": self.accepted,
            "failures": self.failures,
            "rejected": self.rejections,
            **({"weights_capped": self.weights_capped} if self.weights_capped else {}),
            **({"discarded": self.discarded} if self.discarded else {}),
            "hospitals": {name: report.as_record() for name, report in self.reports.items()},
        }


class HospitalFedAvg(FedAvg):
    """FedAvg over the admitted hospitals, each update and privacy report checked before it counts.

    Each round it records every hospital's privacy report, leaves out any hospital that
    declined to train, and rejects (by hospital) any update that is not a sound model of
    the right shape or comes with an unsound report.

    Parameters
    ----------
    cfg : Settings
        The run's settings.
    run_dir : Path
        The run directory, where metrics.json and model.pt are written.
    admission : Admission
        The run's members: only admitted hospitals train, and their numbers name them.
    """

    def __init__(self, cfg, run_dir, admission):
        self.schema = data.load_schema(cfg)
        torch.manual_seed(cfg.seed)
        self.model = build_model(len(self.schema.input_names), cfg.hidden_layers)
        self.global_weights = get_weights(self.model)
        super().__init__(
            fraction_fit=1.0,
            # No Flower evaluation round: it would send each hospital's figures on its
            # held-out patients here, a release about them without DP. Hospitals
            # evaluate for themselves and keep the figures; the server uses its own data.
            fraction_evaluate=0.0,
            min_fit_clients=cfg.min_fit_clients,
            min_available_clients=cfg.min_available_clients,
            initial_parameters=ndarrays_to_parameters(self.global_weights),
            on_fit_config_fn=lambda server_round: {"server_round": server_round},
            evaluate_fn=self._evaluate_global,
        )
        self.cfg, self.run_dir, self.admission = cfg, run_dir, admission
        self.test_x, self.test_y, reference = data.reference_test_set(cfg)
        self.server_momentum = ServerMomentum(cfg.server_momentum)
        self.reports: dict[str, PrivacyReport] = {}  # hospital -> its latest report
        self.trained: dict[str, PrivacyReport] = {}  # hospital -> its latest report of training
        self.last_round = RoundOutcome(0)  # the last round whose replies reached aggregate_fit
        # The decision threshold: fixed, or chosen after the last round
        # (choose_operating_point); until then the figures use a provisional one.
        self.target = operating_point.Target.parse(cfg.decision_threshold)
        self.threshold = operating_point.working_threshold(cfg.decision_threshold)
        self.record = RunRecord(
            cfg,
            run_dir,
            {
                "name": self.schema.name,
                "test_set": reference,
                "test_patients": len(self.test_y),
                "inputs": self.schema.input_names,
            },
        )

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[Any, FitIns]]:
        """Train every admitted hospital that is connected, and no other node.

        Parameters
        ----------
        server_round : int
            The round about to start, from 1.
        parameters : Parameters
            The global model that the hospitals start from.
        client_manager : ClientManager
            Flower's connected nodes.

        Returns
        -------
        list of (ClientProxy, FitIns)
            One training instruction per admitted, connected hospital.

        Raises
        ------
        AggregationError
            If fewer than min_fit_clients admitted hospitals are connected.
        """
        self.admission.refresh()  # a hospital that restarted asks to be admitted again
        self.record.results["refused_nodes"] = self.admission.refusals()
        members = [
            proxy
            for proxy in client_manager.all().values()
            if proxy.node_id in self.admission.members
        ]
        if len(members) < self.min_fit_clients:
            raise AggregationError(
                f"round {server_round}: only {len(members)} admitted hospitals are "
                f"connected, fewer than min_fit_clients ({self.min_fit_clients})"
            )
        instruction = FitIns(parameters, {"server_round": server_round})
        return [(proxy, instruction) for proxy in members]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[Any, FitRes]],
        failures: list[tuple[Any, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Combine the round's sound updates into the new global model (None if none may count).

        No hospital's FedAvg weight counts for more than the rest's together, and the
        server's momentum steps towards the combined model, unless the round must be
        thrown away (_discard_reason). Under SecAgg+ every result carries the same,
        already summed model: it is checked as a whole. What became of each reply is
        kept in `last_round`.

        Parameters
        ----------
        server_round : int
            The round, from 1.
        results : list of (ClientProxy, FitRes)
            The hospitals' replies: an update with its privacy report, or a report only.
        failures : list
            The replies that failed, or their exceptions.

        Returns
        -------
        tuple of (Parameters or None, dict)
            The new global model (None keeps the old one), and no metrics.
        """
        outcome = RoundOutcome(server_round)
        self.last_round = outcome
        accepted = []
        for reply in results:
            update = self._read_reply(outcome, reply)
            if update:
                accepted.append(update)
        outcome.failures = [failure_reason(f) for f in failures]
        for reason in outcome.failures:
            log(WARNING, "A hospital failed in round %d: %s", server_round, reason)
        self.reports.update(outcome.reports)
        outcome.discarded = self._discard_reason(outcome, accepted) if accepted else None
        if outcome.discarded:
            log(WARNING, "Round %d discarded: %s", server_round, outcome.discarded)
            accepted = []
        outcome.accepted = len(accepted)
        if not accepted:
            return None, {}
        combined = accepted[0][1] if self.secure else self._combine(outcome, accepted)
        return ndarrays_to_parameters(self.server_momentum.step(self.global_weights, combined)), {}

    def _read_reply(
        self, outcome: RoundOutcome, reply: tuple[Any, FitRes]
    ) -> tuple[str, list[np.ndarray], int] | None:
        """One hospital's training reply: (hospital, weights, patients) if it may count, else None.

        Its report goes into `outcome` if it is sound; an unsound report or update is
        rejected there, by hospital, with why.
        """
        proxy, fit_res = reply
        hospital = self.admission.members.get(proxy.node_id)
        name = str(proxy.node_id if hospital is None else hospital)
        try:
            if hospital is None:
                raise UnsoundReport(f"node {proxy.node_id} is not an admitted hospital")
            report = PrivacyReport.read(
                dict(fit_res.metrics),
                hospital=hospital,
                num_examples=fit_res.num_examples,
                previous=self.reports.get(name),
                max_patients=self.cfg.max_patients,
            )
            before = self.trained.get(name)
            if (
                report.status == ReportStatus.TRAINED
                and before
                and before.patients != report.patients
            ):
                raise UnsoundReport(
                    f"it trained with {before.patients} patients before in this run, and "
                    f"claims {report.patients} now"
                )
            outcome.reports[name] = report
            if report.status != ReportStatus.TRAINED:
                log(
                    WARNING,
                    "Hospital %s did not train in round %d: %s",
                    name,
                    outcome.server_round,
                    report.reason,
                )
                return None
            try:
                weights = arrays_like(fit_res.parameters.tensors, self.global_weights)
            except ValueError as error:  # its header decides nothing before it is checked
                raise UnsoundReport(f"its update is not the model's arrays ({error})") from None
            problem = None if self.secure else self.check_update(weights)
            if problem:
                raise UnsoundReport(problem)
        except UnsoundReport as problem:
            self._reject(outcome, name, str(problem))
            return None
        self.trained[name] = report
        return name, weights, fit_res.num_examples

    def _combine(
        self, outcome: RoundOutcome, accepted: list[tuple[str, list[np.ndarray], int]]
    ) -> list[np.ndarray]:
        """The accepted updates combined by the run's aggregation, each weight bounded."""
        updates = bounded_weights(accepted)
        outcome.weights_capped = {
            name: [claimed, used]
            for (name, _, claimed), (_, _, used) in zip(accepted, updates, strict=True)
            if used < claimed
        }
        return combine(self.cfg.aggregation, [(w, p) for _, w, p in updates])

    def _discard_reason(
        self, outcome: RoundOutcome, accepted: list[tuple[str, list[np.ndarray], int]]
    ) -> str | None:
        """Return why the round's updates must not become the global model (None if they may).

        Under SecAgg+ the sum is one update whose senders cannot be told apart: it is
        thrown away whole if a hospital in it sent an unsound report, or if it moves the
        model further than any honest round can (max_update_norm: each honest hospital
        keeps its DP noise within it before it trains, and a weighted mean of updates
        within it stays within it). With SecAgg+ or without, fewer sound updates than
        min_fit_clients would be one hospital's update presented as the federation's.
        """
        if self.secure and outcome.rejections:
            return (
                "secure aggregation summed an update whose hospital sent an unsound report; "
                "the sum cannot be separated, so the round's model was thrown away"
            )
        if len(accepted) < self.min_fit_clients:
            return (
                f"only {len(accepted)} hospital's update could be used, fewer than "
                f"min_fit_clients ({self.min_fit_clients}), so the round's model was "
                f"thrown away"
            )
        problem = self.check_update(accepted[0][1]) if self.secure else None
        return problem and (
            f"the securely aggregated model is implausible ({problem}): a hospital "
            f"sent an update no honest DP training makes, and secure aggregation "
            f"hides which one, so the round's model was thrown away"
        )

    def _reject(self, outcome: RoundOutcome, hospital: str, problem: str) -> None:
        """Leave a hospital's reply out of the round, saying why."""
        log(
            WARNING,
            "Rejected hospital %s's update in round %d: %s",
            hospital,
            outcome.server_round,
            problem,
        )
        outcome.rejections.append({"hospital": hospital, "reason": problem})

    @property
    def secure(self) -> bool:
        """Whether the round's training goes through SecAgg+ (the server sees only the sum)."""
        return self.cfg.secure_aggregation == "on"

    def check_update(self, weights: list[np.ndarray]) -> str | None:
        """Return why an update cannot go into the average (None if it can).

        Parameters
        ----------
        weights : list of np.ndarray
            A hospital's model after its round (or, under SecAgg+, the summed model).

        Returns
        -------
        str or None
            The problem: a wrong number or shape of arrays, NaN or infinite values, or
            a change larger than max_update_norm, which honest DP-SGD training never
            makes.
        """
        expected = self.global_weights
        problem = weights_problem(weights, expected)
        if problem:
            return problem
        change = math.sqrt(
            sum(float(np.sum((g - w) ** 2)) for g, w in zip(weights, expected, strict=True))
        )
        if change > self.cfg.max_update_norm:
            return (
                f"it moves the model by {change:.3g} (L2 norm), more than "
                f"max_update_norm {self.cfg.max_update_norm:g}"
            )
        return None

    def _evaluate_global(self, server_round, weights, config):
        """Evaluate the global model on the reference test set; check and record a trained round."""
        if server_round > 0:
            self._check_round_applied(server_round)
        self.global_weights = weights
        set_weights(self.model, weights)
        risk = predict_risk(self.model, self.test_x)
        metrics = clinical_metrics(self.test_y, risk, self.threshold)
        if server_round > 0:
            self._record_round(server_round, metrics)
            self._stop_if_all_declined(server_round)
            self._stop_after_discards()
        return metrics["loss"], metrics

    def _stop_if_all_declined(self, server_round):
        """Stop the run when every hospital declined a round (recorded as such).

        Their budgets do not come back, so every later round would be the same.
        """
        if not self.last_round.all_declined:
            return
        raise AggregationError(
            f"round {server_round}: every hospital declined to train, so the run stops "
            f"(each one's reason is in the round's line above and in metrics.json)"
        )

    def _stop_after_discards(self):
        """Stop the run once DISCARDS_BEFORE_STOP rounds were thrown away.

        Whoever sends what no honest hospital does would otherwise spend every
        hospital's budget round after round.
        """
        discarded = [r["round"] for r in self.record.results.get("discarded_rounds", [])]
        last = self.last_round.discarded
        if last and len(discarded) >= DISCARDS_BEFORE_STOP:
            raise AggregationError(
                f"rounds {discarded} were discarded (the last: {last}); the "
                f"hospitals that trained in them have recorded them as spent, so the run "
                f"stops rather than spend more on updates that cannot be used. Under secure "
                f"aggregation the hospital responsible cannot be named: rerun with "
                f"secure_aggregation off to have the server name and reject it"
            )

    def _check_round_applied(self, server_round):
        """Stop the run when a round's updates were lost: SecAgg+ halted, or none could be used.

        Carrying on would train from a stale model. A discarded round is only recorded
        (_stop_after_discards counts them), and one that every hospital declined is
        left to _stop_if_all_declined. The hospitals that trained have recorded the
        round as spent in their ledgers either way: their updates were released.
        """
        spent = (
            "the hospitals that trained in it have recorded it as spent in their privacy ledgers"
        )
        outcome = self.last_round
        if outcome.server_round != server_round:
            raise AggregationError(
                f"round {server_round} was discarded: secure aggregation halted before "
                f"the sum was complete (fewer than two thirds of the hospitals answered, "
                f"one failed mid-protocol, or one sent a masked update that cannot be "
                f"summed; see the server's log and the hospitals' consoles); {spent}"
            )
        if outcome.discarded:
            self.record.discard_round(server_round, f"{outcome.discarded}; {spent}")
            return
        if outcome.accepted or not (outcome.failures or outcome.rejections):
            return  # an update went in, or every hospital declined (see _stop_if_all_declined)
        reasons = outcome.failures + [
            f"hospital {r['hospital']}: {r['reason']}" for r in outcome.rejections
        ]
        raise AggregationError(
            f"round {server_round}: no hospital's update could be used: " + "; ".join(reasons)
        )

    def _record_round(self, server_round, metrics):
        """Record the round in metrics.json and log its line."""
        self.record.add_round(server_round, metrics, self.last_round.as_record())
        max_epsilon = max((r.epsilon for r in self.reports.values()), default=0.0)
        log(
            INFO,
            "Round %d/%d: global AUC %.3f, accuracy %.3f, max epsilon %.3f of %g",
            server_round,
            self.cfg.rounds,
            metrics["auc"],
            metrics["accuracy"],
            max_epsilon,
            self.cfg.epsilon,
        )

    @property
    def chooses_threshold(self) -> bool:
        """Whether the run chooses its decision threshold (a target, not a number)."""
        return self.target is not None

    def choose_operating_point(self, replies: dict[int, EvaluateRes | str]) -> None:
        """Choose the decision threshold for the run's target from the hospitals' histograms.

        The choice is recorded in metrics.json with what each hospital did. Where no
        threshold can be chosen the provisional one stays, and the run says so.

        Parameters
        ----------
        replies : dict
            Node id to its reply (an EvaluateRes with its report and histograms), or to
            why it has none (str).
        """
        released, outcome = [], {}
        for node, reply in replies.items():
            hospital = self.admission.members.get(node)
            name = str(node if hospital is None else hospital)
            try:
                report, release = self._operating_point_reply(hospital, reply)
            except UnsoundReport as problem:
                outcome[name] = {"status": "rejected", "reason": str(problem)}
                log(WARNING, "Hospital %s's operating point was not used: %s", name, problem)
                continue
            self.reports[name] = report
            outcome[name] = {"status": str(report.status), "reason": report.reason}
            if release is not None:
                released.append(release)
        try:
            point = operating_point.choose(released, self.target)
        except operating_point.NoOperatingPoint as reason:
            self.record.results["operating_point"] = {
                "target": str(self.target),
                "threshold": self.threshold,
                "chosen": False,
                "reason": f"{reason}; the provisional threshold {self.threshold:g} stands",
                "hospitals": outcome,
            }
            log(WARNING, "No operating point: %s", self.record.results["operating_point"]["reason"])
            return
        self.threshold = point.threshold
        self.record.results["operating_point"] = {
            **point.as_record(),
            "chosen": True,
            "hospitals": outcome,
        }
        log(
            INFO,
            "Operating point (%s): threshold %.3f, expected sensitivity %.2f, specificity %.2f",
            point.target,
            point.threshold,
            point.expected_sensitivity,
            point.expected_specificity,
        )

    def _operating_point_reply(
        self, hospital: int | None, reply: EvaluateRes | str
    ) -> tuple[PrivacyReport, operating_point.Release | None]:
        """A hospital's operating-point reply: its report, and its release (None if it declined).

        A hospital may send anything: its report is checked as a training report is,
        and its histograms against what it reports (operating_point.Release.read).

        Raises
        ------
        UnsoundReport
            Why the reply cannot be used.
        """
        if hospital is None:
            raise UnsoundReport("it is not an admitted hospital")
        if isinstance(reply, str):
            raise UnsoundReport(reply)
        metrics = dict(reply.metrics)
        text = metrics.pop("histograms", None)
        report = PrivacyReport.read(
            metrics,
            hospital=hospital,
            num_examples=reply.num_examples,
            previous=self.reports.get(str(hospital)),
            max_patients=self.cfg.max_patients,
            statuses=OPERATING_POINT_STATUSES,
        )
        if report.status != ReportStatus.RELEASED:
            return report, None
        trained = self.trained.get(str(hospital))
        if trained is None or trained.patients != report.patients:  # its FedAvg weight
            raise UnsoundReport(
                f"it reports {report.patients} patients, where its training reports "
                f"in this run said {trained.patients if trained else 'nothing'}"
            )
        releases = [asdict(r) for r in report.releases]
        try:
            return report, operating_point.Release.read(text, releases, report.patients)
        except operating_point.ReleaseProblem as problem:
            raise UnsoundReport(str(problem)) from None

    def finish(self) -> None:
        """Write model.pt with the run's decision threshold, and record the final figures at it.

        The figures are overall and per subgroup, with the usefulness warnings; the
        caller sets the run's status.
        """
        save_model(
            self.run_dir / MODEL_FILE,
            self.model,
            self.cfg.hidden_layers,
            self.schema,
            self.threshold,
        )
        risk = predict_risk(self.model, self.test_x)
        final: dict[str, Any] = clinical_metrics(self.test_y, risk, self.threshold)
        confusion = clinical.Confusion.at(self.test_y, risk, self.threshold)
        final.update(asdict(confusion), prevalence=confusion.prevalence)
        final["calibration"] = asdict(clinical.Calibration.of(self.test_y, risk))
        final["subgroups_unrecorded"] = self.schema.unrecorded(self.test_x)
        final["subgroups"] = [
            asdict(figures)
            for figures in clinical.subgroup_figures(
                self.schema.subgroups(self.test_x), self.test_y, risk, self.threshold
            )
        ]
        self.record.finish(self.reports, final)
        last = self.record.results["rounds"][-1]
        self.record.results["warnings"] = clinical.usefulness_warnings(
            final,
            confusion,
            self.cfg.num_clients,
            last["hospitals_trained"],
            self.record.results.get("operating_point"),
        )
        self.record.save()


def bounded_weights(
    updates: list[tuple[str, list[np.ndarray], int]],
) -> list[tuple[str, list[np.ndarray], int]]:
    """Return the updates with each FedAvg weight capped at the sum of the others'.

    No hospital, whatever patient count it claims, then outweighs the rest of the round
    together; a lone update is left as it is.

    Parameters
    ----------
    updates : list of (str, list of np.ndarray, int)
        Each update's hospital, weights and claimed patient count.

    Returns
    -------
    list of (str, list of np.ndarray, int)
        The same updates, each with the patient count it is weighted by.
    """
    if len(updates) < 2:
        return updates
    total = sum(patients for _, _, patients in updates)
    return [(name, weights, min(patients, total - patients)) for name, weights, patients in updates]


def failure_reason(failure: tuple[Any, FitRes] | BaseException) -> str:
    """Return what a failed hospital's exception said: its start, without control characters.

    The hospital chose the text. Flower reports it as
    "<class '...'>:<'Exception ClientAppException occurred. Message: what it said'>".
    """
    if isinstance(failure, tuple):  # (client, FitRes) with an error status
        return untrusted(failure[1].status.message, REASON_LIMIT)
    error = failure.args[0] if failure.args else failure
    reason = str(getattr(error, "reason", error))
    return untrusted(re.sub(r"(?s)^.*Message: |'>$", "", reason).strip(), REASON_LIMIT)
