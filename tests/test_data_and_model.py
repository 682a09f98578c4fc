import json
import math

import jsonschema
import numpy as np
import pytest
import torch
from conftest import ROOT
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

import data_utils
from securehealth import settings
from securehealth.data import split
from securehealth.data.schema import STRUCTURE
from securehealth.model import (
    build_model,
    clinical_metrics,
    get_weights,
    load_model,
    predict_risk,
    save_model,
    set_weights,
)


@pytest.fixture(params=["synthetic", "breast-cancer"])
def cfg(request):
    return settings.resolve({"dataset": request.param})


def test_hospitals_are_seeded_and_reproducible(cfg):
    (x1, y1), (tx1, ty1) = data_utils.hospital_data(cfg, 1)
    (x2, y2), (tx2, ty2) = data_utils.hospital_data(cfg, 1)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and np.array_equal(tx1, tx2)
    other_seed = settings.resolve({**vars(cfg), "seed": cfg.seed + 1})
    assert not np.array_equal(x1, data_utils.hospital_data(other_seed, 1)[0][0])


def test_hospital_sizes_differ_and_splits_are_disjoint(cfg):
    train = [data_utils.hospital_data(cfg, h) for h in range(3)]
    sizes = [len(t[0][1]) + len(t[1][1]) for t in train]
    assert sizes[0] > sizes[1] > sizes[2]
    for (_, y), (_, ty) in train:
        assert len(ty) == split.test_size(len(y) + len(ty), cfg.test_fraction)
    # No patient is in two places: hospitals, held-out rows and the server's set.
    rows = [r.tobytes() for (x, _), (tx, _) in train for r in (*x, *tx)]
    rows += [r.tobytes() for r in data_utils.reference_test_set(cfg)[0]]
    assert len(rows) == len(set(rows))


def test_synthetic_hospitals_are_non_iid():
    cfg = settings.resolve()
    hospitals = [data_utils.hospital_data(cfg, h)[0] for h in range(3)]
    age = data_utils.load_schema(cfg).input_names.index("age")
    ages = [x[:, age].mean() for x, _ in hospitals]
    prevalence = [y.mean() for _, y in hospitals]
    assert max(ages) - min(ages) > 0.1  # scaled units: about 4 years
    assert max(prevalence) - min(prevalence) > 0.1


def test_breast_cancer_is_the_real_data_set():
    cfg = settings.resolve({"dataset": "breast-cancer"})
    parts = [data_utils.hospital_data(cfg, h) for h in range(3)]
    test_x, test_y, _ = data_utils.reference_test_set(cfg)
    patients = len(test_y) + sum(len(t[0][1]) + len(t[1][1]) for t in parts)
    malignant = test_y.sum() + sum(t[0][1].sum() + t[1][1].sum() for t in parts)
    assert (patients, malignant) == (569, 212)
    assert test_x.shape[1] == 30


def test_encoding_comes_from_the_data_dictionary_alone():
    schema = data_utils.Schema(
        {
            "label": {"column": "sick", "positive": "yes", "negative": "no"},
            "features": [
                {"name": "age", "type": "numeric", "min": 20, "max": 80},
                {"name": "crp", "type": "numeric", "min": 0, "max": 99, "log": True},
                {"name": "sex", "type": "categorical", "categories": ["f", "m"]},
            ],
        },
        "test",
    )
    assert schema.input_names == ["age", "crp", "sex=f", "sex=m"]
    columns = {
        "age": np.array([20, 50, 80, 200]),
        "crp": np.array([0, 9, 99, 1]),
        "sex": np.array(["f", "m", "m", "f"]),
    }
    x = schema.encode(columns)
    assert np.allclose(x[:, 0], [-1, 0, 1, 1])  # declared range -> [-1, 1], clipped
    assert x[0, 1] == -1 and x[2, 1] == 1 and -1 < x[1, 1] < 1  # log-scaled range
    assert np.array_equal(x[:, 2:], [[1, 0], [0, 1], [0, 1], [1, 0]])
    # A row's encoding does not depend on the other rows (no statistics of the data):
    # the same patient gets the same inputs at every hospital.
    alone = schema.encode({k: v[1:2] for k, v in columns.items()})
    assert np.array_equal(alone[0], x[1])
    assert np.array_equal(schema.labels(np.array(["yes", "no"])), [1, 0])


