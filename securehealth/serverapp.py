"""The server's Flower ServerApp (`app`): one training run around the strategy.

The operator's signature is checked before anything is written, the hospitals are
admitted before anyone trains, Flower's workflow (SecAgg+ where set) runs with a Grid
that hands Flower only replies it can read, and at the end the hospitals are told,
the report written and the outcome recorded, whatever happened.
"""

import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Context, Error, Message, MessageType
from flwr.common import EvaluateIns, EvaluateRes, log, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from securehealth import operating_point, settings
from securehealth.admission import Admission
from securehealth.authorisation import Unauthorised, claim, verify_run
from securehealth.certificates import (
    ENROLLED_KEYS_VARIABLE,
    OPERATOR_PUB_VARIABLE,
    check_hospital_keys,
    load_hospital_key,
)
from securehealth.config import Settings
from securehealth.flower import (
    RECORD_KEY_CONFIGS,
    ErrorCode,
    evaluateins_to_recorddict,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
    recorddict_to_getpropertiesres,
)
from securehealth.model import get_weights
from securehealth.privacy.report import REASON_LIMIT
from securehealth.results import RunStatus, has_finished, run_directory
from securehealth.strategy import HospitalFedAvg
from securehealth.text import untrusted

END_NOTICE_TIMEOUT = 30  # seconds to tell the hospitals that the run has ended
# Seconds the hospitals have to send their operating point's histograms (each scores
# its training patients once; a SuperNode starts a ClientApp process for it).
OPERATING_POINT_TIMEOUT = 120
# SecAgg+: every hospital's key is shared with all the others, and any two thirds of
# them can unmask a hospital that drops out mid-round (fewer cannot).
SECAGG_SHARES, SECAGG_THRESHOLD = 1.0, 2 / 3
SECAGG_TIMEOUT = 300  # seconds; a hospital silent this long in a SecAgg+ step has dropped out


def check_authorised(context: Context, run_dir: Path) -> None:
    """Refuse a run its operator did not sign, or one whose signature another run used.

    Checked in deployment only (server.py sets the operator's key), before anything is
    written; the run claims its signature in `run_dir`.

    Raises
    ------
    Unauthorised
        If the run carries no valid signature of the operator, its settings or code
        differ from the ones signed, or another run used its signature (a replay).
    """
    operator_pub = os.environ.get(OPERATOR_PUB_VARIABLE)
    if operator_pub:
        try:
            claim(run_dir, verify_run(context.run_config, operator_pub), context.run_id)
        except Unauthorised as refusal:
            raise Unauthorised(f"run {context.run_id} refused: {refusal}") from None


class HaltingSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ round, which halts, rather than ending the run, where it cannot sum.

    A hostile hospital may send a masked vector of another shape. The round is then
    reported as halted, like one that too few hospitals finished
    (strategy._check_round_applied).
    """

    def __call__(self, grid: Grid, context: Context) -> None:
        try:
            super().__call__(grid, context)
        except Exception as error:  # noqa: BLE001 (what hospitals sent: any of it)
            log(WARNING, "Secure aggregation halted: %s: %s", type(error).__name__, error)


def workflow(cfg: Settings) -> DefaultWorkflow:
    """Return Flower's FedAvg workflow, its training through SecAgg+ where it is on."""
    secure = HaltingSecAggPlus(
        SECAGG_SHARES, SECAGG_THRESHOLD, max_weight=cfg.max_patients, timeout=SECAGG_TIMEOUT
    )
    return DefaultWorkflow(fit_workflow=secure if cfg.secure_aggregation == "on" else None)


