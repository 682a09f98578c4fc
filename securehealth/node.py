"""A hospital's Flower node: its own settings, state directory, run authorisation and admission.

The ClientApp (client.py) runs these without loading patient data or the training stack;
`open_hospital` loads the Hospital (hospital.py) only for a message that trains. The hospital
owns its privacy budget and the settings in `HospitalPolicy`, whatever the server asks: see
docs/explanation/privacy-guarantee.md and docs/explanation/threat-model.md.
"""

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from logging import ERROR
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, GetPropertiesRes, Scalar, Status, log

from securehealth import data, settings
from securehealth.admission import NOT_ADMITTED
from securehealth.authorisation import Unauthorised, first_use, prove_identity, verify_run
from securehealth.config import Settings
from securehealth.data import demonstration
from securehealth.flower import (
    RECORD_KEY_CONFIGS,
    getpropertiesres_to_recorddict,
    recorddict_to_getpropertiesins,
)
from securehealth.privacy.ledger import LedgerError
from securehealth.privacy.report import REASON_LIMIT, Adjacency
from securehealth.results import (
    DEMO_HOSPITALS_DIR_VARIABLE,
    default_state_root,
    lasting_hospitals_dir,
)
from securehealth.state_directory import StateDirectory
from securehealth.text import quoted, untrusted

if TYPE_CHECKING:
    from securehealth.hospital import Hospital

REFUSED_RUN = "refused-run"  # the status of a run this hospital did not take part in


@dataclass(frozen=True)
class HospitalPolicy:
    """The settings that belong to a hospital, not the server: what it spends and accepts.

    A deployed hospital takes them from its own config.py and client.py's flags (its
    node config), never from the server; a simulated hospital, run by the operator
    who also runs the server, takes the run's.
    """

    epsilon: float  # its total budget over every run on its patients
    delta: float
    adjacency: Adjacency
    test_fraction: float  # which of its patients it holds out
    missing_values: str  # what it does with gaps (it decides how many patients train)
    max_weight: float  # its bound on the weights of a global model it accepts
    secure_aggregation: str  # whether its updates go out only through SecAgg+

    @classmethod
    def of(cls, context: Context, run: Settings) -> "HospitalPolicy":
        """This node's policy: its own settings, the run's where it is simulated."""
        base = vars(run) if is_simulated(context) else settings.DEFAULTS
        own = {name: context.node_config.get(name, base[name]) for name in HOSPITAL_SETTINGS}
        return cls(**{name: getattr(settings.resolve(own), name) for name in HOSPITAL_SETTINGS})

    def govern(self, run: Settings) -> Settings:
        """The run's settings with this hospital's own in place of the server's."""
        return settings.decide_auto(settings.resolve({**vars(run), **asdict(self)}))


HOSPITAL_SETTINGS = tuple(field.name for field in fields(HospitalPolicy))


def in_simulation_engine() -> bool:
    """Whether this ClientApp runs in Flower's simulation engine, in a Ray worker.

    simulation.py's hospitals run there; a deployed SuperNode's never do.
    """
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def is_simulated(context: Context) -> bool:
    """Whether the operator simulates this hospital on this machine.

    Simulated means simulation.py, or `flwr run .` on Flower's local simulation: in
    Flower's simulation engine, with no state directory of its own. Nothing a server or
    a run config sends decides it: a deployed SuperNode runs its ClientApps outside Ray,
    and client.py always gives it its state directory.
    """
    return "state-dir" not in context.node_config and in_simulation_engine()


def own_data_file(context: Context, cfg: Settings, hospital: int) -> Path | None:
    """The file of this hospital's patients; None where they are generated.

    In deployment only the file its own client.py named, never one the server names.
    """
    node = context.node_config
    if is_simulated(context) or "data-file" in node:
        return data.own_file(cfg, hospital, node.get("data-file"))
    return None


