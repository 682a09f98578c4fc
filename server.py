"""The server: averages the hospitals' models (FedAvg, weighted by patients),
evaluates the global model on its own reference test set after every round, and
writes the run's results (results.py). `app` is the Flower ServerApp.

It never computes a hospital's epsilon itself: each hospital accounts for its own
data and reports what it has spent; the server checks and records those reports.
Only nodes admitted as the run's hospitals (admission.py) take part, and in
deployment the ServerApp runs only a run its operator signed (authorisation.py).

Run as a script, it is the deployment server: a TLS SuperLink that hospitals
(`python client.py --client-id N`) connect to, and one training run on it:

    python server.py --make-certs            # once: a CA and server certificate
    python server.py [--host H] [--port P] [--name value ...]
"""

import json
import math
import os
import re
import sys
import threading
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Error, Message, MessageType
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import (
    evaluateins_to_recorddict,
    recorddict_to_fitres,
    recorddict_to_getpropertiesres,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.strategy.aggregate import aggregate, aggregate_median, aggregate_trimmed_avg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

import data_utils
import reporting
import runtime
import settings
from admission import Admission, report_problem
from authorisation import Unauthorised, claim, verify_run
from certificates import (
    CA_CERT,
    OPERATOR_KEY,
    OPERATOR_PUB,
    SERVER_CERT,
    SERVER_KEY,
    check_hospital_keys,
    load_hospital_key,
    make_certificates,
    make_operator_key,
)
from model import (
    build_model,
    clinical_metrics,
    get_weights,
    predict_risk,
    save_model,
    set_weights,
)
from results import METRICS_FILE, MODEL_FILE, new_run_dir, run_directory, write_json

# What a hospital reports about its own privacy spending, as metrics.json records it:
# epsilon is cumulative over every release on its patients (all listed in
# `releases`); noise multiplier, sample rate and steps are this run's.
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
)
END_NOTICE_TIMEOUT = 30  # seconds to tell the hospitals that the run has ended
# How the hospitals' accepted updates become the new global model (config.aggregation).
AGGREGATIONS = {
    "fedavg": aggregate,  # the mean, weighted by training patients
    "median": aggregate_median,  # coordinate-wise median: one wild update cannot drag it
    "trimmed-mean": lambda updates: aggregate_trimmed_avg(updates, 0.2),  # drops 20% each end
}
# SecAgg+: every hospital's key is shared with all the others, and any two thirds of
# them can unmask a hospital that drops out mid-round (fewer cannot).
SECAGG_SHARES, SECAGG_THRESHOLD = 1.0, 2 / 3
SECAGG_TIMEOUT = 300  # seconds; a hospital silent this long in a SecAgg+ step has dropped out
# Set by `python server.py` for its own SuperLink, never by whoever submits a run: the
# operator's public key (runs must be signed with its private half) and the folder
# of enrolled hospitals' keys (hospital-N.pub).
OPERATOR_PUB_VARIABLE = "SECUREHEALTH_OPERATOR_PUB"
ENROLLED_KEYS_VARIABLE = "SECUREHEALTH_ENROLLED_KEYS"


class AggregationError(RuntimeError):
    """A round ended without a usable update: the run must stop, not pretend."""


