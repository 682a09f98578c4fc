"""The `breast-cancer` data source: the Wisconsin diagnostic data shipped in scikit-learn.

Its 569 patients are split, seeded and stratified, into hospitals of different sizes
and a reference test set for the server.
"""

from pathlib import Path

import numpy as np

from securehealth.config import Settings
from securehealth.data.schema import Schema
from securehealth.data.split import SERVER_STREAM, SIZE_PATTERN, stratified_parts, test_size

DESCRIPTION = "the Wisconsin diagnostic breast cancer data bundled with scikit-learn"
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "schemas" / "breast_cancer.json"


def _split(cfg, schema):
    """The 569 patients split, seeded and stratified, for the server and the hospitals.

    A reference test set for the server (test_fraction of them), the rest into
    hospitals of different sizes.
    """
    from sklearn.datasets import load_breast_cancer  # scikit-learn: only when it is used

    data = load_breast_cancer()
    columns = dict(zip(data.feature_names, data.data.T, strict=True))
    x = schema.encode(columns)
    y = schema.labels(np.where(data.target == 0, "malignant", "benign"))
    rng = np.random.default_rng([cfg.seed, SERVER_STREAM])
    n_test = test_size(len(y), cfg.test_fraction)
    reference, rest = stratified_parts(y, [n_test, len(y) - n_test], rng)
    weights = [SIZE_PATTERN[h % len(SIZE_PATTERN)] for h in range(cfg.num_clients)]
    hospitals = [rest[part] for part in stratified_parts(y[rest], weights, rng)]
    return (x[reference], y[reference]), [(x[rows], y[rows]) for rows in hospitals]


def load_schema(cfg: Settings, schema_file: str | None = None) -> Schema:
    """The data set's own data dictionary (schemas/breast_cancer.json)."""
    return Schema.load(SCHEMA_FILE)


def hospital_rows(
    cfg: Settings, hospital: int, schema: Schema, data_file: str | None = None
) -> tuple[np.ndarray, np.ndarray, None, str]:
    """(x, y, patient ids, where they come from) of one hospital's patients."""
    x, y = _split(cfg, schema)[1][hospital]
    return x, y, None, f"breast-cancer hospital {hospital}"


def reference_set(cfg: Settings, schema: Schema) -> tuple[np.ndarray, np.ndarray, str]:
    """The server's reference test set: patients held out before the hospitals' split."""
    x, y = _split(cfg, schema)[0]
    return x, y, f"{len(y)} patients held out of the data set before the split"
