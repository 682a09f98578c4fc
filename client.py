"""One hospital: trains the shared model on its own patients with DP-SGD (Opacus)
and sends back only the new weights and a privacy report (scalars). `app` is the
Flower ClientApp, run in simulation (simulation.py) and deployment alike.

Run as a script, it is a hospital in a deployment: a SuperNode that connects to the
server (`python server.py`), trains when asked, and exits when the run ends:

    python client.py --client-id N [--server-address host:port] [--name value ...]

The hospital owns its privacy budget: epsilon, delta, adjacency and which of its
patients it holds out (test_fraction) come from this hospital's own settings,
whatever the server asks for, and its privacy ledger lives in its own state
directory, so that every run on its patients spends from the same budget. It never
trains without that ledger. It also decides whether its updates go out only through
secure aggregation, and it runs only an app identical to its own copy (pinning.py).
A deployed hospital takes part only in runs its server's operator signed, each run
once (authorisation.py), and proves its identity with its enrolled key before it
trains (admission.py).
"""

import json
import os
import sys
import time
from datetime import UTC, datetime
from logging import ERROR
from pathlib import Path

import torch
from flwr.app import Context, Message, MessageType
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, GetPropertiesRes, Status
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import (
    getpropertiesres_to_recorddict,
    recorddict_to_getpropertiesins,
)
from rich.markup import escape

import data_utils
import pinning
import reporting
import runtime
import settings
import training
from authorisation import Unauthorised, prove_identity, verify_run
from certificates import OPERATOR_PUB, make_hospital_key
from model import build_model, clinical_metrics, get_weights, predict_risk, set_weights
from privacy import ACCOUNTANT, BudgetExhausted, LedgerError, PrivacyLedger
from results import HOSPITALS_DIR_VARIABLE, default_state_root, read_json, write_json

STATUS_FILE = "status.json"  # in a hospital's state directory: what it did last
AUTH_KEY = "hospital.key"  # ... its identity for servers that admit only enrolled hospitals
EVALUATION_FILE = "evaluation.json"  # ... and how each global model did on its patients
END_GRACE = 3  # seconds between the server's end-of-run notice and leaving
REFUSED_RUN = "refused-run"  # the status of a run this hospital did not take part in
# Settings that belong to the hospital, not the server (see the module docstring);
# the others are the server's to decide for the run.
HOSPITAL_SETTINGS = ("epsilon", "delta", "adjacency", "test_fraction", "secure_aggregation")
# What a release in the report to the server says: enough to recompute epsilon, and
# no run ids of other federations (they would link this hospital's participation).
RELEASE_KEYS = ("round", "noise_multiplier", "sample_rate", "steps", "adjacency")