class HospitalFedAvg(FedAvg):
    """FedAvg over the admitted hospitals each round, recording each hospital's
    privacy report, leaving out any hospital that refused to train, and rejecting
    (by hospital) any update that is not a sound model of the right shape or comes
    with an unsound report."""

    def __init__(self, cfg, run_dir, admission):
        self.schema = data_utils.load_schema(cfg)
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
        self.test_x, self.test_y, reference = data_utils.reference_test_set(cfg)
        self.started = time.monotonic()
        self.reports = {}  # hospital id -> its latest report
        self.round_reports, self.round_failures, self.round_rejections = {}, [], []
        self.aggregated_round = 0  # the last round whose updates reached aggregate_fit
        self.round_accepted = 0  # updates that went into that round's model
        self.round_discarded = None  # why the round's (secure) sum was thrown away
        self.results = {
            "status": "running",
            "hospitals_connected": 0,
            "refused_nodes": [],
            "config": vars(cfg),
            "data": {
                "name": self.schema.name,
                "test_set": reference,
                "test_patients": len(self.test_y),
                "inputs": self.schema.input_names,
            },
            "rounds": [],
            "final": None,
            "privacy": None,
        }
        self.save()

    def configure_fit(self, server_round, parameters, client_manager):
        """Train every admitted hospital that is connected, and no other node."""
        self.admission.refresh()  # a hospital that restarted asks to be admitted again
        self.results["refused_nodes"] = self.admission.refusals()
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

    def aggregate_fit(self, server_round, results, failures):
        """The new global model from this round's sound updates. Under SecAgg+ every
        result carries the same, already summed model: it is checked as a whole, and
        thrown away if any hospital's report in it is unsound (its update cannot be
        taken out of the sum)."""
        self.aggregated_round = server_round
        self.round_reports, self.round_rejections, self.round_discarded = {}, [], None
        accepted = []
        for proxy, fit_res in results:
            report = dict(fit_res.metrics)
            hospital = self.admission.members.get(proxy.node_id)
            problem = (
                f"node {proxy.node_id} is not an admitted hospital"
                if hospital is None
                else report_problem(
                    report,
                    fit_res.num_examples,
                    hospital,
                    self.reports.get(str(hospital)),
                    self.cfg.max_patients,
                )
            )
            name = str(proxy.node_id if hospital is None else hospital)
            if problem:
                self._reject(name, server_round, problem)
                continue
            report.pop("hospital")
            report["releases"] = json.loads(report["releases"])
            self.round_reports[name] = report
            if report["status"] != "trained":
                log(
                    WARNING,
                    "Hospital %s did not train in round %d: %s",
                    name,
                    server_round,
                    report["reason"],
                )
                continue
            try:
                weights = parameters_to_ndarrays(fit_res.parameters)
            except (ValueError, OSError, EOFError) as error:  # bytes that are no arrays
                self._reject(name, server_round, f"its update is not arrays ({error})")
                continue
            problem = None if self.secure else self.check_update(weights)
            if problem:
                self._reject(name, server_round, problem)
            else:
                accepted.append((weights, fit_res.num_examples))
        self.round_failures = [failure_reason(f) for f in failures]
        for reason in self.round_failures:
            log(WARNING, "A hospital failed in round %d: %s", server_round, reason)
        self.reports.update(self.round_reports)
        if self.secure and self.round_rejections and accepted:
            self.round_discarded = (
                "secure aggregation summed an update whose hospital sent an unsound report; "
                "the sum cannot be separated, so the round's model was thrown away"
            )
            log(WARNING, "Round %d discarded: %s", server_round, self.round_discarded)
            accepted = []
        self.round_accepted = len(accepted)
        if not accepted:
            return None, {}
        if self.secure:
            problem = self.check_update(accepted[0][0])
            if problem:
                raise AggregationError(
                    f"round {server_round}: the securely aggregated model is unusable "
                    f"({problem}). A hospital sent a corrupt update and secure "
                    f"aggregation hides which one; rerun with secure_aggregation off "
                    f"to have the server name and reject it"
                )
            return ndarrays_to_parameters(accepted[0][0]), {}
        return ndarrays_to_parameters(AGGREGATIONS[self.cfg.aggregation](accepted)), {}

    def _reject(self, hospital, server_round, problem):
        log(
            WARNING,
            "Rejected hospital %s's update in round %d: %s",
            hospital,
            server_round,
            problem,
        )
        self.round_rejections.append({"hospital": hospital, "reason": problem})

    @property
    def secure(self):
        return self.cfg.secure_aggregation == "on"

    def check_update(self, weights):
        """Why an update cannot go into the average (None if it can): a wrong
        number or shape of arrays, NaN or infinite values, or a change larger than
        max_update_norm, which honest DP-SGD training never makes."""
        expected = self.global_weights
        if len(weights) != len(expected):
            return f"{len(weights)} weight arrays where the model has {len(expected)}"
        for i, (got, want) in enumerate(zip(weights, expected, strict=True)):
            if got.shape != want.shape:
                return f"weight array {i} has shape {got.shape}, the model's is {want.shape}"
            if not np.issubdtype(got.dtype, np.floating):
                return f"weight array {i} holds {got.dtype}, not floating-point numbers"
            if not np.isfinite(got).all():
                return f"weight array {i} holds NaN or infinite values"
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
        if server_round > 0:
            self._check_round_applied(server_round)
        self.global_weights = weights
        set_weights(self.model, weights)
        risk = predict_risk(self.model, self.test_x)
        metrics = clinical_metrics(self.test_y, risk, self.cfg.decision_threshold)
        if server_round > 0:
            self._record_round(server_round, metrics)
        return metrics["loss"], metrics

    def _check_round_applied(self, server_round):
        """Stop the run when a round's updates never reached the global model for a
        reason other than spent budgets or a discarded sum, instead of carrying on
        with a stale model. The hospitals that trained have recorded the round as
        spent in their ledgers either way: their updates were released."""
        spent = (
            "the hospitals that trained in it have recorded it as spent in their privacy ledgers"
        )
        if self.aggregated_round != server_round:
            raise AggregationError(
                f"round {server_round} was discarded: secure aggregation halted before "
                f"the sum was complete (fewer than two thirds of the hospitals answered, "
                f"or one failed mid-protocol; see the hospitals' consoles); {spent}"
            )
        if self.round_discarded:
            self.results.setdefault("discarded_rounds", []).append(
                {"round": server_round, "reason": f"{self.round_discarded}; {spent}"}
            )
            return
        if self.round_accepted or not (self.round_failures or self.round_rejections):
            return  # an update went in, or every hospital declined (spent budgets)
        reasons = self.round_failures + [
            f"hospital {r['hospital']}: {r['reason']}" for r in self.round_rejections
        ]
        raise AggregationError(
            f"round {server_round}: no hospital's update could be used: " + "; ".join(reasons)
        )

    def _record_round(self, server_round, metrics):
        self.results["rounds"].append(
            {
                "round": server_round,
                "seconds": round(time.monotonic() - self.started, 3),
                "global": metrics,
                "hospitals_trained": self.round_accepted,  # updates in the average
                "failures": self.round_failures,
                "rejected": self.round_rejections,
                **({"discarded": self.round_discarded} if self.round_discarded else {}),
                "hospitals": self.round_reports,
            }
        )
        max_epsilon = max((r["epsilon"] for r in self.reports.values()), default=0.0)
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
        self.save()

    def finish(self):
        """Write model.pt and the final figures (the status is set by the caller)."""
        save_model(
            self.run_dir / MODEL_FILE,
            self.model,
            self.cfg.hidden_layers,
            self.schema,
            self.cfg.decision_threshold,
        )
        self.results["final"] = {"global": self.results["rounds"][-1]["global"]}
        reported = [self.reports[h] for h in sorted(self.reports)]
        self.results["privacy"] = {
            "target_epsilon": self.cfg.epsilon,
            # Each hospital has its own delta: the statement holds with the largest.
            "delta": max((r["delta"] for r in reported), default=self.cfg.delta),
            # Each hospital states its own guarantee; shown once when they agree.
            "adjacency": common_value(reported, "adjacency"),
            "accountant": common_value(reported, "accountant"),
            # Noise comes from a PRNG seeded from OS entropy, not a CSPRNG.
            "secure_rng": False,
            "hospitals": {
                str(h): (
                    {k: self.reports[str(h)][k] for k in (*PRIVACY_KEYS, "patients", "status")}
                    if str(h) in self.reports
                    else {"status": "no report"}  # it failed in every round
                )
                for h in range(self.cfg.num_clients)
            },
        }
        self.save()

    def save(self):
        write_json(self.run_dir / METRICS_FILE, self.results)


