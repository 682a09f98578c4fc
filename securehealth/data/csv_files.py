"""The `csv` data source: your own tables, one file per hospital.

A data directory holds DIR/hospital_<i>.csv per hospital, the data dictionary
DIR/schema.json (or .yaml) and the server's reference test set DIR/test.csv. read_csv
checks every cell against the dictionary; check_size refuses an oversized file unparsed.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from securehealth.config import Settings
from securehealth.data.schema import DataError, Schema
from securehealth.text import quoted

DESCRIPTION = "your own tables, one file per hospital (data_dir)"
FILES = True  # each hospital reads its own file
# The most bytes one patient's row may take (dozens of columns of numbers and short
# categories take 100-300; a thousand columns fit): a longer line, or a file with
# room for more rows than a hospital may hold, is refused before it is parsed.
MAX_ROW_BYTES = 16384


def csv_paths(cfg: Settings) -> tuple[Path, list[Path], Path]:
    """(schema file, hospital files, reference test file) of a csv data directory.

    Raises
    ------
    DataError
        Where no data_dir is set.
    """
    if not cfg.data_dir:
        raise DataError(
            "dataset 'csv' needs --data-dir: the folder with hospital_<i>.csv and schema.json"
        )
    directory = Path(cfg.data_dir)
    schemas = [directory / name for name in ("schema.json", "schema.yaml", "schema.yml")]
    schema = next((p for p in schemas if p.exists()), schemas[0])
    hospitals = [directory / f"hospital_{h}.csv" for h in range(cfg.num_clients)]
    return schema, hospitals, directory / "test.csv"


def check_size(path: Path, cfg: Settings) -> None:
    """Refuse a hospital's file that is not a regular file or holds more than a hospital may.

    Checked before anything is parsed and in bounded memory: the file's size against
    MAX_ROW_BYTES a row, then its lines, counted in 1 MB pieces until they are too
    many. A file that cannot be opened is left to its reader to report.

    Parameters
    ----------
    path : Path
        The hospital's file.
    cfg : Settings
        The run's settings: a hospital holds at most max_patients training patients
        once test_fraction of them are held out.

    Raises
    ------
    DataError
        For anything but a regular file (a device or a pipe would never end), more
        rows than a hospital may hold, or a line longer than MAX_ROW_BYTES.
    """
    max_rows = math.ceil(cfg.max_patients / (1 - cfg.test_fraction))
    why = (
        f"max_patients {cfg.max_patients} for training, test_fraction "
        f"{cfg.test_fraction:g} held out"
    )
    try:
        if path.exists() and not path.is_file():
            raise DataError(f"{path}: not a regular file; give the patients' CSV file itself")
        size = path.stat().st_size
        if size > (max_rows + 1) * MAX_ROW_BYTES:
            raise DataError(
                f"{path}: {size / 1e6:.0f} MB, more than {max_rows} patients' rows can "
                f"take ({why}, at most {MAX_ROW_BYTES} bytes a row): give this hospital "
                f"its own patients only"
            )
        lines, line_start, read = 0, 0, 0  # newlines; where the open line began; bytes
        with open(path, "rb") as file:
            while piece := file.read(1 << 20):
                ends = read + np.flatnonzero(np.frombuffer(piece, np.uint8) == ord("\n"))
                starts = np.concatenate(([line_start], ends[:-1] + 1))
                read, lines = read + len(piece), lines + len(ends)
                line_start = int(ends[-1]) + 1 if len(ends) else line_start
                if max((ends - starts).max(initial=0), read - line_start) > MAX_ROW_BYTES:
                    raise DataError(
                        f"{path}: a line longer than {MAX_ROW_BYTES} bytes, more than a "
                        f"patient's row takes: give this hospital its own patients' table"
                    )
                # The header row, and a last line without a newline, are lines too.
                if lines + (read > line_start) - 1 > max_rows:
                    raise DataError(
                        f"{path}: more than the {max_rows} rows a hospital may hold ({why}): "
                        f"give this hospital its own patients only"
                    )
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return


def read_csv(
    path: str | Path,
    schema: Schema,
    labelled: bool = True,
    header: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A hospital's (or the server's) table, checked cell by cell against the data dictionary.

    Parameters
    ----------
    path : str or Path
        The CSV file.
    schema : Schema
        The data dictionary; missing values are handled as its missing_values says.
    labelled : bool
        Whether the label column is required. If not, it may be left out (new patients
        to score), and y is then None.
    header : list of str, optional
        The column names of a file without a header row; the dictionary's are used.

    Returns
    -------
    tuple
        (x, y, keys). A patient's key is its patient_id if the dictionary declares
        one, else its row as written (every cell): the hospital's held-out rule hashes
        it, so which patients are held out depends on the rows alone, never on a
        setting such as missing_values.

    Raises
    ------
    DataError
        The first problem found, named with its line: a file that cannot be read, a
        column missing or not in the dictionary, an unhandled missing value, a value
        outside its declared range or categories, a repeated patient_id.
    """
    path = Path(path)
    frame, written = _named_columns(_read_table(path), path, schema, header)
    required = _required_columns(frame, path, schema, labelled)
    table, written, missing = _kept_rows(frame, path, schema, required, written)
    _check_missing(table, schema, missing)
    columns = _feature_columns(table, schema, missing)
    keys = _patient_keys(table, schema, written)
    x = schema.encode(columns, missing)
    if schema.label not in required:  # unlabelled, and the file has no label column
        return x, None, keys
    return x, _label_values(table, schema), keys


