"""Demonstrations never spend a real budget.

Data generated or shipped with the code keeps its ledgers with the run, decided from
the data's fingerprint alone, and everything else spends from the lasting ledger that
simulation and deployment share.
"""

import hashlib
import json
import shutil

import pytest
from conftest import (
    EXAMPLE,
    ROOT,
    as_simulated_hospitals,
    flower_context,
    own_data_copy,
    run_script,
)

from securehealth import node, settings
from securehealth.data import demonstration, heart_disease
from securehealth.data.demonstration import SHIPPED_FILES, all_demonstration
from securehealth.data.twin import make_twin
from securehealth.model import build_model, get_weights
from securehealth.privacy.ledger import LedgerError, check_before_start
from securehealth.results import (
    DEMO_HOSPITALS_DIR_VARIABLE,
    HOSPITALS_DIR_VARIABLE,
    default_state_root,
)
from securehealth.state_directory import DEMO_RUNS_DIR, LEDGER_FILE


def test_every_shipped_patient_file_has_its_fingerprint():
    for digest, path in SHIPPED_FILES.items():
        shipped = hashlib.sha256((ROOT / path).read_bytes()).hexdigest()
        assert shipped == digest, f"update SHIPPED_FILES: {path}"
    shipped = {*heart_disease.SHIPPED_DIR.glob("*.data"), *EXAMPLE.glob("hospital_*.csv")}
    assert {ROOT / path for path in SHIPPED_FILES.values()} == shipped


def test_a_demonstration_is_decided_by_the_fingerprint_never_the_path_or_name(tmp_path):
    def demo(**cfg):
        return all_demonstration(settings.resolve(cfg))

    assert demo() and demo(dataset="breast-cancer")  # generated, or bundled in scikit-learn
    assert demo(dataset="heart-disease", num_clients=4, data_dir=str(heart_disease.SHIPPED_DIR))
    assert demo(dataset="csv", data_dir=str(EXAMPLE))
    # The shipped files copied elsewhere are still the shipped files.
    assert demo(dataset="csv", data_dir=str(shutil.copytree(EXAMPLE, tmp_path / "copy")))
    # Own patients in files named exactly as the shipped ones, in a folder named so.
    own_sites = own_data_copy(heart_disease.SHIPPED_DIR, tmp_path / "uci-heart-disease")
    assert not demo(dataset="heart-disease", num_clients=4, data_dir=str(own_sites))
    own_csv = own_data_copy(EXAMPLE, tmp_path / "examples" / "csv")
    assert not demo(dataset="csv", data_dir=str(own_csv))
    # One hospital of one's own makes the whole simulation lasting; so does one byte.
    mixed = shutil.copytree(EXAMPLE, tmp_path / "mixed")
    shutil.copy(own_csv / "hospital_2.csv", mixed / "hospital_2.csv")
    assert not demo(dataset="csv", data_dir=str(mixed))
    edited = shutil.copytree(EXAMPLE, tmp_path / "edited")
    text = (edited / "hospital_0.csv").read_text()
    (edited / "hospital_0.csv").write_text(text.replace("\n", "\r\n", 1))
    assert not demo(dataset="csv", data_dir=str(edited))


def deployed(state_dir, run_id=7, **node_config):
    """Hospital 0 as client.py --insecure starts it, in a run of the server's."""
    run = settings.to_run_config(settings.resolve({"rounds": 2, "num_patients": 600}))
    config = {"partition-id": 0, "num-partitions": 3, "state-dir": str(state_dir)}
    return flower_context({**config, "operator-key": "", **node_config}, run, run_id=run_id)


def train_one_round(hospital):
    weights = get_weights(build_model(hospital.x.shape[1], hospital.cfg.hidden_layers))
    return hospital.train_round(weights, 1)[2]


def test_a_deployed_demonstration_spends_a_fresh_ledger_per_run_beside_the_lasting_one(tmp_path):
    state_dir = tmp_path / "hospital-0"
    for run_id in (7, 8):
        hospital = node.open_hospital(deployed(state_dir, run_id))  # generated patients
        report = train_one_round(hospital)
        assert report["status"] == "trained" and report["ledger_reset"] == ""
        assert hospital.ledger.path == state_dir / DEMO_RUNS_DIR / str(run_id) / LEDGER_FILE
        with hospital.ledger.transaction():
            assert [r["run_id"] for r in hospital.ledger.releases] == [str(run_id)]
    lasting = state_dir / LEDGER_FILE  # the register of authorisations used, nothing spent
    assert not lasting.exists() or not json.loads(lasting.read_text())["releases"]
    assert json.loads((state_dir / "status.json").read_text())["status"] == "trained"