class HospitalClient(NumPyClient):
    """A hospital: trains a round with DP-SGD, accounted in its privacy ledger, and
    evaluates every global model it receives on its own held-out patients. That
    evaluation stays in its state directory: it is not covered by the DP guarantee,
    so it is never sent."""

    def __init__(self, hospital, cfg, run_id, state_dir, data_file=None, schema_file=None):
        self.hospital, self.cfg, self.run_id = hospital, cfg, run_id
        self.state_dir = Path(state_dir)
        (self.x, self.y), self.held_out = data_utils.hospital_data(
            cfg, hospital, data_file, schema_file
        )
        self.ledger = PrivacyLedger(state_dir, cfg.epsilon, cfg.delta, cfg.adjacency)

    def fit(self, parameters, config):
        server_round = int(config["server_round"])
        if len(self.y) > self.cfg.max_patients:  # the server would reject the update
            raise ValueError(
                f"hospital {self.hospital} trains on {len(self.y)} patients, more than "
                f"the server's cap on one hospital's weight (max_patients "
                f"{self.cfg.max_patients}): the server's operator must raise max_patients"
            )
        self._evaluate_locally(parameters, server_round - 1)
        sample_rate, steps = training.sample_rate_and_steps(len(self.y), self.cfg)
        # Read, check, train and record under the ledger's lock: a concurrent training
        # on the same patients waits, and sees this one's release.
        with self.ledger.transaction():
            self.ledger.note_dataset(data_utils.fingerprint(self.x, self.y), len(self.y))
            try:
                sigma = self.ledger.noise_for_round(
                    self.run_id, sample_rate, steps, planned_steps=self.cfg.rounds * steps
                )
            except BudgetExhausted as refusal:
                return parameters, 0, self._report("refused", server_round, str(refusal))
            model = self._model(parameters)
            steps_taken = training.train_private(model, self.x, self.y, self.cfg, sigma)
            self.ledger.record(self.run_id, server_round, sigma, sample_rate, steps_taken)
            return get_weights(model), len(self.y), self._report("trained", server_round)

    def evaluate(self, parameters, config):
        """The server's notice that the run has ended, with the final model (see
        server.tell_hospitals). The hospital evaluates it for itself and sends
        nothing back but the acknowledgement."""
        status, rounds = config["run-status"], int(config["server_round"])
        if status == "finished":
            self._evaluate_locally(parameters, rounds)
        with self.ledger.transaction():
            self._report(status, rounds, config.get("reason", ""))
        return 0.0, 0, {}

    def _model(self, parameters):
        model = build_model(self.x.shape[1], self.cfg.hidden_layers)
        try:
            set_weights(model, parameters)
        except ValueError as error:
            raise ValueError(
                f"the global model does not fit this hospital's data ({error}): the "
                f"server and every hospital must use the same data dictionary"
            ) from None
        return model

    def _evaluate_locally(self, parameters, after_round):
        """Clinical metrics of the global model after `after_round` on the held-out
        patients, appended to this hospital's evaluation file."""
        x, y = self.held_out
        risk = predict_risk(self._model(parameters), x)
        path = self.state_dir / EVALUATION_FILE
        records = read_json(path) if path.exists() else []
        records = [
            r for r in records if r["run_id"] != str(self.run_id) or r["round"] != after_round
        ]
        metrics = clinical_metrics(y, risk, self.cfg.decision_threshold)
        records.append(
            {"run_id": str(self.run_id), "round": after_round, "patients": len(y), **metrics}
        )
        write_json(path, records)

    def _report(self, status, server_round, reason=""):
        """Scalars the server may see: this hospital's privacy spending, no data.
        `epsilon` is cumulative over every release on these patients; the noise
        multiplier, sample rate and steps are this run's; `releases` lists them all,
        so that anyone can recompute epsilon. They also go to the hospital's status
        file, for its operator."""
        plan = self.ledger.data["plans"].get(str(self.run_id), {})
        releases = self.ledger.releases
        report = {
            "hospital": self.hospital,
            "patients": len(self.y),
            "status": status,
            "reason": reason,
            "epsilon": self.ledger.epsilon(),
            "epsilon_budget": self.cfg.epsilon,
            "delta": self.cfg.delta,
            "adjacency": self.cfg.adjacency,
            "accountant": ACCOUNTANT,
            "noise_multiplier": plan.get("noise_multiplier", 0.0),
            "sample_rate": plan.get("sample_rate", 0.0),
            "steps": sum(r["steps"] for r in releases if r["run_id"] == str(self.run_id)),
            "releases": json.dumps(
                [
                    {**{k: r[k] for k in RELEASE_KEYS}, "this_run": r["run_id"] == str(self.run_id)}
                    for r in releases
                ]
            ),
        }
        now = datetime.now(UTC).isoformat(timespec="seconds")
        write_json(
            self.state_dir / STATUS_FILE,
            {**report, "round": server_round, "utc": now, "ledger": str(self.ledger.path)},
        )
        return report


def is_simulated(context: Context):
    """A hospital that simulation.py runs on this machine: no state directory of its
    own, and the machine (never the server) names where simulated hospitals keep
    theirs (HOSPITALS_DIR_VARIABLE)."""
    return "state-dir" not in context.node_config and bool(os.environ.get(HOSPITALS_DIR_VARIABLE))


