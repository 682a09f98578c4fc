"""A server that sends a crafted global model learns no more about a patient than DP allows.

The attack is played on the real ClientApp with real Flower messages, the real Opacus
training and real CSV files, under a data set and its replace-one neighbour.
"""

import shutil

import numpy as np
import pytest
from conftest import EXAMPLE, as_simulated_hospitals, flower_context
from flwr.app import Message
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, recorddict_to_fitres
from flwr.supercore.task_identity import TaskIdentity

import data_utils
from securehealth import clientapp as client
from securehealth import settings
from securehealth.model import build_model, get_weights
from securehealth.results import read_json
from securehealth.state_directory import EVALUATION_FILE

HOSPITAL = 2  # the example's smallest hospital: 120 patients
OLDEST = 95  # the data dictionary's largest age: one patient is given it
HUGE = 1e30  # finite in float32; two of them multiplied are not


@pytest.fixture(autouse=True)
def inside_a_supernode(monkeypatch, tmp_path):
    for name in ("_run_id", "_node_id", "_task_id"):  # as a SuperNode's process sets
        monkeypatch.setattr(TaskIdentity, name, 1)


def with_oldest_patient(folder, line, age=OLDEST):
    """The example's CSV files, with the patient on `line` of hospital 2's file aged `age`.

    That patient is the single one a crafted model will single out.
    """
    shutil.copytree(EXAMPLE, folder)
    path = folder / f"hospital_{HOSPITAL}.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[line].split(",")
    cells[header.index("age")] = str(age)
    lines[line] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return folder


def csv_settings(folder, max_weight):
    return settings.resolve(
        {
            "dataset": "csv",
            "data_dir": str(folder),
            "num_clients": 3,
            "rounds": 2,
            # Every training patient is in every step (sample rate 1): the patient
            # the model singles out is surely used.
            "batch_size": 256,
            "secure_aggregation": "off",
            "max_weight": max_weight,
            # An MLP: the crafted model needs hidden units to be NaN for one patient.
            "hidden_layers": "16",
        }
    )


def oldest_is(folder, where):
    """Whether the oldest patient is among hospital 2's `where` patients.

    `where` is "training" or "held-out".
    """
    cfg = csv_settings(folder, settings.DEFAULTS["max_weight"])
    age = data_utils.load_schema(cfg).input_names.index("age")
    train, held_out = data_utils.hospital_data(cfg, HOSPITAL)
    rows = train[0] if where == "training" else held_out[0]
    everyone = np.concatenate([train[0][:, age], held_out[0][:, age]])
    return rows[:, age].max() == everyone.max() and (everyone == everyone.max()).sum() == 1


def neighbours(tmp_path, where):
    """(D, D'): a data set and its replace-one neighbour.

    D is the example data with one patient, the oldest, among hospital 2's `where`
    patients; D' is the same with that patient's record replaced by another (the same
    record, 40 years younger).
    """
    for line in range(1, 121):
        shutil.rmtree(tmp_path / "D", ignore_errors=True)
        data = with_oldest_patient(tmp_path / "D", line)
        if oldest_is(data, where):
            return data, with_oldest_patient(tmp_path / "D-prime", line, OLDEST - 40)
    raise AssertionError(f"no line of hospital {HOSPITAL}'s file lands among its {where}")


def crafted_model(data_dir):
    """Finite weights whose output is NaN for exactly the oldest patient.

    Two hidden units open only above the second-oldest age, each at 1e30 for the
    oldest, met by output weights +1e30 and -1e30 (infinity minus infinity).
    """
    cfg = csv_settings(data_dir, settings.DEFAULTS["max_weight"])
    names = data_utils.load_schema(cfg).input_names
    age = names.index("age")
    train, held_out = data_utils.hospital_data(cfg, HOSPITAL)
    ages = np.sort(np.concatenate([train[0][:, age], held_out[0][:, age]]))
    cut = (ages[-1] + ages[-2]) / 2
    slope = HUGE / (ages[-1] - cut)
    weights = get_weights(build_model(len(names), cfg.hidden_layers))
    hidden, hidden_bias, output, _ = weights
    for unit, sign in ((0, 1.0), (1, -1.0)):
        hidden[unit] = 0.0
        hidden[unit, age] = slope
        hidden_bias[unit] = -slope * cut
        output[0, unit] = sign * HUGE
    return weights


def fit(data_dir, state_dir, weights, max_weight):
    """Hospital 2's reply to a plain training message carrying `weights`."""
    cfg = csv_settings(data_dir, max_weight)
    instruction = FitIns(ndarrays_to_parameters(weights), {"server_round": 1})
    message = Message(fitins_to_recorddict(instruction, True), dst_node_id=1, message_type="train")
    context = flower_context(
        {"partition-id": HOSPITAL, "num-partitions": 3}, settings.to_run_config(cfg)
    )
    with pytest.MonkeyPatch.context() as patch:
        as_simulated_hospitals(patch, state_dir)
        return client.app(message, context)


@pytest.mark.parametrize("where", ["training", "held-out"])
@pytest.mark.parametrize(
    "max_weight", [settings.DEFAULTS["max_weight"], settings.FLOAT32_MAX], ids=["checked", "off"]
)
def test_a_crafted_model_tells_the_server_nothing_about_one_patient(tmp_path, where, max_weight):
    data, neighbour = neighbours(tmp_path, where)
    weights = crafted_model(data)
    assert all(np.isfinite(w).all() for w in weights)

    replies = {}
    for name, folder in (("D", data), ("D'", neighbour)):
        reply = fit(folder, tmp_path / f"hospitals-{name}", weights, max_weight)
        assert not reply.has_error(), reply.error.reason  # no failure, no error text
        replies[name] = recorddict_to_fitres(reply.content, keep_input=True)

    statuses = {name: r.metrics["status"] for name, r in replies.items()}
    if max_weight == settings.FLOAT32_MAX:  # the bound is off: it trains on the model
        assert statuses == {"D": "trained", "D'": "trained"}
    else:  # refused for the model's sake alone, with the same words
        assert statuses == {"D": "refused", "D'": "refused"}
        assert replies["D"].metrics["reason"] == replies["D'"].metrics["reason"]
        assert "malformed global model" in replies["D"].metrics["reason"]
    for result in replies.values():
        update = parameters_to_ndarrays(result.parameters)
        assert all(np.isfinite(w).all() for w in update)
    assert set(replies["D"].metrics) == set(replies["D'"].metrics)
    assert replies["D"].num_examples == replies["D'"].num_examples


def test_the_hospitals_own_evaluation_of_a_crafted_model_stays_home(tmp_path, caplog):
    data, _ = neighbours(tmp_path, "held-out")
    reply = fit(data, tmp_path / "hospitals", crafted_model(data), settings.FLOAT32_MAX)
    assert not reply.has_error()
    evaluation = read_json(tmp_path / "hospitals" / f"hospital-{HOSPITAL}" / EVALUATION_FILE)
    assert evaluation[-1]["non_finite_scores"] == 1  # the oldest, scored 0.5 at home
    assert "non_finite_scores" not in recorddict_to_fitres(reply.content, False).metrics
