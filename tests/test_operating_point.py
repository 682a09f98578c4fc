"""The operating point: histograms, their accounting, the threshold and one release per run.

One patient's effect on a hospital's histograms, their accounting as the Gaussian
mechanism the ledger records, the server's choice of a threshold from noisy
histograms, and a hospital's one release per run.
"""

import json
import math
from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
from conftest import EXAMPLE
from flwr.common import Code, EvaluateRes, Status
from scipy.stats import norm
from test_privacy import independent_epsilon, train_rounds

from securehealth import clinical, operating_point, settings
from securehealth.admission import Admission
from securehealth.hospital import Hospital
from securehealth.model import build_model, get_weights
from securehealth.privacy.accountant import epsilon_spent
from securehealth.privacy.ledger import OPERATING_POINT_SHARE
from securehealth.privacy.report import OPERATING_POINT_STATUSES, PrivacyReport, ReportStatus
from securehealth.strategy import HospitalFedAvg


def test_one_patient_moves_the_histograms_by_at_most_their_sensitivity():
    random = np.random.default_rng(0)
    # Extreme, non-finite and ordinary logits: what any model a server sends can give.
    logits = np.concatenate(
        [random.normal(0, 3, 200), [np.nan, np.inf, -np.inf, 1e30, -1e30, 6.0, -6.0]]
    )
    labels = random.integers(0, 2, len(logits))
    before = operating_point.score_histogram(logits, labels)
    # Everyone counts once (a clipped logit's kernel loses its last 0.4 % off the grid).
    assert 0.99 * len(logits) < before.sum() <= len(logits)
    worst_replaced = worst_removed = 0.0
    for i in range(len(logits)):
        for new_logit, new_label in ((random.normal(0, 4), random.integers(0, 2)), (np.nan, 1)):
            changed_logits, changed_labels = logits.copy(), labels.copy()
            changed_logits[i], changed_labels[i] = new_logit, new_label
            after = operating_point.score_histogram(changed_logits, changed_labels)
            worst_replaced = max(worst_replaced, np.linalg.norm(after - before))
        removed = operating_point.score_histogram(np.delete(logits, i), np.delete(labels, i))
        worst_removed = max(worst_removed, np.linalg.norm(removed - before))
    assert worst_replaced <= operating_point.histogram_sensitivity("replace-one") + 1e-12
    assert worst_removed <= operating_point.histogram_sensitivity("add-remove") + 1e-12
    assert worst_removed > 0.9 * operating_point.histogram_sensitivity("add-remove")  # tight


@pytest.mark.parametrize("adjacency", ["replace-one", "add-remove"])
def test_the_release_is_accounted_as_exactly_its_gaussian_mechanism(adjacency):
    # The ledger records the histograms as dp-accounting's Poisson-sampled Gaussian at
    # rate 1 with the noise multiplier z; the noise actually added to each count, over
    # the histograms' own sensitivity, must be the mechanism dp-accounting prices.
    z = 17.3
    std = operating_point.histogram_noise_std(z, adjacency)
    sensitivity = operating_point.histogram_sensitivity(adjacency)
    relation = {
        "replace-one": dp_accounting.NeighboringRelation.REPLACE_ONE,
        "add-remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    }[adjacency]
    # Independently: the Gaussian mechanism with that std and sensitivity, whose PLD
    # is the same for both relations (a shift of `sensitivity` either way).
    direct = dp_accounting.pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=std, sensitivity=sensitivity
    )
    accounted = dp_accounting.pld.PLDAccountant(relation)
    accounted.compose(dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(z)))
    assert accounted.get_epsilon(1e-5) == pytest.approx(direct.get_epsilon_for_delta(1e-5), 1e-3)


def binormal_histograms(random, negatives, positives, hospitals=3, std=0.0):
    """Each hospital's noisy histograms of logits drawn from two normal classes."""
    found = []
    for _ in range(hospitals):
        logits = np.concatenate([random.normal(*c[1:], c[0]) for c in (negatives, positives)])
        labels = np.repeat([0, 1], [negatives[0], positives[0]])
        counts = operating_point.score_histogram(logits, labels)
        found.append(operating_point.Release(operating_point.add_noise(counts, std, random), std))
    return found


