"""The utility forecast before training.

Silent where the defaults give a useful model, one line where measured runs did not,
and hospitals that cannot train named.
"""

import math
import subprocess
import sys

import pytest
from conftest import EXAMPLE, ROOT, own_data_copy

from securehealth import data, forecast, settings
from securehealth.forecast import HospitalPlan
from securehealth.privacy.ledger import PrivacyLedger
from securehealth.results import default_state_root
from securehealth.state_directory import LEDGER_FILE


def settings_for(*flags):
    cfg = settings.parse(settings.make_parser(""), list(flags), simulation=True)[0]
    data.locate(cfg)
    return cfg


def fresh_forecast(cfg, tmp_path):
    return forecast.forecast_here(cfg, [tmp_path / f"h{h}" for h in range(cfg.num_clients)])


def test_the_ratio_is_the_runs_noise_over_the_largest_signal_it_could_carry():
    alone = [HospitalPlan(0, 100, 1.0, 1, 10.0)]
    # One step of noise std 10/100 on each of 4 weights, against a signal of 1.
    assert forecast.noise_to_signal(alone, rounds=1, weights=4) == pytest.approx(0.2)
    # Twice the steps: the signal doubles, the noise grows by sqrt(2).
    assert forecast.noise_to_signal(alone, rounds=2, weights=4) == pytest.approx(0.2 / math.sqrt(2))
    # Two such hospitals, averaged: the noise of the average falls by sqrt(2).
    pair = [*alone, HospitalPlan(1, 100, 1.0, 1, 10.0)]
    assert forecast.noise_to_signal(pair, rounds=1, weights=4) == pytest.approx(0.2 / math.sqrt(2))
    # A hospital that cannot train adds nothing.
    idle = [*alone, HospitalPlan(1, 100, 1.0, 1, None, "no budget left")]
    assert forecast.noise_to_signal(idle, rounds=1, weights=4) == pytest.approx(0.2)
    assert forecast.noise_to_signal([idle[1]], rounds=1, weights=4) == math.inf


@pytest.mark.parametrize(
    "flags",
    [
        (),
        ("--dataset", "breast-cancer"),
        ("--dataset", "heart-disease", "--num-clients", "4"),
        ("--dataset", "csv", "--data-dir", str(EXAMPLE)),
    ],
)
def test_the_forecast_is_silent_at_the_defaults_on_every_shipped_data_set(flags, tmp_path):
    outlook = fresh_forecast(settings_for(*flags), tmp_path)
    assert outlook.noise_to_signal < forecast.NOISE_TO_SIGNAL_LIMIT and outlook.warning is None


@pytest.mark.parametrize(
    "flags",
    [
        # Measured (5 seeds, README): median AUC 0.40 and 0.54.
        ("--dataset", "csv", "--data-dir", str(EXAMPLE), "--epsilon", "0.1"),
        ("--epsilon", "0.03"),
    ],
)
def test_the_forecast_warns_in_one_line_where_measured_runs_were_not_useful(flags, tmp_path):
    warning = fresh_forecast(settings_for(*flags), tmp_path).warning
    assert warning.startswith("forecast: the DP noise") and "unlikely to be useful" in warning
    assert "\n" not in warning


def test_hospitals_whose_budget_is_spent_are_named_and_the_rest_forecast(tmp_path):
    cfg = settings_for("--dataset", "csv", "--data-dir", str(EXAMPLE))
    for spent in (0, 1):
        spend(tmp_path / f"h{spent}", cfg)
    outlook = fresh_forecast(cfg, tmp_path)
    assert outlook.training == 1
    assert outlook.warning.startswith("forecast: only 1 of the 3 hospitals can train in this run")
    assert "hospital 0: no budget is left" in outlook.warning and "hospital 1:" in outlook.warning
    alone = [p for p in outlook.plans if p.hospital == 2]
    weights = len(data.load_schema(cfg).input_names) + 1  # logistic regression
    assert outlook.noise_to_signal == forecast.noise_to_signal(alone, cfg.rounds, weights)
    # Measured: hospital 2 alone reaches a median AUC of 0.64, so no noise warning.
    assert "unlikely to be useful" not in outlook.warning

    spend(tmp_path / "h2", cfg)
    nobody = fresh_forecast(cfg, tmp_path)
    assert nobody.warning.startswith("forecast: no hospital can train in this run")


def spend(state_dir, cfg):
    """A ledger that an earlier run spent beyond its budget."""
    ledger = PrivacyLedger(state_dir, cfg.epsilon, cfg.delta, cfg.adjacency)
    with ledger.transaction():
        ledger.record("an earlier run", 1, 1.0, 1.0, 10)


def test_bundled_hospitals_are_forecast_as_fresh_ones_leaving_nothing_behind(tmp_path):
    cfg = settings_for()
    fresh = forecast.forecast_here(cfg, None)
    assert fresh == fresh_forecast(cfg, tmp_path)


