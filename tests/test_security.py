"""Security end to end: secure aggregation, enrolment, the operator's runs, bad updates.

Secure aggregation (SecAgg+) in simulation and deployment, enrolled hospitals only,
runs only from the operator, a hospital refusing code it did not approve, and a server
that rejects bad updates and reports and survives them. Hospitals that record, corrupt
or lie run from a copy of the app whose ClientApp adds one Flower mod (below);
attackers use Flower's own `flwr` CLI.
"""

import asyncio
import hashlib
import http.client
import importlib
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import (
    ROOT,
    TINY,
    assert_ran_to_the_end,
    demo_ledger,
    flower_context,
    hospital_state,
)
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import (
    fitins_to_recorddict,
    fitres_to_recorddict,
    getpropertiesins_to_recorddict,
    getpropertiesres_to_recorddict,
    recorddict_to_getpropertiesins,
)
from flwr.server.strategy.aggregate import aggregate
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console
from rich.markup import escape
from test_deployment import read_metrics

from securehealth import display, settings
from securehealth import node as hospital_node
from securehealth.admission import NOT_ADMITTED, Admission
from securehealth.authorisation import prove_identity
from securehealth.certificates import load_hospital_key, make_certificates, make_hospital_key
from securehealth.deployment import pinning, runtime, superlink_gate
from securehealth.flower import APP_LAUNCHERS
from securehealth.model import get_weights, load_model
from securehealth.privacy.report import REASON_LIMIT, PrivacyReport, UnsoundReport
from securehealth.results import EXIT_WARNINGS, RunStatus, write_json
from securehealth.serverapp import readable
from securehealth.state_directory import StateDirectory
from securehealth.strategy import AggregationError, HospitalFedAvg, failure_reason
from securehealth.text import untrusted

# A ClientApp that saves each plain update the hospital computes (before SecAgg+
# masks it), so that a test can recompute the plain FedAvg of the round.
RECORDING_CLIENT = """
from pathlib import Path

import numpy as np
from flwr.client import ClientApp
from flwr.common import parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import recorddict_to_fitres
from securehealth import clientapp as client
from securehealth import node as hospital_node


def record(message, context, call_next):
    reply = call_next(message, context)
    if message.metadata.message_type != "train":  # the end-of-run notice
        return reply
    hospital, cfg = hospital_node.hospital_settings(context)
    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    path = hospital_node.hospital_state_dir(context, cfg, hospital) / "update.npz"
    arrays = parameters_to_ndarrays(fitres.parameters)
    np.savez(path, num_examples=fitres.num_examples, *arrays)
    return reply


app = ClientApp(client_fn=client.client_fn, mods=[hospital_node.hospital_mod, record])
"""

# A ClientApp whose hospital 0 trains honestly, then tampers with its reply as
# TAMPERING (filled in by tampering_client) says for each round: its weights
# ("nan", "one short", "huge"), the weight it claims (num_examples), or fields of
# its privacy report (None deletes one).
TAMPERING_CLIENT = """
import numpy as np
from flwr.app import Message
from flwr.client import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import (
    fitres_to_recorddict, recorddict_to_fitins, recorddict_to_fitres,
)
from securehealth import clientapp as client
from securehealth import node as hospital_node

BROKEN = {{
    "nan": lambda weights: [w * np.nan for w in weights],
    "one short": lambda weights: weights[:-1],
    "huge": lambda weights: [w + 1e6 for w in weights],
}}
TAMPERING = {tampering}


def tamper(message, context, call_next):
    reply = call_next(message, context)
    if context.node_config["partition-id"] != 0 or message.metadata.message_type != "train":
        return reply
    server_round = int(recorddict_to_fitins(message.content, True).config["server_round"])
    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    for key, value in TAMPERING.get(server_round, {{}}).items():
        if key == "weights":
            weights = BROKEN[value](parameters_to_ndarrays(fitres.parameters))
            fitres.parameters = ndarrays_to_parameters(weights)
        elif key == "num_examples":
            fitres.num_examples = value
        elif value is None:
            del fitres.metrics[key]
        else:
            fitres.metrics[key] = value
    return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


app = ClientApp(client_fn=client.client_fn, mods=[hospital_node.hospital_mod, tamper])
"""


def tampered_run(tmp_path, tampering, *args):
    """A simulation in tmp_path/run in which hospital 0 tampers with its replies.

    The tampering is done by TAMPERING_CLIENT. Returns what the run printed,
    whitespace undone, and its metrics.json.
    """
    app = app_copy(tmp_path / "app", TAMPERING_CLIENT.format(tampering=repr(tampering)))
    result = simulate(app, *args, "--run-dir", str(tmp_path / "run"))
    metrics = read_metrics(tmp_path / "run")
    exit_code = {"finished": 0, RunStatus.FINISHED_WITH_WARNINGS: EXIT_WARNINGS}.get(
        metrics["status"]
    )
    assert result.returncode == exit_code, result.stdout + result.stderr
    return " ".join(result.stdout.split()), metrics


def assert_last_round_short_of_one(metrics, run_dir):
    """Hospital 0's last update was rejected: the run finished, with that warning.

    The report states the warning first.
    """
    assert metrics["status"] == RunStatus.FINISHED_WITH_WARNINGS
    warning = "only 2 of the 3 hospitals trained in the last round"
    assert warning in metrics["warnings"]
    report = (run_dir / "report.md").read_text()
    assert "Status: **finished with warnings**" in report
    assert "**Do not use this model for patients as it stands:**" in report and warning in report


def app_copy(directory, client_module=None, change=None):
    """A copy of the app in `directory`, its ClientApp or one of its files changed.

    The ClientApp is replaced by `client_module` (source text), or one of the files
    is changed by `change` (name, text to add).
    """
    shutil.copytree(
        ROOT,
        directory,
        ignore=shutil.ignore_patterns(".*", "tests", "runs", "state", "certs", "__pycache__"),
    )
    if client_module:
        (directory / "altered_client.py").write_text(client_module)
        pyproject = directory / "pyproject.toml"
        text = pyproject.read_text()
        assert 'clientapp = "securehealth.clientapp:app"' in text
        text = text.replace('"/client.py",', '"/client.py",\n    "/altered_client.py",')
        pyproject.write_text(text.replace('"securehealth.clientapp:app"', '"altered_client:app"'))
    if change:
        name, addition = change
        (directory / name).write_text((directory / name).read_text() + addition)
    return directory