def is_demonstration(
    context: Context, cfg: Settings, hospital: int, content: bytes | None = None
) -> bool:
    """Whether this hospital's patients are a demonstration's, judged from its own data alone.

    See data/demonstration.py. A deployed hospital that brought no file trains on
    generated patients only if the run's data set generates them; else it does not
    train at all (open_hospital).

    Parameters
    ----------
    context : Context
        The node's Flower context.
    cfg : Settings
        The run's settings, with this hospital's own in place of the server's.
    hospital : int
        This hospital's number.
    content : bytes, optional
        Its file's bytes as read for training (data.read_once), else read here.

    Returns
    -------
    bool
        Whether its patients are a demonstration's.
    """
    if is_simulated(context) or "data-file" in context.node_config:
        return demonstration.is_demonstration(own_data_file(context, cfg, hospital), content)
    return not getattr(data.SOURCES[cfg.dataset], "FILES", False)


def hospital_settings(context: Context) -> tuple[int, Settings]:
    """The server's settings for the run, with this hospital's own taking precedence.

    In deployment the hospital's settings come from its node config (client.py passes
    them all), else from its own config.py: never from the server. Only simulated
    hospitals, which simulation.py runs for the operator who also runs the server, take
    them from the run.

    Parameters
    ----------
    context : Context
        The node's Flower context: its node config and the run's config.

    Returns
    -------
    tuple[int, Settings]
        This hospital's number (its partition id) and the settings it trains with.

    Raises
    ------
    ValueError
        When the federation's number of hospitals differs from the run's num_clients.
    """
    node = context.node_config
    run = settings.from_run_config(context.run_config)
    cfg = HospitalPolicy.of(context, run).govern(run)
    hospital = int(node["partition-id"])
    if int(node["num-partitions"]) != cfg.num_clients:
        raise ValueError(
            f"the federation has {node['num-partitions']} hospitals but the run's "
            f"num_clients is {cfg.num_clients}: make them agree (with `flwr run`, "
            f'--federation-config "num-supernodes={cfg.num_clients}")'
        )
    return hospital, cfg


def open_hospital(context: Context) -> "Hospital":
    """The hospital this node is, for this run, once the run is checked (check_run).

    Parameters
    ----------
    context : Context
        The node's Flower context.

    Returns
    -------
    Hospital
        A hospital.Hospital with its own settings, data and privacy ledger.

    Raises
    ------
    ValueError
        When the federation disagrees with the run (hospital_settings), the data it
        brought is of another data set than the run's, the run's data set needs a file
        and it brought none, or its data does not match the data dictionary (the
        details, which quote patients' values, stay in its own log).
    Unauthorised
        When the run may not spend this hospital's budget (check_run).
    LedgerError
        When it has no state directory for its privacy ledger (hospital_state_dir).
    """
    from securehealth.hospital import Hospital  # the training stack, when it trains

    node = context.node_config
    hospital, cfg = hospital_settings(context)
    _check_brought_data(node, cfg)
    own = own_data_file(context, cfg, hospital)
    try:
        # Judged and trained on the same bytes, whatever happens to the file meanwhile.
        with data.read_once(own, cfg) as (copy, content):
            demo = is_demonstration(context, cfg, hospital, content)
            state_dir = hospital_state_dir(context, cfg, hospital, demo)
            check_run(context, state_dir)
            return Hospital(
                hospital,
                cfg,
                context.run_id,
                state_dir,
                None if copy is None else str(copy),
                node.get("schema-file"),
                ledger_dir=ledger_dir(context, cfg, hospital, demo),
                lasting=not demo,
                own_file=None if demo else own,
            )
    except data.DataError as error:
        # The details quote patients' values: they stay in this hospital's own log.
        log(ERROR, "Hospital %s cannot use its data: %s", hospital, error)
        raise ValueError(
            f"hospital {hospital}'s data does not match the data dictionary (details in "
            f"its own log)"
        ) from None


def _check_brought_data(node: dict, cfg: Settings) -> None:
    """Raise ValueError unless this hospital's own data fits the run's data set.

    Its data must be of the run's data set, and a deployed hospital must bring its own
    file where the run's data set reads files.
    """
    # The data set whose file client.py named (its --data is a CSV file).
    brought = node.get("dataset", "csv" if "data-file" in node else None)
    if brought and brought != cfg.dataset:
        raise ValueError(
            f"this hospital brought its own {brought} data but the server's run uses "
            f"dataset {cfg.dataset!r}: start the server with --dataset {brought}"
        )
    if getattr(data.SOURCES[cfg.dataset], "FILES", False) and "state-dir" in node and not brought:
        own = "--data FILE --schema FILE" if cfg.dataset == "csv" else f"--dataset {cfg.dataset}"
        raise ValueError(  # a deployed hospital never reads a file the server names
            f"the server's run uses dataset {cfg.dataset} but this hospital brought no "
            f"data of its own: start it with client.py {own}"
        )


