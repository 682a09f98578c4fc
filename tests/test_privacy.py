import json
import math
import os
import shutil
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest
from conftest import EXAMPLE, ROOT, flower_context, own_data_copy

import data_utils
from securehealth import clientapp as client
from securehealth import node as hospital_node
from securehealth import settings
from securehealth.data.split import held_out_split
from securehealth.hospital import Hospital
from securehealth.model import build_model, get_weights, set_weights
from securehealth.privacy.accountant import (
    BudgetExhausted,
    calibrate_noise_multiplier,
    epsilon_spent,
)
from securehealth.privacy.dpsgd import train_private
from securehealth.privacy.ledger import LedgerError, PrivacyLedger
from securehealth.privacy.schedule import noise_limit
from securehealth.results import HOSPITALS_DIR_VARIABLE


def node_context(node_config, run_settings=None):
    """The Context Flower gives hospital 0's ClientApp: its node config and the run's."""
    return flower_context(
        {"partition-id": 0, "num-partitions": 3, **node_config},
        run_settings or {},
    )


def independent_epsilon(history, delta, adjacency):
    """Google's dp-accounting PLD at its own default precision, on the mechanisms."""
    relation = {
        "replace-one": dp_accounting.NeighboringRelation.REPLACE_ONE,
        "add-remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    }[adjacency]
    accountant = dp_accounting.pld.PLDAccountant(neighboring_relation=relation)
    for sigma, sample_rate, steps in history:
        accountant.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    sample_rate, dp_accounting.GaussianDpEvent(sigma)
                ),
                steps,
            )
        )
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    "budget, sample_rate, steps, adjacency",
    [
        (1.0, 1 / 13, 130, "replace-one"),
        (0.5, 0.2, 50, "replace-one"),
        (4.0, 0.01, 1000, "replace-one"),
        (1.0, 1 / 8, 80, "add-remove"),
    ],
)
def test_calibration_spends_at_most_the_budget_and_nearly_all_of_it(
    budget, sample_rate, steps, adjacency
):
    sigma = calibrate_noise_multiplier(budget, 1e-5, sample_rate, steps, adjacency)
    spent = epsilon_spent([(sigma, sample_rate, steps)], 1e-5, adjacency)
    assert budget * 0.98 <= spent <= budget
    # Google's accountant at its finer default grid agrees, never higher.
    independent = independent_epsilon([(sigma, sample_rate, steps)], 1e-5, adjacency)
    assert spent - 0.002 <= independent <= spent


def test_a_budget_beyond_any_meaning_gets_the_least_noise_quickly():
    from securehealth.privacy.accountant import MIN_NOISE_MULTIPLIER

    sigma = calibrate_noise_multiplier(1000.0, 1e-5, 1 / 7, 70, "replace-one")
    assert sigma == MIN_NOISE_MULTIPLIER
    assert epsilon_spent([(sigma, 1 / 7, 70)], 1e-5, "replace-one") <= 1000.0


def test_replace_one_costs_more_than_add_remove_for_the_same_noise():
    # Measured: the default job's old noise (3.77, calibrated for add-remove with RDP)
    # gives 0.91 under add-remove but 1.84 under replace-one.
    history = [(3.772, 1 / 13, 130)]
    add_remove = epsilon_spent(history, 1e-5, "add-remove")
    replace_one = epsilon_spent(history, 1e-5, "replace-one")
    assert add_remove == pytest.approx(0.908, abs=0.005)
    assert replace_one == pytest.approx(1.836, abs=0.005)


def test_calibration_counts_what_earlier_runs_spent():
    prior = [(5.0, 0.1, 100)]
    fresh = calibrate_noise_multiplier(3.0, 1e-5, 0.1, 100, "replace-one")
    resumed = calibrate_noise_multiplier(3.0, 1e-5, 0.1, 100, "replace-one", prior)
    assert resumed > fresh
    assert epsilon_spent([*prior, (resumed, 0.1, 100)], 1e-5, "replace-one") <= 3.0
    with pytest.raises(BudgetExhausted):
        calibrate_noise_multiplier(0.5, 1e-5, 0.1, 100, "replace-one", prior)