def common_value(reports, key):
    """The value of `key` shared by all reports, "per hospital" if they differ
    (None without reports)."""
    values = {r[key] for r in reports}
    return values.pop() if len(values) == 1 else ("per hospital" if values else None)


def failure_reason(failure):
    """What a failed hospital's exception said. Flower reports it as
    "<class '...'>:<'Exception ClientAppException occurred. Message: what it said'>"."""
    if isinstance(failure, tuple):  # (client, FitRes) with an error status
        return failure[1].status.message
    error = failure.args[0] if failure.args else failure
    reason = str(getattr(error, "reason", error))
    return re.sub(r"(?s)^.*Message: |'>$", "", reason).strip()


def wait_for_hospitals(admission, cfg, strategy):
    """Start only when every hospital 0..num_clients-1 has been admitted, and before
    anyone trains, stop if one of them cannot take part (it disagrees on a setting
    that would void the round, or refused the run); otherwise stop with a message
    that says what to change, instead of waiting for a day."""
    deadline = time.monotonic() + cfg.join_timeout
    while True:
        admission.refresh()
        strategy.results["refused_nodes"] = admission.refusals()
        strategy.results["hospitals_connected"] = len(admission.members)
        strategy.save()
        if admission.disagreeing:
            reasons = "; ".join(
                f"hospital {h}: {reason}" for h, reason in admission.disagreeing.values()
            )
            raise RuntimeError(f"not every hospital can take part, so nobody trained: {reasons}")
        if admission.complete():
            return
        if time.monotonic() > deadline:
            missing = sorted(set(range(cfg.num_clients)) - set(admission.members.values()))
            raise RuntimeError(
                f"hospitals {missing} were not admitted within {cfg.join_timeout} s "
                f"(join_timeout; {len(admission.refused)} nodes refused, see metrics.json's "
                f"refused_nodes). With `flwr run`, give the federation that many nodes: "
                f"--federation-config num-supernodes={cfg.num_clients}"
            )
        log(
            INFO,
            "Waiting for hospitals: %d of %d admitted",
            len(admission.members),
            cfg.num_clients,
        )
        time.sleep(1)


