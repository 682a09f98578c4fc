"""The shipped UCI Heart Disease files.

Four real sites, their gaps, and an encoding that no hospital's rows can move.
"""

import io
import shutil
from argparse import Namespace

import numpy as np
import pytest
from conftest import flower_context
from rich.console import Console

from securehealth import clientapp as client
from securehealth import data, settings
from securehealth.data import heart_disease
from securehealth.data.split import held_out_split
from securehealth.deployment.client_cli import own_data_files
from securehealth.node import open_hospital

CFG = settings.resolve({"dataset": "heart-disease", "num_clients": 4})


def site(hospital, schema=None, data_dir=""):
    schema = schema or data.load_schema(CFG)
    return heart_disease.read_site(heart_disease.site_file(hospital, data_dir), schema)


def column(x, name):
    return x[:, data.load_schema(CFG).input_names.index(name)]


def test_the_four_sites_with_their_patients_and_diagnoses():
    # UCI's published counts: patients, disease (num 1-4), men ("1.0" in Cleveland's
    # file and "1" in the others are the same category).
    counts = [(len(y), y.sum(), column(x, "sex=1").sum()) for x, y, _ in map(site, range(4))]
    assert counts == [(303, 139, 206), (294, 106, 213), (123, 115, 113), (200, 149, 194)]
    held_out = [data.hospital_data(CFG, h) for h in range(4)]
    assert [len(train[1]) + len(test[1]) for train, test in held_out] == [303, 294, 123, 200]
    x, y, described = data.reference_test_set(CFG)
    assert len(y) == sum(len(test[1]) for _, test in held_out) and "pooled" in described


def test_missing_markers_become_a_fill_value_and_a_was_missing_input():
    x = {h: site(h)[0] for h in range(4)}
    # Swiss cholesterol is recorded as 0 (not measured): every Swiss row is missing it;
    # Long Beach has 7 "?" and 49 zeros; Cleveland recorded every value.
    assert [column(x[h], "chol missing").sum() for h in range(4)] == [0, 23, 123, 56]
    fill = column(x[2], "chol")
    assert np.all(fill == fill[0])  # one declared fill value, not a statistic of rows
    assert [column(x[h], "ca missing").sum() for h in range(4)] == [4, 291, 118, 198]
    thal = x[1][:, [data.load_schema(CFG).input_names.index(f"thal={c}") for c in (3, 6, 7)]]
    missing = column(x[1], "thal missing") == 1
    assert not thal[missing].any() and np.all(thal[~missing].sum(axis=1) == 1)


def test_no_hospitals_rows_enter_anothers_encoding(tmp_path):
    copy = shutil.copytree(heart_disease.SHIPPED_DIR, tmp_path / "data")
    cleveland = heart_disease.site_file(0, copy)
    rows = cleveland.read_text().splitlines()
    # Cleveland's rows change wholesale: fewer patients, extreme values, new gaps.
    changed = [",".join(["77"] + r.split(",")[1:4] + ["0"] + r.split(",")[5:]) for r in rows]
    cleveland.write_text("\n".join(changed[:50]) + "\n")
    cfg = settings.resolve({**vars(CFG), "data_dir": str(copy)})
    for hospital in (1, 2, 3):
        (ours, our_test), (original, original_test) = (
            data.hospital_data(c, hospital) for c in (cfg, CFG)
        )
        for a, b in ((ours, original), (our_test, original_test)):
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # Row by row: a site's first five patients read alone encode as within the file.
    few = tmp_path / "few.data"
    few.write_text("\n".join(heart_disease.site_file(1).read_text().splitlines()[:5]) + "\n")
    alone = heart_disease.read_site(few, data.load_schema(CFG))[0]
    assert np.array_equal(alone, site(1)[0][:5])


def test_num_clients_is_the_number_of_sites():
    parser = settings.make_parser(None)
    cfg, _ = settings.parse(parser, ["--dataset", "heart-disease"])
    assert cfg.num_clients == 4
    with pytest.raises(SystemExit) as exited:
        settings.parse(parser, ["--dataset", "heart-disease", "--num-clients", "3"])
    assert exited.value.code == 2
    with pytest.raises(settings.SettingsError, match="num_clients must be 4, got 3"):
        settings.resolve({"dataset": "heart-disease", "num_clients": 3})


def test_other_missing_value_modes_name_the_gap():
    strict = settings.resolve({**vars(CFG), "missing_values": "fail"})
    with pytest.raises(data.DataError) as raised:
        data.hospital_data(strict, 0)
    assert str(raised.value).endswith(
        "processed.cleveland.data line 88, column 'thal': '?' means a missing value; fill "
        "it in, or set missing_values to 'drop' (with adjacency add-remove) to leave such "
        "patients out, or to "
        "'indicator' to encode it as missing"
    )
    dropped = settings.resolve({**vars(CFG), "missing_values": "drop", "adjacency": "add-remove"})
    assert (
        len(heart_disease.read_site(heart_disease.site_file(0), data.load_schema(dropped))[1])
        == 297
    )


def test_a_deployed_hospital_reads_its_own_sites_file(tmp_path):
    args = Namespace(client_id=2, data="", schema="")
    said = Console(file=io.StringIO())
    node = own_data_files(CFG, args, said)
    assert said.file.getvalue() == ""  # both classes at every site: no warning
    assert node == {
        "dataset": "heart-disease",
        "data-file": str(heart_disease.site_file(2)),
        "schema-file": str(heart_disease.SCHEMA_FILE),
    }
    own = {"partition-id": 2, "num-partitions": 4, "state-dir": str(tmp_path), "operator-key": ""}
    run = settings.to_run_config(CFG)
    # Without its own file it refuses: it never reads a file the server names.
    with pytest.raises(ValueError, match="start it with client.py --dataset heart-disease"):
        client.client_fn(flower_context(own, run))
    csv_run = settings.to_run_config(settings.resolve({"dataset": "csv", "data_dir": "x"}))
    with pytest.raises(ValueError, match="brought its own heart-disease data"):
        client.client_fn(flower_context({**own, **node, "num-partitions": 3}, csv_run))
    hospital = open_hospital(flower_context({**own, **node}, run))
    assert len(hospital.y) == 98  # Zurich and Basel's 123 less 25 held out


def test_which_patients_are_held_out_depends_on_the_rows_alone(tmp_path):
    # Not on missing_values: a patient's key is its row as written, not its encoding
    # (which gains "was missing" inputs under indicator).
    complete = tmp_path / "complete.data"  # Cleveland's patients without a gap
    rows = heart_disease.site_file(0).read_text().splitlines()
    complete.write_text("\n".join(r for r in rows if "?" not in r) + "\n")
    spec = data.Schema.load(heart_disease.SCHEMA_FILE).spec
    held_out = []
    for mode in ("fail", "indicator"):
        x, y, keys = heart_disease.read_site(complete, data.Schema(spec, "dictionary", mode))
        held_out.append(held_out_split(x, y, 0.2, keys)[1])
    assert np.array_equal(*held_out) and len(held_out[0]) == 59


def test_a_file_that_does_not_match_the_layout_is_one_line(tmp_path):
    wide = tmp_path / "wide.data"
    rows = heart_disease.site_file(1).read_text().splitlines()
    wide.write_text("\n".join(r + ",0" for r in rows) + "\n")
    with pytest.raises(data.DataError, match="wide.data: 15 columns, but its layout has 14"):
        heart_disease.read_site(wide, data.load_schema(CFG))