def simulate(app, *args):
    return subprocess.run(
        [sys.executable, str(app / "simulation.py"), *TINY, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def recorded_fedavg(state_dirs):
    """FedAvg, weighted by patients, of the updates the hospitals recorded."""
    updates = []
    for state_dir in state_dirs:
        with np.load(state_dir / "update.npz") as saved:
            arrays = [saved[f"arr_{i}"] for i in range(len(saved.files) - 1)]
            updates.append((arrays, int(saved["num_examples"])))
    return aggregate(updates)


def largest_difference(run_dir, expected):
    model, _ = load_model(run_dir / "model.pt")
    pairs = zip(get_weights(model), expected, strict=True)
    return max(float(np.abs(a - b).max()) for a, b in pairs)


@pytest.mark.e2e
def test_secure_aggregation_in_simulation_equals_plain_fedavg(tmp_path):
    app = app_copy(tmp_path / "app", RECORDING_CLIENT)
    run_dir = tmp_path / "run"
    result = simulate(app, "--secure-aggregation", "on", "--rounds", "1", "--run-dir", str(run_dir))
    assert_ran_to_the_end(result.returncode, run_dir, result.stdout + result.stderr)
    assert "secure aggregation on" in " ".join(result.stdout.split())
    metrics = read_metrics(run_dir)
    assert metrics["config"]["secure_aggregation"] == "on"
    assert metrics["rounds"][0]["hospitals_trained"] == 3
    hospitals = sorted((run_dir / "hospitals").glob("hospital-*"))
    # The server saw only masked updates, yet its sum is FedAvg up to SecAgg+'s
    # quantization (2^22 levels over [-8, 8], weights scaled by patients / 10000).
    assert largest_difference(run_dir, recorded_fedavg(hospitals)) < 1e-3


@pytest.mark.e2e
def test_bad_updates_are_rejected_by_hospital_and_the_run_completes(tmp_path):
    broken = {1: {"weights": "nan"}, 2: {"weights": "one short"}, 3: {"weights": "huge"}}
    shown, metrics = tampered_run(tmp_path, broken, "--rounds", "3")
    assert_last_round_short_of_one(metrics, tmp_path / "run")
    run_dir = tmp_path / "run"
    assert len(metrics["rounds"]) == 3
    rejected = [r["rejected"] for r in metrics["rounds"]]
    assert [[x["hospital"] for x in r] for r in rejected] == [["0"], ["0"], ["0"]]
    reasons = [r[0]["reason"] for r in rejected]
    assert "NaN or infinite" in reasons[0]
    assert "1 weight arrays where the model has 2" in reasons[1]  # logistic: W and b
    assert "more than max_update_norm" in reasons[2]
    assert [r["hospitals_trained"] for r in metrics["rounds"]] == [2, 2, 2]
    assert "hospital 0's update rejected: weight array 0 holds NaN" in shown
    assert "updates were rejected in rounds [1, 2, 3]" in shown
    model, _ = load_model(run_dir / "model.pt")
    assert all(np.isfinite(w).all() and np.abs(w).max() < 100 for w in get_weights(model))
    assert metrics["final"]["global"]["auc"] > 0.6  # trained by the other two
    assert (
        "Rejected hospital 0's update in round 1"
        in (run_dir / "flower" / "flwr-run.log").read_text()
    )


def said(processes, name):
    """What a process printed, with the console's line wrapping undone."""
    return " ".join(processes.output(name).split())


def hospital(processes, app, port, number, *more, name):
    args = ["--client-id", str(number), "--num-clients", "2"]
    args += ["--server-address", f"127.0.0.1:{port}", *more]
    return processes.start(str(app / "client.py"), *args, name=name)


def server(processes, app, port, *more):
    args = ["--port", str(port), "--num-clients", "2", *TINY]
    return processes.start(str(app / "server.py"), *args, *more, name="server")


@pytest.mark.e2e
def test_only_enrolled_hospitals_join_and_secure_aggregation_sums_exactly(federation):
    processes, workdir, port = federation
    app = app_copy(workdir / "app", RECORDING_CLIENT)
    keys = workdir / "enrolled"
    keys.mkdir()
    for number in (0, 1):
        public_key = make_hospital_key(workdir / f"hospital-{number}" / "hospital.key")
        shutil.copy(public_key, keys / f"hospital-{number}.pub")
    make_hospital_key(workdir / "impostor" / "hospital.key")  # a key nobody enrolled
    rogue_key = make_hospital_key(workdir / "rogue" / "hospital.key")

    host = server(
        processes, app, port, "--rounds", "1", "--run-dir", "run", "--hospital-keys", str(keys)
    )
    soon = ["--connect-timeout", "5"]  # how long a hospital asks again before it gives up
    impostor = hospital(
        processes, app, port, 1, "--state-dir", str(workdir / "impostor"), *soon, name="impostor"
    )
    assert impostor.wait(timeout=120) == 1
    assert "The server refused this hospital" in said(processes, "impostor")
    assert "not enrolled" in said(processes, "impostor")
    keyless = hospital(
        processes, app, port, 1, "--state-dir", str(workdir / "keyless"), *soon, name="keyless"
    )
    assert keyless.wait(timeout=120) == 1
    told = said(processes, "keyless")
    assert "The server refused this hospital" in told and "--make-key" in told
    assert "stopped unexpectedly" not in told and "connected" not in told
    # The attack: register a key of one's own behind the operator's back, through
    # Flower's Control API (from this machine: it answers nobody else), then claim
    # to be hospital 1. Flower lets the node in; the server does not count it.
    registered = attacker(workdir, f"127.0.0.1:{port}", "supernode", "register", str(rogue_key))
    assert "registered successfully" in registered, registered
    rogue = hospital(processes, app, port, 1, "--state-dir", str(workdir / "rogue"), name="rogue")
    wait_for(lambda: "claims to be hospital 1" in json.dumps(read_metrics(workdir / "run")))
    members = [
        hospital(
            processes, app, port, n, "--state-dir", str(workdir / f"hospital-{n}"), name=f"h{n}"
        )
        for n in (0, 1)
    ]
    assert_ran_to_the_end(host.wait(timeout=300), workdir / "run", said(processes, "server"))
    assert all(member.wait(timeout=60) == 0 for member in members)
    assert "2 enrolled hospitals may join" in said(processes, "server")
    assert "identified by its key" in said(processes, "h0")
    # The refused node is told why and exits, rather than waiting for its timeout.
    assert rogue.wait(timeout=60) == 1
    assert "The server did not admit this hospital to run" in said(processes, "rogue")
    assert "did not prove it with hospital 1's enrolled key" in said(processes, "rogue")
    rogue_ledgers = (workdir / "rogue").glob("**/privacy-ledger.json")
    assert not any(json.loads(p.read_text())["releases"] for p in rogue_ledgers)  # never trained
    shown = said(processes, "server")
    assert "nodes that were not admitted as hospitals" in shown
    assert "did not prove it with hospital 1's enrolled key" in shown
    metrics = read_metrics(workdir / "run")
    [refused] = metrics["refused_nodes"]
    assert "claims to be hospital 1 but did not prove it" in refused["reason"]
    assert metrics["config"]["secure_aggregation"] == "on"  # deployment's default
    expected = recorded_fedavg([workdir / "hospital-0", workdir / "hospital-1"])
    assert largest_difference(workdir / "run", expected) < 1e-3


@pytest.mark.e2e
def test_a_hospital_that_asks_before_its_key_is_registered_waits_and_joins(federation):
    # An enrolled hospital that asks before server.py --hospital-keys has registered
    # its key is told it is not admitted yet, not that it is "not enrolled", and
    # keeps running. Here its key is registered only once it has been turned away.
    processes, workdir, port = federation
    certs, flwr_home = workdir / "certs", workdir / "superlink"
    public_key = make_hospital_key(workdir / "h0" / "hospital.key")
    tls = ["--enable-supernode-auth", "--ssl-ca-certfile", str(certs / "ca.crt")]
    tls += ["--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key")]
    with runtime.superlink(flwr_home, *tls, port=port, ca_cert=certs / "ca.crt") as address:
        runtime.connect_cli(flwr_home, address, certs / "ca.crt")
        member = hospital(processes, ROOT, port, 0, "--state-dir", str(workdir / "h0"), name="h0")
        wait_for(lambda: "does not admit this hospital yet" in said(processes, "h0"), 120)
        runtime.enroll(flwr_home, [public_key])
        listing = [runtime.executable("flwr"), "supernode", "list", "run", "--format", "json"]

        def online():
            answer = subprocess.run(
                listing, cwd=flwr_home, env=runtime.flower_env(flwr_home),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            return '"online"' in answer.stdout

        wait_for(online, 120)
        assert member.poll() is None, said(processes, "h0")
    assert "The server refused this hospital" not in said(processes, "h0")


@pytest.mark.e2e
def test_a_secure_aggregation_mismatch_is_caught_before_anyone_trains(federation):
    processes, workdir, port = federation
    host = server(processes, ROOT, port, "--rounds", "1", "--run-dir", "run")  # SecAgg+ on
    members = [
        hospital(processes, ROOT, port, 0, name="h0"),
        hospital(processes, ROOT, port, 1, "--secure-aggregation", "off", name="h1"),
    ]
    assert host.wait(timeout=300) == 1, said(processes, "server")
    assert all(member.wait(timeout=60) == 1 for member in members)
    shown = said(processes, "server")
    assert "not every hospital can take part, so nobody trained: hospital 1: the server's" in shown
    assert "secure_aggregation is on but this hospital's is off" in shown
    told = said(processes, "h1")
    assert "Did not take part in run" in told and "this hospital's is off" in told
    assert "The server ended the run (failed" in told
    metrics = read_metrics(workdir / "run")
    assert metrics["status"] == "failed" and metrics["rounds"] == []
    for number in (0, 1):  # nobody spent anything
        ledgers = hospital_state(workdir, number).glob("**/privacy-ledger.json")
        assert not any(json.loads(ledger.read_text())["releases"] for ledger in ledgers)


@pytest.mark.e2e
def test_a_hospital_runs_only_an_app_identical_to_its_own_copy(federation):
    processes, workdir, port = federation
    tampered = app_copy(workdir / "app", change=("client.py", "\n# upload the patients\n"))
    host = server(processes, tampered, port, "--rounds", "1", "--run-dir", "run")
    members = [hospital(processes, ROOT, port, n, name=f"h{n}") for n in (0, 1)]
    for member in members:
        assert member.wait(timeout=120) == 1
    out = said(processes, "h0")
    assert "Refused to run the server's app" in out and "client.py" in out, out
    assert "runs only an app identical to this copy" in out
    assert host.wait(timeout=300) == 1
    assert read_metrics(workdir / "run")["status"] == "failed"
    # No round of the tampered code ran at the hospital: nothing was trained there.
    status = json.loads((hospital_state(workdir, 0) / "status.json").read_text())
    assert status["status"] == "untrusted-app"
    # The refusal came from a ClientApp forked from the hospital's zygote (issue 30).
    assert "Forked" in (hospital_state(workdir, 0) / "flower" / "zygote.log").read_text()


def test_no_partial_file_is_ever_left(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json(path, {"status": "running"})

    def power_cut(fd):
        raise OSError("disk unplugged")

    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(OSError):
        write_json(path, {"status": "finished", "rounds": list(range(10000))})
    assert json.loads(path.read_text()) == {"status": "running"}  # the old one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


@pytest.mark.parametrize(
    "aggregation, shift", [("fedavg", (0.01 + 0.02 + 0.5) / 3), ("median", 0.02)]
)
def test_robust_aggregation_is_not_dragged_by_one_hospital(aggregation, shift, tmp_path):
    cfg = settings.resolve(
        {"aggregation": aggregation, "secure_aggregation": "off", "global_test_patients": 200}
    )
    admission = Admission(None, cfg, run_id=1)
    admission.members = {10 + hospital: hospital for hospital in range(3)}  # node -> number
    strategy = HospitalFedAvg(cfg, tmp_path, admission)
    start = strategy.global_weights
    results = [
        (
            SimpleNamespace(node_id=10 + hospital),
            FitRes(
                Status(Code.OK, ""),
                ndarrays_to_parameters([w + step for w in start]),
                100,
                sound_report(hospital),
            ),
        )
        for hospital, step in enumerate((0.01, 0.02, 0.5))  # hospital 2 pulls hard
    ]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    for new, old in zip(parameters_to_ndarrays(parameters), start, strict=True):
        np.testing.assert_allclose(new, old + shift, atol=1e-6)
    assert strategy.last_round.rejections == []


def hospitals_round(strategy, moves, patients=(100, 100, 100)):
    """Round results in which each hospital moves the global model and claims a patient count.

    Hospital i moves every weight of the global model by moves[i] ("nan" for NaN
    weights) and claims patients[i] patients.
    """
    return [
        (
            SimpleNamespace(node_id=10 + hospital),
            FitRes(
                Status(Code.OK, ""),
                ndarrays_to_parameters(
                    [w * np.nan if move == "nan" else w + move for w in strategy.global_weights]
                ),
                claimed,
                sound_report(hospital, patients=claimed),
            ),
        )
        for hospital, (move, claimed) in enumerate(zip(moves, patients, strict=True))
    ]


def plain_strategy(tmp_path, **settings_changes):
    cfg = settings.resolve(
        {"secure_aggregation": "off", "global_test_patients": 200, **settings_changes}
    )
    admission = Admission(None, cfg, run_id=1)
    admission.members = {10 + hospital: hospital for hospital in range(3)}  # node -> number
    return HospitalFedAvg(cfg, tmp_path, admission)


def npy_bytes(header):
    """A .npy array's bytes with the header a hostile hospital chose, and no data."""
    text = header.encode("latin1")
    text += b" " * (64 - (10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


@pytest.mark.parametrize(
    "first_array, problem",
    [
        (
            npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776,), }"),
            "weight array 0 has shape (1099511627776,)",  # 8 TiB, were it allocated
        ),
        (npy_bytes("{'descr': "), "weight array 0 is not a .npy array"),
        (npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 9), }"), "the bytes"),
        (
            npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (True, 9), }")
            + bytes(36),  # True == 1: a shape that compares equal, and would not reshape
            "has shape (True, 9)",
        ),
    ],
    ids=["8 TiB shape", "truncated header", "no data", "a bool for a length"],
)
def test_an_update_whose_header_lies_is_rejected_before_it_is_read(tmp_path, first_array, problem):
    strategy = plain_strategy(tmp_path)
    results = hospitals_round(strategy, (0.1, 0.1, 0.1))
    hostile = results[0][1].parameters
    hostile.tensors = [first_array, *hostile.tensors[1:]]
    parameters, _ = strategy.aggregate_fit(1, results, [])  # the others' round goes on
    (rejection,) = strategy.last_round.rejections
    assert parameters is not None and rejection["hospital"] == "0"
    assert "its update is not the model's arrays" in rejection["reason"]
    assert problem in rejection["reason"]


def test_a_hospital_cannot_weigh_more_in_the_operating_point_than_it_trained_with(tmp_path):
    strategy = plain_strategy(tmp_path)
    strategy.aggregate_fit(1, hospitals_round(strategy, (0.1, 0.1, 0.1)), [])
    # Round 2: hospital 0 declines, claiming 10,000 patients (a weight of 0 is accepted) ...
    declined = sound_report(0, status="refused", patients=10000)
    second = hospitals_round(strategy, (0.1, 0.1, 0.1))
    second[0] = (second[0][0], FitRes(Status(Code.OK, ""), second[0][1].parameters, 0, declined))
    strategy.aggregate_fit(2, second, [])
    assert strategy.reports["0"].patients == 10000
    # ... and its training patient count, 100, stays what its operating point is held to.
    assert strategy.trained["0"].patients == 100
    more = hospitals_round(strategy, (0.1, 0.1, 0.1), patients=(5000, 100, 100))
    strategy.aggregate_fit(3, more, [])
    assert (
        "trained with 100 patients before in this run, and claims 5000"
        in (strategy.last_round.rejections[0]["reason"])
    )


def test_a_hospitals_words_reach_no_console_or_report_as_escapes_or_markup(tmp_path):
    strategy = plain_strategy(tmp_path)
    results = hospitals_round(strategy, (0.1, 0.1, 0.1))
    results[0][1].metrics = sound_report(
        0, ledger_reset="\x1b]0;PWNED\x07\x1b[2J[/nope] ![](https://evil.example/b.png)"
    )
    results[1][1].metrics = {**sound_report(1), "\x1b[2Jnote": "x"}
    strategy.aggregate_fit(1, results, [])
    assert "'\\x1b[2Jnote'" in strategy.last_round.rejections[0]["reason"]  # quoted, not obeyed
    assert "\x1b" not in strategy.reports["0"].ledger_reset
    reset = strategy.reports["0"].ledger_reset
    metrics = {"rounds": [], "privacy": {"hospitals": {"0": {"ledger_reset": reset}}}}
    shown = io.StringIO()
    for problem in display.shortfalls(metrics):  # as print_summary prints them
        Console(file=shown).print(f"[red]Warning:[/] {escape(problem)}")
    assert "[/nope]" in shown.getvalue() and "\x1b" not in shown.getvalue()


def test_no_hospital_outweighs_the_rest_whatever_patient_count_it_claims(tmp_path):
    # Hospital 2 claims 9999 patients (under max_patients) and pulls the other way;
    # uncapped it would hold 98 % of the FedAvg weight. Capped at the others'
    # 200 patients, it holds half: (200 * -0.9 + 100 * 0.1 + 100 * 0.1) / 400.
    strategy = plain_strategy(tmp_path)
    start = strategy.global_weights
    results = hospitals_round(strategy, (0.1, 0.1, -0.9), patients=(100, 100, 9999))
    parameters, _ = strategy.aggregate_fit(1, results, [])
    for new, old in zip(parameters_to_ndarrays(parameters), start, strict=True):
        np.testing.assert_allclose(new, old - 0.4, atol=1e-6)
    assert strategy.last_round.weights_capped == {"2": [9999, 200]}
    strategy._evaluate_global(1, parameters_to_ndarrays(parameters), {})
    assert strategy.record.results["rounds"][0]["weights_capped"] == {"2": [9999, 200]}


def test_fewer_sound_updates_than_min_fit_clients_are_thrown_away_and_twice_stops_the_run(
    tmp_path,
):
    # With two of three updates rejected, the third alone must not make a round:
    # min_fit_clients is 2.
    strategy = plain_strategy(tmp_path)
    start = strategy.global_weights
    for server_round in (1, 2):
        results = hospitals_round(strategy, ("nan", "nan", 0.1))
        assert strategy.aggregate_fit(server_round, results, []) == (None, {})
        assert "only 1 hospital's update could be used" in strategy.last_round.discarded
        if server_round == 1:
            strategy._evaluate_global(server_round, start, {})  # the model stays as it was
    with pytest.raises(AggregationError, match=r"rounds \[1, 2\] were discarded"):
        strategy._evaluate_global(2, start, {})
    discarded = strategy.record.results["discarded_rounds"]
    assert [d["round"] for d in discarded] == [1, 2]
    assert "min_fit_clients (2)" in discarded[0]["reason"]


def test_an_implausible_secure_sum_is_thrown_away_and_a_second_one_stops_the_run(tmp_path):
    # Under SecAgg+ every result carries the same summed model. One moved by more
    # than max_update_norm is thrown away and the run goes on; a second such round
    # stops it.
    strategy = plain_strategy(tmp_path, secure_aggregation="on")
    start = strategy.global_weights
    for server_round in (1, 2):
        results = hospitals_round(strategy, (100.0, 100.0, 100.0))
        the_sum = results[0][1].parameters
        summed = [(proxy, replace(fit_res, parameters=the_sum)) for proxy, fit_res in results]
        assert strategy.aggregate_fit(server_round, summed, []) == (None, {})
        assert "the securely aggregated model is implausible" in strategy.last_round.discarded
        assert "more than max_update_norm 100" in strategy.last_round.discarded
        if server_round == 1:
            strategy._evaluate_global(server_round, start, {})
            assert strategy.record.results["rounds"][0]["discarded"]
    with pytest.raises(AggregationError, match="secure_aggregation off to have the server name"):
        strategy._evaluate_global(2, start, {})


def test_under_secure_aggregation_one_hospitals_update_alone_is_thrown_away(tmp_path):
    # With two hospitals declining, SecAgg+'s "sum" is one hospital's update, which
    # must not become the global model.
    strategy = plain_strategy(tmp_path, secure_aggregation="on")
    results = hospitals_round(strategy, (0.1, 0.1, 0.1))
    for proxy, fit_res in results[1:]:
        number = proxy.node_id - 10
        fit_res.metrics = sound_report(number, status="refused", reason="its budget is spent")
        fit_res.num_examples = 0  # as a hospital that declined sends it
    assert strategy.aggregate_fit(1, results, []) == (None, {})
    assert "only 1 hospital's update could be used" in strategy.last_round.discarded


def test_a_hospitals_error_text_reaches_the_console_cut_and_without_escapes():
    # Passed on whole, a 300,000-character error with terminal escapes stalls the
    # server's console for minutes and reaches it raw.
    said = "\x1b]0;PWNED\x07\x1b[2J" + "Z" * 300_000
    flower = f"<class 'ValueError'>:<'Exception occurred. Message: {said}'>"
    reason = failure_reason(RuntimeError(flower))
    assert "\x1b" not in reason and "\x07" not in reason
    assert reason.endswith("... (300014 characters)") and len(reason) < 1100


def test_a_refused_node_is_told_even_where_its_settings_disagree_with_the_run(
    tmp_path, monkeypatch
):
    for name in ("_run_id", "_node_id", "_task_id"):  # as in a ClientApp's process
        monkeypatch.setattr(TaskIdentity, name, 1)
    # A node whose number is outside the run's is refused and notified; it writes
    # why to its status file rather than waiting silently.
    own = {"partition-id": 4, "num-partitions": 5, "state-dir": str(tmp_path)}
    context = flower_context(own, settings.to_run_config(settings.resolve({})))
    notice = GetPropertiesIns({NOT_ADMITTED: "\x1b[2Jit claims hospital 4, not one of this run's"})
    message = Message(getpropertiesins_to_recorddict(notice), dst_node_id=1, message_type="query")
    hospital_node.hospital_mod(message, context, lambda m, c: None)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == NOT_ADMITTED
    assert status["reason"] == "[2Jit claims hospital 4, not one of this run's"


def test_the_server_steps_with_momentum_from_the_global_model(tmp_path):
    # Every hospital moves the model by 0.1 each round: with server momentum 0.5 the
    # global model moves by 0.1 in round 1 and 0.1 + 0.05 in round 2.
    cfg = settings.resolve(
        {"server_momentum": 0.5, "secure_aggregation": "off", "global_test_patients": 200}
    )
    admission = Admission(None, cfg, run_id=1)
    admission.members = {10 + hospital: hospital for hospital in range(3)}
    strategy = HospitalFedAvg(cfg, tmp_path, admission)
    start = [w.copy() for w in strategy.global_weights]  # the model's own memory
    for server_round, moved in ((1, 0.1), (2, 0.25)):
        now = strategy.global_weights
        results = [
            (
                SimpleNamespace(node_id=10 + hospital),
                FitRes(
                    Status(Code.OK, ""),
                    ndarrays_to_parameters([w + 0.1 for w in now]),
                    100,
                    sound_report(hospital),
                ),
            )
            for hospital in range(3)
        ]
        parameters, _ = strategy.aggregate_fit(server_round, results, [])
        strategy._evaluate_global(server_round, parameters_to_ndarrays(parameters), {})
        for new, old in zip(strategy.global_weights, start, strict=True):
            np.testing.assert_allclose(new, old + moved, atol=1e-6)


def sound_report(number, **changes):
    """A training report as an honest hospital sends it (securehealth.hospital.Hospital._report)."""
    release = {"round": 1, "noise_multiplier": 1.2, "sample_rate": 0.5, "steps": 2}
    report = {
        "hospital": number,
        "patients": 100,
        "status": "trained",
        "reason": "",
        "epsilon": 0.5,
        "epsilon_budget": 1.0,
        "delta": 1e-5,
        "adjacency": "replace-one",
        "accountant": "pld",
        **{k: v for k, v in release.items() if k != "round"},
        "releases": json.dumps(
            [{**release, "adjacency": "replace-one", "mechanism": "dp-sgd", "this_run": True}]
        ),
        "ledger_reset": "",
    }
    return {**report, **changes}


def report_problem(metrics, num_examples, hospital, previous, max_patients):
    """Why the server refuses a report (None where it accepts it)."""
    earlier = previous and PrivacyReport.read(
        previous, hospital=0, num_examples=100, previous=None, max_patients=max_patients
    )
    try:
        PrivacyReport.read(
            metrics,
            hospital=hospital,
            num_examples=num_examples,
            previous=earlier,
            max_patients=max_patients,
        )
    except UnsoundReport as problem:
        return str(problem)
    return None


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({}, None),
        ({"hospital": 1}, "claims hospital 1, but it was admitted as 0"),
        ({"patients": 10**9}, "patient count 1000000000 is outside 1..10000"),
        ({"epsilon": 0.1}, "epsilon 0.1, less than the 0.5 it reported before"),
        ({"epsilon": float("nan")}, "epsilon is not a finite number"),
        ({"delta": 2.0}, "delta is not between 0 and 1"),
        ({"steps": "many"}, "steps is str, not int"),
        ({"status": "finished"}, "status 'finished' is not one of"),
        ({"releases": "[{"}, "releases are not valid JSON"),
        ({"releases": "[" * 100_000 + "]" * 100_000}, "releases are not valid JSON"),
        ({"releases": "[" + ", ".join(["{}"] * 400_000) + "]"}, "releases are over"),
        ({"epsilon": 0.0}, "it trained, yet its report says it spent no epsilon"),
        ({"note": "hello"}, "its report has fields no hospital sends: 'note'"),
        ({"releases": '[{"round": 1}]'}, "release noise_multiplier is NoneType, not float"),
        ({"adjacency": "anyone"}, "adjacency 'anyone' is not one of replace-one, add-remove"),
        ({"accountant": "pld[/]"}, "accountant 'pld[/]' is not one of pld"),
        (
            {"releases": json.dumps([{**json.loads(sound_report(0)["releases"])[0], "steps": -3}])},
            "releases hold a negative noise multiplier, steps or round",
        ),
    ],
)
def test_a_report_is_checked_field_by_field(changes, problem):
    previous = sound_report(0)
    report = sound_report(0, **changes)
    found = report_problem(report, report["patients"], 0, previous, max_patients=10000)
    assert (found is None) if problem is None else (problem in found), found