def test_a_nearly_spent_budget_counts_as_exhausted():
    # What is left would need noise so large that training could learn nothing.
    sigma = calibrate_noise_multiplier(1.0, 1e-5, 1 / 13, 130, "replace-one")
    prior = [(sigma, 1 / 13, 130)]  # epsilon 0.999x of 1
    with pytest.raises(BudgetExhausted, match="less than 1% left"):
        calibrate_noise_multiplier(1.0, 1e-5, 1 / 13, 13, "replace-one", prior)
    # Raised deliberately, the budget allows training again, within the new total.
    more = calibrate_noise_multiplier(2.0, 1e-5, 1 / 13, 130, "replace-one", prior)
    assert epsilon_spent([*prior, (more, 1 / 13, 130)], 1e-5, "replace-one") <= 2.0


def test_ten_rounds_compose_to_more_than_one_round():
    # The trap of a fresh PrivacyEngine per round: each round alone looks cheap.
    one_round = epsilon_spent([(6.5, 1 / 13, 13)], 1e-5, "replace-one")
    ten_rounds = epsilon_spent([(6.5, 1 / 13, 13)] * 10, 1e-5, "replace-one")
    assert ten_rounds > 3 * one_round
    assert ten_rounds == pytest.approx(
        epsilon_spent([(6.5, 1 / 13, 130)], 1e-5, "replace-one"), abs=1e-3
    )


def test_ledger_merges_history_and_survives_reopening(tmp_path):
    ledger = PrivacyLedger(tmp_path, budget=1.0, delta=1e-5, adjacency="replace-one")
    with ledger.transaction():
        ledger.note_dataset("ab" * 32, 100)
        for server_round in (1, 2):
            ledger.record(1, server_round, 2.0, 0.1, 10)
    reopened = PrivacyLedger(tmp_path, budget=1.0, delta=1e-5, adjacency="replace-one")
    with reopened.transaction():
        reopened.note_dataset("cd" * 32, 101)  # another version of the data: same budget
        assert reopened.history == [(2.0, 0.1, 20)]
        assert reopened.epsilon() == epsilon_spent([(2.0, 0.1, 20)], 1e-5, "replace-one")
    saved = json.loads(reopened.path.read_text())
    assert [d["patients"] for d in saved["datasets"]] == [100]  # saved with a release


def test_a_looser_guarantee_cannot_re_price_what_was_spent(tmp_path):
    ledger = PrivacyLedger(tmp_path, budget=1.0, delta=1e-5, adjacency="replace-one")
    with ledger.transaction():
        ledger.record(1, 1, 2.0, 0.1, 10)
    for delta, adjacency in ((1e-2, "replace-one"), (1e-5, "add-remove")):
        looser = PrivacyLedger(tmp_path, budget=1.0, delta=delta, adjacency=adjacency)
        with pytest.raises(LedgerError, match="would re-price what was already spent"):
            with looser.transaction():
                pass
    stricter = PrivacyLedger(tmp_path, budget=1.0, delta=1e-6, adjacency="replace-one")
    with stricter.transaction():
        stricter.record(2, 1, 2.0, 0.1, 10)
    with pytest.raises(LedgerError):  # after the 1e-6 record, 1e-5 is looser than accounted
        with ledger.transaction():
            pass


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '{"format": 2}',
        "{not json",
        '{"format": 2, "guarantee": null, "datasets": [], "plans": [], "releases": []}',
        '{"format": 2, "guarantee": "x", "datasets": [], "plans": {}, "releases": []}',
        '{"format": 2, "guarantee": null, "datasets": [], "plans": {}, "releases": {}}',
        '{"format": 2, "guarantee": null, "datasets": [], "plans": {}, "releases": [{'
        '"run_id": "1", "noise_multiplier": "x", "sample_rate": 0.1, "steps": 1}]}',
        '{"format": 2, "guarantee": null, "datasets": [], "plans": {}, "releases": [{'
        '"run_id": "1", "noise_multiplier": NaN, "sample_rate": 0.1, "steps": 1}]}',
        '{"format": 2, "guarantee": null, "datasets": [], "plans": {}, "releases": [{'
        '"run_id": "1", "noise_multiplier": 1.0, "sample_rate": 2, "steps": 1}]}',
    ],
)
def test_a_damaged_ledger_stops_training_with_one_line(tmp_path, text):
    (tmp_path / "privacy-ledger.json").write_text(text)
    ledger = PrivacyLedger(tmp_path, budget=1.0, delta=1e-5, adjacency="replace-one")
    with pytest.raises(LedgerError, match="unreadable or damaged|not a privacy ledger"):
        with ledger.transaction():
            pass


