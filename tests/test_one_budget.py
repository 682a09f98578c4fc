"""One set of patients has one budget on a machine.

A simulation and a deployed hospital on the same file share one ledger, and a lost
ledger is never silently replaced by an empty one.
"""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import EXAMPLE, ROOT, as_simulated_hospitals, flower_context, own_data_copy
from flwr.supercore.task_identity import TaskIdentity

from securehealth import node, settings
from securehealth.data import heart_disease
from securehealth.hospital import Hospital
from securehealth.model import build_model, get_weights
from securehealth.privacy.ledger import LedgerError, check_before_start
from securehealth.results import (
    HOSPITALS_DIR_VARIABLE,
    default_state_root,
    simulated_hospitals_dir,
)
from securehealth.state_directory import LEDGER_FILE, STATUS_FILE


def run_script(script, *args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(result):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def data_dir(tmp_path):
    return own_data_copy(EXAMPLE, tmp_path / "data")


def csv_settings(data_dir, **more):
    return settings.resolve({"dataset": "csv", "data_dir": str(data_dir), "rounds": 2, **more})


def train_one_round(hospital):
    weights = get_weights(build_model(hospital.x.shape[1], hospital.cfg.hidden_layers))
    return hospital.train_round(weights, 1)[2]


def simulated_hospital(data_dir, hospitals_dir, monkeypatch):
    """Hospital 0 as simulation.py's ClientApp opens it: claiming its file."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    as_simulated_hospitals(monkeypatch, hospitals_dir)
    context = flower_context(
        {"partition-id": 0, "num-partitions": 3},
        settings.to_run_config(csv_settings(data_dir, secure_aggregation="off")),
    )
    return node.open_hospital(context)


def test_a_deployed_hospital_is_refused_a_second_budget_for_a_simulated_file(
    tmp_path, data_dir, monkeypatch
):
    simulated = simulated_hospital(data_dir, tmp_path / "simulation", monkeypatch)
    assert train_one_round(simulated)["status"] == "trained"
    monkeypatch.delenv(HOSPITALS_DIR_VARIABLE)

    for data_file in (
        data_dir / "hospital_0.csv",
        shutil.copy(data_dir / "hospital_0.csv", tmp_path / "copy.csv"),
    ):
        refused = run_script(
            "client.py",
            "--client-id",
            "0",
            "--insecure",
            "--data",
            str(data_file),
            "--schema",
            str(data_dir / "schema.json"),
            "--state-dir",
            str(tmp_path / "deployed"),
            cwd=tmp_path,
        )
        line = one_line_error(refused)
        assert str(simulated.ledger.path) in line, line
        assert "one budget" in line and "--state-dir" in line
    assert not (tmp_path / "deployed" / LEDGER_FILE).exists()


def test_a_simulation_is_refused_a_second_budget_for_a_deployed_file(tmp_path, data_dir):
    cfg = csv_settings(data_dir)
    deployed = tmp_path / "deployed"
    data_file = data_dir / "hospital_1.csv"
    check_before_start(deployed, cfg, data_file)  # client.py's check: records nothing yet
    context = flower_context(
        {
            "partition-id": 1,
            "num-partitions": 3,
            "state-dir": str(deployed),
            "operator-key": "",  # client.py --insecure
            "dataset": "csv",
            "data-file": str(data_file),
            "schema-file": str(data_dir / "schema.json"),
        },
        settings.to_run_config(cfg),
    )
    assert train_one_round(node.open_hospital(context))["status"] == "trained"

    refused = run_script(
        "simulation.py", "--dataset", "csv", "--data-dir", str(data_dir), cwd=tmp_path
    )
    line = one_line_error(refused)
    assert str(deployed / LEDGER_FILE) in line and HOSPITALS_DIR_VARIABLE in line, line
    assert not (default_state_root() / "simulation" / "hospital-1" / LEDGER_FILE).exists()


def test_a_lost_ledger_is_refused_until_its_operator_resets_it(tmp_path, data_dir):
    cfg = csv_settings(data_dir)
    state_dir = tmp_path / "hospital-0"
    first = train_one_round(Hospital(0, cfg, run_id=1, state_dir=state_dir))
    assert first["epsilon"] > 0 and first["ledger_reset"] == ""
    (state_dir / LEDGER_FILE).unlink()  # the status and evaluation files remain

    with pytest.raises(LedgerError, match="is missing, but its status file .* records epsilon"):
        train_one_round(Hospital(0, cfg, run_id=2, state_dir=state_dir))
    refused = run_script(
        *("client.py", "--client-id", "0", "--insecure", "--state-dir", str(state_dir)),
        *("--data", str(data_dir / "hospital_0.csv"), "--schema", str(data_dir / "schema.json")),
        cwd=tmp_path,
    )
    assert "--reset-ledger" in one_line_error(refused)
    assert not (state_dir / LEDGER_FILE).exists()

    check_before_start(state_dir, cfg, reset_reason="disk failure; no backup")
    again = train_one_round(Hospital(0, cfg, run_id=3, state_dir=state_dir))
    assert again["status"] == "trained"
    assert "started afresh" in again["ledger_reset"]
    assert "'disk failure; no backup'" in again["ledger_reset"]
    ledger = json.loads((state_dir / LEDGER_FILE).read_text())
    assert ledger["resets"][0]["reason"] == "disk failure; no backup"
    with pytest.raises(LedgerError, match="never reset while its ledger exists"):
        check_before_start(state_dir, cfg, reset_reason="again")


def test_a_new_hospital_needs_no_reset(tmp_path, data_dir):
    cfg = csv_settings(data_dir)
    check_before_start(tmp_path / "new", cfg)  # nothing there yet: a fresh ledger
    report = train_one_round(Hospital(0, cfg, run_id=1, state_dir=tmp_path / "new"))
    assert report["status"] == "trained" and report["ledger_reset"] == ""


def test_simulation_checks_its_lasting_ledgers_before_it_starts(tmp_path, data_dir):
    hospital_0 = default_state_root() / "simulation" / "hospital-0"
    hospital_0.mkdir(parents=True)
    (hospital_0 / "status.json").write_text(json.dumps({"epsilon": 0.7}))
    args = ("simulation.py", "--dataset", "csv", "--data-dir", str(data_dir))
    refused = run_script(*args, cwd=tmp_path)
    assert "records epsilon 0.7 spent" in one_line_error(refused)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

    bundled = run_script("simulation.py", "--reset-ledger", "lost", cwd=tmp_path)
    assert "for the lasting ledgers of your own data" in one_line_error(bundled)


def deployed_context(data_dir, state_dir, data_file, cfg, **own):
    """Hospital 1 as client.py --insecure --data runs it, with its `own` settings."""
    return flower_context(
        {
            "partition-id": 1,
            "num-partitions": 3,
            "state-dir": str(state_dir),
            "operator-key": "",
            "dataset": "csv",
            "data-file": str(data_file),
            "schema-file": str(data_dir / "schema.json"),
            **own,
        },
        settings.to_run_config(cfg),
    )


def rewritten(text):
    """The same patients, written otherwise.

    Other line endings, rows in reverse order, whole numbers written as decimals.
    """
    header, *rows = text.splitlines()
    decimals = [",".join(c + ".0" if c.isdigit() else c for c in r.split(",")) for r in rows]
    return {
        "crlf": "\r\n".join([header, *rows]) + "\r\n",
        "reversed": "\n".join([header, *rows[::-1]]) + "\n",
        "decimals": "\n".join([header, *decimals]) + "\n",
    }


@pytest.mark.parametrize("copy", ["crlf", "reversed", "decimals"])
def test_a_copy_written_otherwise_is_the_same_patients(tmp_path, data_dir, copy):
    cfg = csv_settings(data_dir)
    original = data_dir / "hospital_1.csv"
    first = node.open_hospital(deployed_context(data_dir, tmp_path / "a", original, cfg))
    assert train_one_round(first)["status"] == "trained"
    other = tmp_path / "copy.csv"
    other.write_text(rewritten(original.read_text())[copy])
    started = run_script(
        "client.py",
        *("--client-id", "1", "--insecure", "--data", str(other)),
        *("--schema", str(data_dir / "schema.json"), "--state-dir", str(tmp_path / "b")),
        cwd=tmp_path,
    )
    assert "holds the same patients as" in one_line_error(started)
    second = node.open_hospital(deployed_context(data_dir, tmp_path / "b", other, cfg))
    with pytest.raises(LedgerError, match="accounted in another privacy ledger"):
        train_one_round(second)
    assert not (tmp_path / "b" / LEDGER_FILE).exists()


def test_a_ledger_index_that_cannot_be_kept_stops_before_anything_is_spent(
    tmp_path, data_dir, monkeypatch
):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "a-file"))  # the state root: unusable
    cfg = settings.resolve({"dataset": "heart-disease", "num_clients": 4, "rounds": 2})
    with pytest.raises(LedgerError, match="cannot keep this machine's ledger index"):
        check_before_start(tmp_path / "hospital-0", cfg)
    sites = own_data_copy(heart_disease.SHIPPED_DIR, tmp_path / "sites")
    hospital = node.open_hospital(heart_disease_hospital(0, tmp_path / "hospital-0", cfg, sites))
    with pytest.raises(LedgerError, match="cannot keep this machine's ledger index"):
        train_one_round(hospital)
    with hospital.ledger.transaction():
        assert hospital.ledger.releases == []  # refused before the release, not after


def test_a_hospital_that_never_released_leaves_no_trace(tmp_path, data_dir):
    # A first round declined (the budget too small for the noise limit) writes no
    # ledger: neither that state directory nor another one for the same file is
    # locked out afterwards.
    data_file = data_dir / "hospital_1.csv"
    cfg = csv_settings(data_dir)
    tiny = deployed_context(data_dir, tmp_path / "a", data_file, cfg, epsilon=1e-4)
    declined = node.open_hospital(tiny)
    assert train_one_round(declined)["status"] == "refused"
    assert not (tmp_path / "a" / LEDGER_FILE).exists()
    check_before_start(tmp_path / "a", cfg, data_file)
    elsewhere = node.open_hospital(deployed_context(data_dir, tmp_path / "b", data_file, cfg))
    assert train_one_round(elsewhere)["status"] == "trained"


def heart_disease_hospital(hospital, state_dir, cfg, sites):
    """A heart-disease site as client.py --insecure --dataset heart-disease runs it.

    Its file is in `sites` (own_data_copy: not the shipped demonstration's).
    """
    return flower_context(
        {
            "partition-id": hospital,
            "num-partitions": 4,
            "state-dir": str(state_dir),
            "operator-key": "",
            "dataset": "heart-disease",
            "data-file": str(heart_disease.site_file(hospital, sites)),
            "schema-file": str(heart_disease.SCHEMA_FILE),
        },
        settings.to_run_config(cfg),
    )


def test_a_server_cannot_erase_the_trace_of_a_lost_ledger(tmp_path):
    # A refused admission rewrites the status file; what it said was spent stays, so
    # a ledger deleted afterwards is still missed (heart-disease: no data index entry).
    cfg = settings.resolve({"dataset": "heart-disease", "num_clients": 4, "rounds": 2})
    state_dir = tmp_path / "hospital-2"
    sites = own_data_copy(heart_disease.SHIPPED_DIR, tmp_path / "sites")
    context = heart_disease_hospital(2, state_dir, cfg, sites)
    assert train_one_round(node.open_hospital(context))["epsilon"] > 0
    other_mode = settings.to_run_config(settings.resolve({**vars(cfg), "missing_values": "fail"}))
    answer = node.admission_answer(
        {"secure_aggregation": "on", "challenge": ""},
        flower_context(context.node_config, other_mode, run_id=2),
    )
    assert "missing_values" in answer["problem"]
    (state_dir / LEDGER_FILE).unlink()
    with pytest.raises(LedgerError, match="records epsilon"):
        check_before_start(state_dir, cfg)


def test_a_servers_words_reach_the_status_file_quoted_and_cut(tmp_path):
    # A hostile server's secure_aggregation value is quoted in the hospital's refusal:
    # its start only, its terminal escapes shown, never obeyed on the hospital's console.
    cfg = settings.resolve({"dataset": "heart-disease", "num_clients": 4, "rounds": 2})
    state_dir = tmp_path / "hospital-1"
    sites = own_data_copy(heart_disease.SHIPPED_DIR, tmp_path / "sites")
    context = heart_disease_hospital(1, state_dir, cfg, sites)
    hostile = "\x1bc" + "x" * 5_000_000  # a terminal reset, then 5 MB
    answer = node.admission_answer({"secure_aggregation": hostile, "challenge": ""}, context)
    status = json.loads((state_dir / STATUS_FILE).read_text())
    assert "\x1b" not in status["reason"] and "\\x1b" in status["reason"]
    assert len(status["reason"]) < 1000 and status["reason"] == answer["problem"]


def test_the_machine_remembers_a_ledger_whose_whole_state_directory_is_gone(tmp_path):
    cfg = settings.resolve({"dataset": "heart-disease", "num_clients": 4, "rounds": 2})
    state_dir = tmp_path / "hospital-0"
    sites = own_data_copy(heart_disease.SHIPPED_DIR, tmp_path / "sites")
    context = heart_disease_hospital(0, state_dir, cfg, sites)
    assert train_one_round(node.open_hospital(context))["status"] == "trained"
    shutil.rmtree(state_dir)
    with pytest.raises(LedgerError, match="ledger index records releases from it"):
        check_before_start(state_dir, cfg)


def test_a_reset_needs_a_short_reason(tmp_path, data_dir):
    cfg = csv_settings(data_dir)
    for reason in ("", "  ", "x" * 301):
        with pytest.raises(LedgerError, match="in 1 to 300 characters"):
            check_before_start(tmp_path / "h", cfg, reset_reason=reason)
    assert not (tmp_path / "h" / LEDGER_FILE).exists()


def test_a_demonstration_simulation_never_uses_a_lasting_hospitals_folder(tmp_path, monkeypatch):
    # A demonstration must not spend from the budgets that a folder named for your
    # own data's simulated hospitals holds.
    monkeypatch.setenv(HOSPITALS_DIR_VARIABLE, str(tmp_path / "lasting"))
    assert simulated_hospitals_dir(True, tmp_path / "run") == tmp_path / "run" / "hospitals"
    assert simulated_hospitals_dir(False, tmp_path / "run") == tmp_path / "lasting"
