"""Tests of benchmark.py flamby-heart.

FLamby's rows and split exactly, test patients kept out of every choice, and the
command end to end on one seed with tiny settings.
"""

import json
import subprocess
import sys

import numpy as np
from conftest import ROOT

from securehealth.tools import clinical_benchmark
from securehealth.tools.benchmark import (
    benchmark_patients,
    cross_validation_folds,
    flamby_rows,
)


def test_flambys_patients_and_split():
    # FLamby's published counts: 740 patients once rows with a gap are dropped
    # (303, 261, 46, 130), 486 for training and 254 for testing.
    splits = [flamby_rows(h) for h in range(4)]
    assert [len(train) + len(test) for train, test in splits] == [303, 261, 46, 130]
    assert sum(len(train) for train, _ in splits) == 486
    assert sum(len(test) for _, test in splits) == 254
    for train, test in splits:
        assert not set(train) & set(test)
    patients, inputs = benchmark_patients(all_columns=False)
    assert not any(name.split(" ")[0].split("=")[0] in ("slope", "ca", "thal") for name in inputs)
    # Stratified by diagnosis where both classes have more than 2 patients (Cleveland).
    (train_x, train_y), (test_x, test_y) = patients[0]
    assert abs(train_y.mean() - test_y.mean()) < 0.02


def test_all_data_trains_on_more_and_is_judged_on_the_same_test_patients():
    flamby, _ = benchmark_patients(all_columns=False)
    everything, inputs = benchmark_patients(all_columns=True)
    assert "thal missing" in inputs
    for (train, test), (more, same_test) in zip(flamby, everything, strict=True):
        assert len(more[1]) >= len(train[1]) and np.array_equal(test[1], same_test[1])
    assert sum(len(more[1]) for more, _ in everything) == 920 - 254


def test_cross_validation_sees_only_training_patients():
    patients, _ = benchmark_patients(all_columns=False)
    for fold in cross_validation_folds(patients):
        for hospital, ((fit_x, _), (valid_x, _)) in enumerate(fold):
            train_x = patients[hospital][0][0]
            seen = np.concatenate([fit_x, valid_x])
            assert len(seen) == len(train_x)
            assert {row.tobytes() for row in seen} == {row.tobytes() for row in train_x}


def test_the_benchmark_command_on_one_seed(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmark.py"), "flamby-heart", "--seeds", "1"]
        + ["--epsilons", "1", "--rounds", "2", "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads((tmp_path / "run" / "benchmark.json").read_text())
    methods = output["methods"]
    # The tuned row is labelled as such, the untuned (fully accounted) row beside it.
    tuned, untuned = "DP FedAvg, ε 1, tuned †", "DP FedAvg, ε 1, defaults, untuned"
    assert {tuned, untuned, "FedAvg, no DP", "Pooled, no DP", "Best alone, no DP"} <= set(methods)
    assert methods["Pooled, no DP"]["flamby"] == "0.735"
    for scores in methods.values():
        assert 0 <= scores["accuracy"] <= 1 and len(scores["hospitals"]) == 4
        assert abs(scores["accuracy"] - np.mean(scores["hospitals"])) < 1e-3
    chosen = output["cross_validation"]["chosen"]
    assert set(chosen) == {"hidden_layers", "learning_rate"}
    assert len(output["cross_validation"]["candidates"]) == 4
    table = (tmp_path / "run" / "benchmark.md").read_text()
    assert "FedYogi" in table and "Zurich & Basel" in table and "cross-validation" in table
    assert "FLamby's non-private pooled 0.735" in table and "Took" in result.stdout
    assert "36 DP trainings" in table and "none of it charged to the epsilon" in table
    assert "every release accounted" in table and "tuning not accounted" in table

    for bad in (["--epsilons", "x"], ["--run-dir", str(tmp_path / "run")]):  # never overwritten
        refused = subprocess.run(
            [sys.executable, str(ROOT / "benchmark.py"), "flamby-heart", *bad],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1


def clinical_row(auc, sensitivity, specificity, fedavg_auc=0.9):
    figures = {"auc": auc, "sensitivity": sensitivity, "specificity": specificity, "brier": 0.1}
    return {
        "federated": {**figures, "threshold": 0.3},
        "FedAvg, no DP": {**figures, "auc": fedavg_auc},
        "Pooled data, no DP": {**figures, "auc": fedavg_auc},
        "seconds": 30.0,
    }


def test_the_clinical_benchmark_names_every_bar_a_data_set_misses():
    good = [clinical_row(0.88, 0.75, 0.8) for _ in range(5)]
    assert clinical_benchmark.verdict("heart-disease", good) == []
    bad = [clinical_row(0.84, 0.69, 0.8), *good[1:]]
    assert clinical_benchmark.verdict("heart-disease", bad) == [
        "seed 0: AUC 0.840 < 0.85",
        "seed 0: sensitivity 0.690 < 0.7",
    ]
    spread = [clinical_row(auc, 0.8, 0.8) for auc in (0.85, 0.86, 0.9, 0.92, 0.93)]
    assert any("AUC spread" in m for m in clinical_benchmark.verdict("heart-disease", spread))
    behind = [clinical_row(0.87, 0.8, 0.8, fedavg_auc=0.9) for _ in range(5)]
    assert clinical_benchmark.verdict("heart-disease", behind) == [
        "median AUC 0.870 is 0.030 below FedAvg without DP (0.900)"
    ]
    table = clinical_benchmark.table({"datasets": {"heart-disease": {"seeds": good}}})
    assert table[1][:3] == ["heart-disease", "DP FedAvg, ε 1", "0.880 (0.880-0.880)"]
