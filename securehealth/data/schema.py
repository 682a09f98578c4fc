"""The data dictionary (Schema): the label's values and each feature's type, range or categories.

Inputs are encoded from the dictionary alone, never from statistics of a hospital's
rows, so the encoding reveals nothing about any patient. Missing values are handled as
the `missing_values` setting says ("fail", "drop" or "indicator"); numbers in the
dictionary match cells by number. The format: docs/how-to/your-own-csv.md.
"""

import functools
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import yaml

from securehealth.text import quoted

MAX_DICTIONARY_BYTES = 1_000_000  # a data dictionary of thousands of columns takes less


class DataError(ValueError):
    """Bad data or data dictionary.

    The message names the file (row, column) and says how to fix it.
    """


@dataclass(frozen=True)
class Subgroup:
    """Patients who share a category, or a band, of a feature marked with "subgroups".

    E.g. "sex = female", "50 <= age < 65".
    """

    feature: str
    name: str
    members: np.ndarray  # which rows of the table it was found in


MISSING_MODES = ("fail", "drop", "indicator")
# What a data dictionary may hold, as a JSON Schema (shipped with the app).
STRUCTURE = Path(__file__).resolve().parents[1] / "schemas" / "data-dictionary.schema.json"


class Schema:
    """A data dictionary, validated on creation.

    It checks and encodes tables the same way at every hospital and at the server,
    missing values as `missing_values` says.
    """

    def __init__(self, spec: dict, source: str | Path, missing_values: str = "fail"):
        """Validate `spec`, a parsed data dictionary, named in messages by `source`.

        Raises
        ------
        DataError
            Where it breaks the dictionary's JSON Schema, or a rule the JSON Schema
            cannot state (label values both positive and negative, a repeated column
            name, a feature's range, fill or subgroups).
        """
        self.spec, self.source, self.missing_values = spec, str(source), missing_values
        check_structure(spec, self.source)
        self.name = spec.get("name", self.source)
        label = spec["label"]
        self.label, self.positive, self.negative = (
            label["column"],
            label["positive"],
            label["negative"],
        )
        self.features = list(spec["features"])
        self.patient_id = spec.get("patient_id")
        self.positive_values, self.negative_values = _listed(self.positive), _listed(self.negative)
        shared = [
            v
            for mine, others in (
                (self.positive_values, self.negative_values),
                (self.negative_values, self.positive_values),
            )
            for v in mine
            if matches([str(v)], others)[0]
        ]
        if shared:
            raise DataError(
                f"{self.source}: {quoted(shared[0])} is both a positive and a negative label value"
            )
        columns = [self.label, *(f["name"] for f in self.features)]
        if self.patient_id is not None:
            columns.append(self.patient_id)
        repeated = next((c for c in columns if columns.count(c) > 1), None)
        if repeated is not None:
            raise DataError(
                f"{self.source}: {quoted(repeated)} names two columns; feature names must be "
                f"unique and differ from the label and patient_id columns"
            )
        for feature in self.features:
            self._check_feature(feature)

    def _check_feature(self, f):
        """What the JSON Schema cannot say: finite numbers, min < max, a fill in range."""
        where = f"{self.source}: feature {quoted(f['name'])}"
        if f["type"] == "numeric":
            low, high = f["min"], f["max"]
            if not (low < high and math.isfinite(float(high) - float(low))):
                raise DataError(f"{where} needs finite numbers min < max (its valid range)")
            if f.get("log") and low < 0:
                raise DataError(f"{where}: a log-scaled feature needs min >= 0")
        if "fill" in f:
            fill = f["fill"]
            if f["type"] == "numeric" and not (
                isinstance(fill, (int, float)) and f["min"] <= fill <= f["max"]
            ):
                raise DataError(f'{where}: "fill" must be a number within [min, max]')
            if f["type"] == "categorical" and not matches([str(fill)], f["categories"])[0]:
                raise DataError(f'{where}: "fill" must be one of its categories')
        self._check_subgroups(f, where)

    def _check_subgroups(self, f, where):
        """Check a feature's "subgroups" marks (band edges, or category names).

        A numeric feature's are band edges, ascending, inside its range; a categorical
        one's are true or a name for each of some of its categories.
        """
        marked = f.get("subgroups")
        if marked is None:
            return
        if f["type"] == "numeric":
            inside = isinstance(marked, list) and all(f["min"] < edge < f["max"] for edge in marked)
            if not (inside and marked == sorted(set(marked))):
                raise DataError(
                    f'{where}: "subgroups" of a numeric feature must be band edges in '
                    f"ascending order strictly between its min and max, e.g. [50, 65]"
                )
            return
        named = marked if isinstance(marked, dict) else {}
        # The category each name is for (None for a key that is no category).
        named_categories = [
            next((i for i, c in enumerate(f["categories"]) if matches([key], [c])[0]), None)
            for key in named
        ]
        names = {" ".join(name.split()) for name in named.values()} - {""}
        if (
            isinstance(marked, list)
            or None in named_categories
            or len(set(named_categories)) < len(named)
            or len(names) < len(named)
        ):
            raise DataError(
                f'{where}: "subgroups" of a categorical feature must be true or name some '
                f'of its categories, each once and each by its own name, e.g. {{"0": '
                f'"female", "1": "male"}}'
            )

    @classmethod
    def load(cls, path: str | Path, missing_values: str = "fail") -> Self:
        """Read a data dictionary from a JSON or YAML file.

        Parameters
        ----------
        path : str or Path
            The file (.json, .yaml or .yml).
        missing_values : str
            How its tables' missing values are handled: "fail", "drop" or "indicator".

        Raises
        ------
        DataError
            Where the file cannot be read, is not UTF-8, is larger than
            MAX_DICTIONARY_BYTES or is not valid JSON or YAML, or the dictionary is not
            sound.
        """
        path = Path(path)
        try:
            if path.exists() and not path.is_file():
                raise DataError(f"{path}: not a regular file; give the data dictionary itself")
            if (size := path.stat().st_size) > MAX_DICTIONARY_BYTES:
                raise DataError(
                    f"{path}: {size / 1e6:.0f} MB, more than a data "
                    f"dictionary takes (at most {MAX_DICTIONARY_BYTES // 1_000_000} MB)"
                )
            text = path.read_text(encoding="utf-8-sig")
        except OSError as error:
            raise DataError(f"{path}: cannot read the data dictionary ({error.strerror})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text; save it as UTF-8") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                spec = yaml.load(text, Loader=_PlainYaml)  # noqa: S506 (a safe loader)
            else:
                spec = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_nan)
        except (ValueError, yaml.YAMLError, RecursionError) as error:
            problem = " ".join(str(error).split()) or "nested too deeply"  # YAML's spans lines
            raise DataError(f"{path}: not valid {path.suffix[1:].upper()} ({problem})") from None
        return cls(spec, path, missing_values)

    @property
    def columns(self) -> list[str]:
        """The columns a table must have (the patient-id column too, if declared)."""
        ids = [self.patient_id] if self.patient_id else []
        return [self.label] + ids + [f["name"] for f in self.features]

    def indicated(self, feature: dict) -> bool:
        """Whether `feature` gets a "was missing" input.

        It does where it declares its missing markers and missing_values is "indicator".
        """
        return self.missing_values == "indicator" and "missing" in feature

    @property
    def input_names(self) -> list[str]:
        """The model's inputs, by name.

        One per numeric feature, one per category, and one "<feature> missing" after
        each feature that is indicated.
        """
        names = []
        for f in self.features:
            if f["type"] == "numeric":
                names.append(f["name"])
            else:
                names += [f"{f['name']}={c}" for c in f["categories"]]
            if self.indicated(f):
                names.append(f"{f['name']} missing")
        return names

    def is_missing(self, column: str, cells: np.ndarray) -> np.ndarray:
        """Which of a column's cells (stripped text) mean "not recorded".

        Those that are empty, or one of the feature's declared markers (numbers compared
        as numbers).
        """
        cells = np.asarray(cells, dtype=str)
        feature = next((f for f in self.features if f["name"] == column), {})
        return (cells == "") | matches(cells, feature.get("missing", []))

    def categories_of(self, feature: dict, cells: np.ndarray) -> np.ndarray:
        """Each cell as the category it names, or "" where it names none.

        Categories are written as in the dictionary ("1.0" is category 1).
        """
        cells, found = np.asarray(cells, dtype=str), np.full(len(cells), "", dtype=object)
        for category in feature["categories"]:
            found[matches(cells, [category]) & (found == "")] = str(category)
        return found

    def encode(
        self, columns: dict[str, np.ndarray], missing: dict[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """Model inputs from checked feature columns, encoded from the dictionary alone.

        Numeric values are mapped from their declared range (log-scaled if declared) to
        [-1, 1], categories one-hot, and a missing value as its declared fill plus 1 in
        its "missing" input. Row by row: no other row, and no statistic of any, enters
        a row's encoding.

        Parameters
        ----------
        columns : dict of str to np.ndarray
            Each feature's checked values, by name.
        missing : dict of str to np.ndarray, optional
            Each indicated feature's missing cells (a boolean mask), by name.

        Returns
        -------
        np.ndarray
            One float32 row of inputs per patient, in input_names' order.
        """
        missing = missing or {}
        encoded = []
        for f in self.features:
            absent = missing.get(f["name"], np.zeros(len(columns[f["name"]]), bool))
            values = np.asarray(columns[f["name"]], dtype=object)
            if f["type"] == "numeric":
                fill = f.get("fill", (f["min"] + f["max"]) / 2)
                encoded.append(_scaled(f, np.where(absent, fill, values).astype(float)))
            else:
                fill = self.categories_of(f, [str(f["fill"])])[0] if "fill" in f else ""
                as_text = np.where(absent, fill, values.astype(str))
                encoded += [(as_text == str(c)).astype(float) for c in f["categories"]]
            if self.indicated(f):
                encoded.append(absent.astype(float))
        return np.column_stack(encoded).astype(np.float32)

    def subgroups(self, x: np.ndarray) -> list[Subgroup]:
        """The subgroups of encoded rows `x` for every feature marked "subgroups".

        In the dictionary's order. A patient whose value is missing belongs to none of
        that feature's subgroups.
        """
        found = []
        for f in self.features:
            marked = f.get("subgroups")
            if marked is None:
                continue
            names = self.input_names
            known = (
                x[:, names.index(f"{f['name']} missing")] == 0
                if self.indicated(f)
                else np.ones(len(x), bool)
            )
            if f["type"] == "numeric":
                column = x[:, names.index(f["name"])]
                edges = [-np.inf, *_scaled(f, np.array(marked, float)).astype(np.float32), np.inf]
                for i, (low, high) in enumerate(itertools.pairwise(edges)):
                    found.append(
                        Subgroup(
                            f["name"],
                            _band_name(f["name"], marked, i),
                            known & (column >= low) & (column < high),
                        )
                    )
            else:
                named = marked if isinstance(marked, dict) else {}
                for category in f["categories"]:
                    label = next(
                        (n for c, n in named.items() if matches([c], [category])[0]),
                        None if named else str(category),
                    )
                    if label is not None:
                        label = " ".join(label.split())
                        column = x[:, names.index(f"{f['name']}={category}")]
                        members = known & (column == 1)
                        found.append(Subgroup(f["name"], f"{f['name']} = {label}", members))
        return found

    def unrecorded(self, x: np.ndarray) -> dict[str, int]:
        """How many of encoded rows `x` have each feature marked "subgroups" missing.

        Only for features whose missing values are encoded (indicated): those patients
        are in none of its subgroups.
        """
        names = self.input_names
        return {
            f["name"]: int(x[:, names.index(f"{f['name']} missing")].sum())
            for f in self.features
            if "subgroups" in f and self.indicated(f)
        }

    def labels(self, values: np.ndarray) -> np.ndarray:
        """1.0 for a positive (disease) value, 0.0 for any other."""
        cells = np.asarray(values).astype(str)
        return matches(cells, self.positive_values).astype(np.float32)

    def decision(self, positive: bool) -> str:
        """The label value a positive or negative decision stands for.

        "1/2/3/4" where several values mean the same.
        """
        return "/".join(map(str, self.positive_values if positive else self.negative_values))

    def is_label(self, values: np.ndarray) -> np.ndarray:
        """Which values are one of the label's declared positive or negative values."""
        return matches(np.asarray(values).astype(str), self.positive_values + self.negative_values)


def _scaled(feature: dict, values: np.ndarray) -> np.ndarray:
    """A numeric feature's values mapped from its declared range to [-1, 1].

    Log-scaled if declared; clipped to the range.
    """
    low, high, v = feature["min"], feature["max"], np.clip(values, feature["min"], feature["max"])
    if feature.get("log"):
        low, high, v = np.log1p(low), np.log1p(high), np.log1p(v)
    return 2 * (v - low) / (high - low) - 1


def _band_name(name: str, edges: list[float], band: int) -> str:
    """A band's name, e.g. "age < 50", "50 <= age < 65", "age >= 65" for edges [50, 65].

    Each edge is written as the dictionary gives it (50, 50.000001, 1234567).
    """
    low, high = (
        (_edge(edges[band - 1]) if band else None),
        (_edge(edges[band]) if band < len(edges) else None),
    )
    if low is None:
        return f"{name} < {high}"
    if high is None:
        return f"{name} >= {low}"
    return f"{low} <= {name} < {high}"


def _edge(value: float) -> str:
    """A band edge in the fewest digits that still give its exact value."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _PlainYaml(yaml.SafeLoader):
    """YAML without aliases (*name).

    A dictionary has no use for them, and nested aliases expand exponentially ("billion
    laughs").
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not allowed in a data dictionary")
        return super().compose_node(parent, index)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict, refusing a key that appears twice."""
    keys = [key for key, _ in pairs]
    repeated = next((key for key in keys if keys.count(key) > 1), None)
    if repeated is not None:
        raise ValueError(f"the key {quoted(repeated)} appears twice in one object")
    return dict(pairs)


def _no_nan(constant: str) -> float:
    """Refuse JSON's NaN and Infinity constants."""
    raise ValueError(f"{constant} is not a number a dictionary may hold")


def _finite(value: object) -> bool:
    """Whether every number in a parsed dictionary is a finite float.

    YAML's .nan and .inf, or an integer too large for a float, are not.
    """
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    if isinstance(value, list):
        return all(map(_finite, value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return math.isfinite(float(value))
        except OverflowError:
            return False
    return True


@functools.cache
def _validator():
    """The JSON Schema's validator, read once per process.

    A worker opens a hospital, and so reads its dictionary, for every message.
    """
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(STRUCTURE.read_text()))


def check_structure(spec: object, source: str) -> None:
    """Check the dictionary against its JSON Schema (schemas/data-dictionary.schema.json).

    Raises
    ------
    DataError
        One line naming the first wrong field and what it may be, or saying that a
        number is not finite.
    """
    import jsonschema  # imported here: only a run that reads a dictionary pays for it

    try:
        error = jsonschema.exceptions.best_match(_validator().iter_errors(spec))
    except RecursionError:
        raise DataError(f"{source}: the data dictionary is nested too deeply") from None
    if error is None:
        if not _finite(spec):
            raise DataError(f"{source}: every number must be finite (no NaN or infinity)")
        return
    where, node = "", spec
    for step in error.absolute_path:  # e.g. features, 0, min -> feature 'age'.min
        item = node[step]
        if where == "features" and isinstance(item, dict) and isinstance(item.get("name"), str):
            where = f"feature {quoted(item['name'])}"
        else:
            where = f"{where}[{step}]" if isinstance(step, int) else f"{where}.{step}".lstrip(".")
        node = item
    where = where or "the data dictionary"
    allowed = error.schema.get("description") if isinstance(error.schema, dict) else None
    raise DataError(f"{source}: {where}: {error.message}" + (f" ({allowed})" if allowed else ""))


def matches(cells: np.ndarray | list[str], values: list) -> np.ndarray:
    """Which text cells equal one of `values`: text as text, numbers as numbers."""
    cells = np.asarray(cells, dtype=str)
    found = np.zeros(len(cells), dtype=bool)
    if any(not isinstance(value, str) for value in values):
        numbers = np.array([_number(c) for c in cells], dtype=float)
    for value in values:
        found |= (cells == value) if isinstance(value, str) else (numbers == value)
    return found


def _listed(value: object) -> list:
    """A label value or list of values, as a list."""
    return list(value) if isinstance(value, list) else [value]


# A number as tables write one: plain ASCII decimal, optional sign and exponent.
NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _number(text: str) -> float:
    """`text` as a number, NaN if it is none.

    Python's float() would also read "1_0", non-ASCII digits, "inf" and "nan".
    """
    return float(text) if NUMBER.fullmatch(text) else float("nan")
