"""A deployed hospital spends its budget only on runs its operator signed, once each.

It also proves who it is. Checked on the real ClientApp with real Flower messages.
"""

import json

import pytest
from conftest import EXAMPLE, flower_context, own_data_copy
from flwr.app import Message
from flwr.common import FitIns, GetPropertiesIns, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import (
    fitins_to_recorddict,
    getpropertiesins_to_recorddict,
    recorddict_to_getpropertiesres,
)
from flwr.supercore.task_identity import TaskIdentity

import data_utils
from securehealth import authorisation, settings
from securehealth import clientapp as client
from securehealth import node as hospital_node
from securehealth.certificates import load_hospital_key, make_hospital_key, make_operator_key
from securehealth.model import build_model, get_weights
from securehealth.state_directory import LEDGER_FILE, STATUS_FILE, StateDirectory

SETTINGS = {"rounds": 1, "secure_aggregation": "off"}


@pytest.fixture(autouse=True)
def inside_a_supernode(monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):  # as a SuperNode's process sets
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def deployed(tmp_path):
    """A hospital as client.py starts it, and the operator's signing key.

    The hospital has its state directory, the operator's public key, its own identity
    key and its own patients (a lasting ledger).
    """
    operator = tmp_path / "operator"
    operator.mkdir()
    make_operator_key(operator)
    state_dir = tmp_path / "hospital-0"
    make_hospital_key(StateDirectory(state_dir).key_file)
    own = own_data_copy(EXAMPLE, tmp_path / "own")
    cfg = settings.resolve({**SETTINGS, "dataset": "csv", "data_dir": str(own)})
    node_config = {
        "partition-id": 0,
        "num-partitions": cfg.num_clients,
        "state-dir": str(state_dir),
        "operator-key": str(operator / "operator.pub"),
        "dataset": "csv",
        "data-file": str(own / "hospital_0.csv"),
        "schema-file": str(own / "schema.json"),
        **{name: getattr(cfg, name) for name in hospital_node.HOSPITAL_SETTINGS},
    }
    return cfg, operator / "operator.key", state_dir, node_config


def signed_run_config(cfg, operator_key):
    run_config = settings.to_run_config(cfg)
    return {**run_config, **authorisation.authorise(run_config, operator_key)}


def ask_to_join(node_config, run_config, run_id=7, node_id=11):
    question = GetPropertiesIns({"challenge": "c0ffee", "secure_aggregation": "off"})
    message = Message(
        getpropertiesins_to_recorddict(question), dst_node_id=node_id, message_type="query"
    )
    context = flower_context(node_config, run_config, run_id=run_id, node_id=node_id)
    reply = client.app(message, context)
    return recorddict_to_getpropertiesres(reply.content).properties


def train(node_config, run_config, cfg, run_id=7):
    inputs = len(data_utils.load_schema(cfg).input_names)
    weights = get_weights(build_model(inputs, cfg.hidden_layers))
    instruction = FitIns(ndarrays_to_parameters(weights), {"server_round": 1})
    message = Message(fitins_to_recorddict(instruction, True), dst_node_id=11, message_type="train")
    return client.app(message, flower_context(node_config, run_config, run_id=run_id, node_id=11))


def releases(state_dir):
    ledger = state_dir / LEDGER_FILE
    return json.loads(ledger.read_text())["releases"] if ledger.exists() else []


def test_a_signed_run_is_admitted_and_the_hospital_proves_its_identity(deployed):
    cfg, operator_key, state_dir, node_config = deployed
    answer = ask_to_join(node_config, signed_run_config(cfg, operator_key))
    assert answer["hospital"] == 0 and answer["problem"] == ""
    key = load_hospital_key(state_dir / "hospital.pub")
    assert authorisation.identity_proven(key, answer["proof"], "c0ffee", 7, 11, 0)
    # The proof holds for this challenge, run, node and number only.
    for other in (
        ("beef", 7, 11, 0),
        ("c0ffee", 8, 11, 0),
        ("c0ffee", 7, 12, 0),
        ("c0ffee", 7, 11, 1),
    ):
        assert not authorisation.identity_proven(key, answer["proof"], *other)
    assert not releases(state_dir)  # answering trains nothing


@pytest.mark.parametrize(
    "attack, refusal",
    [
        ("unsigned", "carries no authorisation from the federation's operator"),
        ("other operator", "is not signed by the operator key"),
        ("changed settings", "settings differ from the ones the operator signed"),
        ("bad signature", "is not signed by the operator key"),
    ],
)
def test_a_run_the_operator_did_not_sign_trains_nothing(deployed, tmp_path, attack, refusal):
    cfg, operator_key, state_dir, node_config = deployed
    run_config = signed_run_config(cfg, operator_key)
    if attack == "unsigned":
        run_config = settings.to_run_config(cfg)
    elif attack == "other operator":
        (tmp_path / "attacker").mkdir()
        make_operator_key(tmp_path / "attacker")
        run_config = signed_run_config(cfg, tmp_path / "attacker" / "operator.key")
    elif attack == "changed settings":
        run_config["epsilon"] = 50.0
    else:
        run_config["signature"] = "AAAA" + run_config["signature"][4:]
    answer = ask_to_join(node_config, run_config)
    assert refusal in answer["problem"]
    status = json.loads((state_dir / STATUS_FILE).read_text())
    assert status["status"] == hospital_node.REFUSED_RUN and refusal in status["reason"]
    with pytest.raises(authorisation.Unauthorised, match=refusal):
        train(node_config, run_config, cfg)
    assert not releases(state_dir)