@dataclass(frozen=True)
class _Table:
    """A table's stripped cells, with each row's line in the file, for error messages."""

    path: Path
    cells: Any  # a pandas DataFrame of text
    line: np.ndarray

    def fail(self, rows: np.ndarray, column: str, problem: str) -> NoReturn:
        """Raise DataError naming the first of `rows` in `column` and its `problem`."""
        first = np.flatnonzero(rows)[0]
        value = self.cells[column].iloc[first]
        raise DataError(
            f"{self.path} line {self.line[first]}, column {quoted(column)}: {quoted(value)} "
            f"{problem}"
        )


def _read_table(path: Path) -> Any:
    """The file's every cell as text, its header row read as a row."""
    import pandas as pd  # imported here: only CSV runs pay for it

    try:
        # Header row read as a row: pandas would rename a repeated column "age.1".
        return pd.read_csv(
            path, dtype=str, keep_default_na=False, skipinitialspace=True, header=None
        )
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError) as error:
        problem = " ".join(str(error).split())  # pandas' own message may span lines
        raise DataError(f"{path}: cannot read it as CSV ({problem})") from None


def _named_columns(
    frame: Any, path: Path, schema: Schema, header: list[str] | None
) -> tuple[Any, Any]:
    """The rows under their column names, and each row as written.

    The names come from the header row, or from `header` for a file without one (of
    which only the dictionary's columns are kept).
    """
    if header:  # the file's own layout: the dictionary chooses the columns it uses
        if frame.shape[1] != len(header):
            raise DataError(
                f"{path}: {frame.shape[1]} columns, but its layout has {len(header)} "
                f"({', '.join(header)})"
            )
        frame.columns = header
    else:
        names = frame.iloc[0].str.strip().tolist()
        repeated = next((name for name in names if names.count(name) > 1), None)
        if repeated is not None:
            raise DataError(f"{path}: column {quoted(repeated)} appears twice in the header row")
        frame = frame.iloc[1:].set_axis(names, axis=1)
    written = frame[sorted(frame.columns)].apply(lambda col: col.str.strip())
    written = written.agg("\x1f".join, axis=1)  # each row as written, column by column
    if header:
        frame = frame[[c for c in header if c in schema.columns]]
    return frame, written


def _required_columns(frame: Any, path: Path, schema: Schema, labelled: bool) -> list[str]:
    """The dictionary's columns the table must have, refusing any it does not declare.

    The label column is required where the table is `labelled` or has one.
    """
    extra = [c for c in frame.columns if c not in schema.columns]
    lacking = any(c not in frame.columns for c in schema.columns if c != schema.label)
    if lacking and len(extra) * 2 > len(frame.columns):
        shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
        raise DataError(
            f"{path}: most of its columns are not in {schema.source} ({shown}: "
            f"{len(extra)} of {len(frame.columns)}), and some of the dictionary's are "
            f"missing: is it a file of another data set?"
        )
    if extra:
        advice = (
            "add it to the data dictionary or remove it from the file"
            if labelled
            else "remove it from the file (a model reads only its own dictionary's columns)"
        )
        raise DataError(f"{path}: column {quoted(extra[0])} is not in {schema.source}; {advice}")
    has_label = labelled or schema.label in frame.columns
    required = [c for c in schema.columns if has_label or c != schema.label]
    absent = [c for c in required if c not in frame.columns]
    if absent:
        what = "the label column" if absent[0] == schema.label else "column"
        raise DataError(f"{path}: {what} {quoted(absent[0])} of {schema.source} is missing")
    return required


def _kept_rows(
    frame: Any, path: Path, schema: Schema, required: list[str], written: Any
) -> tuple[_Table, Any, dict[str, np.ndarray]]:
    """The required cells, each row as written, and each column's missing cells.

    Of the rows kept: with missing_values "drop", only those without a missing value.
    """
    line = frame.index.to_numpy() + 1  # file line numbers
    cells = frame[required].apply(lambda col: col.str.strip())
    missing = {c: schema.is_missing(c, cells[c].to_numpy()) for c in required}
    if schema.missing_values == "drop":
        keep = ~np.any(list(missing.values()), axis=0)
        cells, line, written = cells[keep], line[keep], written[keep]
        missing = {c: gaps[keep] for c, gaps in missing.items()}
    return _Table(path, cells, line), written, missing


