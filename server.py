"""The server: averages the hospitals' models (FedAvg, weighted by patients),
evaluates the global model on its own reference test set after every round, and
writes the run's results (results.py). `app` is the Flower ServerApp.

It never computes a hospital's epsilon itself: each hospital accounts for its own
data and reports what it has spent; the server records those reports.

Run as a script, it is the deployment server: a TLS SuperLink that hospitals
(`python client.py --client-id N`) connect to, and one training run on it:

    python server.py --make-certs            # once: a CA and server certificate
    python server.py [--host H] [--port P] [--name value ...]
"""

import json
import math
import re
import sys
import threading
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.common import EvaluateIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.compat.common.recorddict_compat import evaluateins_to_recorddict
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.strategy.aggregate import aggregate, aggregate_median, aggregate_trimmed_avg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

import data_utils
import reporting
import runtime
import settings
from certificates import CA_CERT, SERVER_CERT, SERVER_KEY, check_hospital_keys, make_certificates
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


class AggregationError(RuntimeError):
    """A round ended without a usable update: the run must stop, not pretend."""


class HospitalFedAvg(FedAvg):
    """FedAvg over every hospital each round, recording each hospital's privacy
    report, leaving out any hospital that refused to train, and rejecting (by
    hospital) any update that is not a sound model of the right shape."""

    def __init__(self, cfg, run_dir):
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
        self.cfg, self.run_dir = cfg, run_dir
        self.test_x, self.test_y, reference = data_utils.reference_test_set(cfg)
        self.started = time.monotonic()
        self.reports = {}  # hospital id -> its latest report
        self.round_reports, self.round_failures, self.round_rejections = {}, [], []
        self.aggregated_round = 0  # the last round whose updates reached aggregate_fit
        self.round_accepted = 0  # updates that went into that round's model
        self.results = {
            "status": "running",
            "hospitals_connected": 0,
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

    def aggregate_fit(self, server_round, results, failures):
        """The new global model from this round's sound updates. Under SecAgg+ every
        result carries the same, already summed model: it is checked as a whole."""
        self.aggregated_round = server_round
        self.round_reports, self.round_rejections = {}, []
        accepted = []
        for _, fit_res in results:
            report = dict(fit_res.metrics)
            hospital = str(report.pop("hospital"))
            report["releases"] = json.loads(report["releases"])
            self.round_reports[hospital] = report
            if report["status"] != "trained":
                log(
                    WARNING,
                    "Hospital %s did not train in round %d: %s",
                    hospital,
                    server_round,
                    report["reason"],
                )
                continue
            weights = parameters_to_ndarrays(fit_res.parameters)
            problem = None if self.secure else self.check_update(weights)
            if problem:
                log(
                    WARNING,
                    "Rejected hospital %s's update in round %d: %s",
                    hospital,
                    server_round,
                    problem,
                )
                self.round_rejections.append({"hospital": hospital, "reason": problem})
            else:
                accepted.append((weights, fit_res.num_examples))
        self.round_failures = [failure_reason(f) for f in failures]
        for reason in self.round_failures:
            log(WARNING, "A hospital failed in round %d: %s", server_round, reason)
        self.reports.update(self.round_reports)
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
        reason other than spent budgets, instead of carrying on with a stale model."""
        if self.aggregated_round != server_round:
            raise AggregationError(
                f"round {server_round}: no update reached the global model: secure "
                f"aggregation halted before the sum was complete. Usually the server "
                f"(secure_aggregation on) and a hospital disagree on secure_aggregation, "
                f"or fewer than two thirds of the hospitals answered; see the hospitals' "
                f"consoles"
            )
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


def wait_for_hospitals(grid, cfg, strategy):
    """Start only when exactly num_clients hospitals are connected; otherwise stop
    with a message that says what to change, instead of waiting for a day."""
    deadline = time.monotonic() + cfg.join_timeout
    while (connected := len(grid.get_node_ids())) < cfg.num_clients:
        if connected != strategy.results["hospitals_connected"]:
            strategy.results["hospitals_connected"] = connected
            strategy.save()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {connected} of {cfg.num_clients} hospitals connected within "
                f"{cfg.join_timeout} s (join_timeout). With `flwr run`, give the "
                f"federation that many nodes: --federation-config "
                f"num-supernodes={cfg.num_clients}"
            )
        log(INFO, "Waiting for hospitals: %d of %d connected", connected, cfg.num_clients)
        time.sleep(1)
    if connected > cfg.num_clients:
        raise RuntimeError(
            f"{connected} hospitals connected but num_clients is {cfg.num_clients}: "
            f"set num_clients to {connected} or connect fewer"
        )
    strategy.results["hospitals_connected"] = connected
    strategy.save()


def tell_hospitals(grid, status, reason, final_weights, rounds):
    """Tell every connected hospital that the run has ended, so that its launcher can
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
        Message(instruction, dst_node_id=node, message_type=MessageType.EVALUATE)
        for node in grid.get_node_ids()
    ]
    notice = threading.Thread(target=grid.send_and_receive, args=(messages,), daemon=True)
    notice.start()
    notice.join(END_NOTICE_TIMEOUT)
    if notice.is_alive():
        log(WARNING, "Not every hospital acknowledged the end of the run")