def true_rates(point, negatives, positives):
    sensitivity = norm.sf(point.logit, positives[1], positives[2])
    specificity = norm.cdf(point.logit, negatives[1], negatives[2])
    return sensitivity, specificity


def test_the_threshold_lands_where_the_target_is_met_under_the_products_noise():
    random = np.random.default_rng(1)
    # A compressed DP model's scores: 200 negatives and 100 positives per hospital.
    negatives, positives = (200, -1.5, 0.4), (100, -0.5, 0.6)
    std = operating_point.histogram_noise_std(17.3, "replace-one")  # the share at epsilon 1
    best = max(
        norm.sf(t, *positives[1:]) - norm.sf(t, *negatives[1:]) for t in np.linspace(-3, 1, 4001)
    )
    for _ in range(5):
        histograms = binormal_histograms(random, negatives, positives, std=std)
        youden = operating_point.choose(histograms, operating_point.Target("youden"))
        sensitivity, specificity = true_rates(youden, negatives, positives)
        assert sensitivity + specificity - 1 > best - 0.05
        assert youden.expected_sensitivity == pytest.approx(sensitivity, abs=0.15)
        wanted = operating_point.Target.parse("sensitivity:0.9")
        sensitive = operating_point.choose(histograms, wanted)
        assert true_rates(sensitive, negatives, positives)[0] == pytest.approx(0.9, abs=0.1)
    # 0.5, the old accident, calls almost nobody sick here.
    assert norm.sf(0.0, *positives[1:]) < 0.25


def test_too_few_patients_of_a_class_give_no_operating_point():
    random = np.random.default_rng(2)
    for _ in range(5):
        histograms = binormal_histograms(random, (300, -1, 1), (2, 1, 1), std=5.0)
        with pytest.raises(operating_point.NoOperatingPoint, match="positive patients"):
            operating_point.choose(histograms, operating_point.Target("youden"))
    with pytest.raises(operating_point.NoOperatingPoint, match="no hospital"):
        operating_point.choose([], operating_point.Target("youden"))


@pytest.mark.parametrize(
    "setting, target, fixed",
    [
        ("auto", operating_point.Target("youden"), None),
        ("sensitivity:0.9", operating_point.Target("sensitivity", 0.9), None),
        ("specificity:.95", operating_point.Target("specificity", 0.95), None),
        ("0.3", None, 0.3),
    ],
)
def test_decision_threshold_settings(setting, target, fixed):
    assert settings.resolve({"decision_threshold": setting}).decision_threshold == setting
    assert operating_point.Target.parse(setting) == target
    assert operating_point.fixed_threshold(setting) == fixed


@pytest.mark.parametrize("setting", ["", "x", "0", "1", "1.5", "sensitivity:1", "recall:0.9"])
def test_a_wrong_decision_threshold_is_one_line(setting):
    with pytest.raises(settings.SettingsError, match="decision_threshold must be auto"):
        settings.resolve({"decision_threshold": setting})


def csv_hospital(tmp_path, **changes):
    cfg = settings.resolve({"dataset": "csv", "data_dir": str(EXAMPLE), "rounds": 2, **changes})
    return Hospital(0, cfg, run_id=7, state_dir=tmp_path / "state")