def tell_hospitals(grid, nodes, status, reason, final_weights, rounds):
    """Tell the run's hospitals (`nodes`) that the run has ended, so that its launcher can
    stop (a SuperNode never exits by itself), and give it the final model to
    evaluate on its own held-out patients. The NumPyClient API has no message for
    this; an evaluate request carries it, and its reply is only an acknowledgement.

    Waiting for the acknowledgements is bounded: a hospital that vanishes midway
    must not hold the server (Flower may retry pulling a half-sent reply for hours).
    """
    instruction = evaluateins_to_recorddict(
        EvaluateIns(
            ndarrays_to_parameters(final_weights),
            {"run-status": status, "reason": reason, "server_round": rounds},
        ),
        keep_input=True,
    )
    messages = [
        Message(instruction, dst_node_id=node, message_type=MessageType.EVALUATE) for node in nodes
    ]
    notice = threading.Thread(target=grid.send_and_receive, args=(messages,), daemon=True)
    notice.start()
    notice.join(END_NOTICE_TIMEOUT)
    if notice.is_alive():
        log(WARNING, "Not every hospital acknowledged the end of the run")


class PromptGrid(Grid):
    """The run's Grid, collecting replies every 0.2 s where Flower's deployment Grid
    waits 3 s between polls (measured: 1.5 s saved per round), and handing Flower's
    workflows only replies they can read (`readable`)."""

    def __init__(self, grid):
        self.grid = grid

    def set_run(self, run):
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs):  # deprecated by Flower; never called here
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        asked = dict(zip(self.push_messages(messages), messages, strict=True))
        waiting = set(asked)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            for reply in self.pull_messages(waiting):
                question = asked[reply.metadata.reply_to_message_id]
                replies.append(readable(question, reply))
                waiting.discard(reply.metadata.reply_to_message_id)
            if waiting:
                time.sleep(0.2)
        return replies