def _check_missing(table: _Table, schema: Schema, missing: dict[str, np.ndarray]) -> None:
    """Refuse the first missing value that missing_values does not handle in its column."""
    encodable = {f["name"] for f in schema.features if schema.indicated(f)}
    unhandled = [
        (np.flatnonzero(gaps)[0], c)
        for c, gaps in missing.items()
        if c not in encodable and gaps.any()
    ]
    if unhandled:
        row, column = min(unhandled)
        value = table.cells[column].iloc[row]
        what = "empty value" if value == "" else f"{quoted(value)} means a missing value"
        fix = "set missing_values to 'drop' (with adjacency add-remove) to leave such patients out"
        if schema.missing_values == "indicator" and column not in (schema.label, schema.patient_id):
            fix = f'declare the feature\'s missing markers ("missing": [...]), or {fix}'
        elif schema.missing_values == "fail":
            fix = f"{fix}, or to 'indicator' to encode it as missing"
        raise DataError(
            f"{table.path} line {table.line[row]}, column {quoted(column)}: {what}; "
            f"fill it in, or {fix}"
        )


def _feature_columns(
    table: _Table, schema: Schema, missing: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Each feature's values (numbers, or category names), checked against the dictionary.

    A number must lie in its declared range, a category be one of the declared ones.
    """
    import pandas as pd

    columns = {}
    for f in schema.features:
        raw, gap = table.cells[f["name"]], missing[f["name"]]
        if f["type"] == "numeric":
            values = pd.to_numeric(raw.where(~gap, "nan"), errors="coerce").to_numpy(float)
            if (np.isnan(values) & ~gap).any():
                table.fail(np.isnan(values) & ~gap, f["name"], "is not a number")
            outside = ((values < f["min"]) | (values > f["max"])) & ~gap
            if outside.any():
                table.fail(
                    outside,
                    f["name"],
                    f"is outside the declared range [{f['min']}, "
                    f"{f['max']}]; correct it or widen the range",
                )
            columns[f["name"]] = values
        else:
            named = schema.categories_of(f, raw.to_numpy())
            unknown = (named == "") & ~gap
            if unknown.any():
                table.fail(unknown, f["name"], f"is not one of the categories {f['categories']}")
            columns[f["name"]] = named
    return columns


def _patient_keys(table: _Table, schema: Schema, written: Any) -> np.ndarray:
    """Each patient's key: its patient_id (each appearing once), else its row as written."""
    if not schema.patient_id:
        return written.to_numpy()
    repeated = table.cells[schema.patient_id].duplicated().to_numpy()
    if repeated.any():
        table.fail(repeated, schema.patient_id, "appears twice: each patient must have one row")
    return table.cells[schema.patient_id].to_numpy()


def _label_values(table: _Table, schema: Schema) -> np.ndarray:
    """The labels (1.0 disease, 0.0 not), each a declared positive or negative value."""
    label = table.cells[schema.label]
    odd = ~schema.is_label(label.to_numpy())
    if odd.any():
        table.fail(
            odd,
            schema.label,
            f"is neither the positive label {schema.positive!r} nor "
            f"the negative {schema.negative!r}",
        )
    return schema.labels(label.to_numpy())


def load_schema(cfg: Settings, schema_file: str | None = None) -> Schema:
    """The federation's data dictionary: a hospital's own --schema file, else data_dir's."""
    return Schema.load(schema_file or csv_paths(cfg)[0], cfg.missing_values)


def hospital_file(cfg: Settings, hospital: int) -> Path:
    """data_dir's hospital_<i>.csv: a simulated hospital's file."""
    return csv_paths(cfg)[1][hospital]


def hospital_rows(
    cfg: Settings, hospital: int, schema: Schema, data_file: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str | Path]:
    """A hospital's patients, (x, y, keys, the file they come from).

    The file is a deployed hospital's own (client.py --data), else data_dir's
    hospital_<i>.csv, refused unread where it holds more than a hospital may
    (check_size).
    """
    source = data_file or hospital_file(cfg, hospital)
    check_size(Path(source), cfg)
    return (*read_csv(source, schema), source)


def reference_set(cfg: Settings, schema: Schema) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The server's test.csv, or None where there is none (see data.reference_test_set)."""
    test_file = csv_paths(cfg)[2]
    if not test_file.exists():
        return None
    return (*read_csv(test_file, schema)[:2], str(test_file))