def test_releases_in_ledgers_of_the_first_version_still_count(tmp_path):
    old = {"fingerprint": "ab" * 32, "plans": {"1": {"delta": 1e-5}}, "releases": []}
    for utc, sigma in (("2026-11-01T10:00:00+00:00", 3.77), ("2026-11-02T10:00:00+00:00", 4.0)):
        release = {"run_id": "1", "round": 1, "noise_multiplier": sigma, "sample_rate": 0.1}
        old["releases"].append({**release, "steps": 10, "utc": utc, "epsilon_after": 0.5})
    (tmp_path / "ledger-abababababababab.json").write_text(json.dumps(old))
    looser = PrivacyLedger(tmp_path, budget=1.0, delta=1e-2, adjacency="replace-one")
    with pytest.raises(LedgerError, match="re-price"):  # they were accounted at 1e-5
        with looser.transaction():
            pass
    ledger = PrivacyLedger(tmp_path, budget=1.0, delta=1e-5, adjacency="replace-one")
    with ledger.transaction():
        assert ledger.history == [(3.77, 0.1, 10), (4.0, 0.1, 10)]


def test_a_ledger_that_cannot_be_written_stops_the_hospital_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(LedgerError, match="writable state directory"):
        PrivacyLedger(tmp_path / "file" / "state", 1.0, 1e-5, "replace-one")


FIT_ONE_ROUND = """
import json, sys
import numpy as np
from securehealth import settings
from securehealth.hospital import Hospital
cfg = settings.resolve(json.loads(sys.argv[1]))
weights = [np.asarray(w, dtype=np.float32) for w in json.loads(sys.argv[2])]
hospital = Hospital(1, cfg, run_id=int(sys.argv[5]), state_dir=sys.argv[3])
new_weights, n, report = hospital.train_round(weights, int(sys.argv[4]))
print(json.dumps(report))
"""


def fit_in_fresh_process(cfg, ledger_dir, server_round, run_id=99):
    weights = [w.tolist() for w in get_weights(build_model(9, cfg.hidden_layers))]
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            FIT_ONE_ROUND,
            json.dumps(vars(cfg)),
            json.dumps(weights),
            str(ledger_dir),
            str(server_round),
            str(run_id),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_restarted_hospital_remembers_what_it_spent(tmp_path):
    cfg = settings.resolve({"rounds": 3, "num_patients": 1000, "run_dir": str(tmp_path)})
    first = fit_in_fresh_process(cfg, tmp_path, 1)
    second = fit_in_fresh_process(cfg, tmp_path, 2)
    steps_per_round = math.ceil(240 / cfg.batch_size)  # hospital 1: 300 patients, 240 train
    assert first["steps"] == steps_per_round and second["steps"] == 2 * steps_per_round
    assert second["noise_multiplier"] == first["noise_multiplier"]  # planned once per run
    expected = epsilon_spent(
        [(first["noise_multiplier"], first["sample_rate"], 2 * steps_per_round)],
        1e-5,
        "replace-one",
    )
    assert second["epsilon"] == pytest.approx(expected)
    assert first["epsilon"] < second["epsilon"] < cfg.epsilon


def train_rounds(hospital, rounds, first_round=1):
    weights = get_weights(build_model(hospital.x.shape[1], hospital.cfg.hidden_layers))
    reports = []
    for server_round in range(first_round, first_round + rounds):
        weights, _, report = hospital.train_round(weights, server_round)
        reports.append(report)
    return reports


def test_a_hospital_refuses_a_round_past_its_budget(tmp_path):
    cfg = settings.resolve({"rounds": 2, "num_patients": 1000, "run_dir": str(tmp_path)})
    hospital = Hospital(0, cfg, run_id=5, state_dir=tmp_path)
    reports = train_rounds(hospital, 2)
    assert [r["status"] for r in reports] == ["trained", "trained"]
    assert reports[-1]["epsilon"] <= cfg.epsilon
    ledger_before = hospital.ledger.path.read_text()

    weights = get_weights(build_model(9, cfg.hidden_layers))
    returned, n, report = hospital.train_round(weights, 3)
    assert report["status"] == "refused" and "budget" in report["reason"]
    assert n == 0
    assert all(np.array_equal(a, b) for a, b in zip(returned, weights, strict=True))
    assert report["epsilon"] <= cfg.epsilon
    assert hospital.ledger.path.read_text() == ledger_before