@contextmanager
def recorded_outcome(
    grid: Grid, strategy: HospitalFedAvg, admission: Admission, run_dir: Path
) -> Iterator[None]:
    """Record the run's outcome, whatever happens inside the `with` block.

    Afterwards, tell the hospitals how the run ended (with the final model), write the
    report if it finished, and save its status in metrics.json; an error is recorded
    and raised again.

    Parameters
    ----------
    grid : Grid
        The run's grid, through which the hospitals are told.
    strategy : HospitalFedAvg
        The run's strategy: its model, threshold and record.
    admission : Admission
        The run's members, who are told.
    run_dir : Path
        The run directory, where the report is written.
    """
    results = strategy.record.results
    try:
        yield
        warned = results.get("warnings")
        status = RunStatus.FINISHED_WITH_WARNINGS if warned else RunStatus.FINISHED
    except BaseException as error:
        results["error"] = f"{type(error).__name__}: {error}"
        status = RunStatus.FAILED
        raise
    finally:
        results["status"] = status
        with ExitStack() as notice:
            try:  # the report is written while the hospitals evaluate the final model
                final = get_weights(strategy.model)
                notice.enter_context(
                    telling_hospitals(
                        grid,
                        admission.hospitals(),
                        status,
                        results.get("error", ""),
                        final,
                        len(results["rounds"]),
                        strategy.threshold,
                    )
                )
            except Exception as error:  # the run's own outcome is what must be saved
                log(WARNING, "Could not tell the hospitals that the run ended: %s", error)
            if has_finished(status):  # before metrics.json says so: readers may then stop us
                from securehealth import report  # matplotlib: loaded at the end, not before round 1

                try:
                    report.write_report(run_dir, results)
                except Exception as error:  # the model and metrics stand without it
                    results["report_error"] = f"{type(error).__name__}: {error}"
                    log(WARNING, "Could not write the report: %s", error)
        strategy.record.save()


def wait_for_hospitals(admission: Admission, cfg: Settings, strategy: HospitalFedAvg) -> None:
    """Return once every hospital 0..num_clients-1 has been admitted, recording who joined.

    Parameters
    ----------
    admission : Admission
        The run's members, refreshed every second.
    cfg : Settings
        The run's settings (num_clients and join_timeout are read).
    strategy : HospitalFedAvg
        The strategy whose record notes the connected and refused nodes.

    Raises
    ------
    RuntimeError
        Before anyone trains, if a hospital cannot take part (it disagrees on a setting
        that would void the round, or refused the run), or if not every hospital was
        admitted within join_timeout; the message says what to change.
    """
    deadline = time.monotonic() + cfg.join_timeout
    while True:
        admission.refresh()
        strategy.record.results["refused_nodes"] = admission.refusals()
        strategy.record.results["hospitals_connected"] = len(admission.members)
        strategy.record.save()
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


