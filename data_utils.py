"""Patient data for a federation of hospitals, described by a data dictionary.

Three sources (the `dataset` setting):

    synthetic      generated patients (coronary heart disease), non-IID hospitals
    breast-cancer  the Wisconsin diagnostic breast cancer data shipped inside
                   scikit-learn (569 patients), split into hospitals
    csv            your own tables: one file per hospital, DIR/hospital_<i>.csv,
                   and a data dictionary DIR/schema.json (or .yaml); the server's
                   reference test set is DIR/test.csv

Every source has a data dictionary (Schema): the label column with its positive
(disease) and negative values, and each feature's type with its declared valid
range or categories. Inputs are encoded from the dictionary alone, never from
statistics of a hospital's rows, so the encoding reveals nothing about any patient
and every hospital feeds the shared model the same way.

Each hospital splits its own patients into training rows (the only rows DP-SGD
touches) and held-out rows (evaluated at the hospital itself), by a rule on its own
rows alone: nothing the server sets (seed, a new run) moves a patient between the
two, and replacing one patient's record moves at most one other (see
_held_out_split).
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import yaml
from sklearn.datasets import load_breast_cancer

SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
SIZE_PATTERN = (5, 3, 2)  # hospitals are large, medium, small, large, ...
MIN_TRAINING_PATIENTS = 10
_SERVER_STREAM = 2**32 - 1  # random stream of the server's own reference population

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
SYNTHETIC_SCHEMA = {
    "name": "Synthetic patients: coronary heart disease",
    "label": {"column": "coronary_heart_disease", "positive": 1, "negative": 0},
    "features": [
        {"name": name, "type": "numeric", "min": low, "max": high, "unit": unit}
        for name, (unit, (low, high)) in FEATURES.items()
    ],
}


class DataError(ValueError):
    """Bad data or data dictionary; the message names the file (row, column) and
    says how to fix it."""


class Schema:
    """A data dictionary: validated on creation, then used to check and encode
    tables the same way at every hospital and at the server."""

    def __init__(self, spec, source):
        self.spec, self.source = spec, str(source)
        self.name = spec.get("name", self.source)
        try:
            label = spec["label"]
            self.label, self.positive, self.negative = (
                label["column"],
                label["positive"],
                label["negative"],
            )
            self.features = list(spec["features"])
        except (KeyError, TypeError) as missing:
            raise DataError(
                f"{self.source}: the data dictionary needs label.column, label.positive, "
                f"label.negative and a list of features; {missing} is missing"
            ) from None
        self.patient_id = spec.get("patient_id")
        if self.patient_id is not None and not isinstance(self.patient_id, str):
            raise DataError(f'{self.source}: patient_id must name a column, e.g. "mrn"')
        if str(self.positive) == str(self.negative):
            raise DataError(f"{self.source}: label.positive and label.negative are the same")
        names = [f.get("name") for f in self.features]
        if (
            not self.features
            or len(set(names)) != len(names)
            or self.label in names
            or self.patient_id in (self.label, *names)
        ):
            raise DataError(
                f"{self.source}: feature names must be present, unique and "
                f"differ from the label and patient_id columns"
            )
        for feature in self.features:
            self._check_feature(feature)

    def _check_feature(self, f):
        where = f"{self.source}: feature {f.get('name')!r}"
        if f.get("type") == "numeric":
            low, high = f.get("min"), f.get("max")
            if not all(isinstance(v, (int, float)) for v in (low, high)) or not low < high:
                raise DataError(f"{where} needs numbers min < max (its declared valid range)")
            if f.get("log") and low < 0:
                raise DataError(f"{where}: a log-scaled feature needs min >= 0")
        elif f.get("type") == "categorical":
            categories = f.get("categories")
            if not isinstance(categories, list) or len(categories) < 2:
                raise DataError(f"{where} needs a list of at least two categories")
        else:
            raise DataError(f"{where}: type must be 'numeric' or 'categorical'")

    @classmethod
    def load(cls, path):
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise DataError(f"{path}: cannot read the data dictionary ({error.strerror})") from None
        try:
            spec = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (ValueError, yaml.YAMLError) as error:
            raise DataError(f"{path}: not valid {path.suffix[1:].upper()} ({error})") from None
        if not isinstance(spec, dict):
            raise DataError(f"{path}: the data dictionary must be a mapping")
        return cls(spec, path)

    @property
    def columns(self):
        """The columns a table must have (the patient-id column too, if declared)."""
        ids = [self.patient_id] if self.patient_id else []
        return [self.label] + ids + [f["name"] for f in self.features]

    @property
    def input_names(self):
        """The model's inputs: one per numeric feature, one per category."""
        names = []
        for f in self.features:
            if f["type"] == "numeric":
                names.append(f["name"])
            else:
                names += [f"{f['name']}={c}" for c in f["categories"]]
        return names

    def encode(self, columns):
        """Model inputs from checked feature columns (name -> array): numeric values
        mapped from their declared range (log-scaled if declared) to [-1, 1], and
        categories one-hot."""
        encoded = []
        for f in self.features:
            values = columns[f["name"]]
            if f["type"] == "numeric":
                low, high, v = (
                    f["min"],
                    f["max"],
                    np.clip(np.asarray(values, float), f["min"], f["max"]),
                )
                if f.get("log"):
                    low, high, v = np.log1p(low), np.log1p(high), np.log1p(v)
                encoded.append(2 * (v - low) / (high - low) - 1)
            else:
                as_text = np.asarray(values).astype(str)
                encoded += [(as_text == str(c)).astype(float) for c in f["categories"]]
        return np.column_stack(encoded).astype(np.float32)

    def labels(self, values):
        """1.0 for the positive (disease) value, 0.0 for the negative."""
        return (np.asarray(values).astype(str) == str(self.positive)).astype(np.float32)