def hospital_settings(context: Context):
    """The server's settings for the run, with this hospital's own taking
    precedence: (hospital number, settings). In deployment the hospital's settings
    come from its node config (client.py passes them all), else from its own
    config.py: never from the server. Only simulated hospitals, which simulation.py
    runs for the operator who also runs the server, take them from the run."""
    node = context.node_config
    run_cfg = settings.from_run_config(context.run_config)
    defaults = {} if is_simulated(context) else settings.DEFAULTS
    own = {name: defaults[name] for name in HOSPITAL_SETTINGS if name in defaults}
    own.update({name: node[name] for name in HOSPITAL_SETTINGS if name in node})
    cfg = settings.decide_auto(settings.resolve({**vars(run_cfg), **own}))
    hospital = int(node["partition-id"])
    if int(node["num-partitions"]) != cfg.num_clients:
        raise ValueError(
            f"the federation has {node['num-partitions']} hospitals "
            f"but num_clients is {cfg.num_clients}"
        )
    return hospital, cfg


def client_fn(context: Context):
    """The hospital for this node."""
    node = context.node_config
    hospital, cfg = hospital_settings(context)
    torch.set_num_threads(1)  # a tiny MLP: threads cost more than they give
    if "data-file" in node and cfg.dataset != "csv":
        raise ValueError(
            f"this hospital brought its own data (--data) but the server's run uses "
            f"dataset {cfg.dataset!r}: start the server with --dataset csv"
        )
    if cfg.dataset == "csv" and "state-dir" in node and "data-file" not in node:
        raise ValueError(  # a deployed hospital never reads a file the server names
            "the server's run uses dataset csv but this hospital brought no data of its "
            "own: start it with client.py --data FILE --schema FILE"
        )
    state_dir = hospital_state_dir(context, hospital)
    check_run(context, cfg, state_dir)
    try:
        hospital_client = HospitalClient(
            hospital,
            cfg,
            context.run_id,
            state_dir,
            node.get("data-file"),
            node.get("schema-file"),
        )
    except data_utils.DataError as error:
        # The details quote patients' values: they stay in this hospital's own log.
        log(ERROR, "Hospital %s cannot use its data: %s", hospital, error)
        raise ValueError(
            f"hospital {hospital}'s data does not match the data dictionary (details in "
            f"its own log)"
        ) from None
    return hospital_client.to_client()


def check_run(context, cfg, state_dir):
    """Raise Unauthorised unless this run may spend this hospital's budget: in
    deployment, its server's operator signed it (checked against the operator's
    public key the hospital was given) and no other run used that signature before.
    Simulated hospitals belong to the operator who runs simulation.py; a hospital
    started with --insecure has no operator key and was warned so."""
    if is_simulated(context):
        return
    operator_pub = context.node_config.get("operator-key")
    try:
        if operator_pub is None:
            raise Unauthorised(
                "this hospital has no operator key to check runs against: start it with "
                "`python client.py --client-id N`"
            )
        if not operator_pub:
            return  # client.py --insecure
        nonce = verify_run(context.run_config, operator_pub)["nonce"]
        ledger = PrivacyLedger(state_dir, cfg.epsilon, cfg.delta, cfg.adjacency)
        with ledger.transaction():
            if not ledger.authorised_run(nonce, context.run_id):
                raise Unauthorised("its authorisation was already used by another run (a replay)")
    except Unauthorised as refusal:
        _refuse_run(state_dir, context.run_id, f"the run is not authorised: {refusal}")
        raise