def test_an_authorisation_is_good_for_one_run_only(deployed):
    cfg, operator_key, state_dir, node_config = deployed
    run_config = signed_run_config(cfg, operator_key)
    assert ask_to_join(node_config, run_config, run_id=7)["problem"] == ""
    train(node_config, run_config, cfg, run_id=7)
    assert len(releases(state_dir)) == 1
    replay = "its authorisation was already used by another run (a replay)"
    assert replay in ask_to_join(node_config, run_config, run_id=8)["problem"]
    with pytest.raises(authorisation.Unauthorised, match="a replay"):
        train(node_config, run_config, cfg, run_id=8)
    assert len(releases(state_dir)) == 1  # the replay spent nothing
    assert ask_to_join(node_config, run_config, run_id=7)["problem"] == ""  # its own run


def test_a_hospital_without_an_operator_key_refuses_every_run(deployed):
    cfg, operator_key, state_dir, node_config = deployed
    del node_config["operator-key"]  # a bare flower-supernode, not client.py
    answer = ask_to_join(node_config, signed_run_config(cfg, operator_key))
    assert "no operator key to check runs against" in answer["problem"]


def test_a_hospital_refuses_a_server_that_disagrees_on_secure_aggregation(deployed):
    cfg, operator_key, state_dir, node_config = deployed
    node_config["secure_aggregation"] = "on"
    answer = ask_to_join(node_config, signed_run_config(cfg, operator_key))
    assert "the server's secure_aggregation is off but this hospital's is on" in answer["problem"]
    assert json.loads((state_dir / STATUS_FILE).read_text())["status"] == hospital_node.REFUSED_RUN


def test_a_hospital_refuses_a_server_that_disagrees_on_missing_values(deployed):
    # A server that switched modes between runs would learn how many patients have a
    # gap; the hospital's own setting decides, and both sides must encode alike.
    cfg, operator_key, state_dir, node_config = deployed
    server = settings.resolve({**vars(cfg), "missing_values": "fail"})
    answer = ask_to_join(node_config, signed_run_config(server, operator_key))
    assert (
        "the server's missing_values is fail but this hospital's is indicator"
        in (answer["problem"])
    )


def test_the_servers_app_refuses_a_replayed_authorisation(deployed, tmp_path):
    cfg, operator_key, _, _ = deployed
    signed = json.loads(signed_run_config(cfg, operator_key)["authorisation"])
    authorisation.claim(tmp_path / "run", signed, 7)
    authorisation.claim(tmp_path / "run", signed, 7)  # the same run may check again
    with pytest.raises(authorisation.Unauthorised, match="used by run 7 already"):
        authorisation.claim(tmp_path / "run", signed, 8)


def test_an_authorisation_used_on_a_demonstration_is_not_good_for_own_patients(deployed):
    # The register of authorisations used is the hospital's, whatever data a run
    # is on: a server replaying a trial run's authorisation on the hospital's own
    # patients is refused.
    cfg, operator_key, state_dir, node_config = deployed
    run_config = signed_run_config(cfg, operator_key)
    trial = {**node_config, "data-file": str(EXAMPLE / "hospital_0.csv")}
    assert ask_to_join(trial, run_config, run_id=7)["problem"] == ""
    train(trial, run_config, cfg, run_id=7)
    replay = "its authorisation was already used by another run (a replay)"
    assert replay in ask_to_join(node_config, run_config, run_id=8)["problem"]
    assert replay in ask_to_join(trial, run_config, run_id=9)["problem"]
    assert not releases(state_dir)  # the trial's spend stayed in its own demo ledger


def test_a_demonstration_run_leaves_the_lasting_ledgers_guarantee_alone(deployed):
    # A trial on the shipped example with a stricter delta must not make the lasting
    # ledger adopt it: the next run on the hospital's own patients is still taken.
    cfg, operator_key, state_dir, node_config = deployed
    own_run = signed_run_config(cfg, operator_key)
    train(node_config, own_run, cfg, run_id=7)
    trial = {**node_config, "data-file": str(EXAMPLE / "hospital_0.csv"), "delta": 1e-7}
    trial_run = signed_run_config(cfg, operator_key)
    assert ask_to_join(trial, trial_run, run_id=8)["problem"] == ""
    train(trial, trial_run, cfg, run_id=8)
    ledger = json.loads((state_dir / LEDGER_FILE).read_text())
    assert ledger["guarantee"]["delta"] == 1e-5 and len(ledger["releases"]) == 1
    next_run = signed_run_config(cfg, operator_key)
    assert ask_to_join(node_config, next_run, run_id=9)["problem"] == ""
    train(node_config, next_run, cfg, run_id=9)
    assert len(releases(state_dir)) == 2
    register = json.loads(StateDirectory(state_dir).register_file.read_text())
    assert sorted(register.values()) == ["7", "8", "9"]