def test_a_simulation_in_which_no_hospital_can_train_is_refused_before_it_starts(tmp_path):
    data_dir = own_data_copy(EXAMPLE, tmp_path / "data")
    cfg = settings_for("--dataset", "csv", "--data-dir", str(data_dir))
    for hospital in range(3):
        spend(default_state_root() / "simulation" / f"hospital-{hospital}", cfg)
    refused = subprocess.run(
        [sys.executable, str(ROOT / "simulation.py"), "--dataset", "csv"]
        + ["--data-dir", str(data_dir)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and refused.stderr.count("\n") <= 2, refused.stderr
    assert "forecast: no hospital can train in this run" in refused.stderr
    assert "hospital 2: no budget is left" in refused.stderr and "Traceback" not in refused.stderr
    # What to do, where the ledgers are: a new folder for a new cohort, never a reset.
    assert str(default_state_root() / "simulation") in refused.stderr
    assert "for a new cohort of patients point $SECUREHEALTH_HOSPITALS_DIR" in refused.stderr
    assert not (tmp_path / "runs").exists()  # no run directory, no Flower process


def simulate(tmp_path, *flags):
    return subprocess.run(
        [sys.executable, str(ROOT / "simulation.py"), *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_plan_shows_what_each_hospital_would_spend_and_changes_nothing(tmp_path):
    data_dir = own_data_copy(EXAMPLE, tmp_path / "data")
    cfg = settings_for("--dataset", "csv", "--data-dir", str(data_dir))
    ledgers = default_state_root() / "simulation"
    spend(ledgers / "hospital-0", cfg)
    before = (ledgers / "hospital-0" / LEDGER_FILE).read_bytes()
    planned = simulate(tmp_path, "--plan", "--dataset", "csv", "--data-dir", str(data_dir))
    assert planned.returncode == 0, planned.stderr
    rows = {line.split()[1]: line.split() for line in planned.stdout.splitlines() if "│" in line}
    # Hospital 0 spent its budget earlier: it trains with nothing this run.
    assert rows["0"][-2:] == ["nothing", "│"] and rows["0"][-5:-3] == ["/", "1"]
    # Hospital 2 (96 training patients) samples everyone: one step a round, and this
    # run would spend its whole budget with the noise its ledger would plan.
    plan = forecast.forecast_here(cfg, [ledgers / f"hospital-{h}" for h in range(3)]).plans[2]
    assert rows["2"][3:12:2] == ["96", "1.000", "1", f"{plan.noise_multiplier:.3f}", "0.000"]
    assert rows["2"][-2] == "1.000"
    assert "only 2 of the 3 hospitals can train in this run (hospital 0: no budget is left" in (
        " ".join(planned.stdout.split())
    )
    assert "for a new cohort of patients" in planned.stdout
    # Nothing was spent or started: the spent ledger is as it was, the others have
    # no ledger, and there is no run directory.
    assert (ledgers / "hospital-0" / LEDGER_FILE).read_bytes() == before
    assert not any((ledgers / f"hospital-{h}" / LEDGER_FILE).exists() for h in (1, 2))
    assert not (tmp_path / "runs").exists()

    for hospital in (1, 2):
        spend(ledgers / f"hospital-{hospital}", cfg)
    nobody = simulate(tmp_path, "--plan", "--dataset", "csv", "--data-dir", str(data_dir))
    assert "A run with these settings would be refused: no hospital can train" in " ".join(
        nobody.stdout.split()
    )
    assert nobody.returncode == 1  # for a script: the planned run would be refused


def test_the_plan_of_a_demonstration_says_it_spends_nothing_lasting(tmp_path):
    planned = simulate(tmp_path, "--plan", "--dataset", "breast-cancer")
    assert planned.returncode == 0, planned.stderr
    text = " ".join(planned.stdout.split())
    assert "Demonstration data (generated, or shipped with this code, by its" in text
    assert "every run's hospitals start with fresh ledgers" in text
    assert "a useful model is forecast" in text and "Warning" not in text
    assert not (tmp_path / "runs").exists()
    refused = simulate(tmp_path, "--plan", "--reset-ledger", "new patients")
    assert refused.returncode == 2 and "--plan changes nothing" in refused.stderr


@pytest.mark.parametrize("epsilon", [1.0, 1000.0])
def test_the_plan_says_what_the_run_then_spends(tmp_path, epsilon):
    # At epsilon 1000 the noise stops at the least calibration goes to, so a run
    # spends less than the budget: the plan must say so, not "all that is left".
    from securehealth.tools.federation import dp_federation

    flags = ["--data-dir", str(EXAMPLE), "--rounds=2", f"--epsilon={epsilon}"]
    cfg = settings_for("--dataset", "csv", *flags)
    homes = [tmp_path / f"hospital-{h}" for h in range(cfg.num_clients)]
    plans = forecast.forecast_here(cfg, homes, spend=True).plans
    dp_federation(cfg, tmp_path)  # the real hospitals' training and operating point
    for plan, home in zip(plans, homes, strict=True):
        ledger = PrivacyLedger(home, cfg.epsilon, cfg.delta, cfg.adjacency)
        with ledger.transaction():
            assert ledger.epsilon() == pytest.approx(plan.epsilon_after, rel=1e-6)
    assert all(p.epsilon_after < 0.5 * epsilon for p in plans) == (epsilon == 1000.0)
