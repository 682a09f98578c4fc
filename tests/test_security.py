"""Security end to end: secure aggregation (SecAgg+) in simulation and deployment,
enrolled hospitals only, a hospital refusing code it did not approve, and a server
that rejects bad updates and survives them. Hospitals that record or corrupt their
updates run from a copy of the app whose ClientApp adds one Flower mod (below)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import hospital_state
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy.aggregate import aggregate
from test_deployment import ROOT, read_metrics

import settings
from certificates import make_hospital_key
from model import get_weights, load_model
from results import write_json
from server import HospitalFedAvg

TINY = ["--num-patients", "600", "--global-test-patients", "200"]

# A ClientApp that saves each plain update the hospital computes (before SecAgg+
# masks it), so that a test can recompute the plain FedAvg of the round.
RECORDING_CLIENT = """
import numpy as np
from flwr.client import ClientApp
from flwr.common import parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import recorddict_to_fitres
import client


def record(message, context, call_next):
    reply = call_next(message, context)
    if message.metadata.message_type != "train":  # the end-of-run notice
        return reply
    hospital, _ = client.hospital_settings(context)
    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    path = client.hospital_state_dir(context, hospital) / "update.npz"
    arrays = parameters_to_ndarrays(fitres.parameters)
    np.savez(path, num_examples=fitres.num_examples, *arrays)
    return reply


app = ClientApp(client_fn=client.client_fn, mods=[client.secure_aggregation_mod, record])
"""

# A ClientApp whose hospital 0 sends a broken update each round: NaN, one array
# short, then absurdly large.
HOSTILE_CLIENT = """
import numpy as np
from flwr.app import Message
from flwr.client import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import (
    fitres_to_recorddict, recorddict_to_fitins, recorddict_to_fitres,
)
import client


def corrupt(message, context, call_next):
    reply = call_next(message, context)
    if context.node_config["partition-id"] != 0 or message.metadata.message_type != "train":
        return reply
    server_round = int(recorddict_to_fitins(message.content, True).config["server_round"])
    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    weights = parameters_to_ndarrays(fitres.parameters)
    broken = {1: [w * np.nan for w in weights], 2: weights[:-1], 3: [w + 1e6 for w in weights]}
    fitres.parameters = ndarrays_to_parameters(broken[server_round])
    return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