def test_a_server_cannot_make_a_deployed_hospital_a_demonstration(tmp_path, monkeypatch):
    # Its own file decides; a run config naming the shipped files, or a data set
    # whose files the hospital did not bring, does not.
    own = own_data_copy(EXAMPLE, tmp_path / "own")
    files = {"dataset": "csv", "schema-file": str(own / "schema.json")}
    context = deployed(tmp_path / "h", **files, **{"data-file": str(own / "hospital_0.csv")})
    context.run_config.update(
        settings.to_run_config(settings.resolve({"dataset": "csv", "data_dir": str(EXAMPLE)}))
    )
    _, cfg = node.hospital_settings(context)
    assert not node.is_demonstration(context, cfg, 0)
    assert node.ledger_dir(context, cfg, 0) == tmp_path / "h"
    asks_shipped_sites = deployed(tmp_path / "h", **{"num-partitions": 4})
    asks_shipped_sites.run_config.update(
        settings.to_run_config(settings.resolve({"dataset": "heart-disease", "num_clients": 4}))
    )
    _, cfg = node.hospital_settings(asks_shipped_sites)
    assert not node.is_demonstration(asks_shipped_sites, cfg, 0)
    # Nor simulated: that takes Flower's simulation engine in this very process.
    monkeypatch.setenv(HOSPITALS_DIR_VARIABLE, str(tmp_path / "simulated"))
    assert not node.is_simulated(flower_context({}, {}))


def test_a_simulated_demonstration_never_uses_the_lasting_folder(tmp_path, monkeypatch):
    # Whatever SECUREHEALTH_HOSPITALS_DIR says (the operator's lasting folder, or a
    # Ray cluster's workers'), a demonstration's hospitals keep the run's own state.
    as_simulated_hospitals(monkeypatch, tmp_path / "lasting")
    demo = flower_context({"partition-id": 0, "num-partitions": 3}, {}, run_id=4)
    cfg = settings.resolve()
    expected = default_state_root() / DEMO_RUNS_DIR / "4" / "hospital-0"
    assert node.hospital_state_dir(demo, cfg, 0) == expected
    monkeypatch.setenv(DEMO_HOSPITALS_DIR_VARIABLE, str(tmp_path / "run" / "hospitals"))
    assert node.ledger_dir(demo, cfg, 0) == tmp_path / "run" / "hospitals" / "hospital-0"
    own_cfg = settings.resolve(
        {"dataset": "csv", "data_dir": str(own_data_copy(EXAMPLE, tmp_path / "o"))}
    )
    assert node.ledger_dir(demo, own_cfg, 0) == tmp_path / "lasting" / "hospital-0"


def test_flwr_run_hospitals_know_where_their_ledgers_are_without_a_variable(tmp_path, monkeypatch):
    # `flwr run .` on Flower's local simulation: no SECUREHEALTH_HOSPITALS_DIR.
    as_simulated_hospitals(monkeypatch, tmp_path)
    monkeypatch.delenv(HOSPITALS_DIR_VARIABLE)
    simulated = {"partition-id": 1, "num-partitions": 3}
    demo = flower_context(simulated, settings.to_run_config(settings.resolve()), run_id=12)
    assert node.is_simulated(demo)
    _, cfg = node.hospital_settings(demo)
    expected = default_state_root() / DEMO_RUNS_DIR / "12" / "hospital-1"
    assert node.hospital_state_dir(demo, cfg, 1) == node.ledger_dir(demo, cfg, 1) == expected
    own = own_data_copy(EXAMPLE, tmp_path / "own")
    own_cfg = settings.resolve({"dataset": "csv", "data_dir": str(own)})
    lasting = flower_context(simulated, settings.to_run_config(own_cfg), run_id=12)
    expected = default_state_root() / "simulation" / "hospital-1"
    assert node.ledger_dir(lasting, own_cfg, 1) == expected


def test_client_py_says_a_demonstration_spends_nothing_lasting(tmp_path):
    # No server listens there: client.py says what it spends, then gives up on it.
    state_dir = tmp_path / "hospital-0"
    flags = ["--insecure", "--state-dir", state_dir, "--connect-timeout", "1"]
    flags += ["--server-address", "127.0.0.1:9"]
    result = run_script("client.py", "--client-id", "0", *flags, cwd=tmp_path)
    assert "data is a demonstration's" in result.stdout, result.stdout + result.stderr
    assert f"{state_dir / DEMO_RUNS_DIR}/<run id>" in result.stdout.replace("\n", "")
    assert not (state_dir / LEDGER_FILE).exists()
    reset = run_script("client.py", "--client-id", "0", *flags, "--reset-ledger", "x", cwd=tmp_path)
    assert reset.returncode == 2 and "leave out --reset-ledger" in reset.stderr


