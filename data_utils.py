"""Synthetic patients for a federation of hospitals, and the fixed feature scaling
every hospital and the server share.

Each hospital has its own case mix (age, smoking, baseline risk) and size, so the
federation is non-IID like real hospitals. The diagnosis (coronary heart disease)
follows a nonlinear risk model of the kind used in clinical risk scores. All data is
generated from the seed: nothing is downloaded and every run is reproducible.

Scaling uses declared physiological ranges (FEATURES), never statistics of a
hospital's rows, so the transformation itself reveals nothing about any patient.
"""

import hashlib

import numpy as np

# name: (unit, declared valid range). Values outside the range are clipped.
FEATURES = {
    "age": ("years", (18.0, 95.0)),
    "sex_male": ("0 = female, 1 = male", (0.0, 1.0)),
    "bmi": ("kg/m2", (15.0, 50.0)),
    "systolic_bp": ("mmHg", (80.0, 220.0)),
    "total_cholesterol": ("mmol/L", (2.0, 10.0)),
    "hdl_cholesterol": ("mmol/L", (0.4, 3.0)),
    "hba1c": ("% (glycated haemoglobin)", (4.0, 14.0)),
    "smoker": ("0 = no, 1 = current smoker", (0.0, 1.0)),
    "family_history": ("0 = no, 1 = premature CHD in a parent/sibling", (0.0, 1.0)),
}
FEATURE_NAMES = list(FEATURES)
LABEL = "coronary_heart_disease"

SIZE_PATTERN = (5, 3, 2)  # hospitals are large, medium, small, large, ...
_GLOBAL_TEST_STREAM = 2**32 - 1  # random stream of the server's reference population


def hospital_sizes(num_patients, num_clients):
    """Patients per hospital, following SIZE_PATTERN and summing to num_patients."""
    weights = np.array([SIZE_PATTERN[h % len(SIZE_PATTERN)] for h in range(num_clients)])
    sizes = np.floor(num_patients * weights / weights.sum()).astype(int)
    sizes[: num_patients - sizes.sum()] += 1  # hand out the rounding remainder
    return sizes.tolist()


def test_size(n, test_fraction):
    """Patients of a hospital of n held out from training (at least one)."""
    return max(1, round(n * test_fraction))


def _hospital_profile(seed, hospital):
    """Case mix of one hospital: who it treats, and how sick they tend to be."""
    rng = np.random.default_rng([seed, hospital, 0])
    return {
        "mean_age": rng.uniform(45.0, 66.0),
        "share_male": rng.uniform(0.4, 0.6),
        "smoking_rate": rng.uniform(0.12, 0.32),
        "risk_offset": rng.normal(0.0, 0.35),  # unmeasured local factors
    }


def _patients(rng, profile, n):
    """Raw (unscaled) features and diagnoses of n patients of one hospital."""
    age = np.clip(rng.normal(profile["mean_age"], 14.0, n), 18, 95)
    male = rng.binomial(1, profile["share_male"], n)
    bmi = np.clip(rng.normal(27.0 + 0.03 * (age - 50), 4.5, n), 15, 50)
    sbp = 118 + 0.5 * (age - 50) + 0.8 * (bmi - 27) + 4 * male + rng.normal(0, 14, n)
    chol = 5.2 + 0.01 * (age - 50) + rng.normal(0, 1.0, n)
    hdl = 1.5 - 0.25 * male - 0.02 * (bmi - 27) + rng.normal(0, 0.3, n)
    hba1c = 5.0 + 0.01 * (age - 50) + 0.06 * (bmi - 27) + rng.gamma(2.0, 0.35, n)
    smoker = rng.binomial(1, profile["smoking_rate"], n)
    family = rng.binomial(1, 0.2, n)

    logit = (
        -2.1
        + profile["risk_offset"]
        + 0.05 * (age - 55)
        + 0.0015 * np.maximum(age - 65, 0) ** 2  # risk accelerates in old age
        + 0.5 * male
        + 0.025 * (sbp - 130)
        + 0.35 * (chol - 5.2)
        - 0.9 * (hdl - 1.3)
        + 0.8 * np.maximum(hba1c - 6.5, 0)  # diabetes threshold
        + 0.004 * np.maximum(bmi - 30, 0) ** 2  # obesity
        + smoker * (0.5 + 0.03 * np.maximum(age - 45, 0))  # smoking harms more with age
        + 0.6 * family
    )
    diagnosis = rng.binomial(1, 1 / (1 + np.exp(-logit)))
    raw = np.column_stack([age, male, bmi, sbp, chol, hdl, hba1c, smoker, family])
    return raw, diagnosis


def scale(raw):
    """Map raw features to [-1, 1] with the declared ranges (clipping outliers)."""
    low, high = np.array([r for _, r in FEATURES.values()]).T
    return (2 * (np.clip(raw, low, high) - low) / (high - low) - 1).astype(np.float32)


def load_hospital(cfg, hospital):
    """One hospital's data as ((train_x, train_y), (test_x, test_y)), scaled."""
    n = hospital_sizes(cfg.num_patients, cfg.num_clients)[hospital]
    rng = np.random.default_rng([cfg.seed, hospital, 1])
    raw, y = _patients(rng, _hospital_profile(cfg.seed, hospital), n)
    x, y = scale(raw), y.astype(np.float32)
    n_test = test_size(n, cfg.test_fraction)
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def global_test_set(cfg):
    """The server's reference population: new patients from every hospital's case
    mix in proportion to hospital size (no hospital's own rows)."""
    sizes = hospital_sizes(cfg.global_test_patients, cfg.num_clients)
    parts = [
        _patients(
            np.random.default_rng([cfg.seed, h, _GLOBAL_TEST_STREAM]),
            _hospital_profile(cfg.seed, h),
            n,
        )
        for h, n in enumerate(sizes)
    ]
    raw = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts]).astype(np.float32)
    return scale(raw), y


def fingerprint(x, y):
    """SHA-256 of a dataset's rows: the key of its privacy ledger."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()