def check_run(context: Context, state_dir: Path) -> None:
    """Raise Unauthorised unless this run may spend this hospital's budget.

    In deployment, its server's operator must have signed the run (checked against the
    operator's public key the hospital was given), and no other run may have used that
    signature before; a refusal goes to the hospital's status file. Simulated hospitals
    belong to the operator who runs simulation.py; a hospital started with --insecure
    has no operator key and was warned so.

    Parameters
    ----------
    context : Context
        The node's Flower context: the run's config and its authorisation.
    state_dir : Path
        This hospital's state directory, with its register of authorisations used.

    Raises
    ------
    Unauthorised
        When the hospital has no operator key to check runs against, the run is not
        signed by its operator, or the run's signature was used by another run.
    """
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
        if not first_use(state_dir, nonce, context.run_id):
            raise Unauthorised("its authorisation was already used by another run (a replay)")
    except Unauthorised as refusal:
        _refuse_run(state_dir, context.run_id, f"the run is not authorised: {refusal}")
        raise


def _refuse_run(state_dir: Path, run_id: int, reason: str) -> None:
    """Tell this hospital's operator that it refused the run (client.py watches its status)."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    reason = untrusted(reason, REASON_LIMIT)  # it may quote the server
    status = {"status": REFUSED_RUN, "run_id": str(run_id), "reason": reason, "utc": now}
    StateDirectory(Path(state_dir)).write_status(status)


def _record_not_admitted(context: Context, reason: str) -> None:
    """Record in the hospital's status file that the server did not admit it, and why.

    client.py says so and stops; nothing was spent.
    """
    try:
        hospital, cfg = hospital_settings(context)
        state_dir = hospital_state_dir(context, cfg, hospital)
    except (ValueError, LedgerError):  # it disagrees with the run's settings
        state_dir = context.node_config.get("state-dir")  # client.py's, in deployment
        if not state_dir:
            return  # no state directory of its own: nobody to tell
    now = datetime.now(UTC).isoformat(timespec="seconds")
    status = {"status": NOT_ADMITTED, "run_id": str(context.run_id), "reason": reason, "utc": now}
    StateDirectory(Path(state_dir)).write_status(status)


def admission_answer(question: dict[str, Scalar], context: Context) -> dict[str, Scalar]:
    """This hospital's answer to the server's admission question (admission.py).

    Parameters
    ----------
    question : dict[str, Scalar]
        The server's question: its secure_aggregation setting and a challenge to sign.
    context : Context
        The node's Flower context.

    Returns
    -------
    dict[str, Scalar]
        "hospital": its number; "problem": why it cannot take part in this run, "" if
        it can (its own set-up is unusable, the run is not authorised, or the server's
        secure_aggregation or missing_values differs from its own); "proof": its
        signature of the server's challenge with its enrolled key, "" without one.
    """
    try:
        hospital, cfg = hospital_settings(context)
        state_dir = hospital_state_dir(context, cfg, hospital)
    except (ValueError, LedgerError) as error:  # its own set-up: say so now, not at round 1
        hospital = int(context.node_config.get("partition-id", -1))
        return {"hospital": hospital, "problem": f"it cannot take part: {error}", "proof": ""}
    problem = ""
    try:
        check_run(context, state_dir)
    except Unauthorised as refusal:
        problem = f"it refused the run: {refusal}"
    asked = {
        "secure_aggregation": question["secure_aggregation"],
        # How gaps are encoded decides the model's inputs: the server's must be ours.
        "missing_values": settings.from_run_config(context.run_config).missing_values,
    }
    for name, value in asked.items():
        if not problem and value != getattr(cfg, name):
            shown = quoted(value)  # the server's words: as it is only where plain
            if isinstance(value, str) and len(value) <= 40 and value.replace("-", "").isalnum():
                shown = value
            problem = (
                f"the server's {name} is {shown} but this hospital's is "
                f"{getattr(cfg, name)}: both sides must agree (client.py "
                f"--{name.replace('_', '-')} {shown}, or ask the server's operator)"
            )
            _refuse_run(state_dir, context.run_id, problem)
    key = StateDirectory(state_dir).key_file
    proof = ""
    if not is_simulated(context) and key.exists():
        proof = prove_identity(
            key, question["challenge"], context.run_id, context.node_id, hospital
        )
    return {"hospital": hospital, "problem": problem, "proof": proof}


def hospital_mod(
    message: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Answer admission questions, and take part in SecAgg+ exactly when this hospital says so.

    Admission is answered without loading any data. A training message goes through
    Flower's secaggplus_mod when this hospital's secure_aggregation is on: a hospital
    that expects it never sends its update in the clear.

    Raises
    ------
    ValueError
        When the server asks for a secure update and this hospital's
        secure_aggregation is off, or for a plain one and it is on.
    """
    kind = message.metadata.message_type
    if kind == MessageType.QUERY:
        question = recorddict_to_getpropertiesins(message.content).config
        if NOT_ADMITTED in question:
            _record_not_admitted(context, untrusted(question[NOT_ADMITTED], REASON_LIMIT))
            answer = GetPropertiesRes(Status(Code.OK, ""), {})
        else:
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


