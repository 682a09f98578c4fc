"""What the report tells a clinician beyond the overall figures.

Subgroups the data dictionary marks, with intervals, and the gaps that end a run
with warnings.
"""

import json

import numpy as np
import pytest
from conftest import EXAMPLE
from sklearn.metrics import roc_auc_score

from securehealth import clinical, report
from securehealth.data.schema import DataError, Schema, Subgroup

AGE_AND_SEX = {
    "label": {"column": "disease", "positive": 1, "negative": 0},
    "features": [
        {"name": "age", "type": "numeric", "min": 20, "max": 90, "subgroups": [50, 65]},
        {
            "name": "sex",
            "type": "categorical",
            "categories": [0, 1],
            "missing": ["?"],
            "subgroups": {"0": "female", "1": "male"},
        },
        {"name": "bmi", "type": "numeric", "min": 15, "max": 50, "missing": ["?"]},
    ],
}


def test_subgroups_are_found_in_encoded_rows_by_band_and_category():
    schema = Schema(AGE_AND_SEX, "test", missing_values="indicator")
    ages = np.array([20.0, 49.9, 50.0, 64.0, 65.0, 90.0])
    sexes = np.array(["0", "1", "?", "1", "0", "1"], dtype=object)
    x = schema.encode(
        {"age": ages, "sex": sexes, "bmi": np.full(6, 25.0)},
        {"sex": sexes == "?", "bmi": np.zeros(6, bool)},
    )
    found = {g.name: g.members.tolist() for g in schema.subgroups(x)}
    assert schema.unrecorded(x) == {"sex": 1}  # bmi is marked with no subgroups
    assert found == {
        "age < 50": [True, True, False, False, False, False],
        "50 <= age < 65": [False, False, True, True, False, False],
        "age >= 65": [False, False, False, False, True, True],
        "sex = female": [True, False, False, False, True, False],  # the "?" is in neither
        "sex = male": [False, True, False, True, False, True],
    }


def test_the_shipped_dictionaries_mark_age_and_sex():
    schema = Schema.load(EXAMPLE / "schema.json", "indicator")
    names = [g.name for g in schema.subgroups(np.zeros((1, len(schema.input_names)), "f4"))]
    assert names == ["age < 50", "50 <= age < 65", "age >= 65", "sex = female", "sex = male"]


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        ({"type": "numeric", "min": 20, "max": 90, "subgroups": [65, 50]}, "ascending order"),
        ({"type": "numeric", "min": 20, "max": 90, "subgroups": [90]}, "strictly between"),
        ({"type": "numeric", "min": 20, "max": 90, "subgroups": True}, "band edges"),
        ({"type": "categorical", "categories": ["a", "b"], "subgroups": [1]}, "true or name"),
        ({"type": "categorical", "categories": ["a", "b"], "subgroups": {"c": "x"}}, "name some"),
        ({"type": "categorical", "categories": ["a", "b"], "subgroups": False}, "subgroups"),
        (
            {"type": "categorical", "categories": [0, 1], "subgroups": {"0": "F", "1": "F"}},
            "own name",
        ),
        (
            {"type": "categorical", "categories": [0, 1], "subgroups": {"0": "F", "0.0": "G"}},
            "once",
        ),
        (
            {"type": "categorical", "categories": [0, 1], "subgroups": {"0": "F", "1": " F"}},
            "own name",
        ),
        ({"type": "numeric", "min": 0, "max": 100, "subgroups": list(range(1, 22))}, "at most 20"),
    ],
)
def test_a_wrong_subgroup_mark_is_one_line(feature, message):
    spec = json.loads(json.dumps(AGE_AND_SEX))
    spec["features"][0] = {"name": "age", **feature}
    with pytest.raises(DataError, match=message) as refused:
        Schema(spec, "dictionary.json")
    assert "\n" not in str(refused.value) and "dictionary.json" in str(refused.value)


def test_auc_interval_matches_the_spread_of_the_auc_over_resampled_patients():
    rng = np.random.default_rng(0)
    y = np.array([1] * 60 + [0] * 140)
    risk = rng.normal(y * 1.2, 1.0)
    auc = roc_auc_score(y, risk)
    low, high = clinical.auc_interval(auc, 60, 140)
    resampled = []
    for _ in range(400):
        pick = np.concatenate([rng.choice(60, 60), 60 + rng.choice(140, 140)])
        resampled.append(roc_auc_score(y[pick], risk[pick]))
    bootstrap_low, bootstrap_high = np.percentile(resampled, [2.5, 97.5])
    assert low < auc < high
    assert abs((high - low) - (bootstrap_high - bootstrap_low)) < 0.2 * (high - low)


def one_worse_subgroup(rng, worse_patients):
    """Reference patients where a model separates the classes well, except in a subgroup.

    The subgroup is the first `worse_patients` patients, where its risks are noise.
    """
    y = rng.permutation(np.array([1, 0] * 300))
    risk = 1 / (1 + np.exp(-rng.normal(np.where(y == 1, 2.0, -2.0), 1.0)))
    worse = np.zeros(len(y), bool)
    worse[:worse_patients] = True
    risk[worse] = rng.uniform(size=worse_patients)
    return y, risk, worse