def update_norm(hospital, weights, noise_multiplier):
    """How far one round of real DP-SGD (Opacus) moves `weights`."""
    model = build_model(hospital.x.shape[1], hospital.cfg.hidden_layers)
    set_weights(model, weights)
    train_private(model, hospital.x, hospital.y, hospital.cfg, noise_multiplier)
    moved = [a - b for a, b in zip(get_weights(model), weights, strict=True)]
    return math.sqrt(sum(float(np.sum(d * d)) for d in moved))


def test_the_noise_limit_is_where_real_updates_reach_max_update_norm(tmp_path):
    # The 16-unit MLP: with its 177 weights the norm of the noise varies little.
    cfg = settings.resolve({"num_patients": 1000, "run_dir": str(tmp_path), "hidden_layers": "16"})
    hospital = Hospital(2, cfg, run_id=1, state_dir=tmp_path)  # 160 training patients
    weights = get_weights(build_model(hospital.x.shape[1], cfg.hidden_layers))
    limit = noise_limit(len(hospital.y), sum(w.size for w in weights), cfg)
    at_limit = np.array([update_norm(hospital, weights, limit) for _ in range(5)])
    # The noise alone, momentum included, moves the model by max_update_norm; the
    # clipped gradients add at most a few units (lr 0.3, steps of norm <= 1). One
    # round's norm varies by about 6 % (30 runs: 88-110, mean 99): the mean of five
    # lies within 10 % (4 standard deviations), each within 30 %.
    assert 0.9 < at_limit.mean() / cfg.max_update_norm < 1.1, at_limit
    assert np.all(np.abs(at_limit / cfg.max_update_norm - 1) < 0.3), at_limit
    assert update_norm(hospital, weights, limit / 4) < cfg.max_update_norm / 3


def test_a_budget_too_small_to_train_usefully_is_declined_with_what_would_work(tmp_path):
    base = {"num_patients": 1000, "rounds": 20, "run_dir": str(tmp_path)}
    cfg = settings.resolve({**base, "epsilon": 1e-3})
    hospital = Hospital(2, cfg, run_id=1, state_dir=tmp_path / "small")
    [report] = train_rounds(hospital, 1)
    assert report["status"] == "refused"
    reason = report["reason"]
    assert "epsilon 0.001 is too small for 20 rounds" in reason
    assert "max_update_norm 100" in reason and "at least" in reason
    with hospital.ledger.transaction() as ledger:  # nothing spent or planned
        assert ledger.data["releases"] == [] and ledger.data["plans"] == {}
    least = float(reason.split("at least ")[1].split()[0])

    # What it names works: just above it the hospital trains, just below it declines.
    enough = settings.resolve({**base, "epsilon": least * 1.02})
    assert train_rounds(Hospital(2, enough, 1, tmp_path / "enough"), 1)[0]["status"] == "trained"
    short = settings.resolve({**base, "epsilon": least * 0.98})
    assert train_rounds(Hospital(2, short, 1, tmp_path / "short"), 1)[0]["status"] == "refused"

    # A limit below the least noise calibration uses: no budget helps, and none is named.
    tight = settings.resolve({**base, "epsilon": 120, "max_update_norm": 0.001})
    [report] = train_rounds(Hospital(2, tight, 1, tmp_path / "tight"), 1)
    assert report["status"] == "refused" and "too small for any budget" in report["reason"]
    assert "at least" not in report["reason"] and report["epsilon"] == 0


