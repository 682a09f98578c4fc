"""predict.py: new patients scored with a run's model.pt, checked like training data."""

import csv
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLE, ROOT

from securehealth.data import Schema
from securehealth.data.csv_files import read_csv
from securehealth.model import build_model, predict_risk, save_model

THRESHOLD = 0.4471  # within the initialised model's risks (0.43-0.48), so 0.5 would differ


@pytest.fixture
def run_dir(tmp_path):
    """A finished run's directory, with a decision threshold of its own (THRESHOLD).

    It holds its metrics.json and a model.pt for the example CSV data dictionary
    (weights as initialised: what is checked is the scoring).
    """
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"status": "finished"}))
    schema = Schema.load(EXAMPLE / "schema.json")
    torch.manual_seed(0)
    model = build_model(len(schema.input_names), (4,))
    save_model(run / "model.pt", model, (4,), schema, THRESHOLD)
    return run


def predict(*args, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def unlabelled_copy(tmp_path):
    """The example's test patients without their label column."""
    rows = list(csv.DictReader((EXAMPLE / "test.csv").open()))
    path = tmp_path / "patients.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, [k for k in rows[0] if k != "chd"])
        writer.writeheader()
        writer.writerows({k: v for k, v in row.items() if k != "chd"} for row in rows)
    return path, len(rows)


def test_new_patients_get_a_risk_and_a_decision_each(run_dir, tmp_path):
    patients, count = unlabelled_copy(tmp_path)
    result = predict("--run-dir", run_dir, "--data", patients)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(result.stdout.splitlines()))
    assert len(rows) == count and [int(r["line"]) for r in rows] == list(range(2, count + 2))
    schema = Schema.load(EXAMPLE / "schema.json")
    model = build_model(len(schema.input_names), (4,))
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True)["state_dict"])
    expected = predict_risk(model, read_csv(patients, schema, labelled=False)[0])
    for row, risk in zip(rows, expected, strict=True):
        assert float(row["risk"]) == pytest.approx(float(risk), abs=1e-6)
        assert row["prediction"] == ("yes" if risk >= THRESHOLD else "no")
        assert float(row["threshold"]) == THRESHOLD
    assert any(0.5 > risk >= THRESHOLD for risk in expected)  # a decision 0.5 would not make
    assert "Decision: chd yes where the risk is at least 0.4471" in result.stderr
    assert "Against their labels" not in result.stderr  # no labels, no metrics


def test_with_labels_the_clinical_metrics_are_printed(run_dir, tmp_path):
    output = tmp_path / "risks.csv"
    result = predict("--run-dir", run_dir, "--data", EXAMPLE / "test.csv", "--output", output)
    assert result.returncode == 0, result.stderr
    assert "200 patients scored" in result.stdout and "Against their labels: AUC" in result.stdout
    assert len(output.read_text().splitlines()) == 1 + 200


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda text: text.replace("\n65,", "\nabc,", 1), ["line", "column 'age'", "not a number"]),
        (lambda text: text.replace("\n65,", "\n,", 1), ["line", "column 'age'", "empty value"]),
    ],
)
def test_bad_patients_get_the_training_datas_one_line_errors(run_dir, tmp_path, change, expected):
    patients, _ = unlabelled_copy(tmp_path)
    patients.write_text(change(patients.read_text()))
    result = predict("--run-dir", run_dir, "--data", patients)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert all(part in result.stderr for part in expected) and "Traceback" not in result.stderr


def test_a_file_of_another_data_set_is_named_as_such(run_dir, tmp_path):
    patients = tmp_path / "patients.csv"
    patients.write_text("mean radius,mean texture\n14.1,19.3\n")
    result = predict("--run-dir", run_dir, "--data", patients)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "most of its columns are not in" in result.stderr
    assert "(mean radius, mean texture: 2 of 2)" in result.stderr
    assert "another data set" in result.stderr and "add it to" not in result.stderr
    # Heart-disease's columns: age and sex are the example's too, the rest are not.
    patients.write_text("age,sex,cp,trestbps,chol,fbs,restecg\n63,male,1,145,233,1,2\n")
    result = predict("--run-dir", run_dir, "--data", patients)
    assert "(cp, trestbps, chol, ...: 5 of 7)" in result.stderr
    assert "another data set" in result.stderr and result.stderr.count("\n") == 1
    # Every column of the dictionary, and more: those are to be removed, not a data set.
    patients, _ = unlabelled_copy(tmp_path)
    rows = patients.read_text().splitlines()
    extra = ",".join(f"x{i}" for i in range(12))
    patients.write_text("\n".join(f"{row},{extra}" for row in rows) + "\n")
    result = predict("--run-dir", run_dir, "--data", patients)
    assert "column 'x0' is not in" in result.stderr and "remove it" in result.stderr


