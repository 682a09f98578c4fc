"""Synthetic twins: CSV data directories generated from a data dictionary alone.

`simulation.py --dataset csv --data-dir DIR --make-twin TWIN` (make_twin) writes one, to
rehearse the whole pipeline without reading any hospital's row. Its files are a
demonstration's (is_twin: regenerated from TWIN/twin.json and compared byte for byte).
Its invented patients cannot tell how good a model your own give (docs/how-to/your-own-csv.md).
"""

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from securehealth.data.schema import DataError, Schema, matches
from securehealth.data.split import hospital_sizes

MANIFEST = "twin.json"  # in the twin's folder: what its files were generated from
MAX_MANIFEST_BYTES = 4096  # a real twin.json is a few hundred bytes
MAX_TABLE_PATIENTS = 1_000_000  # a twin's table holds at most this many patients
POSITIVE_SHARE = 0.3  # about this share of the twin's patients have the disease
RULE_STRENGTH = 2.0  # spread of the label rule's logits: a learnable, not a trivial, task
TEST_STREAM = 1_000_000  # the test set's random stream, apart from every hospital's


@dataclass(frozen=True)
class TwinRecipe:
    """What a twin's files are generated from, besides its data dictionary."""

    seed: int
    hospital_patients: tuple[int, ...]
    test_patients: int
    schema_sha256: str


