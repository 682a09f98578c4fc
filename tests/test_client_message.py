"""What a hospital sends to the server, checked on the real Flower message."""

import numpy as np
import pytest
from conftest import as_simulated_hospitals, flower_context
from flwr.app import Message
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.serde import message_to_proto
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, recorddict_to_fitres
from flwr.supercore.task_identity import TaskIdentity

import data_utils
from securehealth import clientapp as client
from securehealth import settings
from securehealth.model import build_model, get_weights

PRIVACY_REPORT_KEYS = {
    "hospital",
    "patients",
    "status",
    "reason",
    "epsilon",
    "epsilon_budget",
    "delta",
    "adjacency",
    "accountant",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "releases",
    "ledger_reset",
}


def plain_fit_request(cfg):
    """The initial weights, a plain (not SecAgg+) fit message, and hospital 0's context."""
    inputs = len(data_utils.load_schema(cfg).input_names)
    initial = get_weights(build_model(inputs, cfg.hidden_layers))
    instruction = FitIns(ndarrays_to_parameters(initial), {"server_round": 1})
    message = Message(fitins_to_recorddict(instruction, True), dst_node_id=1, message_type="train")
    context = flower_context({"partition-id": 0, "num-partitions": 3}, settings.to_run_config(cfg))
    return initial, message, context


@pytest.fixture(autouse=True)
def inside_a_supernode(monkeypatch, tmp_path):
    for name in ("_run_id", "_node_id", "_task_id"):  # as a SuperNode's process sets
        monkeypatch.setattr(TaskIdentity, name, 1)
    as_simulated_hospitals(monkeypatch, tmp_path / "hospitals")


def test_only_weights_and_a_privacy_report_leave_the_hospital(tmp_path):
    cfg = settings.resolve(
        {"rounds": 2, "num_patients": 600, "run_dir": str(tmp_path), "secure_aggregation": "off"}
    )
    initial, message, context = plain_fit_request(cfg)

    reply = client.app(message, context)

    result = recorddict_to_fitres(reply.content, keep_input=True)
    weights = parameters_to_ndarrays(result.parameters)
    assert [w.shape for w in weights] == [w.shape for w in initial]
    trained = not all(np.array_equal(a, b) for a, b in zip(weights, initial, strict=True))
    assert trained
    (x, y), (held_out_x, _) = data_utils.hospital_data(cfg, 0)
    assert result.num_examples == len(y)
    assert set(result.metrics) == PRIVACY_REPORT_KEYS
    assert all(isinstance(v, (int, float, str)) for v in result.metrics.values())

    wire = message_to_proto(reply).SerializeToString()  # what would cross the network
    assert not any(row.tobytes() in wire for row in x)
    assert not any(row.tobytes() in wire for row in held_out_x)
    assert y.tobytes() not in wire


def test_a_hospital_expecting_secure_aggregation_never_sends_in_the_clear(tmp_path):
    cfg = settings.resolve({"num_patients": 600, "run_dir": str(tmp_path)})  # "auto"
    _, message, context = plain_fit_request(cfg)  # the hospital decides "auto": on
    with pytest.raises(ValueError, match="asked for a plain update but this hospital's"):
        client.app(message, context)
    assert not (tmp_path / "hospitals").exists()  # it did not even start training
