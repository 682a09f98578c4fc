"""The `synthetic` data source: generated patients (coronary heart disease).

The hospitals are non-IID, each with its own case mix, and the server has its own
reference population.
"""

import numpy as np

from securehealth.config import Settings
from securehealth.data.schema import Schema
from securehealth.data.split import SERVER_STREAM, hospital_sizes

DESCRIPTION = "generated patients (coronary heart disease), non-IID hospitals"

# Synthetic patients: name -> (unit, declared valid range).
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
# Subgroups the report shows the model's figures for: age bands, and sex.
SUBGROUPS = {"age": [50.0, 65.0], "sex_male": [0.5]}
SYNTHETIC_SCHEMA = {
    "name": "Synthetic patients: coronary heart disease",
    "label": {"column": "coronary_heart_disease", "positive": 1, "negative": 0},
    "features": [
        {
            "name": name,
            "type": "numeric",
            "min": low,
            "max": high,
            "unit": unit,
            **({"subgroups": SUBGROUPS[name]} if name in SUBGROUPS else {}),
        }
        for name, (unit, (low, high)) in FEATURES.items()
    ],
}


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
    """Raw features (name -> values) and diagnoses of n patients of one hospital.

    The diagnoses come from a nonlinear risk model of the kind used in clinical risk
    scores.
    """
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
    values = (age, male, bmi, sbp, chol, hdl, hba1c, smoker, family)
    return dict(zip(FEATURES, values, strict=True)), diagnosis


def hospital_rows(
    cfg: Settings, hospital: int, schema: Schema, data_file: str | None = None
) -> tuple[np.ndarray, np.ndarray, None, str]:
    """(x, y, patient ids, where they come from) of one hospital's patients."""
    n = hospital_sizes(cfg.num_patients, cfg.num_clients)[hospital]
    rng = np.random.default_rng([cfg.seed, hospital, 1])
    columns, y = _patients(rng, _hospital_profile(cfg.seed, hospital), n)
    return schema.encode(columns), y.astype(np.float32), None, f"synthetic hospital {hospital}"


def reference_set(cfg: Settings, schema: Schema) -> tuple[np.ndarray, np.ndarray, str]:
    """New patients from every hospital's case mix, in proportion to hospital size."""
    parts = []
    for h, n in enumerate(hospital_sizes(cfg.global_test_patients, cfg.num_clients)):
        rng = np.random.default_rng([cfg.seed, h, SERVER_STREAM])
        columns, y = _patients(rng, _hospital_profile(cfg.seed, h), n)
        parts.append((schema.encode(columns), y.astype(np.float32)))
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return x, y, "new synthetic patients"


def load_schema(cfg: Settings, schema_file: str | None = None) -> Schema:
    """The generated patients' own data dictionary (SYNTHETIC_SCHEMA)."""
    return Schema(SYNTHETIC_SCHEMA, "synthetic data")