# ---- Splitting ---------------------------------------------------------------------


def hospital_sizes(num_patients, num_clients):
    """Patients per hospital, following SIZE_PATTERN and summing to num_patients."""
    weights = np.array([SIZE_PATTERN[h % len(SIZE_PATTERN)] for h in range(num_clients)])
    sizes = np.floor(num_patients * weights / weights.sum()).astype(int)
    sizes[: num_patients - sizes.sum()] += 1  # hand out the rounding remainder
    return sizes.tolist()


def test_size(n, test_fraction):
    """Patients of a hospital of n held out from training (at least one)."""
    return max(1, round(n * test_fraction))


def stratified_parts(y, weights, rng):
    """Row indices split into parts in proportion to `weights`, each class dealt out
    separately so that every part keeps the overall share of the disease."""
    parts = [[] for _ in weights]
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        cuts = np.round(np.cumsum(weights)[:-1] / np.sum(weights) * len(rows)).astype(int)
        for part, chunk in zip(parts, np.split(rows, cuts), strict=True):
            part.extend(chunk)
    return [np.sort(np.array(part, dtype=int)) for part in parts]


def row_keys(x, y, patient_ids=None):
    """A stable pseudo-random key per patient: a hash of its identifier if the data
    dictionary declares one, else of its row. The hospital's held-out rule."""
    if patient_ids is not None:
        rows = [str(p).encode() for p in patient_ids]
    else:
        table = np.column_stack([x, y]).astype(np.float32)
        rows = [row.tobytes() for row in table]
    return np.array(
        [int.from_bytes(hashlib.blake2b(r, digest_size=8).digest(), "big") for r in rows],
        dtype=np.uint64,
    )


def _held_out_split(x, y, test_fraction, patient_ids=None):
    """Row indices (train, held out) of one hospital's rows: the test_size patients
    with the smallest row_keys are held out, so the same patients are held out in
    every run, whatever the server's settings.

    Not stratified by diagnosis, on purpose: replace-one privacy needs that replacing
    one patient's record changes the training rows by at most one record and never
    their number (which is released). Per-class cuts move when a replaced record has
    the other diagnosis, pulling further patients across and changing the count."""
    order = np.argsort(row_keys(x, y, patient_ids), kind="stable")
    n_test = test_size(len(y), test_fraction)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


# ---- Synthetic patients ---------------------------------------------------------------


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
    """Raw features (name -> values) and diagnoses of n patients of one hospital,
    from a nonlinear risk model of the kind used in clinical risk scores."""
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


def _synthetic_hospital(cfg, hospital, schema):
    n = hospital_sizes(cfg.num_patients, cfg.num_clients)[hospital]
    rng = np.random.default_rng([cfg.seed, hospital, 1])
    columns, y = _patients(rng, _hospital_profile(cfg.seed, hospital), n)
    return schema.encode(columns), y.astype(np.float32)