def test_a_sound_report_survives_the_trip_through_flowers_metrics():
    report = PrivacyReport.read(
        sound_report(0), hospital=0, num_examples=100, previous=None, max_patients=10000
    )
    again = PrivacyReport.read(
        report.to_metrics(), hospital=0, num_examples=100, previous=None, max_patients=10000
    )
    assert again == report and again.releases[0].this_run is True


def test_a_report_without_a_hospital_number_or_with_another_weight_is_rejected():
    report = sound_report(0)
    del report["hospital"]
    assert "hospital is NoneType, not int" in report_problem(report, 100, 0, None, 10000)
    weighted = report_problem(sound_report(0), 10**9, 0, None, 10000)
    assert "weights its update by 1000000000 patients but reports 100" in weighted


@pytest.mark.e2e
def test_lying_reports_are_rejected_and_named_and_the_run_completes(tmp_path):
    lies = {
        2: {"hospital": 1, "epsilon": 0.0},  # another hospital's number, nothing spent
        3: {"num_examples": 10**9, "patients": 10**9},  # to outweigh everyone
        4: {"epsilon": 0.01},  # less than it reported in round 1
        5: {"releases": "[{not json"},
        6: {"hospital": None},
    }
    shown, metrics = tampered_run(tmp_path, lies, "--rounds", "6")
    assert_last_round_short_of_one(metrics, tmp_path / "run")
    assert len(metrics["rounds"]) == 6
    rejected = [r["rejected"] for r in metrics["rounds"]]
    assert rejected[0] == [] and all([x["hospital"] for x in r] == ["0"] for r in rejected[1:])
    reasons = [r[0]["reason"] for r in rejected[1:]]
    assert "its report claims hospital 1, but it was admitted as 0" in reasons[0]
    assert "patient count 1000000000 is outside 1..10000" in reasons[1]
    assert "less than the" in reasons[2] and "it reported before" in reasons[2]
    assert "releases are not valid JSON" in reasons[3]
    assert "hospital is NoneType" in reasons[4]
    assert [r["hospitals_trained"] for r in metrics["rounds"]] == [3, 2, 2, 2, 2, 2]
    # Hospital 1's own reports stand; hospital 0's lies were rejected, and its honest
    # reply with its operating point reports what it really spent, all six rounds.
    hospitals = metrics["privacy"]["hospitals"]
    assert hospitals["1"]["epsilon"] > 0.9 and hospitals["0"]["epsilon"] > 0.9
    assert metrics["operating_point"]["hospitals"]["0"]["status"] == "released"
    assert "hospital 0's update rejected: its report claims hospital 1" in shown