def test_a_hospital_releases_its_operating_point_once_within_its_budget(tmp_path):
    hospital = csv_hospital(tmp_path)
    weights = get_weights(build_model(hospital.x.shape[1], hospital.cfg.hidden_layers))
    histograms, report = hospital.release_operating_point(weights, 0)
    assert histograms is None and report["status"] == ReportStatus.DECLINED  # nothing trained yet
    assert "reserved no operating point" in report["reason"]

    trained = train_rounds(hospital, 2)
    assert trained[-1]["epsilon"] < hospital.cfg.epsilon  # room kept for the release
    histograms, report = hospital.release_operating_point(weights, 2)
    assert report["status"] == ReportStatus.RELEASED and histograms.shape == (
        2,
        operating_point.BINS,
    )
    assert histograms.sum() == pytest.approx(len(hospital.y), abs=400)  # noisy counts
    ledger = json.loads(hospital.ledger.path.read_text())
    last = ledger["releases"][-1]
    assert (last["mechanism"], last["sample_rate"], last["steps"]) == ("operating-point", 1, 1)
    released = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in ledger["releases"]]
    assert report["epsilon"] == pytest.approx(epsilon_spent(released, 1e-5, "replace-one"))
    assert independent_epsilon(released, 1e-5, "replace-one") <= report["epsilon"] + 1e-3
    assert 0.95 * hospital.cfg.epsilon <= report["epsilon"] <= hospital.cfg.epsilon
    # Its noise alone would cost OPERATING_POINT_SHARE of the budget it started with.
    alone = epsilon_spent([(last["noise_multiplier"], 1.0, 1)], 1e-5, "replace-one")
    assert alone == pytest.approx(OPERATING_POINT_SHARE * hospital.cfg.epsilon, abs=2e-3)
    assert json.loads(report["releases"])[-1]["mechanism"] == "operating-point"

    # A server asking again learns nothing more: the noise cannot be averaged away.
    again, report = hospital.release_operating_point(weights, 2)
    assert again is None and report["status"] == ReportStatus.DECLINED
    assert "released already" in report["reason"]
    assert len(json.loads(hospital.ledger.path.read_text())["releases"]) == len(released)


def test_a_fixed_threshold_reserves_and_releases_nothing(tmp_path):
    hospital = csv_hospital(tmp_path, decision_threshold="0.3")
    trained = train_rounds(hospital, 2)
    assert trained[-1]["epsilon"] == pytest.approx(hospital.cfg.epsilon, abs=0.01)
    weights = get_weights(build_model(hospital.x.shape[1], hospital.cfg.hidden_layers))
    histograms, report = hospital.release_operating_point(weights, 2)
    assert histograms is None and report["status"] == ReportStatus.DECLINED


def test_a_crafted_final_model_is_refused_before_anything_is_released(tmp_path):
    hospital = csv_hospital(tmp_path)
    weights = get_weights(build_model(hospital.x.shape[1], hospital.cfg.hidden_layers))
    train_rounds(hospital, 2)
    crafted = [np.full_like(w, np.nan) for w in weights]
    histograms, report = hospital.release_operating_point(crafted, 2)
    assert histograms is None and "malformed final model" in report["reason"]
    assert "operating-point" not in hospital.ledger.path.read_text()


def test_a_useless_model_is_called_useless():
    y = np.array([0] * 90 + [1] * 10)
    risk = np.full(100, 0.2)
    confusion = clinical.Confusion.at(y, risk, 0.5)
    final = {"auc": 0.5, "accuracy": 0.9, "sensitivity": 0.0, "specificity": 1.0}
    found = clinical.usefulness_warnings(final, confusion, 3, 2, {"chosen": True})
    assert any("every reference patient negative" in w for w in found)
    assert any("below 0.6" in w for w in found)
    assert any("no better than calling everyone the majority class" in w for w in found)
    assert any("only 2 of the 3 hospitals" in w for w in found)
    good = {"auc": 0.9, "accuracy": 0.8, "sensitivity": 0.8, "specificity": 0.8}
    risk = np.where(y == 1, 0.9, 0.1)
    assert clinical.usefulness_warnings(good, clinical.Confusion.at(y, risk, 0.5), 3, 3, None) == []
    assert confusion.majority_accuracy == 0.9 and math.isclose(confusion.prevalence, 0.1)