def test_a_subgroup_the_model_fails_is_flagged_in_the_report():
    y, risk, worse = one_worse_subgroup(np.random.default_rng(1), 150)
    subgroups = [Subgroup("sex", "sex = female", worse), Subgroup("sex", "sex = male", ~worse)]
    figures = clinical.subgroup_figures(subgroups, y, risk, 0.5)
    female, male = figures
    assert female.patients == 150 and female.positives == int(y[worse].sum())
    assert any(gap.startswith("AUC 0.") for gap in female.gaps) and male.gaps == ()
    assert female.auc[1][1] < roc_auc_score(y, risk)  # the interval lies below the whole
    final = {**vars(clinical.Confusion.at(y, risk, 0.5)), "subgroups": [vars(f) for f in figures]}
    section = "\n".join(report.subgroup_section(final))
    assert "| sex = female | 150 (" in section and "below it too): sex = female: AUC 0." in section
    assert "have no recorded" not in section  # everyone is in one of sex's subgroups


def figures_of(members, y, risk):
    return clinical.subgroup_figures([Subgroup("age", "some", members)], y, risk, 0.5)[0]


def test_a_subgroup_below_the_whole_is_flagged_only_beyond_chance_and_with_enough_patients():
    # 300 sick, 240 of them found (0.80).
    y = np.ones(300)
    risk = np.where(np.arange(300) < 240, 0.9, 0.1)
    members = np.zeros(300, bool)
    members[227:247] = True  # 13 found, 7 missed: 0.65 (95% CI 0.43-0.82), within chance
    within = figures_of(members, y, risk)
    assert within.sensitivity[0] == 0.65 and within.sensitivity[1][1] > 0.8
    assert within.gaps == ()
    members[:] = False
    members[240:252] = True  # 0 of 12 found: its interval's upper end (0.24) is below 0.80
    none_found = figures_of(members, y, risk)
    assert none_found.gaps[0].startswith("sensitivity 0.00 (95% CI 0.00 to 0.24)")
    members[245:252] = False  # 0 of 5: as far below, but too few of the class to flag
    too_few = figures_of(members, y, risk)
    assert too_few.sensitivity[1][1] < 0.8 and too_few.gaps == ()


def test_a_subgroup_of_one_class_has_no_auc():
    y = np.array([1, 1, 0, 0])
    members = np.array([True, True, False, False])
    figures = clinical.subgroup_figures([Subgroup("age", "sick only", members)], y, y * 0.9, 0.5)
    assert figures[0].auc is None and figures[0].specificity is None
    assert figures[0].sensitivity[0] == 1.0


def test_calibration_says_which_way_the_risks_are_off():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.05, 0.95, 5000)
    y = (rng.uniform(size=5000) < truth).astype(float)
    logit = np.log(truth / (1 - truth))

    def risks(scale, shift=0.0):
        return 1 / (1 + np.exp(-(logit * scale - shift)))

    calibrated = clinical.Calibration.of(y, truth)
    assert calibrated.slope == pytest.approx(1, abs=0.1) and "match" in calibrated.text()
    compressed = clinical.Calibration.of(y, risks(1 / 3))  # as DP noise tends to leave them
    assert compressed.slope == pytest.approx(3, rel=0.1) and "compressed" in compressed.text()
    assert "too extreme" in clinical.Calibration.of(y, risks(2)).text()
    low = clinical.Calibration.of(y, risks(1, shift=1))
    assert low.mean_risk < low.observed - 0.1 and "under-estimates risk" in low.text()
    assert "near 0: the risks say almost nothing" in clinical.Calibration(0.3, 0.3, 0.02).text()
    assert "inverted" in clinical.Calibration(0.3, 0.3, -0.8).text()
    assert "almost nothing" in clinical.Calibration(0.3, 0.3, -0.06).text()  # noise, not inverted
    # Small risks keep their digits: 0.001 against 0.0005 is not "0.001 against 0.001".
    assert "0.001 against 0.0005 observed" in clinical.Calibration(0.001, 0.0005, 1.0).text()
    # A threefold over-estimate of a rare outcome is not "a match".
    assert "over-estimates risk" in clinical.Calibration(0.06, 0.02, 1.0).text()


def test_band_names_keep_the_edges_as_written_and_tables_keep_names_in_their_cells():
    spec = json.loads(json.dumps(AGE_AND_SEX))
    spec["features"][0]["subgroups"] = [50, 50.000001]
    spec["features"][1]["subgroups"] = {"0": "women | girls", "1": "men\nand boys"}
    schema = Schema(spec, "test", missing_values="indicator")
    x = np.zeros((1, len(schema.input_names)), "f4")
    names = [g.name for g in schema.subgroups(x)]
    assert names[:3] == ["age < 50", "50 <= age < 50.000001", "age >= 50.000001"]
    table = report._table(["Subgroup"], [[name] for name in names[3:]])
    assert table.splitlines()[2:] == ["| sex = women \\| girls |", "| sex = men and boys |"]


def test_a_subgroup_with_few_of_a_class_gets_no_auc_and_no_auc_gap():
    y = np.array([1] * 9 + [0] * 200 + [1] * 100)
    risk = np.concatenate([np.full(9, 0.1), np.full(200, 0.2), np.full(100, 0.9)])
    few = np.zeros(len(y), bool)
    few[:60] = True  # 9 sick, all ranked below the healthy: an AUC of 0
    figures = clinical.subgroup_figures([Subgroup("age", "few", few)], y, risk, 0.5)[0]
    assert figures.auc is None and not any(g.startswith("AUC") for g in figures.gaps)
    assert figures.sensitivity[0] == 0.0  # its sensitivity, with a Wilson interval, is shown