def test_the_server_cannot_reset_a_budget_with_another_seed_or_split(tmp_path):
    # The reset attack: the server's seed and test_fraction choose the held-out rows;
    # a ledger keyed by the training split would open a fresh budget on the same
    # patients at each change.
    # A fixed threshold: the runs reserve nothing for an operating point, and the
    # first spends the whole budget on training.
    base = {
        "rounds": 2,
        "num_patients": 1000,
        "run_dir": str(tmp_path),
        "decision_threshold": "0.5",
    }
    first = Hospital(0, settings.resolve(base), run_id=1, state_dir=tmp_path)
    assert train_rounds(first, 2)[-1]["status"] == "trained"
    for run_id, changed in enumerate(({"seed": 43}, {"test_fraction": 0.3}), start=2):
        cfg = settings.resolve({**base, **changed})
        again = Hospital(0, cfg, run_id=run_id, state_dir=tmp_path)
        report = train_rounds(again, 1)[0]
        assert report["status"] == "refused" and "budget" in report["reason"]
        assert report["epsilon"] <= cfg.epsilon
    ledger = json.loads((tmp_path / "privacy-ledger.json").read_text())
    assert len(ledger["releases"]) == 2  # one budget for everything it trained on


def test_the_held_out_patients_are_the_hospitals_choice_not_the_servers(tmp_path):
    cfg = settings.resolve({"dataset": "csv", "data_dir": str(EXAMPLE)})
    reseeded = settings.resolve({**vars(cfg), "seed": 7})
    same = [data_utils.hospital_data(c, 0)[1][0] for c in (cfg, reseeded)]
    assert np.array_equal(*same)


def test_replacing_one_patient_changes_at_most_one_training_record(tmp_path):
    # Replace-one privacy of the training rows needs it: the held-out rule may not
    # move other patients across, nor change the (released) training count.
    rng = np.random.default_rng(0)
    for n in (26, 101, 400, 1016):
        x = rng.normal(size=(n, 3)).astype(np.float32)
        y = (rng.random(n) < 0.5).astype(np.float32)
        train, _ = held_out_split(x, y, 0.2)
        for row in rng.choice(n, 20, replace=False):
            x2, y2 = x.copy(), y.copy()
            x2[row] = rng.normal(size=3)
            y2[row] = 1 - y2[row]  # the other diagnosis, the case that moved cut points
            train2, _ = held_out_split(x2, y2, 0.2)
            assert len(train2) == len(train)
            before = {x[i].tobytes() + y[i].tobytes() for i in train}
            after = {x2[i].tobytes() + y2[i].tobytes() for i in train2}
            assert len(before - after) <= 1


def test_adding_or_removing_one_patient_changes_only_that_patients_training_record():
    # Add-remove privacy of the training rows needs it: a cut by count moves with the
    # count, swapping another patient in or out as well (302 -> 303 patients would
    # hold out 61 instead of 60).
    rng = np.random.default_rng(1)
    for n in (26, 101, 302, 1016):
        x = rng.normal(size=(n + 1, 3)).astype(np.float32)
        y = (rng.random(n + 1) < 0.5).astype(np.float32)
        train, _ = held_out_split(x, y, 0.2, adjacency="add-remove")
        with_one, _ = held_out_split(x[:n], y[:n], 0.2, adjacency="add-remove")
        before = {x[i].tobytes() for i in train}
        after = {x[i].tobytes() for i in with_one}
        assert after <= before and len(before - after) <= 1


def test_a_deployed_hospital_never_reads_a_file_the_server_names(tmp_path):
    server_run = {"dataset": "csv", "data_dir": str(EXAMPLE)}
    context = node_context({"state-dir": str(tmp_path)}, server_run)
    with pytest.raises(ValueError, match="brought no data of its own"):
        client.client_fn(context)


def test_a_data_error_reaches_the_server_without_patient_values(tmp_path):
    table = tmp_path / "patients.csv"
    rows = (EXAMPLE / "hospital_0.csv").read_text().splitlines()
    rows[5] = rows[5].replace(rows[5].split(",")[1], "117", 1)  # age outside [18, 95]
    table.write_text("\n".join(rows) + "\n")
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path)}
    node["operator-key"] = ""  # client.py --insecure: runs are not checked for a signature
    node.update({"data-file": str(table), "schema-file": str(EXAMPLE / "schema.json")})
    context = node_context(node, {"dataset": "csv"})
    with pytest.raises(ValueError, match="does not match the data dictionary") as raised:
        client.client_fn(context)
    assert "117" not in str(raised.value) and "line" not in str(raised.value)


