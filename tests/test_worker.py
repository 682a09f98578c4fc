"""A deployed hospital's warm worker (deployment/worker.py) and its ClientApp relay (relay.py).

Real training through a real Unix socket, with the hospital's own node config
whatever the message says, answering only the hospital's own user.
"""

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY, demo_ledger, flower_context

from securehealth import clientapp as client
from securehealth import local_socket, relay, settings
from securehealth.deployment import worker
from securehealth.deployment.worker import warm_worker
from securehealth.model import build_model, get_weights
from securehealth.state_directory import STATUS_FILE

RUN = settings.to_run_config(
    settings.resolve(
        {"num_patients": int(TINY[1]), "global_test_patients": int(TINY[3]), "rounds": 2}
    )
)


@pytest.fixture
def hospital(tmp_path):
    """A hospital's own node config, and its worker's socket."""
    own = {
        "partition-id": 0,
        "num-partitions": 3,
        "state-dir": str(tmp_path / "own"),
        "operator-key": "",
    }
    with warm_worker(own) as socket_path:
        yield own, socket_path


def test_the_clientapp_relays_training_to_the_hospitals_worker(hospital, tmp_path):
    own, socket_path = hospital
    # Its socket has no file, so kill -9 of client.py leaves nothing behind in /tmp:
    # it is a random name in Linux's abstract namespace.
    assert socket_path.startswith(local_socket.ABSTRACT) and not Path(socket_path).exists()
    assert f"@{socket_path[1:]}" in Path("/proc/net/unix").read_text()
    # The message's node config cannot move the hospital: only the socket is read.
    elsewhere = {relay.NODE_CONFIG_KEY: socket_path, "state-dir": str(tmp_path / "server's")}
    app = client.client_fn(flower_context(elsewhere, RUN, run_id=5))
    relayed = app.numpy_client
    assert isinstance(relayed, relay.RelayClient)
    weights = get_weights(build_model(9, settings.DEFAULTS["hidden_layers"]))
    new, patients, report = relayed.fit(weights, {"server_round": 1})
    assert patients == report["patients"] == 240 and report["status"] == "trained"
    assert [w.shape for w in new] == [w.shape for w in weights]
    assert not all(np.array_equal(a, b) for a, b in zip(new, weights, strict=True))
    assert demo_ledger(own["state-dir"]).parent.name == "5"  # generated patients: run 5's own
    assert not (tmp_path / "server's").exists()
    assert relayed.evaluate(
        new, {"server_round": 1, "run-status": "finished", "threshold": 0.5}
    ) == (0.0, 0, {})
    # A hostile server's run status reaches the hospital's status file as a status it may
    # send, never as its own text (client.py prints that file on the operator's console).
    hostile = "\x1b]0;pwned\x07[link=https://evil.example]re-verify[/link]"
    relayed.evaluate(new, {"server_round": 1, "run-status": hostile, "threshold": 0.5})
    status = json.loads((Path(own["state-dir"]) / STATUS_FILE).read_text())
    assert status["status"] == "failed"
    # An error at the hospital reaches the ClientApp (and so the server) as one line.
    csv_run = {**RUN, "dataset": "csv"}
    with pytest.raises(ValueError, match="brought no data of its own"):
        client.client_fn(flower_context(elsewhere, csv_run, run_id=6)).numpy_client.fit(
            new, {"server_round": 1}
        )


def test_worker_and_clientapp_talk_only_to_their_own_user(hospital, monkeypatch):
    _, socket_path = hospital
    left, right = socket.socketpair(socket.AF_UNIX)
    assert local_socket.peer_uid(left) == os.getuid()
    left.close(), right.close()
    me, weights = os.getuid(), get_weights(build_model(9, settings.DEFAULTS["hidden_layers"]))
    relayed = relay.RelayClient(socket_path, flower_context({}, RUN))
    # The worker, as another user would look to it: no answer.
    monkeypatch.setattr(worker, "os", SimpleNamespace(getuid=lambda: me + 1))
    with pytest.raises(ValueError, match="gave no answer"):
        relayed.fit(weights, {"server_round": 1})
    monkeypatch.undo()
    # A socket of another user's, to the ClientApp: not used.
    monkeypatch.setattr(relay, "os", SimpleNamespace(getuid=lambda: me + 1))
    with pytest.raises(ValueError, match="another user's"):
        relayed.fit(weights, {"server_round": 1})


def test_no_worker_is_one_line(tmp_path):
    relayed = relay.RelayClient(str(tmp_path / "gone.sock"), flower_context({}, RUN))
    with pytest.raises(ValueError, match="is its client.py still running"):
        relayed.fit([], {"server_round": 1})


def test_a_silent_or_garbled_caller_does_not_block_the_worker(hospital, monkeypatch):
    _, socket_path = hospital
    monkeypatch.setattr(worker, "REQUEST_TIMEOUT", 0.5)
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(local_socket.socket_address(socket_path))  # connects, never sends
    garbled = socket.socket(socket.AF_UNIX)
    garbled.connect(local_socket.socket_address(socket_path))
    garbled.sendall(relay.LENGTH.pack(1 << 62))  # claims an absurd size
    weights = get_weights(build_model(9, settings.DEFAULTS["hidden_layers"]))
    relayed = relay.RelayClient(socket_path, flower_context({}, RUN, run_id=9))
    assert relayed.fit(weights, {"server_round": 1})[1] == 240  # still served
    silent.close(), garbled.close()


def test_a_changed_copy_is_not_trained_with_until_restarted(hospital, monkeypatch):
    _, socket_path = hospital
    monkeypatch.setattr(worker, "app_digest", lambda: "the files changed")
    relayed = relay.RelayClient(socket_path, flower_context({}, RUN, run_id=11))
    with pytest.raises(ValueError, match="restart client.py"):
        relayed.fit(
            get_weights(build_model(9, settings.DEFAULTS["hidden_layers"])), {"server_round": 1}
        )


def test_without_peer_credentials_the_clientapp_trains_itself(monkeypatch):
    monkeypatch.delattr(socket, "SO_PEERCRED")
    with warm_worker({}) as socket_path:
        assert socket_path is None
