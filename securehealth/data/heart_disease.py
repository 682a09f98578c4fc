"""The `heart-disease` data source: UCI Heart Disease, four real hospitals' patients.

One file per site, shipped in data/uci-heart-disease/ (CC BY 4.0; attribution in its
README). Hospital i is site i, so a federation on it has exactly four hospitals; Flower's
app bundle carries no data files, so launchers pass the folder's path (data_dir).
"""

from pathlib import Path

import numpy as np

from securehealth.config import Settings
from securehealth.data.csv_files import read_csv
from securehealth.data.schema import Schema

DESCRIPTION = "four real hospitals' patients (UCI Heart Disease, shipped in data/)"
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "uci-heart-disease"
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "schemas" / "heart_disease.json"
FILES = True  # each hospital reads its own site's file
SITES = ("cleveland", "hungarian", "switzerland", "va")  # hospital i is SITES[i]
SITE_NAMES = ("Cleveland", "Budapest", "Zurich & Basel", "Long Beach VA")
# The files have no header row: their columns, in order (the UCI description).
COLUMNS = [
    *("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg"),
    *("thalach", "exang", "oldpeak", "slope", "ca", "thal", "num"),
]


def site_file(hospital: int, data_dir: str | Path = "") -> Path:
    """Site `hospital`'s file, in data_dir if given, else in this copy's data/."""
    return Path(data_dir or SHIPPED_DIR) / f"processed.{SITES[hospital]}.data"


def hospital_file(cfg: Settings, hospital: int) -> Path:
    """Site `hospital`'s file in data_dir (the shipped folder unless another is given)."""
    return site_file(hospital, cfg.data_dir)


def read_site(path: str | Path, schema: Schema) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One site's (x, y, keys): its header-less file read by the data dictionary."""
    return read_csv(path, schema, header=COLUMNS)


def load_schema(cfg: Settings, schema_file: str | None = None) -> Schema:
    """A hospital's own data dictionary, else the shipped one (schemas/heart_disease.json)."""
    return Schema.load(schema_file or SCHEMA_FILE, cfg.missing_values)


def hospital_rows(
    cfg: Settings, hospital: int, schema: Schema, data_file: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Path]:
    """A deployed hospital's own file (client.py passes it), else its site's file."""
    source = Path(data_file or hospital_file(cfg, hospital))
    return (*read_site(source, schema), source)


def reference_set(cfg: Settings, schema: Schema) -> None:
    """None: the server judges the model on the four sites' held-out patients.

    They are a public data set, shipped in every copy (see data.reference_test_set).
    """
    return None
