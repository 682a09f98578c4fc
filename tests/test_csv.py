"""Your own tables: a CSV directory with a data dictionary, good and bad."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE, ROOT

import data_utils
from securehealth import settings


@pytest.fixture
def data_dir(tmp_path):
    return Path(shutil.copytree(EXAMPLE, tmp_path / "data"))


def edit(path, change):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(change(lines)) + "\n")


def drop_column(name):
    def change(lines):
        index = lines[0].split(",").index(name)
        return [",".join(c for i, c in enumerate(line.split(",")) if i != index) for line in lines]

    return change


def set_cell(line_number, column, value):
    def change(lines):
        index = lines[0].split(",").index(column)
        cells = lines[line_number - 1].split(",")
        cells[index] = value
        lines[line_number - 1] = ",".join(cells)
        return lines

    return change


def test_a_csv_directory_loads_with_its_data_dictionary(data_dir):
    cfg = settings.resolve({"dataset": "csv", "data_dir": str(data_dir)})
    data_utils.check_all(cfg, pool_held_out=False)
    (x, y), (test_x, test_y) = data_utils.hospital_data(cfg, 0)
    assert len(y) + len(test_y) == 300 and x.shape[1] == 10  # 6 numeric + 2 x 2 categories
    assert set(np.unique(y)) == {0.0, 1.0}
    reference_x, reference_y, described = data_utils.reference_test_set(cfg)
    assert len(reference_y) == 200 and described.endswith("test.csv")
    # Columns may come in any order: they are matched by name.
    edit(
        data_dir / "hospital_1.csv",
        lambda lines: [",".join(reversed(line.split(","))) for line in lines],
    )
    assert np.array_equal(
        data_utils.hospital_data(cfg, 1)[0][0],
        data_utils.hospital_data(settings.resolve({"dataset": "csv", "data_dir": str(EXAMPLE)}), 1)[
            0
        ][0],
    )


def test_without_test_csv_a_simulation_pools_the_held_out_rows(data_dir):
    (data_dir / "test.csv").unlink()
    cfg = settings.resolve({"dataset": "csv", "data_dir": str(data_dir)})
    x, y, described = data_utils.reference_test_set(cfg)
    assert len(y) == sum(len(data_utils.hospital_data(cfg, h)[1][1]) for h in range(3))
    assert "pooled" in described
    with pytest.raises(data_utils.DataError, match="needs its own reference test set"):
        data_utils.check_all(cfg, pool_held_out=False)  # a deployed server


def test_missing_values_can_be_dropped_deliberately(data_dir):
    edit(data_dir / "hospital_0.csv", set_cell(7, "bmi", ""))
    cfg = settings.resolve({"dataset": "csv", "data_dir": str(data_dir), "missing_values": "drop"})
    (x, y), (tx, ty) = data_utils.hospital_data(cfg, 0)
    assert len(y) + len(ty) == 299


BAD_CASES = {
    "missing file": ("hospital_2.csv", lambda p: p.unlink(), ["hospital_2.csv", "not found"]),
    "missing label column": (
        "hospital_0.csv",
        lambda p: edit(p, drop_column("chd")),
        ["label column 'chd'"],
    ),
    "column not in the schema": (
        "hospital_1.csv",
        lambda p: edit(p, lambda ls: [ls[0] + ",weight"] + [line + ",70" for line in ls[1:]]),
        ["hospital_1.csv", "'weight' is not in", "add it to the data dictionary"],
    ),
    "schema column missing": (
        "hospital_0.csv",
        lambda p: edit(p, drop_column("bmi")),
        ["column 'bmi'", "missing"],
    ),
    "not a number": (
        "hospital_0.csv",
        lambda p: edit(p, set_cell(5, "bmi", "abc")),
        ["hospital_0.csv line 5, column 'bmi'", "not a number"],
    ),
    "empty cell": (
        "hospital_2.csv",
        lambda p: edit(p, set_cell(9, "age", "")),
        ["hospital_2.csv line 9, column 'age'", "empty", "missing_values"],
    ),
    "label not binary": (
        "hospital_0.csv",
        lambda p: edit(p, set_cell(3, "chd", "maybe")),
        ["line 3, column 'chd'", "neither the positive"],
    ),
    "outside the declared range": (
        "hospital_0.csv",
        lambda p: edit(p, set_cell(4, "age", "150")),
        ["line 4, column 'age'", "outside the declared range", "widen"],
    ),
    "unknown category": (
        "hospital_1.csv",
        lambda p: edit(p, set_cell(2, "sex", "unknown")),
        ["line 2, column 'sex'", "categories"],
    ),
    "too few patients": (
        "hospital_2.csv",
        lambda p: edit(p, lambda ls: ls[:10]),
        ["hospital_2.csv", "for training", "at least 10"],
    ),
    "bad data dictionary": (
        "schema.json",
        lambda p: p.write_text("{ not json"),
        ["schema.json", "not valid JSON"],
    ),
}


@pytest.mark.parametrize("case", BAD_CASES, ids=list(BAD_CASES))
def test_bad_data_stops_with_one_line_and_nothing_written(case, data_dir, tmp_path):
    file, spoil, words = BAD_CASES[case]
    spoil(data_dir / file)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "simulation.py"),
            "--dataset",
            "csv",
            "--data-dir",
            str(data_dir),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "run").exists()