def test_a_csv_that_gains_a_patient_composes_with_the_old_ledger(tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(EXAMPLE, data_dir)
    cfg = settings.resolve(
        {"dataset": "csv", "data_dir": str(data_dir), "rounds": 2, "run_dir": str(tmp_path)}
    )
    state = tmp_path / "state"
    reports = train_rounds(Hospital(0, cfg, run_id=1, state_dir=state), 1)
    table = data_dir / "hospital_0.csv"
    table.write_text(table.read_text() + "yes,70,male,31.0,150,6.1,0.9,7.2,yes\n")

    grown = Hospital(0, cfg, run_id=2, state_dir=state)
    assert len(grown.y) + len(grown.held_out[1]) == 1 + sum(
        len(part[1])
        for part in data_utils.hospital_data(
            settings.resolve({**vars(cfg), "data_dir": str(EXAMPLE)}), 0
        )
    )
    report = train_rounds(grown, 1)[0]
    assert report["status"] == "trained"
    ledger = json.loads((state / "privacy-ledger.json").read_text())
    assert [d["patients"] for d in ledger["datasets"]] == [
        reports[0]["patients"],
        report["patients"],
    ]
    released = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in ledger["releases"]]
    assert len(released) == 2 and report["epsilon"] == pytest.approx(
        epsilon_spent(released, 1e-5, "replace-one")
    )
    assert report["epsilon"] > reports[0]["epsilon"]


def test_relabelled_patients_and_rewritten_rows_do_not_open_a_fresh_budget(tmp_path):
    # Identifiers cannot prove that two datasets share no patient: the same patients
    # under new identifiers, with every row changed, still spend from the same budget.
    data_dir = tmp_path / "data"
    shutil.copytree(EXAMPLE, data_dir)
    schema = json.loads((data_dir / "schema.json").read_text())
    (data_dir / "schema.json").write_text(json.dumps({**schema, "patient_id": "mrn"}))
    header, *rows = (EXAMPLE / "hospital_0.csv").read_text().splitlines()

    def write(ids, age_shift):
        lines = [f"mrn,{header}"]
        for patient, row in zip(ids, rows, strict=True):
            label, age, rest = row.split(",", 2)
            lines.append(f"{patient},{label},{int(age) + age_shift},{rest}")
        (data_dir / "hospital_0.csv").write_text("\n".join(lines) + "\n")

    cfg = settings.resolve(  # a fixed threshold: the first run spends its whole budget
        {
            "dataset": "csv",
            "data_dir": str(data_dir),
            "rounds": 2,
            "run_dir": str(tmp_path),
            "decision_threshold": "0.5",
        }
    )
    write([f"P{i:05d}" for i in range(len(rows))], 0)
    first = train_rounds(Hospital(0, cfg, run_id=1, state_dir=tmp_path), 2)
    write([f"p{i}" for i in range(len(rows))], 1)
    again = train_rounds(Hospital(0, cfg, run_id=2, state_dir=tmp_path), 1)[0]
    assert again["status"] == "refused" and again["epsilon"] == first[-1]["epsilon"]
    ledger = json.loads((tmp_path / "privacy-ledger.json").read_text())
    assert len(ledger["releases"]) == 2 and len(ledger["datasets"]) == 1
    assert "P00001" not in (tmp_path / "privacy-ledger.json").read_text()


def test_a_bare_supernode_takes_its_budget_from_its_own_config_not_the_server(tmp_path):
    server_wants = {
        "epsilon": 50,
        "delta": 0.2,
        "adjacency": "add-remove",
        "test_fraction": 0.9,
        # Dropping patients with gaps: it would let the server learn how many have one.
        "missing_values": "drop",
        "max_weight": 1e30,
    }
    context = node_context({"state-dir": str(tmp_path)}, server_wants)
    _, cfg = hospital_node.hospital_settings(context)
    for name in server_wants:
        assert getattr(cfg, name) == settings.DEFAULTS[name]