def test_a_provisional_threshold_and_the_runs_warnings_are_said(run_dir, tmp_path):
    warning = "no operating point was chosen: too few positives under their noise"
    (run_dir / "metrics.json").write_text(
        json.dumps(
            {
                "status": "finished with warnings",
                "operating_point": {"chosen": False, "reason": "too few positives"},
                "warnings": [warning],
            }
        )
    )
    result = predict("--run-dir", run_dir, "--data", EXAMPLE / "test.csv")
    assert result.returncode == 0, result.stderr
    assert "0.4471, a provisional threshold: the run chose no operating point" in result.stderr
    assert f"Warning: the run finished with warnings: {warning}; do not use" in result.stderr


def test_a_run_that_did_not_finish_has_no_model_to_use(run_dir, tmp_path):
    shutil.copy(EXAMPLE / "test.csv", tmp_path / "patients.csv")
    (run_dir / "metrics.json").write_text(json.dumps({"status": "failed"}))
    result = predict("--run-dir", run_dir, "--data", tmp_path / "patients.csv")
    assert result.returncode == 2 and "holds no finished run" in result.stderr


def test_no_output_replaces_a_file_unasked_or_a_runs_own_file(run_dir, tmp_path):
    patients, _ = unlabelled_copy(tmp_path)
    metrics = (run_dir / "metrics.json").read_bytes()
    for extra in ([], ["--overwrite"]):  # a run's own files: never, even when asked
        refused = predict(
            "--run-dir", run_dir, "--data", patients, "--output", run_dir / "metrics.json", *extra
        )
        assert refused.returncode == 2 and "the run's own" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert (run_dir / "metrics.json").read_bytes() == metrics
    kept = tmp_path / "risks.csv"
    kept.write_text("mine\n")
    refused = predict("--run-dir", run_dir, "--data", patients, "--output", kept)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert kept.read_text() == "mine\n"
    replaced = predict("--run-dir", run_dir, "--data", patients, "--output", kept, "--overwrite")
    assert replaced.returncode == 0 and kept.read_text().startswith("line,risk")


def test_a_damaged_runs_metrics_is_one_line_not_a_traceback(run_dir, tmp_path):
    (run_dir / "metrics.json").write_text("line,risk\n2,0.4\n")  # what an overwrite left
    patients, _ = unlabelled_copy(tmp_path)
    for script, args in (("predict.py", ["--data", patients]), ("report.py", [])):
        result = subprocess.run(
            [sys.executable, str(ROOT / script), "--run-dir", str(run_dir), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and "is damaged" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_patient_ids_a_spreadsheet_would_run_are_written_as_text(tmp_path):
    spec = json.loads((EXAMPLE / "schema.json").read_text())
    schema = Schema({**spec, "patient_id": "mrn"}, "with ids")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"status": "finished"}))
    save_model(run / "model.pt", build_model(len(schema.input_names), (4,)), (4,), schema, 0.5)
    hostile = ['=HYPERLINK("http://x","y")', "+1+cmd|' /C calc'!A0", "@SUM(1)", "-2+3", "=1+1"]
    rows = list(csv.DictReader((EXAMPLE / "test.csv").open()))[: len(hostile)]
    patients = tmp_path / "patients.csv"
    with patients.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["mrn", *rows[0]])
        writer.writeheader()
        writer.writerows({"mrn": mrn, **row} for mrn, row in zip(hostile, rows, strict=True))
    result = predict("--run-dir", run, "--data", patients, "--output", tmp_path / "risks.csv")
    assert result.returncode == 0, result.stderr
    written = [row["mrn"] for row in csv.DictReader((tmp_path / "risks.csv").open())]
    assert written == ["'" + mrn for mrn in hostile]