def operating_point_reply(number, counts, **changes):
    """A hospital's reply to the request for its operating point, with `changes` to its report.

    The reply is as an honest hospital sends it (Hospital.release_operating_point).
    """
    release = {
        "round": 10,
        "noise_multiplier": 17.3,
        "sample_rate": 1.0,
        "steps": 1,
        "adjacency": "replace-one",
        "mechanism": "operating-point",
        "this_run": True,
    }
    report = {
        "hospital": number,
        "patients": 300,
        "status": "released",
        "reason": "",
        "epsilon": 1.0,
        "epsilon_budget": 1.0,
        "delta": 1e-5,
        "adjacency": "replace-one",
        "accountant": "pld",
        "noise_multiplier": 20.0,
        "sample_rate": 0.5,
        "steps": 20,
        "ledger_reset": "",
        "releases": json.dumps([release]),
        "histograms": json.dumps(np.asarray(counts).tolist()),
        **changes,
    }
    return EvaluateRes(Status(Code.OK, ""), 0.0, 0, report)


def trained_report(number):
    """What hospital `number` reported after training in this run: 300 patients."""
    metrics = dict(operating_point_reply(number, []).metrics)
    del metrics["histograms"]
    released = PrivacyReport.read(
        metrics,
        hospital=number,
        num_examples=0,
        previous=None,
        max_patients=10000,
        statuses=OPERATING_POINT_STATUSES,
    )
    return replace(released, status=ReportStatus.TRAINED, epsilon=0.9)


def test_a_hostile_hospitals_operating_point_is_refused_and_the_others_choose_it(tmp_path):
    cfg = settings.resolve({"secure_aggregation": "off", "global_test_patients": 200})
    admission = Admission(None, cfg, run_id=1)
    admission.members = {10 + hospital: hospital for hospital in range(3)}
    strategy = HospitalFedAvg(cfg, tmp_path, admission)
    # Each trained in this run as a hospital of 300 patients (its FedAvg weight).
    strategy.trained = {str(h): trained_report(h) for h in range(3)}
    strategy.reports = dict(strategy.trained)
    random = np.random.default_rng(3)
    std = operating_point.histogram_noise_std(17.3, "replace-one")
    honest = [
        r.histograms for r in binormal_histograms(random, (200, -1.5, 0.5), (100, 0, 0.6), 2, std)
    ]
    op_release = json.loads(operating_point_reply(0, honest[0]).metrics["releases"])[0]
    flood = np.zeros((2, operating_point.BINS))
    flood[1, 0] = 3000  # "3000 positives" from a hospital of 300
    huge = np.full((2, operating_point.BINS), 1e308)
    loud = {**op_release, "noise_multiplier": 1e200}
    hostile = {
        "its report lists 0 operating-point releases": {"releases": "[]"},
        "its report lists 2 operating-point releases": {"releases": json.dumps([op_release] * 2)},
        "adjacency 'x'": {"releases": json.dumps([{**op_release, "adjacency": "x"}])},
        "counts its patients cannot give": {"histograms": json.dumps(huge.tolist())},
        "cannot give": {"histograms": json.dumps(flood.tolist())},
        "exceeds its patients": {"releases": json.dumps([loud])},
        "not 2 finite rows": {"histograms": json.dumps((huge * 0 + np.nan).tolist())},
        "not a list of numbers": {"histograms": "[[1, 2"},
        "not a list of numbers ": {"histograms": f"[[1{'0' * 400}]]"},  # overflows a float
        # Claiming more patients than it trained with, to flood the histograms.
        "its training reports in this run said 300": {
            "patients": 3000,
            "histograms": json.dumps((flood + honest[0]).tolist()),
        },
    }
    for reason, changes in hostile.items():
        strategy.choose_operating_point(
            {
                10: operating_point_reply(0, honest[0]),
                11: operating_point_reply(1, honest[1]),
                12: operating_point_reply(2, honest[0], **changes),
            }
        )
        chosen = strategy.record.results["operating_point"]
        assert chosen["chosen"] and chosen["histograms"] == 2, reason
        assert chosen["hospitals"]["2"]["status"] == "rejected"
        assert reason.strip() in chosen["hospitals"]["2"]["reason"]
        assert 0.05 < strategy.threshold < 0.6