def readable(question, reply):
    """The reply, or an error reply from its node in its place if Flower's workflows
    could not decode it (they would raise and end the run): whatever one node
    sends fails that node, never the run."""
    if reply.has_error():
        return reply
    try:
        if question.metadata.message_type == MessageType.QUERY:
            recorddict_to_getpropertiesres(reply.content)
        elif question.metadata.message_type == MessageType.TRAIN:
            if RECORD_KEY_CONFIGS in question.content.config_records:  # a SecAgg+ stage
                reply.content.config_records[RECORD_KEY_CONFIGS]
            else:
                recorddict_to_fitres(reply.content, keep_input=True)
    except Exception as error:  # a trust boundary: a node may send anything
        reason = f"its reply is malformed ({type(error).__name__})"
        return Message(Error(ErrorCode.UNKNOWN, reason), reply_to=question)
    return reply


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = settings.decide_auto(settings.from_run_config(context.run_config))
    run_dir = run_directory(cfg, context.run_id)
    operator_pub = os.environ.get(OPERATOR_PUB_VARIABLE)
    if operator_pub:  # started by server.py: nothing runs that its operator did not sign
        try:
            claim(run_dir, verify_run(context.run_config, operator_pub), context.run_id)
        except Unauthorised as refusal:
            raise Unauthorised(f"run {context.run_id} refused: {refusal}") from None
    log(INFO, "SecureHealth-ML: results go to %s", run_dir)
    grid = PromptGrid(grid)
    admission = Admission(grid, cfg, context.run_id, enrolled_keys(cfg))
    strategy = HospitalFedAvg(cfg, run_dir, admission)
    legacy_context = LegacyContext(
        context=context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy
    )
    try:
        wait_for_hospitals(admission, cfg, strategy)
        secure = SecAggPlusWorkflow(
            SECAGG_SHARES,
            SECAGG_THRESHOLD,
            max_weight=cfg.max_patients,
            timeout=SECAGG_TIMEOUT,
        )
        DefaultWorkflow(fit_workflow=secure if strategy.secure else None)(grid, legacy_context)
        strategy.finish()
        status = "finished"
    except BaseException as error:
        strategy.results["error"] = f"{type(error).__name__}: {error}"
        status = "failed"
        raise
    finally:
        try:
            rounds_done = len(strategy.results["rounds"])
            reason = strategy.results.get("error", "")
            final = get_weights(strategy.model)
            tell_hospitals(grid, admission.hospitals(), status, reason, final, rounds_done)
        except Exception as error:  # the run's own outcome is what must be saved
            log(WARNING, "Could not tell the hospitals that the run ended: %s", error)
        strategy.results["status"] = status
        if status == "finished":  # before metrics.json says so: readers may then stop us
            import report  # matplotlib: loaded at the end, not before round 1

            try:
                report.write_report(run_dir, strategy.results)
            except Exception as error:  # the model and metrics stand without it
                strategy.results["report_error"] = f"{type(error).__name__}: {error}"
                log(WARNING, "Could not write the report: %s", error)
        strategy.save()


def enrolled_keys(cfg):
    """{hospital number: public key} of the hospitals the operator enrolled for this
    server (server.py --hospital-keys), or {} where any hospital may join."""
    folder = os.environ.get(ENROLLED_KEYS_VARIABLE)
    if not folder:
        return {}
    enrolled = check_hospital_keys(folder, cfg.num_clients)
    return {number: load_hospital_key(path) for number, path in enrolled.items()}