app = ClientApp(client_fn=client.client_fn, mods=[client.secure_aggregation_mod, corrupt])
"""


def app_copy(directory, client_module=None, change=None):
    """A copy of the app in `directory`: its ClientApp replaced by `client_module`
    (source text), or one of its files changed by `change` (name, text to add)."""
    shutil.copytree(
        ROOT,
        directory,
        ignore=shutil.ignore_patterns(".*", "tests", "runs", "state", "certs", "__pycache__"),
    )
    if client_module:
        (directory / "altered_client.py").write_text(client_module)
        pyproject = directory / "pyproject.toml"
        text = pyproject.read_text()
        assert 'clientapp = "client:app"' in text
        pyproject.write_text(text.replace('"client:app"', '"altered_client:app"'))
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


def test_secure_aggregation_in_simulation_equals_plain_fedavg(tmp_path):
    app = app_copy(tmp_path / "app", RECORDING_CLIENT)
    run_dir = tmp_path / "run"
    result = simulate(app, "--secure-aggregation", "on", "--rounds", "1", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "secure aggregation on" in " ".join(result.stdout.split())
    metrics = read_metrics(run_dir)
    assert metrics["config"]["secure_aggregation"] == "on"
    assert metrics["rounds"][0]["hospitals_trained"] == 3
    hospitals = sorted((run_dir / "hospitals").glob("hospital-*"))
    # The server saw only masked updates, yet its sum is FedAvg up to SecAgg+'s
    # quantization (2^22 levels over [-8, 8], weights scaled by patients / 10000).
    assert largest_difference(run_dir, recorded_fedavg(hospitals)) < 1e-3


def test_bad_updates_are_rejected_by_hospital_and_the_run_completes(tmp_path):
    app = app_copy(tmp_path / "app", HOSTILE_CLIENT)
    run_dir = tmp_path / "run"
    result = simulate(app, "--rounds", "3", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "finished" and len(metrics["rounds"]) == 3
    rejected = [r["rejected"] for r in metrics["rounds"]]
    assert [[x["hospital"] for x in r] for r in rejected] == [["0"], ["0"], ["0"]]
    reasons = [r[0]["reason"] for r in rejected]
    assert "NaN or infinite" in reasons[0]
    assert "3 weight arrays where the model has 4" in reasons[1]  # 2 layers: W and b each
    assert "more than max_update_norm" in reasons[2]
    assert [r["hospitals_trained"] for r in metrics["rounds"]] == [2, 2, 2]
    shown = " ".join(result.stdout.split())
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


def test_only_enrolled_hospitals_join_and_secure_aggregation_sums_exactly(federation):
    processes, workdir, port = federation
    app = app_copy(workdir / "app", RECORDING_CLIENT)
    keys = workdir / "enrolled"
    keys.mkdir()
    for number in (0, 1):
        public_key = make_hospital_key(workdir / f"hospital-{number}" / "hospital.key")
        shutil.copy(public_key, keys / f"hospital-{number}.pub")
    make_hospital_key(workdir / "impostor" / "hospital.key")  # a key nobody enrolled

    host = server(
        processes, app, port, "--rounds", "1", "--run-dir", "run", "--hospital-keys", str(keys)
    )
    impostor = hospital(
        processes, app, port, 1, "--state-dir", str(workdir / "impostor"), name="impostor"
    )
    assert impostor.wait(timeout=120) == 1
    assert "The server refused this hospital" in said(processes, "impostor")
    assert "not enrolled" in said(processes, "impostor")
    members = [
        hospital(
            processes, app, port, n, "--state-dir", str(workdir / f"hospital-{n}"), name=f"h{n}"
        )
        for n in (0, 1)
    ]
    assert host.wait(timeout=300) == 0, said(processes, "server")
    assert all(member.wait(timeout=60) == 0 for member in members)
    assert "2 enrolled hospitals may join" in said(processes, "server")
    assert "identified by its key" in said(processes, "h0")
    metrics = read_metrics(workdir / "run")
    assert metrics["config"]["secure_aggregation"] == "on"  # deployment's default
    expected = recorded_fedavg([workdir / "hospital-0", workdir / "hospital-1"])
    assert largest_difference(workdir / "run", expected) < 1e-3


def test_server_and_hospitals_that_disagree_on_secure_aggregation_fail_loudly(federation):
    processes, workdir, port = federation
    host = server(processes, ROOT, port, "--rounds", "2", "--run-dir", "run")  # SecAgg+ on
    off = ["--secure-aggregation", "off"]
    members = [hospital(processes, ROOT, port, n, *off, name=f"h{n}") for n in (0, 1)]
    assert host.wait(timeout=300) == 1, said(processes, "server")
    assert "secure aggregation halted" in said(processes, "server")
    assert all(member.wait(timeout=60) == 1 for member in members)
    assert "The server ended the run (failed: AggregationError" in said(processes, "h0")
    metrics = read_metrics(workdir / "run")
    assert metrics["status"] == "failed" and metrics["rounds"] == []
    assert "disagree on secure_aggregation" in metrics["error"]


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
    strategy = HospitalFedAvg(cfg, tmp_path)
    start = strategy.global_weights
    report = {"status": "trained", "reason": "", "releases": "[]"}
    results = [
        (
            None,
            FitRes(
                Status(Code.OK, ""),
                ndarrays_to_parameters([w + step for w in start]),
                100,
                {"hospital": hospital, **report},
            ),
        )
        for hospital, step in enumerate((0.01, 0.02, 0.5))  # hospital 2 pulls hard
    ]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    for new, old in zip(parameters_to_ndarrays(parameters), start, strict=True):
        np.testing.assert_allclose(new, old + shift, atol=1e-6)
    assert strategy.round_rejections == []