@pytest.mark.e2e
def test_a_secure_sum_with_a_lying_report_is_discarded_and_counted_as_spent(tmp_path):
    lies = {1: {"hospital": 2}}
    shown, metrics = tampered_run(tmp_path, lies, "--secure-aggregation", "on", "--rounds", "2")
    first, second = metrics["rounds"]
    assert "the round's model was thrown away" in first["discarded"]
    assert [x["hospital"] for x in first["rejected"]] == ["0"]
    assert first["hospitals_trained"] == 0 and second["hospitals_trained"] == 3
    for hospital in (0, 1, 2):  # the discarded round was released, so it is spent
        ledger = tmp_path / "run" / "hospitals" / f"hospital-{hospital}" / "privacy-ledger.json"
        released = json.loads(ledger.read_text())["releases"]
        assert [r["mechanism"] for r in released] == ["dp-sgd", "dp-sgd", "operating-point"]
    assert "rounds [1] were discarded after the hospitals trained" in shown
    assert "ledgers count them as spent" in shown


@pytest.mark.e2e
def test_a_hostile_hospital_under_secure_aggregation_costs_two_rounds_then_the_run_stops(
    tmp_path,
):
    # One hospital's weights of 1e6 (clipped by SecAgg+ to 8) spoil a round's sum: it
    # is thrown away and the run goes on; a second thrown-away round stops it, and
    # every hospital is told why.
    app = app_copy(
        tmp_path / "app",
        TAMPERING_CLIENT.format(tampering=repr({1: {"weights": "huge"}, 3: {"weights": "huge"}})),
    )
    run_dir = tmp_path / "run"
    result = simulate(app, "--secure-aggregation", "on", "--rounds", "4", "--run-dir", str(run_dir))
    shown = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1, shown
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "failed"
    assert [r["round"] for r in metrics["discarded_rounds"]] == [1, 3]
    first, second, third = metrics["rounds"]
    assert "the securely aggregated model is implausible" in first["discarded"]
    assert "more than max_update_norm 100" in first["discarded"]
    assert second["hospitals_trained"] == 3 and "discarded" not in second
    assert "rounds [1, 3] were discarded" in metrics["error"]
    for hospital in (0, 1, 2):  # round 4 never trained: the run stopped after round 3
        ledger = run_dir / "hospitals" / f"hospital-{hospital}" / "privacy-ledger.json"
        released = json.loads(ledger.read_text())["releases"]
        assert [r["round"] for r in released] == [1, 2, 3]
        status = json.loads((ledger.parent / "status.json").read_text())
        assert "rounds [1, 3] were discarded" in status["reason"], status


