import numpy as np
import pytest
import torch

import data_utils
import settings
from model import (
    build_model,
    clinical_metrics,
    get_weights,
    load_model,
    predict_risk,
    save_model,
    set_weights,
)


@pytest.fixture
def cfg():
    return settings.resolve()


def test_hospitals_are_seeded_and_reproducible(cfg):
    (x1, y1), (tx1, ty1) = data_utils.load_hospital(cfg, 1)
    (x2, y2), (tx2, ty2) = data_utils.load_hospital(cfg, 1)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and np.array_equal(tx1, tx2)
    other_seed = settings.resolve({"seed": cfg.seed + 1})
    assert not np.array_equal(x1, data_utils.load_hospital(other_seed, 1)[0][0])


def test_hospital_sizes_differ_and_add_up(cfg):
    sizes = data_utils.hospital_sizes(4000, 3)
    assert sizes == [2000, 1200, 800]
    assert sum(data_utils.hospital_sizes(1001, 7)) == 1001
    (x, _), (tx, _) = data_utils.load_hospital(cfg, 2)
    assert len(x) + len(tx) == 800 and len(tx) == 160


def test_hospitals_are_non_iid(cfg):
    hospitals = [data_utils.load_hospital(cfg, h)[0] for h in range(3)]
    ages = [x[:, data_utils.FEATURE_NAMES.index("age")].mean() for x, _ in hospitals]
    prevalence = [y.mean() for _, y in hospitals]
    assert max(ages) - min(ages) > 0.1  # scaled units: about 4 years
    assert max(prevalence) - min(prevalence) > 0.1


def test_scaling_uses_declared_ranges_not_the_data():
    low = [r[0] for _, r in data_utils.FEATURES.values()]
    high = [r[1] for _, r in data_utils.FEATURES.values()]
    raw = np.array([low, high, np.add(high, 100)])
    scaled = data_utils.scale(raw)
    assert np.allclose(scaled[0], -1) and np.allclose(scaled[1:], 1)  # clipped
    # Row by row: a row's scaling does not depend on the other rows.
    assert np.array_equal(data_utils.scale(raw[:1])[0], scaled[0])


def test_global_test_set_is_not_made_of_hospital_rows(cfg):
    gx, gy = data_utils.global_test_set(cfg)
    assert len(gx) == cfg.global_test_patients and 0.1 < gy.mean() < 0.6
    rows = {row.tobytes() for h in range(3) for row in data_utils.load_hospital(cfg, h)[0][0]}
    assert not any(row.tobytes() in rows for row in gx)


def test_fingerprint_changes_with_any_row(cfg):
    (x, y), _ = data_utils.load_hospital(cfg, 0)
    changed = x.copy()
    changed[5, 0] += 0.01
    assert data_utils.fingerprint(x, y) == data_utils.fingerprint(x.copy(), y.copy())
    assert data_utils.fingerprint(x, y) != data_utils.fingerprint(changed, y)


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


def test_clinical_metrics_on_a_known_case():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    risk = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.1, 0.4])
    m = clinical_metrics(y, risk, threshold=0.5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["auc"] == pytest.approx(13 / 15)  # 13 of 15 (diseased, healthy) pairs ordered


def test_model_file_rebuilds_the_same_model(tmp_path):
    model = build_model(9, (16,))
    save_model(tmp_path / "model.pt", model, (16,), data_utils.FEATURE_NAMES, 0.5)
    loaded, saved = load_model(tmp_path / "model.pt")
    x = np.random.default_rng(0).uniform(-1, 1, (10, 9)).astype(np.float32)
    assert np.array_equal(predict_risk(model, x), predict_risk(loaded, x))
    assert saved["feature_names"] == data_utils.FEATURE_NAMES
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left
