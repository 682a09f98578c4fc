"""What a person reads: round lines and the summary, also when hospitals fail."""

import re

from flwr.app import Error
from rich.console import Console

from securehealth import display, report, settings
from securehealth.strategy import failure_reason

HOSPITAL = {
    "epsilon": 0.42,
    "epsilon_budget": 1.0,
    "delta": 1e-5,
    "noise_multiplier": 3.5,
    "sample_rate": 0.1,
    "steps": 20,
    "adjacency": "replace-one",
    "accountant": "pld",
    "releases": [{"noise_multiplier": 3.5, "sample_rate": 0.1, "steps": 20}],
    "ledger_reset": "",
    "patients": 160,
    "status": "trained",
}
GLOBAL = {
    "auc": 0.8,
    "accuracy": 0.75,
    "sensitivity": 0.5,
    "specificity": 0.9,
    "precision": 0.6,
    "f1": 0.55,
    "brier": 0.17,
    "loss": 0.5,
    "threshold": 0.5,
}
FINAL = {
    **GLOBAL,
    "true_positives": 30,
    "false_negatives": 30,
    "false_positives": 14,
    "true_negatives": 126,
    "prevalence": 0.3,
}


def metrics_with_a_failed_hospital():
    return {
        "status": "finished",
        "rounds": [
            {
                "round": 1,
                "global": GLOBAL,
                "hospitals_trained": 1,
                "failures": ["disk full"],
                "hospitals": {"0": HOSPITAL},
            }
        ],
        "final": {"global": FINAL},
        "warnings": ["only 1 of the 2 hospitals trained in the last round"],
        "data": {"test_patients": 200},
        "privacy": {
            "target_epsilon": 1.0,
            "delta": 1e-5,
            "adjacency": "replace-one",
            "accountant": "pld",
            "hospitals": {"0": HOSPITAL, "1": {"status": "no report"}},
        },
    }


def test_round_line_shows_progress_and_names_failures():
    cfg = settings.resolve({"num_clients": 2, "rounds": 5})
    line = display.round_line(metrics_with_a_failed_hospital()["rounds"][0], cfg)
    assert "Round   1/5" in line and "AUC 0.800" in line and "max epsilon 0.420 / 1" in line
    assert "(1/2 hospitals trained)" in line and "disk full" in line


def test_summary_shows_every_hospital_and_warns_about_failures():
    console = Console(record=True, width=150)
    metrics = metrics_with_a_failed_hospital()
    metrics["final"]["global"] = {
        **FINAL,
        "subgroups": [
            {"subgroup": "age < 50", "gaps": ["sensitivity 0.20 (95% CI 0.11 to 0.32) ..."]},
            {"subgroup": "age >= 50", "gaps": []},
        ],
    }
    display.print_summary(metrics, "runs/x", console)
    text = console.export_text()
    assert "Subgroup gaps: age < 50 (figures well below" in text and "age >= 50 (" not in text
    assert "0.4200" in text and "3.5000" in text and "160" in text
    assert re.search(r"│\s+1 │\s+- │", text)  # the hospital that never reported
    assert "hospitals failed in rounds [1]" in text
    assert "30 of 60 sick patients found, 14 false alarms among 140" in text
    assert "fixed by the decision_threshold setting" in text
    last = text.strip().splitlines()
    assert "Finished with warnings: only 1 of the 2 hospitals trained" in " ".join(last[-3:])
    assert display.shortfalls(metrics_with_a_failed_hospital()) != []


def test_a_round_nobody_trained_in_is_named_with_the_reasons():
    declined = {**HOSPITAL, "status": "refused", "reason": "epsilon spent 0.9999 of 1"}
    record = {
        "round": 2,
        "global": GLOBAL,
        "hospitals_trained": 0,
        "failures": [],
        "hospitals": {"0": declined},
    }
    line = display.round_line(record, settings.resolve())
    assert "hospital 0 declined" in line and "0.9999 of 1" in line
    metrics = {"rounds": [record]}
    assert display.idle_rounds(metrics) == [2]
    assert "no hospital trained in rounds [2]" in display.shortfalls(metrics)[0]


def test_failure_reason_unwraps_flowers_error_message():
    reason = "<class 'ClientAppException'>:<'\nException ClientAppException occurred. "
    reason += "Message: boom in hospital'>"
    assert failure_reason(Exception(Error(code=0, reason=reason))) == "boom in hospital"


def test_the_report_explains_predictive_values_a_low_accuracy_and_a_fit_that_disagrees():
    # FINAL: 30 of 60 sick found (sensitivity 0.5, 95% CI 0.38-0.62), 126 of 140 healthy.
    point = {
        "chosen": True,
        "target": "largest Youden's J",
        "histograms": 3,
        "expected_sensitivity": 0.91,  # outside the reference set's interval
        "expected_specificity": 0.88,  # inside it
    }
    metrics = {"final": {"global": {**FINAL, "accuracy": 0.65}}, "operating_point": point}
    text = " ".join(report.operating_point_section(metrics))
    assert "68.2% of those called sick are sick (PPV)" in text  # 30 of 44
    assert "80.8% of those called healthy are healthy (NPV)" in text  # 126 of 156
    assert "Accuracy 0.650 is below the 0.700 of calling everyone the majority class" in text
    assert "the fit expected sensitivity 0.91, outside the reference set's 95% CI 0.38" in text
    assert "specificity 0.88" not in text.split("disagree")[1]
    metrics["final"]["global"]["accuracy"] = 0.78
    point["expected_sensitivity"] = 0.52
    text = " ".join(report.operating_point_section(metrics))
    assert "majority class" not in text.split("Wilson")[1] and "disagree" not in text