def peak_memory_kb(pid):
    """The process's peak resident memory so far (VmHWM), in kB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1])


def post(address, path, headers, body_pieces):
    """Send an unauthenticated POST to the SuperLink, piece by piece.

    Returns the status it got, or None where the server closed the connection first.
    """
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("POST", path)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        for piece in body_pieces:
            connection.send(piece)
        return connection.getresponse().status
    except (BrokenPipeError, ConnectionResetError):
        return None
    finally:
        connection.close()


def test_two_bodies_from_one_address_arriving_at_once_both_reach_flower():
    # One request ending while another from the same address is arriving must not
    # make the second fail: a 500 makes the hospital leave the run.
    delivered = []

    async def flower(scope, receive, send):
        delivered.append((await receive())["body"])

    gate = superlink_gate.BoundedFleetBodies(flower, limit=1000)
    scope = {"type": "http", "path": "/v1/fleet/push-object", "client": ("127.0.0.1", 1)}

    async def both():
        first, second = asyncio.Queue(), asyncio.Queue()
        headers = {**scope, "headers": [(b"content-length", b"6")]}
        started = asyncio.create_task(gate(headers, second.get, None))
        await asyncio.sleep(0)  # the second is waiting for its first bytes
        await first.put({"type": "http.request", "body": b"xyz123", "more_body": False})
        await gate(headers, first.get, None)  # ends while the second is arriving
        await second.put({"type": "http.request", "body": b"abc", "more_body": True})
        await second.put({"type": "http.request", "body": b"def", "more_body": False})
        await started

    asyncio.run(both())
    assert sorted(delivered) == [b"abcdef", b"xyz123"]
    assert not gate.in_flight


@pytest.mark.e2e
def test_the_superlink_refuses_a_huge_request_before_reading_it(tmp_path):
    # Read before any check, a 200 MB unauthenticated body takes 148 to 430 MB of the
    # SuperLink's memory.
    limit = superlink_gate.fleet_body_limit(1000)
    variable = {superlink_gate.BODY_LIMIT_VARIABLE: str(limit)}
    with runtime.superlink(tmp_path / "flower", "--insecure", environment=variable) as address:
        [gate] = [
            pid
            for pid in runtime.process_tree(os.getpid())
            if b"superlink_gate" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        before = peak_memory_kb(gate)
        megabyte = b"x" * 1_000_000
        declared = {"Content-Length": "200000000", "Content-Type": "application/protobuf"}
        assert post(address, "/v1/fleet/push-object", declared, [megabyte] * 200) in (413, None)
        chunked = {"Transfer-Encoding": "chunked", "Content-Type": "application/protobuf"}
        pieces = [b"%x\r\n%s\r\n" % (len(megabyte), megabyte)] * 200 + [b"0\r\n\r\n"]
        assert post(address, "/v1/fleet/push-object", chunked, pieces) in (413, None)
        within = {"Content-Length": "1000", "Content-Type": "application/protobuf"}
        answer = post(address, "/v1/fleet/push-object", within, [b"x" * 1000])
        assert answer not in (413, None)  # Flower's own answer to bytes that mean nothing
        assert peak_memory_kb(gate) - before < 50_000  # not 200 MB
        # Unbounded, 600 connections each sending almost the limit, then waiting,
        # hold 2.85 GB. Bodies in flight from one address hold 2 limits at most (a
        # global bound would let 8 such connections lock every hospital out).
        host, port = address.split(":")
        stalled, answers = [], []
        for _ in range(30):
            connection = http.client.HTTPConnection(host, int(port), timeout=60)
            connection.putrequest("POST", "/v1/fleet/push-object")
            connection.putheader("Content-Length", str(limit))
            connection.endheaders()
            try:
                connection.send(b"x" * (limit - 1000))  # and the last 1000 bytes never come
            except OSError:  # refused and closed before all of it was sent
                pass
            stalled.append(connection)
        for connection in stalled[2:]:
            try:
                answers.append(connection.getresponse().status)
            except OSError:
                answers.append(None)  # closed on it
        # 408: one took a place while the first two were still arriving, and stalled.
        assert set(answers) <= {503, 408, None} and answers.count(503) >= 20, answers
        assert peak_memory_kb(gate) - before < 60_000
        for connection in stalled:
            connection.close()


def attacker(workdir, address, *command):
    """Flower's own `flwr` CLI, run by someone holding only ca.crt and the server's address.

    ca.crt is public; they call the server's federation "victim".
    """
    home = workdir / "attacker"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink.victim]\naddress = "{address}"\n'
        f'root-certificates = "{workdir / "certs" / "ca.crt"}"\n'
    )
    flwr = Path(sys.executable).parent / "flwr"
    # flwr ls FEDERATION; flwr run APP FEDERATION ...; flwr log|stop RUN_ID FEDERATION;
    # flwr supernode register KEY FEDERATION
    position = {"ls": 1, "run": 2, "log": 2, "stop": 2, "supernode": 3}[command[0]]
    command = (*command[:position], "victim", *command[position:])
    result = subprocess.run(
        [str(flwr), *command],
        env={**os.environ, "FLWR_HOME": str(home)},
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=180,
    )
    return result.stdout  # what the attacker sees


def wait_for(condition, timeout=240):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(1)


def network_address():
    """This machine's address on its network (not loopback), or None without one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # picks the outgoing interface; sends nothing
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