def make_twin(schema_file: Path, folder: Path, recipe_settings: dict[str, int]) -> Path:
    """Write a twin of the data dictionary `schema_file` into the new or empty `folder`.

    Parameters
    ----------
    schema_file : Path
        The data dictionary, copied into the twin.
    folder : Path
        A new or empty folder.
    recipe_settings : dict of str to int
        num_clients, num_patients, global_test_patients and seed: the twin's sizes and
        its random streams.

    Returns
    -------
    Path
        The folder.

    Raises
    ------
    DataError
        Where the folder holds anything, or the dictionary does not load.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"--make-twin {folder}: not an empty folder; name a new one")
    schema_bytes = Path(schema_file).read_bytes()
    Schema.load(schema_file)  # a dictionary that would not load makes no twin
    recipe = TwinRecipe(
        seed=recipe_settings["seed"],
        hospital_patients=tuple(
            hospital_sizes(recipe_settings["num_patients"], recipe_settings["num_clients"])
        ),
        test_patients=recipe_settings["global_test_patients"],
        schema_sha256=hashlib.sha256(schema_bytes).hexdigest(),
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"schema{Path(schema_file).suffix}").write_bytes(schema_bytes)
    (folder / MANIFEST).write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    for name, table in twin_tables(Schema.load(schema_file), recipe).items():
        (folder / name).write_bytes(table)
    return folder


def twin_tables(schema: Schema, recipe: TwinRecipe) -> dict[str, bytes]:
    """Every file of the twin, by name: hospital_<i>.csv, then test.csv."""
    names = [f"hospital_{h}.csv" for h in range(len(recipe.hospital_patients))] + ["test.csv"]
    return {name: twin_table(schema, recipe, name) for name in names}


def twin_table(schema: Schema, recipe: TwinRecipe, name: str) -> bytes | None:
    """The twin's file `name` (hospital_<i>.csv or test.csv), or None if it has none.

    Each file comes from its own random stream, so one is made without the others.
    """
    streams = {f"hospital_{h}.csv": (h, n) for h, n in enumerate(recipe.hospital_patients)}
    streams["test.csv"] = (TEST_STREAM, recipe.test_patients)
    if name not in streams:
        return None
    stream, n = streams[name]
    rule = _label_rule(schema, recipe.seed)
    return _table(schema, rule, np.random.default_rng([recipe.seed, stream]), n, stream)


def is_twin(path: Path, content: bytes) -> bool:
    """Whether `content`, the bytes of the file at `path`, is that file of its folder's twin.

    That is the file of that name which the folder's twin.json and data dictionary
    generate. Anything unexpected in them (types, sizes beyond a twin's) answers no.
    """
    folder = Path(path).parent
    try:
        recipe = _recipe(folder / MANIFEST)
        schemas = [folder / name for name in ("schema.json", "schema.yaml", "schema.yml")]
        schema_file = next(p for p in schemas if p.exists())
        if hashlib.sha256(schema_file.read_bytes()).hexdigest() != recipe.schema_sha256:
            return False
        return twin_table(Schema.load(schema_file), recipe, Path(path).name) == content
    except (OSError, ValueError, TypeError, KeyError, StopIteration, RecursionError):
        return False  # DataError is a ValueError


def _recipe(manifest: Path) -> TwinRecipe:
    """A twin.json read with its types and sizes checked (ValueError otherwise)."""
    with open(manifest, "rb") as file:
        text = file.read(MAX_MANIFEST_BYTES + 1)
    if len(text) > MAX_MANIFEST_BYTES:
        raise ValueError("not a twin's manifest: too long")
    fields = json.loads(text)
    sizes = [*fields["hospital_patients"], fields["test_patients"]]
    whole = [fields["seed"], *sizes]
    if not all(type(v) is int for v in whole) or not isinstance(fields["schema_sha256"], str):
        raise ValueError("not a twin's manifest: wrong types")
    if not all(1 <= n <= MAX_TABLE_PATIENTS for n in sizes) or len(sizes) > 1001:
        raise ValueError("not a twin's manifest: sizes beyond a twin's")
    return TwinRecipe(
        seed=fields["seed"],
        hospital_patients=tuple(fields["hospital_patients"]),
        test_patients=fields["test_patients"],
        schema_sha256=fields["schema_sha256"],
    )


def _draw(feature: dict, rng: np.random.Generator, n: int) -> np.ndarray:
    """A feature's invented values, drawn evenly across its range or categories.

    Numbers are drawn on a log scale where declared and rounded to 2 decimals; values
    the feature declares as missing markers are never drawn.
    """
    markers = feature.get("missing", [])  # values that mean "not recorded": never drawn
    if feature["type"] == "categorical":
        recorded = [c for c in feature["categories"] if not matches([str(c)], markers)[0]]
        if not recorded:
            raise DataError(f"feature {feature['name']!r}: every category means missing")
        categories = np.array(recorded, dtype=object)
        return categories[rng.integers(len(categories), size=n)]
    low, high = feature["min"], feature["max"]
    if feature.get("log"):
        values = np.expm1(rng.uniform(np.log1p(low), np.log1p(high), n))
    else:
        values = rng.uniform(low, high, n)
    values = np.clip(np.round(values, 2), low, high)
    missing = matches([_cell(v) for v in values], markers)
    if missing.any():
        candidates = [round((low + high) / 2, 2), low, high]
        fill = next((v for v in candidates if not matches([_cell(v)], markers)[0]), None)
        if fill is None:
            raise DataError(f"feature {feature['name']!r}: no value in its range is recorded")
        values = np.where(missing, fill, values)
    return values


def _label_rule(schema: Schema, seed: int) -> tuple[np.ndarray, float]:
    """The twin's label rule: weights on the encoded inputs, and an offset.

    The offset makes about POSITIVE_SHARE of a large sample positive.
    """
    rng = np.random.default_rng([seed, TEST_STREAM + 1])
    weights = rng.normal(size=len(schema.input_names))
    sample = schema.encode({f["name"]: _draw(f, rng, 10_000) for f in schema.features})
    logits = sample @ weights
    scale = RULE_STRENGTH / max(float(logits.std()), 1e-9)
    return weights * scale, -float(np.quantile(logits * scale, 1 - POSITIVE_SHARE))


def _table(
    schema: Schema, rule: tuple[np.ndarray, float], rng: np.random.Generator, n: int, stream: int
) -> bytes:
    """One CSV table of n invented patients, in the dictionary's columns."""
    columns = {f["name"]: _draw(f, rng, n) for f in schema.features}
    weights, offset = rule
    risk = 1 / (1 + np.exp(-(schema.encode(columns) @ weights + offset)))
    sick = rng.random(n) < risk
    labels = np.where(sick, str(schema.positive_values[0]), str(schema.negative_values[0]))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(schema.columns)
    for row in range(n):
        ids = [f"twin-{stream}-{row}"] if schema.patient_id else []
        cells = [_cell(columns[f["name"]][row]) for f in schema.features]
        writer.writerow([labels[row], *ids, *cells])
    return text.getvalue().encode()


def _cell(value: object) -> str:
    """A value as the twin writes it: numbers without trailing zeros."""
    if isinstance(value, float | np.floating):
        return np.format_float_positional(float(value), trim="-")
    return str(value)