@pytest.mark.parametrize("own", [False, True])
def test_simulation_keeps_a_demonstrations_ledgers_with_the_run(tmp_path, own):
    data_dir = own_data_copy(EXAMPLE, tmp_path / "own") if own else EXAMPLE
    args = ["simulation.py", "--dataset", "csv", "--data-dir", data_dir, "--plan"]
    result = run_script(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert ("Ledgers in" in text) is own and ("Demonstration data" in text) is not own


def test_tools_outside_the_ledgers_are_free_on_a_demonstration_only(tmp_path):
    # Refused on one's own patients, whatever the data set's name; free on the
    # shipped files (--plan: nothing trains).
    own_sites = own_data_copy(heart_disease.SHIPPED_DIR, tmp_path / "sites")
    for data_set, folder, free in (
        ("csv", EXAMPLE, True),
        ("heart-disease", heart_disease.SHIPPED_DIR, True),
        ("heart-disease", own_sites, False),
    ):
        flags = ["--dataset", data_set, "--data-dir", folder, "--baselines", "--plan"]
        result = run_script("simulation.py", *flags, cwd=tmp_path)
        assert (result.returncode == 0) is free, result.stderr
        assert ("--unaccounted-privacy-spend" in result.stderr) is not free


def test_the_audit_self_test_trains_on_a_demonstration_only(tmp_path):
    own_sites = own_data_copy(heart_disease.SHIPPED_DIR, tmp_path / "sites")
    flags = ["--self-test", "--dataset", "heart-disease", "--data-dir", own_sites]
    refused = run_script("audit.py", *flags, cwd=tmp_path)
    assert refused.returncode == 2 and "never on your own patients" in refused.stderr


def test_a_synthetic_twin_is_made_from_the_dictionary_alone_and_rehearses_for_free(tmp_path):
    # Only the data dictionary is there: no row of anyone's can be read.
    dictionary_only = tmp_path / "dictionary"
    dictionary_only.mkdir()
    shutil.copy(EXAMPLE / "schema.json", dictionary_only / "schema.json")
    twin = tmp_path / "twin"
    flags = ["--dataset", "csv", "--data-dir", dictionary_only, "--make-twin", twin]
    made = run_script("simulation.py", *flags, "--num-patients", "900", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "no row of yours read" in " ".join(made.stdout.split())
    names = {"schema.json", "twin.json", "test.csv", *(f"hospital_{h}.csv" for h in range(3))}
    assert {p.name for p in twin.iterdir()} == names
    cfg = settings.resolve({"dataset": "csv", "data_dir": str(twin), "num_patients": 900})
    assert all_demonstration(cfg)
    # Its patients pass every check, both classes, and a model learns something.
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from securehealth import data

    (x, y), (_, held_out_y) = data.hospital_data(cfg, 0)
    test_x, test_y, _ = data.reference_test_set(cfg)
    assert len(y) + len(held_out_y) == 450 and 0.15 < y.mean() < 0.45
    model = LogisticRegression(max_iter=1000).fit(x, y)
    assert roc_auc_score(test_y, model.predict_proba(test_x)[:, 1]) > 0.7
    # A twin is its bytes: a file or the dictionary changed in any way is not one.
    planned = run_script(
        "simulation.py", "--dataset", "csv", "--data-dir", twin, "--plan", cwd=tmp_path
    )
    assert "Demonstration data" in " ".join(planned.stdout.split()), planned.stderr
    table = twin / "hospital_1.csv"
    table.write_text(table.read_text() + table.read_text().splitlines()[1] + "\n")
    assert not demonstration.is_demonstration(table)
    assert demonstration.is_demonstration(twin / "hospital_0.csv")
    schema = twin / "schema.json"
    schema.write_text(schema.read_text() + " ")
    assert not demonstration.is_demonstration(twin / "hospital_0.csv")
    # Never into a folder that holds anything.
    again = run_script("simulation.py", *flags, cwd=tmp_path)
    assert again.returncode == 2 and "not an empty folder" in again.stderr


def test_a_demonstration_run_keeps_the_lasting_ledgers_trace(tmp_path):
    # Own patients first, then a trial on generated ones in the same state directory:
    # the status file still says what the lasting ledger had spent, so that ledger is
    # missed if it is lost, and the trial's evaluations stay with the trial's ledger.
    state_dir = tmp_path / "hospital-0"
    own = own_data_copy(EXAMPLE, tmp_path / "own")
    files = {"dataset": "csv", "schema-file": str(own / "schema.json")}
    mine = deployed(state_dir, 5, **files, **{"data-file": str(own / "hospital_0.csv")})
    mine.run_config.update(
        settings.to_run_config(settings.resolve({"dataset": "csv", "data_dir": str(own)}))
    )
    spent = train_one_round(node.open_hospital(mine))["epsilon"]
    assert train_one_round(node.open_hospital(deployed(state_dir, 6)))["status"] == "trained"
    status = json.loads((state_dir / "status.json").read_text())
    assert status["ledger"] == str(state_dir / DEMO_RUNS_DIR / "6" / LEDGER_FILE)
    assert status["lasting"] == {"epsilon": spent, "ledger": str(state_dir / LEDGER_FILE)}
    assert (state_dir / DEMO_RUNS_DIR / "6" / "evaluation.json").exists()
    kept = json.loads((state_dir / "evaluation.json").read_text())
    assert {record["run_id"] for record in kept} == {"5"}
    (state_dir / LEDGER_FILE).unlink()
    with pytest.raises(LedgerError, match=f"records epsilon {spent:.4g} spent"):
        check_before_start(state_dir, settings.resolve({"dataset": "csv", "data_dir": str(own)}))


def test_what_is_judged_a_demonstration_is_what_trains(tmp_path, monkeypatch):
    # The attack: the twin's file is judged, then swapped for real patients before
    # training reads it. The hospital trains on the bytes it judged.
    twin = tmp_path / "twin"
    settings_for_twin = {"seed": 1, "num_patients": 900, "num_clients": 3}
    make_twin(EXAMPLE / "schema.json", twin, {**settings_for_twin, "global_test_patients": 100})
    real = own_data_copy(EXAMPLE, tmp_path / "own") / "hospital_0.csv"  # 300 patients
    judge = demonstration.is_demonstration

    def judge_then_swap(own_file, content=None):
        verdict = judge(own_file, content)
        shutil.copy(real, own_file)
        return verdict

    monkeypatch.setattr(demonstration, "is_demonstration", judge_then_swap)
    files = {"dataset": "csv", "schema-file": str(twin / "schema.json")}
    context = deployed(tmp_path / "h", 9, **files, **{"data-file": str(twin / "hospital_0.csv")})
    context.run_config.update(
        settings.to_run_config(settings.resolve({"dataset": "csv", "data_dir": str(twin)}))
    )
    hospital = node.open_hospital(context)
    assert len(hospital.y) + len(hospital.held_out[1]) == 450  # the twin's hospital 0
    assert hospital.ledger.directory == tmp_path / "h" / DEMO_RUNS_DIR / "9"
    assert (twin / "hospital_0.csv").read_bytes() == real.read_bytes()  # it was swapped


def test_a_twin_manifest_out_of_a_twins_bounds_is_no_twin_and_costs_nothing(tmp_path):
    twin = make_twin(
        EXAMPLE / "schema.json",
        tmp_path / "twin",
        {"seed": 3, "num_patients": 300, "num_clients": 3, "global_test_patients": 100},
    )
    table = twin / "hospital_0.csv"
    manifest = json.loads((twin / "twin.json").read_text())
    assert demonstration.is_demonstration(table)
    for changed in (
        {**manifest, "test_patients": 10**10},  # would take minutes and all the memory
        {**manifest, "seed": "3"},
        {**manifest, "hospital_patients": [150.0, 90, 60]},
    ):
        (twin / "twin.json").write_text(json.dumps(changed))
        assert not demonstration.is_demonstration(table)
    (twin / "twin.json").write_text("[" * 100_000)
    assert not demonstration.is_demonstration(table)


def test_a_twin_never_writes_a_value_its_dictionary_calls_missing(tmp_path):
    spec = json.loads((EXAMPLE / "schema.json").read_text())
    for feature in spec["features"]:
        if feature["name"] == "age":
            feature.update(min=0, max=2, missing=[0, 1])  # the midpoint is a marker
            feature.pop("subgroups", None)
        if feature["name"] == "sex":
            feature["missing"] = ["male"]
    (tmp_path / "schema.json").write_text(json.dumps(spec))
    twin = make_twin(
        tmp_path / "schema.json",
        tmp_path / "twin",
        {"seed": 3, "num_patients": 300, "num_clients": 3, "global_test_patients": 100},
    )
    strict = settings.resolve({"dataset": "csv", "data_dir": str(twin), "missing_values": "fail"})
    from securehealth import data

    for hospital in range(3):
        data.hospital_data(strict, hospital)  # DataError on any "not recorded" value