def ask_operating_point(
    grid: Grid, strategy: HospitalFedAvg, admission: Admission, rounds: int
) -> None:
    """Have the strategy choose the decision threshold from the hospitals' histograms.

    Every hospital is asked for its operating point's histograms of the final model
    (Hospital.release_operating_point); the replies that come within
    OPERATING_POINT_TIMEOUT are used. Nothing is asked where the threshold is fixed.

    Parameters
    ----------
    grid : Grid
        The run's grid.
    strategy : HospitalFedAvg
        The strategy, which holds the final model and chooses the threshold.
    admission : Admission
        The run's members, who are asked.
    rounds : int
        The number of rounds trained, sent with the request.
    """
    if not strategy.chooses_threshold:
        return
    instruction = EvaluateIns(
        ndarrays_to_parameters(get_weights(strategy.model)),
        {"task": operating_point.TASK, "server_round": rounds},
    )
    messages = [
        Message(
            evaluateins_to_recorddict(instruction, keep_input=True),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in admission.hospitals()
    ]
    replies: dict[int, EvaluateRes | str] = {}
    for reply in grid.send_and_receive(messages, timeout=OPERATING_POINT_TIMEOUT):
        node = reply.metadata.src_node_id
        if reply.has_error():
            replies[node] = f"it failed: {untrusted(str(reply.error.reason), REASON_LIMIT)}"
            continue
        try:
            replies[node] = recorddict_to_evaluateres(reply.content)
        except Exception as error:  # a trust boundary: a node may send anything
            replies[node] = f"its reply is malformed ({type(error).__name__})"
    strategy.choose_operating_point(replies)


@contextmanager
def telling_hospitals(
    grid: Grid,
    nodes: Iterable[int],
    status: str,
    reason: str,
    final_weights: list[np.ndarray],
    rounds: int,
    threshold: float,
) -> Iterator[None]:
    """Tell the run's hospitals that the run has ended, with the final model and threshold.

    Each hospital's launcher can then stop (a SuperNode never exits by itself), and the
    hospital evaluates the final model on its own held-out patients. The NumPyClient
    API has no message for this; an evaluate request carries it, and its reply is only
    an acknowledgement. The `with` block runs while the notice is under way; leaving it
    waits for the acknowledgements, at most END_NOTICE_TIMEOUT: a hospital that vanishes
    midway must not hold the server (Flower may retry pulling a half-sent reply for hours).

    Parameters
    ----------
    grid : Grid
        The run's grid.
    nodes : Iterable of int
        The node ids of the run's hospitals.
    status : str
        The run's status (a RunStatus).
    reason : str
        Why the run failed; empty if it did not.
    final_weights : list of np.ndarray
        The final model's weights.
    rounds : int
        The number of rounds recorded.
    threshold : float
        The run's decision threshold.
    """
    instruction = evaluateins_to_recorddict(
        EvaluateIns(
            ndarrays_to_parameters(final_weights),
            {
                "run-status": status,
                "reason": reason,
                "server_round": rounds,
                "threshold": threshold,
            },
        ),
        keep_input=True,
    )
    messages = [
        Message(instruction, dst_node_id=node, message_type=MessageType.EVALUATE) for node in nodes
    ]
    notice = threading.Thread(target=grid.send_and_receive, args=(messages,), daemon=True)
    notice.start()
    try:
        yield
    finally:
        notice.join(END_NOTICE_TIMEOUT)
        if notice.is_alive():
            log(WARNING, "Not every hospital acknowledged the end of the run")


class PromptGrid(Grid):
    """The run's Grid: prompter replies, and only replies Flower's workflows can read.

    It collects replies every 0.2 s where Flower's deployment Grid waits 3 s between
    polls (measured: 1.5 s saved per round), and hands the workflows each reply through
    `readable`. The other methods delegate to the wrapped grid.
    """

    def __init__(self, grid):
        self.grid = grid

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(
        self, *args: Any, **kwargs: Any
    ) -> Message:  # deprecated by Flower; never called here
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send `messages` and return the replies that came within `timeout` seconds (None: all)."""
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


def readable(question: Message, reply: Message) -> Message:
    """Return the reply, or an error reply from its node if Flower's workflows could not decode it.

    They would raise and end the run: whatever one node sends fails that node, never the
    run.

    Parameters
    ----------
    question : Message
        The message the node answers, which says what its reply must hold.
    reply : Message
        The node's reply.

    Returns
    -------
    Message
        `reply`, or an error reply in its place.
    """
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


def enrolled_keys(cfg: Settings) -> dict[int, ec.EllipticCurvePublicKey]:
    """Return the public keys the operator enrolled for this server, by hospital number.

    They come from server.py --hospital-keys; {} where any hospital may join.

    Raises
    ------
    ValueError
        If the enrolled keys do not fit the run (certificates.check_hospital_keys).
    """
    folder = os.environ.get(ENROLLED_KEYS_VARIABLE)
    if not folder:
        return {}
    enrolled = check_hospital_keys(folder, cfg.num_clients)
    return {number: load_hospital_key(path) for number, path in enrolled.items()}


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one training run: admit the hospitals, then `rounds` rounds, then the operating point.

    The operating point comes from the hospitals' DP score histograms after the last
    round; the run's outcome is recorded whatever happens.
    """
    settings.check_defaults(context.run_config, grid.run.override_config)
    cfg = settings.decide_auto(settings.from_run_config(context.run_config))
    run_dir = run_directory(cfg, context.run_id)
    check_authorised(context, run_dir)  # before anything is written
    log(INFO, "SecureHealth-ML: results go to %s", run_dir)
    grid = PromptGrid(grid)
    admission = Admission(grid, cfg, context.run_id, enrolled_keys(cfg))
    strategy = HospitalFedAvg(cfg, run_dir, admission)
    with recorded_outcome(grid, strategy, admission, run_dir):
        wait_for_hospitals(admission, cfg, strategy)
        rounds = LegacyContext(
            context=context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy
        )
        workflow(cfg)(grid, rounds)
        ask_operating_point(grid, strategy, admission, cfg.rounds)
        strategy.finish()
