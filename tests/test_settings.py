import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import ROOT

from securehealth import settings
from securehealth.config import Settings
from securehealth.privacy.report import Adjacency
from securehealth.results import RunDirError, new_run_dir


def parse(argv):
    return settings.parse(settings.make_parser("test"), argv)[0]


def test_defaults_come_from_config_py():
    cfg = parse([])
    assert isinstance(cfg, Settings)
    assert cfg == replace(Settings(), secure_aggregation="on")  # "auto" decided: a deployment
    assert (cfg.epsilon, cfg.delta, cfg.adjacency) == (1.0, 1e-5, Adjacency.REPLACE_ONE)


def test_overrides_with_dashes_or_underscores_and_typed():
    cfg = parse(["--learning-rate", "0.1", "--local_epochs", "2", "--hidden-layers", "32,16"])
    assert cfg.learning_rate == 0.1 and isinstance(cfg.learning_rate, float)
    assert cfg.local_epochs == 2 and isinstance(cfg.local_epochs, int)
    assert cfg.hidden_layers == (32, 16)
    assert parse(["--hidden-layers", ""]).hidden_layers == ()


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--epsilon", "0"], "epsilon"),
        (["--epsilon", "-1"], "epsilon"),
        (["--epsilon", "nan"], "epsilon"),
        (["--delta", "0"], "delta"),
        (["--delta", "1.5"], "delta"),
        (["--rounds", "0"], "rounds"),
        (["--rounds", "2.5"], "rounds"),
        (["--batch-size", "many"], "batch_size"),
        (["--adjacency", "swap"], "adjacency"),
        (["--dataset", "mimic"], "dataset"),
        (["--missing-values", "impute"], "missing_values"),
        (["--num-clients", "1"], "min_fit_clients"),
        (["--min-fit-clients", "3", "--min-available-clients", "2"], "min_available_clients"),
        (["--epsilom", "2"], "epsilon"),  # unknown name: suggests the right one
        (["--secure-aggregation", "yes"], "secure_aggregation"),
        (["--aggregation", "mean"], "aggregation"),
        (["--max-update-norm", "0"], "max_update_norm"),
        # Robust aggregation needs single updates, which SecAgg+ hides.
        (["--aggregation", "median", "--secure-aggregation", "on"], "secure aggregation hides"),
    ],
)
def test_invalid_values_exit_2_with_one_line_naming_the_setting(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err


def test_run_config_round_trip():
    cfg = parse(["--rounds", "3", "--hidden-layers", "8,4"])
    run_config = settings.to_run_config(cfg)
    assert all(type(v) in (bool, int, float, str) for v in run_config.values())  # Flower's types
    assert settings.from_run_config(run_config) == cfg
    assert settings.from_run_config({}) == settings.resolve()  # config.py


def test_run_config_is_validated_too():
    with pytest.raises(settings.SettingsError, match="epsilon"):
        settings.from_run_config({"epsilon": -1})


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--epsilon", "0"], "epsilon"),
        (["--unknown-thing", "1"], "unknown_thing"),
        (["--num-clients", "300"], "training"),  # hospitals too small for DP-SGD
        (["--dataset", "csv"], "--data-dir"),
    ],
)
def test_simulation_script_rejects_bad_input_before_starting_anything(argv, named, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "simulation.py"), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_run_directory_in_use_is_refused_unless_overwrite_replaces_the_run(tmp_path):
    others = tmp_path / "others"
    (others / "notes").mkdir(parents=True)
    with pytest.raises(RunDirError, match="not empty.*--overwrite"):
        new_run_dir(str(others))
    with pytest.raises(RunDirError, match=r"not a run's \(notes\)"):  # only a run's files
        new_run_dir(str(others), overwrite=True)
    assert (others / "notes").is_dir()

    (others / "metrics.json").write_text("{}")  # a run's file among others: still theirs
    with pytest.raises(RunDirError, match=r"not a run's \(notes\)"):
        new_run_dir(str(others), overwrite=True)
    assert (others / "notes").is_dir()

    previous = tmp_path / "previous"
    (previous / "flower").mkdir(parents=True)
    for name in ("report.md", "model.pt"):
        (previous / name).write_text("old")
    (previous / "metrics.json").write_text("not a run's record")
    with pytest.raises(RunDirError, match="no run"):
        new_run_dir(str(previous), overwrite=True)
    (previous / "metrics.json").write_text('{"status": "finished"}')
    with pytest.raises(RunDirError, match="not empty"):
        new_run_dir(str(previous))
    assert (previous / "model.pt").read_text() == "old"
    assert new_run_dir(str(previous), overwrite=True) == previous
    assert list(previous.iterdir()) == []  # nothing of the old run mixes with the new

    (tmp_path / "a-file").write_text("")
    with pytest.raises(RunDirError, match="is a file"):
        new_run_dir(str(tmp_path / "a-file"))
    with pytest.raises(RunDirError, match="cannot write to run_dir .*Not a directory"):
        new_run_dir(str(tmp_path / "a-file" / "run"))
    assert new_run_dir(str(tmp_path / "new" / "run")).is_dir()  # parents are made


@pytest.mark.parametrize("script", ["simulation.py", "server.py", "sweep.py", "benchmark.py"])
def test_every_script_refuses_a_run_directory_in_use_in_one_line(script, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "report.md").write_text("someone's")
    more = {"server.py": ["--insecure"], "benchmark.py": ["flamby-heart"]}.get(script, [])
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *more, "--run-dir", "busy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("to replace the run in it")
    assert (tmp_path / "busy" / "report.md").read_text() == "someone's"


def test_every_setting_has_a_one_line_description():
    assert sorted(settings.HELP) == sorted(settings.DEFAULTS)
    assert [name for name, text in settings.HELP.items() if not text or "\n" in text] == []


def test_help_shows_each_settings_description_and_default():
    shown = " ".join(settings.make_parser("test").format_help().split())
    assert "TOTAL epsilon each hospital may spend over all rounds together [default: 1.0]" in shown


def test_auto_secure_aggregation_is_on_in_deployment_and_off_in_simulation():
    cfg = settings.resolve()
    assert cfg.secure_aggregation == "auto"
    assert settings.decide_auto(cfg).secure_aggregation == "on"
    assert settings.decide_auto(cfg, simulation=True).secure_aggregation == "off"
    explicit = settings.resolve({"secure_aggregation": "on"})
    assert settings.decide_auto(explicit, simulation=True).secure_aggregation == "on"
    with pytest.raises(settings.SettingsError, match="secure aggregation hides"):
        settings.decide_auto(settings.resolve({"aggregation": "median"}))  # deployment: on


@pytest.mark.parametrize(
    ("given", "layers"), [("32,16", (32, 16)), ("(32, 16)", (32, 16)), ("()", ()), ("", ())]
)
def test_hidden_layers_as_config_py_writes_them(given, layers):
    assert settings.resolve({"hidden_layers": given}).hidden_layers == layers