def _synthetic_reference(cfg, schema):
    """New patients from every hospital's case mix, in proportion to hospital size."""
    parts = []
    for h, n in enumerate(hospital_sizes(cfg.global_test_patients, cfg.num_clients)):
        rng = np.random.default_rng([cfg.seed, h, _SERVER_STREAM])
        columns, y = _patients(rng, _hospital_profile(cfg.seed, h), n)
        parts.append((schema.encode(columns), y.astype(np.float32)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---- Breast cancer (bundled with scikit-learn) ---------------------------------------------


def _breast_cancer_split(cfg, schema):
    """The 569 patients split, seeded and stratified: a reference test set for the
    server (test_fraction of them), the rest into hospitals of different sizes."""
    data = load_breast_cancer()
    columns = dict(zip(data.feature_names, data.data.T, strict=True))
    x = schema.encode(columns)
    y = schema.labels(np.where(data.target == 0, "malignant", "benign"))
    rng = np.random.default_rng([cfg.seed, _SERVER_STREAM])
    n_test = test_size(len(y), cfg.test_fraction)
    reference, rest = stratified_parts(y, [n_test, len(y) - n_test], rng)
    weights = [SIZE_PATTERN[h % len(SIZE_PATTERN)] for h in range(cfg.num_clients)]
    hospitals = [rest[part] for part in stratified_parts(y[rest], weights, rng)]
    return (x[reference], y[reference]), [(x[rows], y[rows]) for rows in hospitals]


# ---- Your own CSV files --------------------------------------------------------------------


def csv_paths(cfg):
    """(schema file, hospital files, reference test file) of a csv data directory."""
    if not cfg.data_dir:
        raise DataError(
            "dataset 'csv' needs --data-dir: the folder with hospital_<i>.csv and schema.json"
        )
    directory = Path(cfg.data_dir)
    schemas = [directory / name for name in ("schema.json", "schema.yaml", "schema.yml")]
    schema = next((p for p in schemas if p.exists()), schemas[0])
    hospitals = [directory / f"hospital_{h}.csv" for h in range(cfg.num_clients)]
    return schema, hospitals, directory / "test.csv"


def read_csv(path, schema, missing_values):
    """A hospital's (or the server's) table, checked cell by cell against the data
    dictionary; returns (x, y, patient ids or None if the dictionary declares no
    patient_id). The first problem stops it, named with its line."""
    import pandas as pd  # imported here: only CSV runs pay for it

    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read it as CSV ({error})") from None
    extra = [c for c in frame.columns if c not in schema.columns]
    if extra:
        raise DataError(
            f"{path}: column {extra[0]!r} is not in {schema.source}; add it to "
            f"the data dictionary or remove it from the file"
        )
    absent = [c for c in schema.columns if c not in frame.columns]
    if absent:
        what = "the label column" if absent[0] == schema.label else "column"
        raise DataError(f"{path}: {what} {absent[0]!r} of {schema.source} is missing")

    line = frame.index.to_numpy() + 2  # file line numbers: the header is line 1
    blank = (frame[schema.columns].apply(lambda col: col.str.strip()) == "").to_numpy()
    if blank.any():
        if missing_values == "drop":
            keep = ~blank.any(axis=1)
            frame, line = frame[keep], line[keep]
        else:
            row, col = np.argwhere(blank)[0]
            raise DataError(
                f"{path} line {line[row]}, column {schema.columns[col]!r}: empty "
                f"value; fill it in, or set missing_values to 'drop' to leave "
                f"such patients out"
            )

    def fail(rows, column, problem):
        first = np.flatnonzero(rows)[0]
        value = frame[column].iloc[first]
        raise DataError(f"{path} line {line[first]}, column {column!r}: {value!r} {problem}")

    columns = {}
    for f in schema.features:
        raw = frame[f["name"]].str.strip()
        if f["type"] == "numeric":
            values = pd.to_numeric(raw, errors="coerce").to_numpy(float)
            if np.isnan(values).any():
                fail(np.isnan(values), f["name"], "is not a number")
            outside = (values < f["min"]) | (values > f["max"])
            if outside.any():
                fail(
                    outside,
                    f["name"],
                    f"is outside the declared range [{f['min']}, "
                    f"{f['max']}]; correct it or widen the range",
                )
            columns[f["name"]] = values
        else:
            unknown = ~raw.isin([str(c) for c in f["categories"]]).to_numpy()
            if unknown.any():
                fail(unknown, f["name"], f"is not one of the categories {f['categories']}")
            columns[f["name"]] = raw.to_numpy()
    patient_ids = None
    if schema.patient_id:
        patient_ids = frame[schema.patient_id].str.strip().to_numpy()
        repeated = frame[schema.patient_id].str.strip().duplicated().to_numpy()
        if repeated.any():
            fail(repeated, schema.patient_id, "appears twice: each patient must have one row")
    label = frame[schema.label].str.strip()
    odd = ~label.isin([str(schema.positive), str(schema.negative)]).to_numpy()
    if odd.any():
        fail(
            odd,
            schema.label,
            f"is neither the positive label {schema.positive!r} nor "
            f"the negative {schema.negative!r}",
        )
    return schema.encode(columns), schema.labels(label.to_numpy()), patient_ids


# ---- What the hospitals and the server use ------------------------------------------------


def load_schema(cfg, schema_file=None):
    if cfg.dataset == "synthetic":
        return Schema(SYNTHETIC_SCHEMA, "synthetic data")
    if cfg.dataset == "breast-cancer":
        return Schema.load(SCHEMAS_DIR / "breast_cancer.json")
    return Schema.load(schema_file or csv_paths(cfg)[0])


def hospital_data(cfg, hospital, data_file=None, schema_file=None):
    """One hospital's ((train_x, train_y), (test_x, test_y)). In deployment a csv
    hospital passes its own file and data dictionary."""
    schema = load_schema(cfg, schema_file)
    ids = None
    if cfg.dataset == "synthetic":
        x, y = _synthetic_hospital(cfg, hospital, schema)
        source = f"synthetic hospital {hospital}"
    elif cfg.dataset == "breast-cancer":
        x, y = _breast_cancer_split(cfg, schema)[1][hospital]
        source = f"breast-cancer hospital {hospital}"
    else:
        source = data_file or csv_paths(cfg)[1][hospital]
        x, y, ids = read_csv(source, schema, cfg.missing_values)
    train, test = _held_out_split(x, y, cfg.test_fraction, ids)
    if len(train) < MIN_TRAINING_PATIENTS:
        raise DataError(
            f"{source}: {len(y)} patients leave {len(train)} for training after holding "
            f"out test_fraction {cfg.test_fraction:g}; DP-SGD needs at least "
            f"{MIN_TRAINING_PATIENTS}: add patients or lower test_fraction"
        )
    return (x[train], y[train]), (x[test], y[test])


def reference_test_set(cfg):
    """The server's own test set, (x, y, what it is): the model is judged on it."""
    schema = load_schema(cfg)
    if cfg.dataset == "synthetic":
        return (*_synthetic_reference(cfg, schema), "new synthetic patients")
    if cfg.dataset == "breast-cancer":
        x, y = _breast_cancer_split(cfg, schema)[0]
        return x, y, f"{len(y)} patients held out of the data set before the split"
    test_file = csv_paths(cfg)[2]
    if test_file.exists():
        return (*read_csv(test_file, schema, cfg.missing_values)[:2], str(test_file))
    # Simulation only: every hospital's held-out rows, pooled (see the README).
    held_out = [hospital_data(cfg, h)[1] for h in range(cfg.num_clients)]
    x = np.concatenate([h[0] for h in held_out])
    y = np.concatenate([h[1] for h in held_out])
    return x, y, "the hospitals' held-out patients, pooled (no test.csv given)"


def check_all(cfg, pool_held_out=True):
    """Load every hospital's data and the server's reference set once, before anything
    starts, so that bad data stops a launcher with one line (DataError) rather than
    a failed run. With pool_held_out=False (a deployed server) the csv reference set
    must be the server's own test.csv."""
    if cfg.dataset == "csv" and not pool_held_out and not csv_paths(cfg)[2].exists():
        raise DataError(
            f"{csv_paths(cfg)[2]}: file not found; the server needs its own reference test "
            f"set to evaluate the model (the hospitals' files stay at the hospitals)"
        )
    if pool_held_out:  # simulation: this machine holds every hospital's data
        for hospital in range(cfg.num_clients):
            hospital_data(cfg, hospital)
    reference_test_set(cfg)


def fingerprint(x, y):
    """SHA-256 of a dataset's rows: names a version of a hospital's data in its
    privacy ledger (which holds one budget for all of them)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()