def test_numbers_are_matched_as_numbers_and_only_as_numbers():
    schema = data_utils.Schema(
        {
            "label": {"column": "y", "positive": [1, 2], "negative": 0},
            "features": [
                {"name": "a", "type": "categorical", "categories": [0, 1], "missing": ["?"]},
            ],
        },
        "test",
        "indicator",
    )
    cells = np.array(["1", "1.0", "01", "+1", "1e0", "1_0", "\uff11", "nan", "x"])
    assert schema.categories_of(schema.features[0], cells).tolist() == [
        *["1"] * 5,
        *[""] * 4,  # Python's float() would read the first two as 10 and 1
    ]
    assert schema.labels(np.array(["2.0", "0", "3"])).tolist() == [1, 0, 0]
    assert schema.is_label(np.array(["2.0", "0", "3"])).tolist() == [True, True, False]
    # A declared categorical fill is the category it names, written either way.
    filled = dict(schema.features[0], fill="1.0")
    schema.features[0] = filled
    x = schema.encode({"a": np.array(["", "0"], dtype=object)}, {"a": np.array([True, False])})
    assert x.tolist() == [[0, 1, 1], [1, 0, 0]]


LABEL = {"column": "y", "positive": 1, "negative": 0}
A = {"name": "a", "type": "numeric", "min": 0, "max": 1}


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"features": []}, "the data dictionary: 'label' is a required property"),
        ([1, 2], "the data dictionary: \\[1, 2\\] is not of type 'object'"),
        ({"label": "chd", "features": []}, "label: 'chd' is not of type 'object'"),
        ({"label": LABEL, "features": "age"}, "features: 'age' is not of type 'array'"),
        ({"label": LABEL, "features": [1, 2]}, "features\\[\\d\\]: \\d is not of type 'object'"),
        (
            {"label": {"column": "y", "positive": [1, 2], "negative": 2.0}, "features": [A]},
            "both a positive and a negative",
        ),
        (
            {"label": {"column": "y", "positive": 1, "negative": "1.0"}, "features": [A]},
            "both a positive and a negative",
        ),
        (
            {"label": {"column": "y", "positive": [], "negative": 0}, "features": [A]},
            "label.positive: \\[\\] should be non-empty",
        ),
        (
            {"label": {"column": "y", "positive": True, "negative": 0}, "features": [A]},
            "label.positive: True is not valid.*a value \\(text or a number\\) or a list",
        ),
        (
            {"label": LABEL, "features": [{"name": "a", "type": "numeric", "min": 5, "max": 1}]},
            "feature 'a' needs finite numbers min < max",
        ),
        (
            {
                "label": LABEL,
                "features": [{"name": "a", "type": "numeric", "min": -math.inf, "max": 1}],
            },
            "every number must be finite",
        ),
        (
            {"label": LABEL, "features": [{"name": "a", "type": "numeric", "min": 0, "max": True}]},
            "feature 'a'.max: True is not of type 'number'",
        ),
        (
            {"label": LABEL, "features": [{"name": "a", "type": "text"}]},
            "feature 'a'.type: 'text' is not one of \\['numeric', 'categorical'\\]",
        ),
        (
            {
                "label": LABEL,
                "features": [{"name": "a", "type": "categorical", "categories": [1], "x": 1}],
            },
            "feature 'a'",
        ),
        (
            {"label": LABEL, "features": [{**A, "name": "y"}]},
            "'y' names two columns",
        ),
    ],
)
def test_bad_data_dictionaries_are_named_in_one_line(spec, problem):
    with pytest.raises(data_utils.DataError, match=problem) as refused:
        data_utils.Schema(spec, "schema.json")
    assert "\n" not in str(refused.value) and str(refused.value).startswith("schema.json: ")


def test_the_shipped_data_dictionaries_follow_the_published_structure():
    structure = json.loads(STRUCTURE.read_text())
    jsonschema.Draft202012Validator.check_schema(structure)
    for path in [*ROOT.glob("securehealth/schemas/*_*.json"), *ROOT.glob("examples/*/schema.json")]:
        data_utils.Schema.load(path)  # raises if not