ROUNDS_LONGER_THAN_THE_ATTACK = 100  # 12 rounds once all finished before the stop came


@pytest.mark.e2e
def test_only_the_operator_can_start_or_see_runs(federation):
    """Runs need the operator's signature, once each; the network reaches only the Fleet API.

    Attack: with ca.crt and the server's address, list the live run, read its log,
    submit a clean copy of this app with settings of one's choosing, replay the
    operator's own signed run config, and stop the run.
    """
    processes, workdir, port = federation
    external = network_address()
    shutil.rmtree(workdir / "certs")  # certificates valid for the network address too
    make_certificates(workdir / "certs", ["localhost", "127.0.0.1", *filter(None, [external])])
    clean = app_copy(workdir / "clean")
    host = server(
        processes, ROOT, port, "--host", "0.0.0.0" if external else "127.0.0.1",
        "--rounds", str(ROUNDS_LONGER_THAN_THE_ATTACK), "--run-dir", "run",
        "--secure-aggregation", "off",
    )  # fmt: skip
    plain = ["--secure-aggregation", "off", "--connect-timeout", "5"]
    members = [hospital(processes, ROOT, port, n, *plain, name=f"h{n}") for n in (0, 1)]
    wait_for(lambda: "Round 1: trained" in said(processes, "h0"))
    real_run = re.search(r"started run (\d+)", (workdir / "run/flower/flwr-run.log").read_text())[1]

    if external:  # from the network: nothing but the hospitals' Fleet API answers
        for command in (("ls",), ("log", real_run), ("stop", real_run), ("run", str(clean))):
            answer = attacker(workdir, f"{external}:{port}", *command)
            assert "only the Fleet API is served to the network" in answer, (command, answer)

    # From the server's own machine the Control API answers, but the server's
    # ServerApp runs only what the operator signed, each signature once.
    local = f"127.0.0.1:{port}"
    assert real_run in attacker(workdir, local, "ls")
    evil = workdir / "evil.toml"
    evil.write_text(f"rounds = 1\nrun_dir = {json.dumps(str(workdir / 'evil'))}\n")
    submitted = attacker(workdir, local, "run", str(clean), "--run-config", str(evil), "--stream")
    assert "the run carries no authorisation from the federation's operator" in submitted
    replay = workdir / "run/flower/run-config.toml"  # the operator's own, signed
    replayed = attacker(workdir, local, "run", str(clean), "--run-config", str(replay), "--stream")
    assert f"its authorisation was used by run {real_run} already (a replay)" in replayed
    stopped = attacker(workdir, local, "stop", real_run)
    assert "successfully stopped" in stopped, stopped

    assert host.wait(timeout=120) == 1
    assert "The run was stopped: stopped through Flower's Control API" in said(processes, "server")
    metrics = read_metrics(workdir / "run")
    assert metrics["status"] == "stopped" and len(metrics["rounds"]) < ROUNDS_LONGER_THAN_THE_ATTACK
    assert not (workdir / "evil").exists()  # the attacker's run wrote nothing
    for number in (0, 1):  # and spent nothing: every release is the operator's run's
        ledger = json.loads(demo_ledger(hospital_state(workdir, number)).read_text())
        assert {r["run_id"] for r in ledger["releases"]} == {real_run}
        register = StateDirectory(hospital_state(workdir, number)).register_file
        assert list(json.loads(register.read_text()).values()) == [real_run]
    for member in members:
        assert member.wait(timeout=60) == 1