def test_a_supernode_without_a_state_directory_is_no_simulated_hospital(tmp_path, monkeypatch):
    # The machine names where simulated hospitals keep their state, but this node is a
    # deployed SuperNode (not in Flower's simulation engine): it neither takes the
    # server's settings nor trains without a state directory of its own.
    monkeypatch.setenv(HOSPITALS_DIR_VARIABLE, str(tmp_path / "hospitals"))
    server_wants = {"epsilon": 50, "adjacency": "add-remove", "max_weight": 1e30}
    context = node_context({}, server_wants)
    _, cfg = hospital_node.hospital_settings(context)
    assert (cfg.epsilon, cfg.adjacency) == (settings.DEFAULTS["epsilon"], "replace-one")
    with pytest.raises(LedgerError, match="no state directory"):
        hospital_node.open_hospital(context)
    assert not (tmp_path / "hospitals").exists()


def test_an_expected_batch_below_one_is_one(tmp_path):
    # 98 patients, batch size 1: the sample rate is 1/98 and int(98 / 98) can be 0.
    x, y = np.random.default_rng(0).random((98, 9), np.float32), np.zeros(98, np.float32)
    model = build_model(9, (16,))
    cfg = settings.resolve({"batch_size": 1, "rounds": 1})
    train_private(model, x, y, cfg, noise_multiplier=1.0)
    assert all(np.isfinite(w).all() for w in get_weights(model))


def test_concurrent_trainings_on_one_hospital_lose_no_release(tmp_path):
    cfg = settings.resolve({"rounds": 4, "num_patients": 1000, "run_dir": str(tmp_path)})
    weights = [w.tolist() for w in get_weights(build_model(9, cfg.hidden_layers))]

    def fit(server_round, run_id):
        args = [json.dumps(vars(cfg)), json.dumps(weights), str(tmp_path), str(server_round)]
        return subprocess.Popen(
            [sys.executable, "-c", FIT_ONE_ROUND, *args, str(run_id)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    runs = [fit(server_round, run_id) for run_id in (7, 8) for server_round in (1, 2)]
    assert all(run.wait(timeout=300) == 0 for run in runs)
    ledger = json.loads((tmp_path / "privacy-ledger.json").read_text())
    releases = ledger["releases"]
    assert sorted((r["run_id"], r["round"]) for r in releases) == [
        ("7", 1),
        ("7", 2),
        ("8", 1),
        ("8", 2),
    ]
    history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in releases]
    assert epsilon_spent(history, 1e-5, "replace-one") <= cfg.epsilon


def test_a_hospital_without_a_state_directory_does_not_train(monkeypatch):
    monkeypatch.delenv(HOSPITALS_DIR_VARIABLE, raising=False)
    context = node_context({})
    with pytest.raises(LedgerError, match="no state directory for its privacy ledger"):
        hospital_node.hospital_state_dir(context, settings.resolve(), 0)


def test_opacus_samples_at_the_calibrated_rate(tmp_path):
    cfg = settings.resolve({"rounds": 1, "num_patients": 1000, "run_dir": str(tmp_path)})
    hospital = Hospital(2, cfg, run_id=1, state_dir=tmp_path)
    report = train_rounds(hospital, 1)[0]
    batches = math.ceil(len(hospital.y) / cfg.batch_size)
    assert report["sample_rate"] == 1 / batches  # not batch_size / n
    assert report["steps"] == batches


def test_hospitals_of_the_same_size_calibrate_once_per_process():
    from securehealth.privacy.accountant import _calibrate

    prior = [[3.0, 0.25, 4]]  # as a ledger read back from JSON holds it
    first = calibrate_noise_multiplier(2.0, 1e-5, 0.5, 2, "replace-one", prior)
    hits = _calibrate.cache_info().hits
    assert calibrate_noise_multiplier(2.0, 1e-5, 0.5, 2, "replace-one", [tuple(prior[0])]) == first
    assert _calibrate.cache_info().hits == hits + 1
    assert epsilon_spent([*prior, (first, 0.5, 2)], 1e-5, "replace-one") <= 2.0


@pytest.mark.parametrize(
    "script, args",
    [
        ("sweep.py", ["--seeds", "1"]),
        ("simulation.py", ["--baselines"]),
    ],
)
def test_tools_that_train_outside_the_ledgers_refuse_real_patients(script, args, tmp_path):
    own = own_data_copy(EXAMPLE, tmp_path / "own")  # examples/csv itself is a demonstration
    csv = ["--dataset", "csv", "--data-dir", str(own), "--run-dir", str(tmp_path / "run")]
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *csv, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--unaccounted-privacy-spend" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