GOOD = '"label": {"column": "y", "positive": 1, "negative": 0}'


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("s.json", b'{"name": "caf\xe9", ' + GOOD.encode() + b', "features": []}', "not UTF-8"),
        ("s.json", b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        ("s.yaml", b"[" * 100_000 + b"]" * 100_000, "not valid YAML"),
        ("s.json", b"{" + GOOD.encode() + b", " + GOOD.encode() + b"}", "'label' appears twice"),
        (
            "s.json",
            b'{"features": [{"name": "a", "type": "categorical", "categories": [NaN, 1]}]}',
            "NaN is not a number",
        ),
        ("s.yaml", b"l: &a [1]\nlabel: {column: y, positive: *a, negative: 0}\n", "aliases"),
        (
            "s.yaml",
            (
                b"label: {column: y, positive: 1, negative: 0}\nfeatures: [{name: a, type: "
                b"categorical, categories: [.nan, 1]}]\n"
            ),
            "every number must be finite",
        ),
        (
            "s.json",
            b"{" + GOOD.encode() + b', "features": [{"name": "a", "type": "numeric", '
            b'"min": 1' + b"0" * 400 + b', "max": 2}]}',
            "every number must be finite",
        ),
        (
            "s.json",
            b"{" + GOOD.encode() + b', "features": [{"name": "a", "type": "numeric", '
            b'"min": -1.7e308, "max": 1.7e308}]}',
            "finite numbers min < max",
        ),
    ],
)
def test_a_data_dictionary_file_that_cannot_be_used_is_one_line(name, text, problem, tmp_path):
    path = tmp_path / name
    path.write_bytes(text)
    with pytest.raises(data_utils.DataError, match=problem) as refused:
        data_utils.Schema.load(path)
    assert "\n" not in str(refused.value)


def test_a_data_dictionary_that_is_not_valid_yaml_is_one_line(tmp_path):
    path = tmp_path / "schema.yaml"
    path.write_text("label:\n  column: y\n features: [\n")
    with pytest.raises(data_utils.DataError, match="schema.yaml: not valid YAML") as refused:
        data_utils.Schema.load(path)
    assert "\n" not in str(refused.value)


def test_model_shapes_and_weight_exchange():
    model = build_model(9, (16, 8))
    assert model(torch.zeros(5, 9)).shape == (5, 1)
    assert [w.shape for w in get_weights(model)] == [(16, 9), (16,), (8, 16), (8,), (1, 8), (1,)]
    assert len(get_weights(build_model(9, ()))) == 2  # logistic regression
    other = build_model(9, (16, 8))
    set_weights(other, get_weights(model))
    x = torch.randn(4, 9)
    assert torch.equal(model(x), other(x))


def test_set_weights_rejects_another_architecture():
    model = build_model(9, (16,))
    with pytest.raises(ValueError, match="shape"):
        set_weights(model, get_weights(build_model(9, (8,))))
    with pytest.raises(ValueError, match="expected 4"):
        set_weights(model, get_weights(build_model(9, (16, 8))))


def test_clinical_metrics_are_scikit_learns_on_a_known_case():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    risk = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.1, 0.4])
    m = clinical_metrics(y, risk, threshold=0.5)
    predicted = risk >= 0.5
    assert m["sensitivity"] == pytest.approx(2 / 3) == recall_score(y, predicted)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["accuracy"] == pytest.approx(6 / 8) == accuracy_score(y, predicted)
    assert m["auc"] == pytest.approx(13 / 15) == roc_auc_score(y, risk)  # pairs ordered
    assert m["precision"] == pytest.approx(2 / 3) == precision_score(y, predicted)
    assert m["f1"] == pytest.approx(2 / 3) == f1_score(y, predicted)
    assert m["brier"] == pytest.approx(brier_score_loss(y, risk))
    assert clinical_metrics(y, risk, threshold=0.25)["sensitivity"] == 1.0
    assert clinical_metrics(np.zeros(3), np.array([0.1, 0.2, 0.3]), 0.5)["auc"] is None


def test_model_file_rebuilds_the_same_model(tmp_path):
    schema = data_utils.load_schema(settings.resolve())
    model = build_model(9, (16,))
    save_model(tmp_path / "model.pt", model, (16,), schema, 0.5)
    loaded, saved = load_model(tmp_path / "model.pt")
    x = np.random.default_rng(0).uniform(-1, 1, (10, 9)).astype(np.float32)
    assert np.array_equal(predict_risk(model, x), predict_risk(loaded, x))
    assert saved["input_names"] == schema.input_names
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left


def test_fingerprint_changes_with_any_row():
    (x, y), _ = data_utils.hospital_data(settings.resolve(), 0)
    changed = x.copy()
    changed[5, 0] += 0.01
    assert data_utils.fingerprint(x, y) == data_utils.fingerprint(x.copy(), y.copy())
    assert data_utils.fingerprint(x, y) != data_utils.fingerprint(changed, y)