def hospital_state_dir(
    context: Context, cfg: Settings, hospital: int, demo: bool | None = None
) -> Path:
    """Where the hospital keeps its status and evaluations; never a place the server names.

    In deployment its own directory (client.py's --state-dir). In simulation the one
    chosen on this machine: results.lasting_hospitals_dir for its own patients, and for
    a demonstration a fresh folder of the run (DEMO_HOSPITALS_DIR_VARIABLE, which
    simulation.py sets, else demo-runs/<run id>/ in the state root), never the lasting
    one.

    Parameters
    ----------
    context : Context
        The node's Flower context.
    cfg : Settings
        The run's settings, with this hospital's own in place of the server's.
    hospital : int
        This hospital's number.
    demo : bool, optional
        Whether its data is a demonstration's, where known already; else judged here.

    Returns
    -------
    Path
        The hospital's state directory.

    Raises
    ------
    LedgerError
        When a deployed hospital has no state directory: without one it does not train.
    """
    if is_simulated(context):
        if not (is_demonstration(context, cfg, hospital) if demo is None else demo):
            return lasting_hospitals_dir() / f"hospital-{hospital}"
        demonstrations = os.environ.get(DEMO_HOSPITALS_DIR_VARIABLE)
        runs = StateDirectory(default_state_root()).demo_run(context.run_id)
        return Path(demonstrations or runs) / f"hospital-{hospital}"
    if context.node_config.get("state-dir"):
        return Path(context.node_config["state-dir"])
    raise LedgerError(
        "this hospital has no state directory for its privacy ledger, so it does not "
        "train: start it with `python client.py --client-id N` (or give flower-supernode "
        "--node-config \"state-dir='/absolute/path'\")"
    )


def ledger_dir(context: Context, cfg: Settings, hospital: int, demo: bool | None = None) -> Path:
    """Where the privacy ledger this run spends from lives.

    It is the state directory, except that a deployed hospital whose data is a
    demonstration's keeps a fresh ledger per run in demo-runs/<run id>/ inside it,
    never touching its lasting one.

    Parameters
    ----------
    context, cfg, hospital, demo
        As for hospital_state_dir.

    Returns
    -------
    Path
        The folder of the ledger this run spends from.

    Raises
    ------
    LedgerError
        When a deployed hospital has no state directory (hospital_state_dir).
    """
    demo = is_demonstration(context, cfg, hospital) if demo is None else demo
    state_dir = hospital_state_dir(context, cfg, hospital, demo)
    if is_simulated(context) or not demo:
        return state_dir
    return StateDirectory(state_dir).demo_run(context.run_id)