def _refuse_run(state_dir, run_id, reason):
    """Tell this hospital's operator (client.py watches the status file)."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    status = {"status": REFUSED_RUN, "run_id": str(run_id), "reason": reason, "utc": now}
    write_json(Path(state_dir) / STATUS_FILE, status)


def admission_answer(question, context):
    """This hospital's answer to the server's admission question (admission.py): its
    number, why it cannot take part in this run if it cannot (the run is not
    authorised, or the server's secure_aggregation differs from its own), and its
    signature of the server's challenge with its enrolled key, if it has one."""
    hospital, cfg = hospital_settings(context)
    state_dir = hospital_state_dir(context, hospital)
    problem = ""
    try:
        check_run(context, cfg, state_dir)
    except Unauthorised as refusal:
        problem = f"it refused the run: {refusal}"
    asked = question["secure_aggregation"]
    if not problem and asked != cfg.secure_aggregation:
        problem = (
            f"the server's secure_aggregation is {asked} but this hospital's is "
            f"{cfg.secure_aggregation}: both sides must agree (client.py "
            f"--secure-aggregation {asked}, or ask the server's operator)"
        )
        _refuse_run(state_dir, context.run_id, problem)
    key = state_dir / AUTH_KEY
    proof = ""
    if not is_simulated(context) and key.exists():
        proof = prove_identity(
            key, question["challenge"], context.run_id, context.node_id, hospital
        )
    return {"hospital": hospital, "problem": problem, "proof": proof}


def hospital_mod(message, context, call_next):
    """Answer the server's admission question (without loading any data), and take
    part in SecAgg+ (Flower's secaggplus_mod) exactly when this hospital's
    secure_aggregation setting says so. A hospital that expects it never sends its
    update in the clear."""
    kind = message.metadata.message_type
    if kind == MessageType.QUERY:
        question = recorddict_to_getpropertiesins(message.content).config
        answer = GetPropertiesRes(Status(Code.OK, ""), admission_answer(question, context))
        return Message(getpropertiesres_to_recorddict(answer), reply_to=message)
    if kind != MessageType.TRAIN:
        return call_next(message, context)
    asked = "on" if RECORD_KEY_CONFIGS in message.content.config_records else "off"
    own = hospital_settings(context)[1].secure_aggregation
    if asked != own:
        raise ValueError(
            f"the server asked for {'a secure (SecAgg+)' if asked == 'on' else 'a plain'} "
            f"update but this hospital's secure_aggregation is {own}: both sides must "
            f"agree (client.py --secure-aggregation {asked}, or ask the server's operator)"
        )
    return (
        secaggplus_mod(message, context, call_next) if own == "on" else call_next(message, context)
    )


def hospital_state_dir(context, hospital):
    """Where the hospital keeps its privacy ledger, status and evaluations: in
    deployment its own directory (client.py's --state-dir); in simulation the one
    simulation.py chose on this machine. Never a place the server names: without
    one, the hospital does not train."""
    if is_simulated(context):
        return Path(os.environ[HOSPITALS_DIR_VARIABLE]) / f"hospital-{hospital}"
    if context.node_config.get("state-dir"):
        return Path(context.node_config["state-dir"])
    raise LedgerError(
        "this hospital has no state directory for its privacy ledger, so it does not "
        "train: start it with `python client.py --client-id N` (or give flower-supernode "
        "--node-config \"state-dir='/absolute/path'\")"
    )


app = ClientApp(client_fn=client_fn, mods=[hospital_mod])


def join(argv=None):
    """`python client.py --client-id N`: this hospital's SuperNode, until the run ends."""
    runtime.interrupt_on_signals()
    parser = settings.make_parser(__doc__, ("num_clients", *HOSPITAL_SETTINGS))
    group = parser.add_argument_group("hospital")
    group.add_argument(
        "--client-id", type=int, required=True, help="this hospital's number, 0 to num_clients - 1"
    )
    group.add_argument(
        "--server-address",
        default=f"127.0.0.1:{runtime.DEFAULT_PORT}",
        help="host:port of the server",
    )
    group.add_argument(
        "--root-certificates",
        default="certs/ca.crt",
        help="the federation's CA certificate (a copy of the server's)",
    )
    group.add_argument(
        "--operator-key",
        default="",
        help="the operator's public key, which every run must be signed with (a copy of "
        "the server's certs/operator.pub) [default: operator.pub beside --root-certificates]",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS, and runs are not checked for the operator's signature: only "
        "against a server started with --insecure",
    )
    group.add_argument(
        "--state-dir",
        default="",
        help="the hospital's own directory: privacy ledger, status, Flower's "
        f"state and logs [default: {default_state_root()}/hospital-<client id>]",
    )
    group.add_argument(
        "--data", default="", help="this hospital's own CSV file (with --schema): dataset csv"
    )
    group.add_argument(
        "--schema", default="", help="the federation's data dictionary (schema.json or .yaml)"
    )
    group.add_argument(
        "--make-key",
        action="store_true",
        help="create this hospital's identity key in --state-dir for a server that "
        "admits only enrolled hospitals, then exit",
    )
    group.add_argument(
        "--trust-server-app",
        action="store_true",
        help="run whatever app the server ships, not only one identical to this copy",
    )
    group.add_argument(
        "--connect-timeout",
        type=float,
        default=300,
        help="seconds to keep trying to reach the server",
    )
    cfg, args = settings.parse(parser, argv)
    if not 0 <= args.client_id < cfg.num_clients:
        parser.error(
            f"--client-id must be in 0..{cfg.num_clients - 1} "
            f"(num_clients is {cfg.num_clients}), got {args.client_id}"
        )
    state_dir = Path(args.state_dir or default_state_root() / f"hospital-{args.client_id}")
    state_dir = state_dir.resolve()
    auth_key = state_dir / AUTH_KEY
    if args.make_key:
        try:
            public_key = make_hospital_key(auth_key)
        except FileExistsError as error:
            parser.error(str(error))
        print(
            f"Created this hospital's identity: {auth_key} (private: it never leaves this "
            f"machine) and {public_key}. Send {public_key.name} to the server's operator "
            f"to be enrolled (server.py --hospital-keys)."
        )
        return 0
    try:  # no training without a sound ledger that can be written
        ledger = PrivacyLedger(state_dir, cfg.epsilon, cfg.delta, cfg.adjacency)
        with ledger.transaction(timeout=5):  # readable, and this guarantee no looser
            pass
    except LedgerError as error:
        parser.error(str(error))
    try:
        runtime.split_address(args.server_address)
    except ValueError as error:
        parser.error(f"--server-address: {error}")
    ca_cert = None if args.insecure else Path(args.root_certificates).resolve()
    if ca_cert and not ca_cert.is_file():
        parser.error(
            f"no CA certificate at {ca_cert}: copy the server's certs/ca.crt "
            f"(made by `python server.py --make-certs`) or pass --root-certificates"
        )
    operator_pub = ""
    if ca_cert:
        operator_pub = Path(args.operator_key or ca_cert.with_name(OPERATOR_PUB)).resolve()
        if not operator_pub.is_file():
            parser.error(
                f"no operator key at {operator_pub}: copy the server's certs/{OPERATOR_PUB} "
                f"(made by `python server.py --make-certs`) or pass --operator-key"
            )
    own_data = {}
    if args.data or args.schema:
        if not (args.data and args.schema):
            parser.error("--data and --schema go together: the file and its data dictionary")
        own_data = {
            "data-file": str(Path(args.data).resolve()),
            "schema-file": str(Path(args.schema).resolve()),
        }
        try:  # check the file now, not in the middle of round 1
            csv_cfg = settings.resolve({**vars(cfg), "dataset": "csv"})
            data_utils.hospital_data(csv_cfg, args.client_id, args.data, args.schema)
        except data_utils.DataError as error:
            parser.error(str(error))
    console = reporting.make_console()
    if args.insecure:
        console.print(
            "[bold red]WARNING: --insecure: no TLS, this hospital's model updates "
            "cross the network unencrypted to an unauthenticated server, and it trains "
            "for any run, signed by the operator or not.[/]"
        )
    if args.trust_server_app:
        console.print(
            "[bold red]WARNING: --trust-server-app: this hospital runs whatever code the "
            "server ships, with access to its patients' data.[/]"
        )
    try:
        wait_for_server(args.server_address, args.connect_timeout, console)
        runtime.check_server(args.server_address, ca_cert)
    except runtime.FlowerError as error:
        console.print(f"[red]{escape(str(error))}[/]")
        return 1
    node_config = {
        "partition-id": args.client_id,
        "num-partitions": cfg.num_clients,
        "state-dir": str(state_dir),
        "operator-key": str(operator_pub),
        **own_data,
        **{name: getattr(cfg, name) for name in HOSPITAL_SETTINGS},
    }
    flwr_home = state_dir / "flower"
    status_file, pinned = state_dir / STATUS_FILE, not args.trust_server_app
    launcher = pinning.install_launcher(flwr_home / "bin", status_file, pinned)
    try:
        with runtime.supernode(
            flwr_home,
            args.server_address,
            node_config,
            ca_cert,
            auth_key if auth_key.exists() and ca_cert else None,
            launcher,
        ) as node:
            console.print(
                f"Hospital {args.client_id} connected to {args.server_address}; its budget: "
                f"epsilon {cfg.epsilon:g}, delta {cfg.delta:g}, {cfg.adjacency} adjacency, "
                f"over all runs on its patients (privacy ledger: {ledger.path}); "
                f"secure aggregation "
                f"{cfg.secure_aggregation}; "
                + ("identified by its key; " if auth_key.exists() else "")
                + (
                    "runs any app the server ships. "
                    if args.trust_server_app
                    else "runs only an app identical to this copy. "
                )
                + f"State and logs: {state_dir}"
            )
            return follow_rounds(node, state_dir, args, console)
    except KeyboardInterrupt:
        console.print("[red]Interrupted.[/] This hospital left the federation.")
        return 130


def wait_for_server(address, timeout, console):
    """Wait until the server accepts connections (start order does not matter)."""
    deadline = time.monotonic() + timeout
    if not runtime.server_reachable(address):
        console.print(f"Waiting for server at {address} ...")
        while not runtime.server_reachable(address):
            if time.monotonic() > deadline:
                raise runtime.FlowerError(
                    f"no server at {address} after {timeout:g} s: check --server-address "
                    f"and that `python server.py` runs there"
                )
            time.sleep(1)


def follow_rounds(node, state_dir, args, console):
    """Print what this hospital does each round, until the server ends the run;
    the exit code says how it ended."""
    status_path = state_dir / STATUS_FILE
    last = status_path.read_text() if status_path.exists() else None
    unreachable_since = None
    while node.poll() is None:
        text = status_path.read_text() if status_path.exists() else None
        if text != last:
            last = text
            exit_code = show_status(json.loads(text), state_dir, console)
            if exit_code is not None:
                return exit_code
        if runtime.server_reachable(args.server_address):
            unreachable_since = None
        else:
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > args.connect_timeout:
                console.print(
                    f"[red]Lost the server at {args.server_address} for "
                    f"{args.connect_timeout:g} s; leaving.[/]"
                )
                return 1
        time.sleep(1)
    log = state_dir / "flower" / "supernode.log"
    if "Failed to activate SuperNode" in runtime.log_tail(log):
        key = state_dir / AUTH_KEY
        console.print(
            "[red]The server refused this hospital: it admits only enrolled hospitals.[/] "
            + (
                f"This hospital's key is not enrolled there: send {key.with_suffix('.pub')} "
                f"to the server's operator."
                if key.exists()
                else "Create this hospital's key with --make-key and send the .pub file "
                "to the server's operator."
            )
        )
    else:
        console.print(f"[red]The SuperNode stopped unexpectedly:[/]\n{runtime.log_tail(log)}")
    return 1


def show_status(status, state_dir, console):
    """Print a change of this hospital's status; the exit code once the run is over
    for this hospital, else None."""
    if status["status"] == pinning.REFUSED:
        console.print(f"[red]Refused to run the server's app:[/] {escape(status['reason'])}")
        return 1
    if status["status"] == REFUSED_RUN:  # nothing spent; the server's own run may follow
        console.print(
            f"[red]Did not take part in run {status['run_id']}:[/] {escape(status['reason'])}"
        )
        return None
    spent = f"epsilon spent {status['epsilon']:.3f} of {status['epsilon_budget']:g}"
    if status["status"] == "trained":
        console.print(f"Round {status['round']}: trained; {spent}")
    elif status["status"] == "refused":
        console.print(
            f"[yellow]Round {status['round']}: declined to train: "
            f"{escape(status['reason'])}. Raise --epsilon deliberately to continue.[/]"
        )
    else:
        reason = f": {escape(status['reason'])}" if status["reason"] else ""
        console.print(f"The server ended the run ({status['status']}{reason}); {spent}.")
        evaluation = state_dir / EVALUATION_FILE
        if status["status"] == "finished" and evaluation.exists():
            final = read_json(evaluation)[-1]
            console.print(
                f"Final model on this hospital's {final['patients']} held-out patients "
                f"(kept here): {reporting.metrics_text(final)}"
            )
        time.sleep(END_GRACE)  # for the SuperNode to send our acknowledgement
        return 0 if status["status"] == "finished" else 1
    return None


if __name__ == "__main__":
    sys.exit(join())