class AnsweringGrid:
    """Stands in for Flower's Grid in front of Admission.

    `answers[node](challenge)` is what that connected node replies to the admission
    question.
    """

    def __init__(self, answers):
        self.answers, self.notices = answers, {}  # node -> the notice it was sent

    def get_node_ids(self):
        return list(self.answers)

    def push_messages(self, messages):
        for message in messages:
            config = recorddict_to_getpropertiesins(message.content).config
            self.notices[message.metadata.dst_node_id] = dict(config)
        return [str(n) for n in range(len(self.notices))]

    def send_and_receive(self, questions, timeout=None):
        replies = []
        for question in questions:
            challenge = recorddict_to_getpropertiesins(question.content).config["challenge"]
            answer = self.answers[question.metadata.dst_node_id](challenge)
            result = GetPropertiesRes(Status(Code.OK, ""), answer)
            replies.append(Message(getpropertiesres_to_recorddict(result), reply_to=question))
        return replies


def test_admission_binds_each_number_to_one_proven_node(tmp_path, monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):  # as in a ServerApp's process
        monkeypatch.setattr(TaskIdentity, name, 1)
    cfg = settings.resolve({"num_clients": 2})
    keys = {n: make_hospital_key(tmp_path / f"h{n}" / "hospital.key") for n in (0, 1)}
    enrolled = {n: load_hospital_key(path) for n, path in keys.items()}

    def proving(number, key_of=None):  # a node answering as `number`, signing with a key
        key = tmp_path / f"h{number if key_of is None else key_of}" / "hospital.key"
        return lambda node: (
            lambda challenge: {
                "hospital": number,
                "problem": "",
                "proof": prove_identity(key, challenge, 9, node, number),
            }
        )

    answers = {10: proving(0)(10), 11: proving(1, key_of=0)(11)}  # node 11: hospital 0's key
    answers[14] = lambda challenge: {"hospital": "zero", "proof": 7}  # nonsense
    grid = AnsweringGrid(answers)
    admission = Admission(grid, cfg, run_id=9, enrolled_keys=enrolled)
    admission.refresh()
    assert admission.members == {10: 0} and not admission.complete()
    assert "did not prove it with hospital 1's enrolled key" in admission.refused[11]
    answers[12] = proving(0)(12)  # hospital 0 restarted; its old node is still listed
    answers[13] = proving(1)(13)
    admission.refresh()
    assert admission.members == {10: 0, 13: 1} and admission.complete()
    assert "in the run already as node 10" in admission.waiting[12]
    del answers[10]  # Flower notices the old node is gone: the new one is admitted
    admission.refresh()
    assert admission.members == {12: 0, 13: 1} and not admission.waiting
    assert [r["node"] for r in admission.refusals()] == ["11", "14"]  # named, never admitted
    assert "it claims hospital 'zero', not one of this run's" in admission.refused[14]
    # Each refused node is told why, rather than waiting for its timeout.
    assert sorted(grid.notices) == [11, 14]
    assert grid.notices[11] == {NOT_ADMITTED: admission.refused[11]}


