"""The membership-inference audit and the privacy-utility sweep."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from model import build_model
from securehealth import settings
from securehealth.privacy import dpsgd
from securehealth.tools import audit


def random_patients(n, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, 9)).astype(np.float32), rng.integers(0, 2, n).astype(np.float32)


def test_the_attack_sees_membership_in_a_memorising_model():
    # Random diagnoses can only be memorised. The non-members are the same patients
    # with the other diagnosis: a model that memorised is sure of the one it saw.
    x, y = random_patients(40, 0)
    torch.manual_seed(0)
    model = build_model(9, (256,))
    cfg = settings.resolve({"batch_size": 8, "learning_rate": 0.5})
    dpsgd.train_plain(model, x, y, cfg, epochs=300)
    result = audit.attack(model, (x, y), (x, 1 - y))
    assert result["auc"]["low"] > 0.9 and result["advantage"]["mean"] > 0.8


def test_the_attack_is_at_chance_on_an_untrained_model():
    torch.manual_seed(0)
    result = audit.attack(build_model(9, (16,)), random_patients(400, 0), random_patients(400, 1))
    assert result["auc"]["low"] < 0.5 < result["auc"]["high"]
    assert abs(result["auc"]["mean"] - 0.5) < 0.03


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 3.0])
def test_the_bound_matches_its_closed_form(epsilon):
    # With delta = 0 the best ROC curve gives AUC e^eps / (1 + e^eps), advantage tanh(eps/2).
    exact = audit.bound(epsilon, 0.0)
    assert exact["auc"] == pytest.approx(math.exp(epsilon) / (1 + math.exp(epsilon)), abs=1e-6)
    assert exact["advantage"] == pytest.approx(math.tanh(epsilon / 2))
    assert audit.bound(epsilon, 1e-5)["advantage"] > exact["advantage"]
    assert audit.bound(0.0, 0.0) == {"advantage": 0.0, "auc": pytest.approx(0.5)}
    assert audit.bound(1.0, 1e-5)["auc"] == pytest.approx(0.731, abs=1e-3)  # as measured here


def test_a_tiny_sweep_writes_its_table_and_plot(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sweep.py"),
            "--epsilons",
            "1,4",
            "--seeds",
            "2",
            "--rounds",
            "2",
            "--num-patients",
            "600",
            "--global-test-patients",
            "200",
            "--run-dir",
            str(tmp_path / "sweep"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["epsilon"] for p in sweep["points"]] == [1.0, 4.0] and sweep["seeds"] == 2
    assert set(sweep["references"]) == {"FedAvg, no DP", "Pooled data, no DP"}
    assert all(0.5 < p["auc"]["mean"] <= 1 for p in sweep["points"])
    assert "| 4 |" in (tmp_path / "sweep" / "sweep.md").read_text()
    with Image.open(tmp_path / "sweep" / "sweep.png") as image:
        image.verify()
        assert image.format == "PNG"