class PromptGrid(Grid):
    """The run's Grid, collecting replies every 0.2 s where Flower's deployment Grid
    waits 3 s between polls (measured: 1.5 s saved per round)."""

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
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            for reply in self.pull_messages(waiting):
                replies.append(reply)
                waiting.discard(reply.metadata.reply_to_message_id)
            if waiting:
                time.sleep(0.2)
        return replies


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = settings.decide_auto(settings.from_run_config(context.run_config))
    run_dir = run_directory(cfg, context.run_id)
    log(INFO, "SecureHealth-ML: results go to %s", run_dir)
    grid = PromptGrid(grid)
    strategy = HospitalFedAvg(cfg, run_dir)
    legacy_context = LegacyContext(
        context=context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy
    )
    try:
        wait_for_hospitals(grid, cfg, strategy)
        secure = SecAggPlusWorkflow(
            SECAGG_SHARES,
            SECAGG_THRESHOLD,
            max_weight=cfg.secagg_max_patients,
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
            tell_hospitals(grid, status, reason, get_weights(strategy.model), rounds_done)
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
        try:
            make_certificates(certs, list(dict.fromkeys(hosts)))
        except FileExistsError as error:
            parser.error(str(error))
        console.print(
            f"Created {certs}/: server.crt and server.key for {', '.join(dict.fromkeys(hosts))}, "
            f"and the CA (ca.crt, ca.key). Give every hospital a copy of {certs / CA_CERT}; "
            f"the keys never leave this machine."
        )
        return 0
    if args.insecure:
        console.print(
            "[bold red]WARNING: --insecure: no TLS, model updates cross the "
            "network unencrypted and the server is not authenticated.[/]"
        )
        tls_args, ca_cert = ["--insecure"], None
    else:
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
            if not (certs / name).is_file():
                parser.error(
                    f"no TLS file {certs / name}: create the certificates with "
                    f"`python server.py --make-certs` (or use --insecure to test)"
                )
        ca_cert = certs / CA_CERT
        tls_args = [
            *(["--enable-supernode-auth"] if args.hospital_keys else []),
            "--ssl-certfile",
            str(certs / SERVER_CERT),
            "--ssl-keyfile",
            str(certs / SERVER_KEY),
            "--ssl-ca-certfile",
            str(ca_cert),
        ]
    hospital_keys = []
    if args.hospital_keys:
        if args.insecure:
            parser.error("--hospital-keys needs TLS: drop --insecure")
        try:
            hospital_keys = check_hospital_keys(args.hospital_keys)
        except ValueError as error:
            parser.error(str(error))
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
    exit_code, metrics = runtime.run_federation(
        cfg,
        console,
        tls_args,
        ca_cert=ca_cert,
        hospital_keys=hospital_keys,
        host=args.host,
        port=args.port,
    )
    if metrics is not None:
        reporting.print_summary(metrics, cfg.run_dir, console)
    return exit_code


if __name__ == "__main__":
    sys.exit(serve())