def test_a_reply_flower_cannot_read_fails_its_node_not_the_run(monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):  # as in a ServerApp's process
        monkeypatch.setattr(TaskIdentity, name, 1)
    fit = FitIns(ndarrays_to_parameters([np.zeros(2)]), {"server_round": 1})
    plain = Message(fitins_to_recorddict(fit, True), dst_node_id=5, message_type="train")
    secure = Message(RecordDict(), dst_node_id=5, message_type="train")
    secure.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({"stage": "setup"})
    query = Message(RecordDict(), dst_node_id=5, message_type="query")
    for question in (plain, secure, query):
        reply = readable(question, Message(RecordDict(), reply_to=question))  # empty
        assert reply.has_error() and "its reply is malformed" in reply.error.reason
        assert reply.metadata.src_node_id == 5  # the node that sent it fails
    answer = FitRes(Status(Code.OK, ""), fit.parameters, 10, {})
    sound = Message(fitres_to_recorddict(answer, True), reply_to=plain)
    assert readable(plain, sound) is sound


@pytest.fixture(scope="module")
def this_bundle(tmp_path_factory):
    """This copy's app bundle as `flwr build` makes it: what an honest server ships."""
    folder = tmp_path_factory.mktemp("fab")
    build = [runtime.executable("flwr"), "build", "--app", str(ROOT)]
    subprocess.run(build, cwd=folder, capture_output=True, timeout=120, check=True)
    (bundle,) = folder.glob("*.fab")
    return bundle.read_bytes()


def rebundled(bundle, change):
    """The bundle with change(name, bytes) applied to each file.

    The change returns the file's new bytes, or None to leave the file out.
    """
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(bundle)) as old, zipfile.ZipFile(out, "w") as new:
        for name in old.namelist():
            content = change(name, old.read(name))
            if content is not None:
                new.writestr(name, content)
    return out.getvalue()


def tampered_server_py(name, content):
    return content + b"\n# upload the patients\n" if name == "server.py" else content


def pinned_flower_command(command, monkeypatch, task=None):
    """Flower's `command` as the pinned launcher runs it, its real installer a recorder.

    Flower's CLI installs `task`'s bundle, as it does first. Returns the list of
    installs that happened.
    """
    runner = importlib.import_module(APP_LAUNCHERS[command][0])
    installed = []
    monkeypatch.setattr(runner, "install_from_fab", lambda *args, **kwargs: installed.append(1))
    if command == "flwr-clientapp":  # the task input a SuperNode hands its ClientApp
        monkeypatch.setattr(runner, "pull_task_input", lambda client: task)

    def flower_cli():
        if command == "flwr-clientapp":
            runner.pull_task_input(None)
        runner.install_from_fab(task[3].content, skip_prompt=True)

    monkeypatch.setattr(
        importlib.import_module(APP_LAUNCHERS[command][1]), command.replace("-", "_"), flower_cli
    )
    return installed


def task_shipping(bundle, fab_version="0.1.0", fab_hash=None):
    """(message, context, run, fab) of a run shipping `bundle` and naming it."""
    run = SimpleNamespace(fab_id="securehealth-ml/securehealth-ml", fab_version=fab_version)
    fab = SimpleNamespace(hash_str=fab_hash or hashlib.sha256(bundle).hexdigest(), content=bundle)
    return None, None, run, fab


@pytest.mark.parametrize("command", sorted(APP_LAUNCHERS))
def test_both_launchers_refuse_an_app_that_differs_from_this_copy(
    command, monkeypatch, this_bundle
):
    """A bundle with one file changed never reaches Flower's installer, on a hospital or server.

    The pinned launchers wrap the installer Flower really calls (flwr is pinned).
    """
    task = task_shipping(rebundled(this_bundle, tampered_server_py))
    installed = pinned_flower_command(command, monkeypatch, task)
    with pytest.raises(PermissionError, match="differs from the approved copy .* in server.py;"):
        pinning.run_pinned(command)
    assert installed == []


def test_a_hospital_runs_this_copy_and_refuses_one_with_a_file_left_out(monkeypatch, this_bundle):
    installed = pinned_flower_command("flwr-clientapp", monkeypatch, task_shipping(this_bundle))
    pinning.run_pinned("flwr-clientapp")
    assert installed == [1]  # the honest bundle is installed
    without = rebundled(this_bundle, lambda n, c: None if n == "securehealth/hospital.py" else c)
    assert pinning.differences(without) == ["securehealth/hospital.py (missing)"]


@pytest.mark.parametrize(
    "fab_version, fab_hash",
    [
        ("0.1.0/../../../../../tmp/elsewhere", None),  # any folder with a client.py
        ("0.0.9", None),  # an older app the hospital once installed
        ("0.1.0", "c0ffee" * 10),  # another installed app of this version
    ],
)
def test_a_run_must_load_the_app_it_shipped(monkeypatch, this_bundle, fab_version, fab_hash):
    """A server cannot point a hospital at another folder than the app the run shipped.

    Flower installs the shipped bytes but loads the folder the run names by app id,
    version and hash.
    """
    task = task_shipping(this_bundle, fab_version, fab_hash)
    installed = pinned_flower_command("flwr-clientapp", monkeypatch, task)
    with pytest.raises(PermissionError, match="names another app than the one it shipped"):
        pinning.run_pinned("flwr-clientapp")
    assert installed == []


def test_a_hospital_keeps_the_details_of_a_refusal_to_itself(monkeypatch, this_bundle, tmp_path):
    task = task_shipping(rebundled(this_bundle, tampered_server_py))
    pinned_flower_command("flwr-clientapp", monkeypatch, task)
    status_file = tmp_path / "status.json"
    with pytest.raises(PermissionError) as refusal:
        pinning.run_pinned("flwr-clientapp", str(status_file))
    assert str(ROOT) not in str(refusal.value) and "server.py" not in str(refusal.value)
    status = json.loads(status_file.read_text())  # the hospital's own console shows it
    assert status["status"] == pinning.REFUSED
    assert str(ROOT) in status["reason"] and "server.py" in status["reason"]


def test_a_hospitals_words_cannot_reverse_hide_or_start_a_line():
    said = "ledger lost \u202e.tegdub sti nihtiw\u200b" + " " * 118 + "All is well.\u2028x\ty"
    shown = untrusted(said, REASON_LIMIT)
    assert shown == "ledger lost .tegdub sti nihtiw All is well. x y"
