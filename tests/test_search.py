"""The accounted hyper-parameter search (sweep.py --search-budget).

Every trial and every score it compares is charged to the hospitals' lasting ledgers,
the charge recomputed independently, its cost said before it starts and refused where
it is not affordable.
"""

import json

import pytest
from conftest import EXAMPLE, own_data_copy, run_script
from test_privacy import independent_epsilon

from securehealth import settings
from securehealth.results import default_state_root
from securehealth.state_directory import LEDGER_FILE
from securehealth.tools import search


def sweep(*args, cwd):
    return run_script("sweep.py", *args, cwd=cwd)


def test_a_search_charges_every_trial_and_score_to_the_lasting_ledgers(tmp_path):
    own = own_data_copy(EXAMPLE, tmp_path / "own")
    flags = ["--dataset", "csv", "--data-dir", own, "--rounds", "2", "--epsilon", "4"]
    flags += ["--grid", "learning_rate=0.1,1", "--run-dir", tmp_path / "run"]
    result = sweep(*flags, "--search-budget", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stdout.split())
    assert said.index("raises each hospital's cumulative epsilon by at most 3") < said.index("|")
    found = json.loads((tmp_path / "run" / "search.json").read_text())
    assert [t["changes"] for t in found["trials"]] == [
        {"learning_rate": "0.1"},
        {"learning_rate": "1"},
    ]
    for hospital in range(3):
        path = default_state_root() / "simulation" / f"hospital-{hospital}" / LEDGER_FILE
        ledger = json.loads(path.read_text())
        runs = {r["run_id"] for r in ledger["releases"]}
        assert len(runs) == 2  # one run per candidate
        scores = [r for r in ledger["releases"] if r["mechanism"] == "operating-point"]
        assert 1 <= len(scores) <= 2  # each score a release, where it was released
        history = [
            (r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in ledger["releases"]
        ]
        recomputed = independent_epsilon(history, 1e-5, "replace-one")
        after = found["trials"][-1]["epsilon_after"][hospital]
        assert recomputed <= after + 1e-6 and after <= 3 * (1 + 1e-3)
        assert found["trials"][0]["epsilon_after"][hospital] <= 1.5 * (1 + 1e-3)
        # The ledger was new: the search alone is everything in it.
        alone = found["epsilon_of_the_search_alone"][hospital]
        assert alone == pytest.approx(after, rel=1e-6) and recomputed <= alone + 1e-6
        # The trials' models were not evaluated on held-out patients (figures without DP).
        assert not (path.parent / "evaluation.json").exists()
    # What is left is what a later run may spend: a second search of 3 is refused.
    again = sweep(
        *flags[:-2], "--run-dir", tmp_path / "again", "--search-budget", "3", cwd=tmp_path
    )
    assert again.returncode == 2 and "give a smaller --search-budget" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "again").exists()


def test_a_search_on_a_demonstration_spends_nothing_lasting(tmp_path):
    flags = ["--dataset", "csv", "--data-dir", EXAMPLE, "--rounds", "1"]
    flags += ["--grid", "learning_rate=0.1,1", "--search-budget", "0.5"]
    result = sweep(*flags, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "scratch ledger" in result.stdout
    assert not (default_state_root() / "simulation").exists()
    index = default_state_root() / "data-ledgers.json"  # no claim on the shipped files
    assert not index.exists() or "examples" not in index.read_text()


@pytest.mark.parametrize(
    "grid, problem",
    [
        ("epsilon=1,2", "NAME one of learning_rate"),
        ("learning_rate=0.1", "give 2 to 20"),
        ("learning_rate=fast,0.1", "learning_rate"),
    ],
)
def test_a_grid_that_cannot_be_searched_is_refused_in_one_line(tmp_path, grid, problem):
    with pytest.raises(settings.SettingsError, match=problem):
        search.parse_grid(grid, settings.resolve())
    result = sweep("--grid", grid, "--search-budget", "0.5", cwd=tmp_path)
    assert result.returncode == 2 and problem in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_search_whose_first_candidate_cannot_be_scored_stops_there(tmp_path):
    # 0.1 a candidate on hospitals of 96-240 training patients: the histograms drown,
    # and so would every other candidate's (the same share): stop, spending 0.1.
    own = own_data_copy(EXAMPLE, tmp_path / "own")
    flags = ["--dataset", "csv", "--data-dir", own, "--rounds", "2", "--search-budget", "0.3"]
    result = sweep(*flags, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads((tmp_path / "run" / "search.json").read_text())
    [trial] = found["trials"]
    assert trial["score"] is None and "too few under their noise" in trial["unscored"]
    assert max(trial["epsilon_after"]) <= 0.1 * (1 + 1e-3) and found["best"] is None
    assert "No candidate scored better than chance" in result.stdout
