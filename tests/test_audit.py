"""Tests of the privacy audit and the privacy-utility sweep.

The audit is the one-run canary audit and the membership-inference attack.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import EXAMPLE, ROOT, own_data_copy
from PIL import Image

from securehealth import data, settings
from securehealth.model import build_model
from securehealth.privacy import dpsgd
from securehealth.privacy.schedule import sample_rate_and_steps
from securehealth.tools import audit, canary_audit, lower_bounds


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


# --- The one-run canary audit -------------------------------------------------


@pytest.mark.parametrize("guesses", [10, 100, 1000])
def test_all_guesses_right_give_the_theorems_bound(guesses):
    # delta 0: the chance of r right out of r under eps-DP is at most p^r, p = e^eps/(1+e^eps);
    # the bound is the eps where p^r = 1 - confidence.
    p = 0.05 ** (1 / guesses)
    exact = math.log(p / (1 - p))
    assert lower_bounds.epsilon_lower_bound(
        guesses, guesses, guesses, delta=0.0, confidence=0.95
    ) == pytest.approx(exact, abs=1e-3)


def test_a_hundred_right_guesses_of_a_hundred_prove_epsilon_3_49():
    assert lower_bounds.epsilon_lower_bound(100, 100, 100, 0.0, 0.95) == pytest.approx(
        3.49, abs=0.01
    )


def test_chance_guessing_proves_nothing():
    rng = np.random.default_rng(0)
    coins = rng.integers(0, 2, 2000)
    scores = rng.standard_normal(2000)  # scores that know nothing of the coins
    for analysis in lower_bounds.ANALYSES:
        found = lower_bounds.audit_guesses(scores, coins, 1e-5, 0.95, analysis)
        assert found["epsilon"] < 0.1, found
    assert lower_bounds.epsilon_lower_bound(1000, 400, 200, 1e-5) == 0.0


def test_delta_adds_the_theorems_term():
    # p = P[Bin(r, q) >= v] + 2 m delta max_i P[v - i <= Bin(r, q) < v] / i, by brute force.
    m, r, v, eps, delta = 50, 20, 15, 0.7, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    term = max(sum(pmf[v - i : v]) / i for i in range(1, v + 1))
    expected = sum(pmf[v:]) + 2 * m * delta * term
    assert lower_bounds.p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)
    assert lower_bounds.epsilon_lower_bound(m, r, v, delta) < lower_bounds.epsilon_lower_bound(
        m, r, v, 0.0
    )


def _gaussian_epsilon(mu, delta):
    """epsilon of mu-Gaussian DP at delta (Dong, Roth and Su)."""
    from scipy import optimize, stats

    def excess(eps):
        return (
            stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
            - delta
        )

    return optimize.brentq(excess, 0, 50)


def test_the_gaussian_analysis_is_sound_and_tighter():
    # An exactly mu-GDP release of each coin: a score N(+-mu/2, 1). Its true epsilon must
    # be refuted rarely (at most 5% of audits at 95% confidence), and the Gaussian
    # analysis proves more than the (epsilon, delta) one from the same guesses.
    mu, delta, trials = 1.0, 1e-5, 20
    true_epsilon = _gaussian_epsilon(mu, delta)
    rng = np.random.default_rng(1)
    found = {a: [] for a in lower_bounds.ANALYSES}
    for _ in range(trials):
        coins = rng.integers(0, 2, 1000)
        scores = rng.standard_normal(1000) + mu * (coins - 0.5)
        for analysis in lower_bounds.ANALYSES:
            found[analysis].append(lower_bounds.audit_guesses(scores, coins, delta, 0.95, analysis))
    gaussian = np.array([f["epsilon"] for f in found["gaussian"]])
    epsilon_delta = np.array([f["epsilon"] for f in found["epsilon-delta"]])
    assert (gaussian > true_epsilon).sum() <= 2 and (epsilon_delta > true_epsilon).sum() <= 2
    assert gaussian.mean() > 1.2 * epsilon_delta.mean() > 0.5


def _tiny(**overrides):
    return settings.resolve(
        {"num_patients": 1500, "global_test_patients": 200, "rounds": 3, **overrides}
    )


def test_white_box_scores_are_the_canaries_clipped_gradients(tmp_path):
    # Without noise a canary weight moves only by its own canary's clipped gradient:
    # towards its coin's version, by at most max_grad_norm a step.
    cfg = _tiny()
    patients = [data.hospital_data(cfg, h) for h in range(cfg.num_clients)]
    canaries = canary_audit.Canaries.draw(300, 20, patients[0][0][0], cfg.adjacency)
    facts, updates, _ = canary_audit.train_variant(cfg, "no-noise", canaries, patients, tmp_path)
    scores = canaries.white_box_scores(updates)
    moved = scores != 0
    assert moved.mean() > 0.8  # most canaries were sampled in 3 rounds
    assert np.all((scores[moved] > 0) == (canaries.white_coins[moved] == 1))
    sample_rate, steps = sample_rate_and_steps(facts["patients"], cfg)
    rows = facts["patients"] + 300 + 20  # Opacus divides by the expected batch of all rows
    # Each step moves a weight by at most lr * C / (expected batch), carried by momentum.
    carried = sum((1 - cfg.momentum**j) / (1 - cfg.momentum) for j in range(1, steps + 1))
    most = cfg.rounds * cfg.learning_rate * cfg.max_grad_norm / int(sample_rate * rows) * carried
    assert np.abs(scores).max() <= most * 1.001
    assert np.abs(scores).max() > most / 20  # moved by the clipped gradient, not a trace


def test_the_audited_hospital_samples_at_its_patients_rate(tmp_path):
    # The canaries ride along: the mechanism audited is the hospital's own, its sample
    # rate and steps those of its patients, as in the run audited.
    cfg = _tiny()
    patients = [data.hospital_data(cfg, h) for h in range(cfg.num_clients)]
    canaries = canary_audit.Canaries.draw(2000, 20, patients[0][0][0], cfg.adjacency)
    facts, _, _ = canary_audit.train_variant(cfg, "product", canaries, patients, tmp_path)
    n = len(patients[0][0][1])
    sample_rate, steps = sample_rate_and_steps(n, cfg)
    assert (facts["patients"], facts["sample_rate"]) == (n, sample_rate)
    assert facts["steps"] == cfg.rounds * steps
    assert facts["claimed_epsilon"] == pytest.approx(cfg.epsilon, rel=1e-3)


def test_the_coins_are_secret():
    x = np.zeros((10, 9), np.float32)
    draws = [canary_audit.Canaries.draw(200, 50, x, "replace-one") for _ in range(2)]
    assert not np.array_equal(draws[0].white_coins, draws[1].white_coins)
    assert not np.array_equal(draws[0].black_coins, draws[1].black_coins)


def test_patients_never_move_the_canary_weights(tmp_path):
    cfg = _tiny(rounds=2)
    patients = [data.hospital_data(cfg, h) for h in range(cfg.num_clients)]
    canaries = canary_audit.Canaries.draw(50, 0, patients[0][0][0], "add-remove")
    canaries.white_coins[:] = 0  # add-remove: no canary is there
    _, updates, _ = canary_audit.train_variant(cfg, "no-noise", canaries, patients, tmp_path)
    assert np.all(np.asarray(updates) == 0)


def test_the_half_noise_variant_halves_the_released_noise_and_nothing_else(tmp_path):
    # No canary present (add-remove, every coin 0): the canary weights' updates are the
    # DP noise alone. The broken variant's ledger, claim and settings are the product's.
    cfg = _tiny(adjacency="add-remove")
    patients = [data.hospital_data(cfg, h) for h in range(cfg.num_clients)]
    canaries = canary_audit.Canaries.draw(2000, 0, patients[0][0][0], "add-remove")
    canaries.white_coins[:] = 0
    found = {}
    for name in ("product", "half-noise"):
        facts, updates, _ = canary_audit.train_variant(
            cfg, name, canaries, patients, tmp_path / name
        )
        ledger = json.loads((tmp_path / name / "hospital-0" / "privacy-ledger.json").read_text())
        found[name] = (
            facts["claimed_epsilon"],
            ledger["releases"][-1]["noise_multiplier"],
            float(np.std(updates)),
        )
    (claim, recorded, noise), (half_claim, half_recorded, half_noise) = found.values()
    assert (half_claim, half_recorded) == (claim, recorded)
    assert half_noise / noise == pytest.approx(0.5, rel=0.05)


def _variant(verdict, must_fail, bound=0.5):
    return {
        "description": "a variant",
        "claimed_epsilon": 1.0,
        "analysis": "gaussian",
        "lower_bound": bound,
        "verdict": verdict,
        "must_fail": must_fail,
    }


@pytest.mark.parametrize(
    ("product", "broken", "shuffled", "outcome"),
    [
        ("PASS", "FAIL", "PASS", "PASS"),
        ("PASS", "FAIL", "FAIL", "PASS"),  # shuffled batches: reported only
        ("FAIL", "FAIL", "PASS", "FAIL"),
        ("PASS", "PASS", "PASS", "INCONCLUSIVE"),  # a broken variant not caught
    ],
)
def test_the_verdict(product, broken, shuffled, outcome):
    variants = {
        "product": _variant(product, False),
        "half-noise": _variant(broken, True, 1.4),
        "no-noise": _variant("FAIL", True, 9.0),
        "shuffled-batches": _variant(shuffled, None),
    }
    assert canary_audit.verdict(variants)["outcome"] == outcome


def test_the_self_test_on_tiny_settings(tmp_path):
    # One round and 500 canaries: "noise for one round used for all" is the product
    # itself, and half the noise is beyond these canaries' power, so the audit must say
    # it is inconclusive, not pass. The product stays within its claim; without noise
    # the audit is far above it.
    run_dir = tmp_path / "audit"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "audit.py"),
            "--self-test",
            "--rounds",
            "1",
            "--num-patients",
            "1500",
            "--canaries",
            "500",
            "--run-dir",
            str(run_dir),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    audit = json.loads((run_dir / "audit.json").read_text())["canary_audit"]
    assert audit["outcome"] == "INCONCLUSIVE", audit["summary"]
    variants = audit["variants"]
    assert variants["product"]["verdict"] == "PASS"
    # One round of 5 steps is far from the Gaussian curve: the (epsilon, delta)
    # analysis decides.
    assert {v["analysis"] for v in variants.values()} == {"epsilon-delta"}
    assert variants["no-noise"]["verdict"] == "FAIL"
    assert variants["no-noise"]["lower_bound"] > 2 * variants["no-noise"]["claimed_epsilon"]
    broken = variants["one-round-accounting"]
    assert broken["epsilon_of_noise_used"] == pytest.approx(broken["claimed_epsilon"], rel=1e-2)
    assert "lower bound" in audit["summary"] and "95% confidence" in audit["summary"]
    assert (
        "INCONCLUSIVE" in result.stdout
        and "| The product as it is |" in (run_dir / "audit.md").read_text()
    )
    with Image.open(run_dir / "audit.png") as image:
        image.verify()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset", "csv", "--data-dir", "own"], "never on your own patients"),
        (["--canaries", "1"], "canaries must be 10 to 50000, got 1"),
        (["--canaries", "100000"], "canaries must be 10 to 50000, got 100000"),
        (["--rounds", "1000000"], "use at most 100 rounds, not 1000000"),
    ],
)
def test_the_self_test_refuses_what_it_cannot_do_in_one_line(tmp_path, flags, message):
    own_data_copy(EXAMPLE, tmp_path / "own")
    result = subprocess.run(
        [sys.executable, str(ROOT / "audit.py"), "--self-test", *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_self_test_never_overwrites_a_training_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"status": "finished"}')
    (run_dir / "audit.json").write_text('{"canary_audit": {}}')
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "audit.py"),
            "--self-test",
            "--run-dir",
            str(run_dir),
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "holds a training run (metrics.json)" in result.stderr
    assert (run_dir / "metrics.json").exists()


def test_the_gaussian_premise_is_checked_as_far_as_its_delta_reaches():
    # A claim of epsilon 30 (q 1/13, 130 steps): the claim's delta is 2.9 times the
    # Gaussian's at epsilon 33, where the Gaussian's is still 4.7e-7.
    pld = canary_audit.claim_pld(30.0, 1e-5, 1 / 13, 130, "replace-one")
    assert not lower_bounds.gaussian_premise_holds(pld.get_delta_for_epsilon, 30.0, 1e-5)


@pytest.mark.parametrize(("rounds", "holds"), [(10, True), (1, False)])
def test_the_gaussian_premise_is_checked_at_the_audited_settings(rounds, holds):
    # The Gaussian analysis refutes a claim only where the claimed releases' privacy
    # curve lies within the Gaussian one at the claim. At the defaults (hospital 0's
    # 1600 patients: 10 rounds of 13 steps at sample rate 1/13) it does; one round of
    # 13 steps is far from Gaussian (its delta up to 1.55 times the Gaussian's).
    from securehealth.privacy.accountant import calibrate_noise_multiplier

    cfg = settings.resolve({})
    sample_rate, steps = sample_rate_and_steps(1600, cfg)
    sigma = calibrate_noise_multiplier(1.0, 1e-5, sample_rate, rounds * steps, "replace-one")
    pld = canary_audit.independent_pld([(sigma, sample_rate, rounds * steps)], "replace-one")
    assert lower_bounds.gaussian_premise_holds(pld.get_delta_for_epsilon, 1.0, 1e-5) == holds
    # The Gaussian mechanism itself passes; a less private one does not (replace-one:
    # two records' gradients lie twice the clipping bound apart).
    exact = canary_audit.independent_pld(
        [(2 / lower_bounds.gaussian_mu(1.0, 1e-5), 1.0, 1)], "replace-one"
    )
    assert lower_bounds.gaussian_premise_holds(exact.get_delta_for_epsilon, 1.0, 1e-5)
    assert not lower_bounds.gaussian_premise_holds(exact.get_delta_for_epsilon, 0.9, 1e-5)


def test_the_canaries_catch_a_product_whose_accounting_is_wrong(monkeypatch, tmp_path):
    # A planted bug in the product's accountant: replace-one accounted as add-remove,
    # so the hospital calibrates too little noise and claims the budget. Only the
    # released updates give it away, and the audit sees them.
    from securehealth.privacy import accountant

    real = accountant._accountant
    monkeypatch.setattr(accountant, "_accountant", lambda adjacency: real("add-remove"))
    accountant._epsilon.cache_clear()
    accountant._calibrate.cache_clear()
    cfg = settings.resolve({"max_patients": 30000})  # the canaries join hospital 0's rows
    patients = [data.hospital_data(cfg, h) for h in range(cfg.num_clients)]
    # Twice the self-test's canaries: its true epsilon (2.0 for a claim of 1) goes
    # unrefuted in about 1 audit in 150 (simulated Gaussian scores at its separation;
    # 1 in 20 with the self-test's 10,000).
    canaries = canary_audit.Canaries.draw(20000, 20, patients[0][0][0], cfg.adjacency)
    try:
        product = canary_audit.audit_variant(cfg, "product", canaries, patients, tmp_path)
    finally:
        accountant._epsilon.cache_clear()
        accountant._calibrate.cache_clear()
    assert product["claimed_epsilon"] == pytest.approx(1.0, rel=1e-3)
    assert product["verdict"] == "FAIL", product["lower_bound"]
    assert product["lower_bound"] > 1.0


def test_the_canaries_are_not_refused_by_the_servers_cap_on_a_hospital(tmp_path):
    # 600 training patients, the cap at 600: the audit's hospital 0 holds 920 rows.
    cfg = _tiny(max_patients=600)
    result = canary_audit.run(cfg, white=300, black=20)
    assert result["variants"]["product"]["patients"] == 600
    assert result["variants"]["product"]["verdict"] == "PASS"