def serve(argv=None):
    """`python server.py`: the deployment server, with TLS unless --insecure."""
    runtime.interrupt_on_signals()
    parser = settings.make_parser(__doc__)
    group = parser.add_argument_group("deployment")
    group.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for hospitals on other machines",
    )
    group.add_argument("--port", type=int, default=runtime.DEFAULT_PORT, help="port to listen on")
    group.add_argument("--certs-dir", default="certs", help="where the TLS files are")
    group.add_argument(
        "--make-certs",
        action="store_true",
        help="create a CA and a server certificate in --certs-dir, then exit",
    )
    group.add_argument(
        "--cert-hosts",
        default="",
        help="with --make-certs: more names or IPs hospitals reach the server by, comma-separated",
    )
    group.add_argument(
        "--insecure", action="store_true", help="no TLS: everything crosses the network unencrypted"
    )
    group.add_argument(
        "--hospital-keys",
        default="",
        help="a folder of enrolled hospitals' public keys (*.pub, from client.py --make-key): "
        "only hospitals holding one of them may join",
    )
    cfg, args = settings.parse(parser, argv)
    if cfg.data_dir:  # Flower's processes run elsewhere: give them an absolute path
        cfg.data_dir = str(Path(cfg.data_dir).resolve())
    certs = Path(args.certs_dir).resolve()
    console = reporting.make_console()
    if args.make_certs:
        named = [args.host] if args.host not in runtime.WILDCARD_HOSTS else []
        hosts = ["localhost", "127.0.0.1", *named, *filter(None, args.cert_hosts.split(","))]
        tls_files = (CA_CERT, SERVER_CERT, SERVER_KEY)
        try:
            if all((certs / name).is_file() for name in tls_files):
                make_operator_key(certs)  # certificates from before runs were signed
                made = "the operator's run-signing key (operator.key, operator.pub)"
            else:
                make_certificates(certs, list(dict.fromkeys(hosts)))
                made = (
                    f"server.crt and server.key for {', '.join(dict.fromkeys(hosts))}, the "
                    f"CA (ca.crt, ca.key) and the operator's run-signing key (operator.key, "
                    f"operator.pub)"
                )
        except FileExistsError as error:
            parser.error(str(error))
        console.print(
            f"Created in {certs}/: {made}. Give every hospital a copy of {certs / CA_CERT} "
            f"and {certs / OPERATOR_PUB}; the .key files never leave this machine."
        )
        return 0
    if args.insecure:
        console.print(
            "[bold red]WARNING: --insecure: no TLS, model updates cross the "
            "network unencrypted and the server is not authenticated.[/]"
        )
        tls_args, ca_cert, operator_key = ["--insecure"], None, None
    else:
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY, OPERATOR_KEY, OPERATOR_PUB):
            if not (certs / name).is_file():
                parser.error(
                    f"no file {certs / name}: create it with `python server.py "
                    f"--make-certs` (it keeps existing certificates; or use --insecure to test)"
                )
        ca_cert, operator_key = certs / CA_CERT, certs / OPERATOR_KEY
        tls_args = [
            *(["--enable-supernode-auth"] if args.hospital_keys else []),
            "--ssl-certfile",
            str(certs / SERVER_CERT),
            "--ssl-keyfile",
            str(certs / SERVER_KEY),
            "--ssl-ca-certfile",
            str(ca_cert),
        ]
    hospital_keys, environment = {}, {}
    if operator_key:  # the ServerApp refuses any run this operator did not sign
        environment[OPERATOR_PUB_VARIABLE] = str(certs / OPERATOR_PUB)
    if args.hospital_keys:
        if args.insecure:
            parser.error("--hospital-keys needs TLS: drop --insecure")
        try:
            hospital_keys = check_hospital_keys(args.hospital_keys, cfg.num_clients)
        except ValueError as error:
            parser.error(str(error))
        environment[ENROLLED_KEYS_VARIABLE] = str(Path(args.hospital_keys).resolve())
    try:
        data_utils.check_all(cfg, pool_held_out=False)
        runtime.ensure_port_free(args.host, args.port)
        cfg.run_dir = str(new_run_dir(cfg.run_dir))
    except (data_utils.DataError, runtime.FlowerError, FileExistsError) as error:
        parser.error(f"{error}; choose another with --port" if "port" in str(error) else str(error))
    console.print(
        f"[bold]SecureHealth-ML[/] server on {args.host}:{args.port} "
        f"({'TLS' if ca_cert else 'no TLS'}; secure aggregation {cfg.secure_aggregation}; "
        f"{f'{len(hospital_keys)} enrolled hospitals' if hospital_keys else 'any hospital'} "
        f"may join): {cfg.rounds} rounds once {cfg.num_clients} "
        f"hospitals have joined. Start each with: python client.py --client-id N"
    )
    if not hospital_keys:
        console.print(
            "[yellow]Any machine that reaches this port can join as a hospital and claim "
            "a free hospital number: enrol the hospitals' keys with --hospital-keys.[/]"
        )
    exit_code, metrics = runtime.run_federation(
        cfg,
        console,
        tls_args,
        ca_cert=ca_cert,
        hospital_keys=list(hospital_keys.values()),
        operator_key=operator_key,
        environment=environment,
        host=args.host,
        port=args.port,
    )
    if metrics is not None:
        reporting.print_summary(metrics, cfg.run_dir, console)
    return exit_code


if __name__ == "__main__":
    sys.exit(serve())
