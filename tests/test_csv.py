"""Your own tables: a CSV directory with a data dictionary, good and bad."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE, ROOT

import data_utils
from securehealth import settings
from securehealth.data import read_once
from securehealth.data.csv_files import read_csv


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
    cfg = csv_settings(data_dir, "drop")
    (x, y), (tx, ty) = data_utils.hospital_data(cfg, 0)
    assert len(y) + len(ty) == 299


def test_dropping_patients_with_gaps_is_refused_under_replace_one(data_dir):
    # Replace-one releases the training count; dropping rows with gaps would let one
    # patient's record (the same record with an empty cell) change it.
    with pytest.raises(settings.SettingsError) as refused:
        settings.resolve({"dataset": "csv", "data_dir": str(data_dir), "missing_values": "drop"})
    assert "replace-one" in str(refused.value) and "add-remove" in str(refused.value)
    assert "\n" not in str(refused.value)


def declare_missing(data_dir, feature, markers, **more):
    """The data dictionary with `feature` declaring its missing markers."""
    path = data_dir / "schema.json"
    schema = json.loads(path.read_text())
    for f in schema["features"]:
        if f["name"] == feature:
            f.update({"missing": markers, **more})
    path.write_text(json.dumps(schema))


def csv_settings(data_dir, missing_values):
    """csv settings; dropping patients with gaps needs add-remove adjacency."""
    adjacency = "add-remove" if missing_values == "drop" else "replace-one"
    return settings.resolve(
        {
            "dataset": "csv",
            "data_dir": str(data_dir),
            "missing_values": missing_values,
            "adjacency": adjacency,
        }
    )


def test_a_declared_missing_marker_stops_the_run_or_drops_the_patient(data_dir):
    declare_missing(data_dir, "total_cholesterol", ["?", 0])  # 0: not measured
    edit(data_dir / "hospital_0.csv", set_cell(4, "total_cholesterol", "?"))
    edit(data_dir / "hospital_0.csv", set_cell(6, "total_cholesterol", "0.0"))
    with pytest.raises(data_utils.DataError) as stopped:
        data_utils.hospital_data(csv_settings(data_dir, "fail"), 0)
    message = str(stopped.value)
    assert "line 4, column 'total_cholesterol': '?' means a missing value" in message
    assert "'drop'" in message and "'indicator'" in message and "\n" not in message
    (x, y), (tx, ty) = data_utils.hospital_data(csv_settings(data_dir, "drop"), 0)
    assert len(y) + len(ty) == 298  # the two patients with a marker left out


def test_the_indicator_mode_encodes_a_missing_value_as_fill_plus_a_missing_input(data_dir):
    declare_missing(data_dir, "total_cholesterol", ["?", 0])
    declare_missing(data_dir, "smoker", [""])  # a category: no category, plus the flag
    edit(data_dir / "hospital_0.csv", set_cell(2, "total_cholesterol", "?"))
    edit(data_dir / "hospital_0.csv", set_cell(2, "smoker", ""))
    edit(data_dir / "hospital_0.csv", set_cell(3, "total_cholesterol", "0"))
    cfg = csv_settings(data_dir, "indicator")
    schema = data_utils.load_schema(cfg)
    names = schema.input_names
    assert names.index("total_cholesterol missing") == names.index("total_cholesterol") + 1
    assert names[-1] == "smoker missing" and len(names) == 10 + 2
    x, y, _ = read_csv(data_dir / "hospital_0.csv", schema)
    column = {name: x[:, i] for i, name in enumerate(names)}
    # The declared fill is the middle of the declared range, which encodes to 0.
    assert column["total_cholesterol"][:2].tolist() == [0.0, 0.0]
    assert column["total_cholesterol missing"][:3].tolist() == [1.0, 1.0, 0.0]
    assert column["smoker=yes"][0] == column["smoker=no"][0] == 0.0
    assert column["smoker missing"][:2].tolist() == [1.0, 0.0]
    assert len(y) == 300  # nobody left out


def test_a_declared_fill_value_is_used_and_checked(data_dir):
    declare_missing(data_dir, "total_cholesterol", ["?"], fill=2.0)  # the range's minimum
    edit(data_dir / "hospital_0.csv", set_cell(2, "total_cholesterol", "?"))
    cfg = csv_settings(data_dir, "indicator")
    schema = data_utils.load_schema(cfg)
    x, _, _ = read_csv(data_dir / "hospital_0.csv", schema)
    assert x[0, schema.input_names.index("total_cholesterol")] == -1.0
    declare_missing(data_dir, "total_cholesterol", ["?"], fill=99.0)
    with pytest.raises(data_utils.DataError, match='"fill" must be a number within'):
        data_utils.load_schema(cfg)


def test_the_indicator_mode_still_refuses_a_gap_the_dictionary_does_not_declare(data_dir):
    edit(data_dir / "hospital_1.csv", set_cell(5, "bmi", ""))
    with pytest.raises(data_utils.DataError, match="line 5, column 'bmi': empty value.*declare"):
        data_utils.hospital_data(csv_settings(data_dir, "indicator"), 1)


def test_no_statistic_of_any_hospitals_rows_enters_the_encoding(data_dir):
    """A patient's inputs are the same whatever the other rows are.

    Changing another hospital's rows, or this hospital's other rows, changes none of them.
    """
    declare_missing(data_dir, "total_cholesterol", ["?", 0])
    edit(data_dir / "hospital_0.csv", set_cell(2, "total_cholesterol", "?"))
    cfg = csv_settings(data_dir, "indicator")
    schema = data_utils.load_schema(cfg)
    before, _, _ = read_csv(data_dir / "hospital_0.csv", schema)
    for line in range(2, 40):  # hospital 1: very different patients
        edit(data_dir / "hospital_1.csv", set_cell(line, "total_cholesterol", "0"))
        edit(data_dir / "hospital_1.csv", set_cell(line, "age", "90"))
    data_utils.hospital_data(cfg, 1)
    edit(data_dir / "hospital_0.csv", lambda lines: lines[:11])  # 10 of its own rows
    alone, _, _ = read_csv(data_dir / "hospital_0.csv", schema)
    assert np.array_equal(alone, before[:10])
    assert np.array_equal(read_csv(data_dir / "hospital_0.csv", schema)[0], alone)


def test_a_hospital_with_patients_of_one_class_is_warned_about(data_dir):
    cfg = csv_settings(data_dir, "fail")
    assert data_utils.check_all(cfg) == []

    def all_healthy(lines):  # chd is the first column
        return [lines[0]] + ["no" + line[line.index(",") :] for line in lines[1:]]

    edit(data_dir / "hospital_1.csv", all_healthy)
    [warning] = data_utils.check_all(cfg)
    assert warning.startswith("hospital 1: all ") and "training patients are negative" in warning


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
    "data dictionary of the wrong shape": (
        "schema.json",
        lambda p: p.write_text('{"label": "chd", "features": "age"}'),
        ["schema.json: label: 'chd' is not of type 'object'"],
    ),
    "a column twice": (
        "hospital_0.csv",
        lambda p: edit(p, lambda ls: [ls[0].replace("bmi", "age")] + ls[1:]),
        ["hospital_0.csv: column 'age' appears twice in the header row"],
    ),
    "a 10 KB cell": (  # only the cell's start is echoed, and its length
        "hospital_0.csv",
        lambda p: edit(p, set_cell(5, "bmi", "9" * 10_000)),
        ["line 5, column 'bmi'", "'9999999999", "... (10000 characters)", "not a number"],
    ),
    "a 200 KB line": (  # longer than any patient's row: refused before it is parsed
        "hospital_0.csv",
        lambda p: edit(p, set_cell(5, "bmi", "9" * 200_000)),
        ["hospital_0.csv: a line longer than 16384 bytes"],
    ),
    "a ragged row": (
        "hospital_1.csv",
        lambda p: edit(p, lambda ls: ls[:7] + [ls[7] + ",1,2"] + ls[8:]),
        ["hospital_1.csv: cannot read it as CSV", "line 8"],
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
    assert len(lines[0]) < 500, lines[0][:1000]
    assert not (tmp_path / "run").exists()


def test_a_file_with_more_rows_than_a_hospital_may_hold_is_refused_before_it_is_parsed(
    data_dir, monkeypatch
):
    import pandas as pd

    cfg = settings.resolve({"dataset": "csv", "data_dir": str(data_dir), "max_patients": 40})
    rows = (data_dir / "hospital_0.csv").read_text().splitlines()
    assert len(rows) - 1 > 50  # max_patients 40 training, 20 % held out: at most 50 rows

    def no_parsing(*args, **kwargs):
        raise AssertionError("the file was parsed")

    monkeypatch.setattr(pd, "read_csv", no_parsing)
    with pytest.raises(data_utils.DataError, match="more than the 50 rows a hospital may hold"):
        data_utils.hospital_data(cfg, 0)
    with pytest.raises(data_utils.DataError, match="more than the 50 rows a hospital may hold"):
        with read_once(data_dir / "hospital_0.csv", cfg):
            pass


def test_a_200_mb_file_is_refused_by_client_py_in_bounded_memory(data_dir, tmp_path):
    # Parsed whole, 5.6 million rows take 9.1 GB and more than 300 s, without a word.
    header, *rows = (data_dir / "hospital_0.csv").read_bytes().splitlines(keepends=True)
    big = tmp_path / "big.csv"
    with open(big, "wb") as file:
        file.write(header)
        while file.tell() < 200_000_000:
            file.write(b"".join(rows) * 100)
    # The child's peak memory, measured by a parent that runs nothing else.
    measure = (
        "import resource, subprocess, sys; "
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "print(r.stderr)"
    )
    client = [str(ROOT / "client.py"), "--client-id", "0", "--insecure"]
    client += ["--data", str(big), "--schema", str(data_dir / "schema.json")]
    result = subprocess.run(
        [sys.executable, "-c", measure, sys.executable, *client],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")},
    )
    exit_code, peak_kb = map(int, result.stdout.split("\n")[0].split())
    stderr = result.stdout.split("\n", 1)[1].strip()
    assert exit_code == 2 and len(stderr.splitlines()) == 1, result.stdout
    assert "big.csv: more than the 12500 rows a hospital may hold" in stderr
    assert peak_kb < 500_000, peak_kb


def test_a_device_a_pipe_or_a_table_of_endless_lines_is_refused_before_it_is_read(
    data_dir, tmp_path
):
    # Read unchecked, --data /dev/zero loops forever, a pipe blocks, a 21 MB header
    # of 2 million columns takes 2.9 GB, and --schema /dev/zero is read until
    # MemoryError.
    cfg = settings.resolve({"dataset": "csv", "data_dir": str(data_dir)})
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(100_000)) + "\n1\n")
    for data_file, problem in (
        ("/dev/zero", "not a regular file"),
        (str(pipe), "not a regular file"),
        (str(wide), "a line longer than 16384 bytes"),
    ):
        with pytest.raises(data_utils.DataError, match=problem):
            data_utils.hospital_data(cfg, 0, data_file, str(data_dir / "schema.json"))
    with pytest.raises(data_utils.DataError, match="not a regular file"):
        data_utils.hospital_data(cfg, 0, str(data_dir / "hospital_0.csv"), "/dev/zero")
