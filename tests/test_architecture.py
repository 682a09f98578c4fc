"""The package's shape, as docs/explanation/architecture.md describes it.

Flower internals only behind securehealth/flower.py, the app bundle holding only what
the hospitals and the ServerApp run, the apps never loading the tools or launchers,
no import circles, and one aggregation registry and FedAvg loop.
"""

import ast
import inspect
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import import_module
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT
from scipy.stats import trim_mean

from securehealth import flower, settings
from securehealth.aggregation import AGGREGATIONS, ServerMomentum, combine
from securehealth.deployment import client_cli, pinning, runtime
from securehealth.tools.federation import federate

# Flower's public API: what any module may import (securehealth/flower.py aside).
PUBLIC_FLOWER = {
    "flwr.app",
    "flwr.client",
    "flwr.client.mod",
    "flwr.clientapp",
    "flwr.common",
    "flwr.server",
    "flwr.server.strategy",
    "flwr.server.workflow",
    "flwr.serverapp",
    "flwr.serverapp.strategy",
}


def flower_imports(path):
    """The flwr modules a source file imports."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return {m for m in modules if m == "flwr" or m.startswith("flwr.")}


def product_sources():
    return [
        p
        for p in ROOT.rglob("*.py")
        if not {"tests", ".venv", "runs"} & set(p.relative_to(ROOT).parts)
    ]


def test_only_flower_py_touches_flowers_internals():
    outside = {
        str(path.relative_to(ROOT)): sorted(flower_imports(path) - PUBLIC_FLOWER)
        for path in product_sources()
        if path != ROOT / "securehealth" / "flower.py"
    }
    assert {name: found for name, found in outside.items() if found} == {}


def test_every_flower_internal_still_exists():
    """What a Flower upgrade would break, checked in one place."""
    for name in flower.__all__:
        assert getattr(flower, name) is not None
    for command, (installer_module, cli_module) in flower.APP_LAUNCHERS.items():
        assert callable(import_module(installer_module).install_from_fab)
        assert callable(getattr(import_module(cli_module), command.replace("-", "_")))
    factory_module, cli_module = flower.SUPERLINK_APP
    assert callable(import_module(factory_module).create_app)
    assert callable(import_module(cli_module).flower_superlink)
    pull_loop, cli_module = flower.SUPERNODE
    # run_supernode replaces the pull loop's `time`: it must use it only to wait.
    assert set(re.findall(r"\btime\.(\w+)", inspect.getsource(import_module(pull_loop)))) == {
        "sleep"
    }
    assert callable(import_module(cli_module).flower_supernode)
    # client.py reads the SuperNode's log: the end-of-run notice's reply is sent.
    logged = inspect.getsource(import_module(pull_loop))
    assert f'"{client_cli.RECEIVED}%s' in logged and f'"{client_cli.SENT}"' in logged


def test_another_flower_version_fails_closed_in_one_line():
    pretend = (
        "import importlib.metadata as metadata; real = metadata.version; "
        "metadata.version = lambda name: '1.43.0' if name == 'flwr' else real(name); "
        "import securehealth.serverapp"
    )
    result = subprocess.run(
        [sys.executable, "-c", pretend], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "Flower 1.42.0's internals" in last and "flwr 1.43.0 is installed" in last


def product_imports():
    """Every product module and the product modules it imports, at any level of the code.

    Imports inside functions count: they are how a circle hides from Python at
    import time, and the reader still has to follow them.
    """
    modules = {}
    for path in product_sources():
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        name = parts[:-1] if parts[-1] == "__init__" else parts
        modules[".".join(name)] = (path, parts[:-1])
    graph = {}
    for name, (path, package) in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package[: len(package) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def import_circles(graph):
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, circles = {}, {}, [], []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    return circles


def test_no_import_circles_at_any_level():
    assert import_circles(product_imports()) == []


def test_the_circle_finder_finds_a_circle():
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_imports_no_script_above_it():
    graph = product_imports()
    scripts = {name for name in graph if not name.startswith("securehealth")}
    above = {name: graph[name] & scripts for name in graph if name.startswith("securehealth")}
    assert {name: found for name, found in above.items() if found} == {}


def test_both_apps_live_in_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "securehealth.serverapp:app",
        "clientapp": "securehealth.clientapp:app",
    }


def test_the_apps_load_neither_tools_nor_launchers():
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, securehealth.serverapp, securehealth.clientapp; "
            "print(' '.join(sorted(m for m in sys.modules "
            "if m.startswith(('securehealth.tools', 'securehealth.deployment')))))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert loaded.stdout.strip() == ""


def test_a_message_that_does_not_train_loads_no_training_stack():
    # Flower starts a process per message; admission and the SecAgg+ stages (three of
    # a hospital's four messages a round) need neither the model nor the accountant.
    heavy = {"torch", "opacus", "sklearn", "pandas", "matplotlib", "dp_accounting", "scipy"}
    assert libraries_loaded_by("import securehealth.clientapp") & heavy == set()


def libraries_loaded_by(code):
    """The top-level packages a fresh Python has loaded after running `code` in ROOT."""
    loaded = subprocess.run(
        [sys.executable, "-c", f"{code}; import sys; print(' '.join(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    return {name.split(".")[0] for name in loaded.stdout.split()}


def test_the_app_bundle_ships_what_hospitals_run_and_nothing_else(tmp_path):
    built = subprocess.run(
        [runtime.executable("flwr"), "build", "--app", str(ROOT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (bundle,) = tmp_path.glob("*.fab")
    names = set(zipfile.ZipFile(bundle).namelist())
    for needed in ("server.py", "client.py", "securehealth/config.py", "securehealth/model.py"):
        assert needed in names
    assert (
        "securehealth/privacy/ledger.py" in names
        and "securehealth/schemas/breast_cancer.json" in names
    )
    assert (
        "securehealth/schemas/heart_disease.json" in names
        and "securehealth/data/heart_disease.py" in names
    )
    unshipped = ("securehealth/tools/", "securehealth/deployment/", "tests/")
    assert not [n for n in names if n.startswith(unshipped)]
    tools = {"simulation.py", "audit.py", "sweep.py", "bench.py", "report.py", "predict.py"}
    tools |= {"benchmark.py", "data/uci-heart-disease/processed.va.data"}
    tools.add("data_utils.py")
    assert not names & tools
    assert pinning.differences(bundle.read_bytes()) == []  # a hospital would run it
    # runtime.flwr_run bundles a copy of the shipped files (Flower's bundler reads every
    # file under the folder first): the same files, byte for byte.
    copied = subprocess.run(
        [runtime.executable("flwr"), "build", "--app", str(runtime.shipped_copy(tmp_path / "c"))],
        cwd=tmp_path / "c",
        capture_output=True,
    )
    assert copied.returncode == 0, copied.stdout + copied.stderr
    (from_copy,) = (tmp_path / "c").glob("*.fab")
    with zipfile.ZipFile(bundle) as original, zipfile.ZipFile(from_copy) as copy:
        assert sorted(copy.namelist()) == sorted(original.namelist())
        assert all(copy.read(n) == original.read(n) for n in names if not n.endswith("/"))


def test_a_forecast_loads_no_training_stack():
    # simulation.py forecasts every run before Flower starts: PyTorch, Opacus and
    # scikit-learn would hold up its start by seconds.
    loaded = libraries_loaded_by(
        "from securehealth import forecast, settings; "
        "forecast.forecast_here(settings.resolve({}), None)"
    )
    assert loaded & {"torch", "opacus", "sklearn", "matplotlib"} == set()


def test_pyproject_declares_every_setting_with_config_pys_default():
    """`flwr run . --run-config "rounds=2"` needs each key declared in pyproject.toml.

    config.py is the source of the values.
    """
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert {k: declared["config"][k] for k in settings.DEFAULTS} == settings.to_run_config(
        settings.resolve()
    )


def test_a_default_that_differs_from_config_py_is_refused_unless_overridden():
    run_config = {**settings.to_run_config(settings.resolve()), "epsilon": 8.0}
    with pytest.raises(
        settings.SettingsError, match="epsilon = 8.0 but securehealth/config.py says 1.0"
    ):
        settings.check_defaults(run_config, overridden={})
    settings.check_defaults(run_config, overridden={"epsilon": 8.0})  # chosen: fine


def updates():
    rng = np.random.default_rng(0)
    return [([rng.normal(size=(3, 2)), rng.normal(size=2)], n) for n in (10, 30, 60, 100, 5)]


def test_each_aggregation_is_the_statistic_it_names():
    stacked = [np.stack([u[0][i] for u in updates()]) for i in range(2)]
    patients = np.array([n for _, n in updates()], dtype=float)
    expected = {
        "fedavg": [np.average(s, axis=0, weights=patients) for s in stacked],
        "median": [np.median(s, axis=0) for s in stacked],
        "trimmed-mean": [trim_mean(s, 0.2, axis=0) for s in stacked],
    }
    assert set(AGGREGATIONS) == set(expected)
    for name, arrays in expected.items():
        for got, want in zip(combine(name, updates()), arrays, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)
    assert settings.resolve({"aggregation": "median", "secure_aggregation": "off"})


def test_the_fedavg_loop_leaves_out_a_hospital_that_did_not_train():
    start = [np.zeros(2)]
    hospitals = [
        lambda w, r: ([w[0] + 1.0], 30),
        lambda w, r: ([w[0] + 4.0], 10),
        lambda w, r: (w, 0),  # declined (its budget): no weight
    ]
    plain = SimpleNamespace(rounds=2, aggregation="fedavg", server_momentum=0.0)
    after = federate(start, hospitals, plain)
    np.testing.assert_allclose(after[0], [3.5, 3.5])  # (30*1 + 10*4) / 40 = 1.75 a round
    # With momentum 0.5 the second round moves by 1.75 plus half the first's 1.75.
    after = federate(start, hospitals, SimpleNamespace(**{**vars(plain), "server_momentum": 0.5}))
    np.testing.assert_allclose(after[0], [1.75 + 1.75 * 1.5] * 2)


def test_server_momentum_takes_flowers_fedavgm_step():
    # Flower's FedAvgM (server learning rate 1) after its weighted mean, and ours
    # after the same mean, over rounds of random updates; a round that keeps the
    # model where it is still carries the velocity.
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvgM

    rng = np.random.default_rng(0)
    current = [rng.normal(size=(1, 4)).astype(np.float32), rng.normal(size=1).astype(np.float32)]
    flowers = FedAvgM(
        initial_parameters=ndarrays_to_parameters(current),
        server_momentum=0.5,
        server_learning_rate=1.0,
        fit_metrics_aggregation_fn=lambda _: {},
    )
    ours = ServerMomentum(0.5)
    for server_round in range(1, 5):
        updates = [
            ([w + rng.normal(size=w.shape).astype(np.float32) for w in current], n)
            for n in (30, 70)
        ]
        results = [
            (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(w), n, {}))
            for w, n in updates
        ]
        expected = parameters_to_ndarrays(flowers.aggregate_fit(server_round, results, [])[0])
        current = ours.step(current, combine("fedavg", updates))
        for got, want in zip(current, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            assert got.dtype == np.float32
    assert settings.resolve({"server_momentum": 0.0})
    with pytest.raises(settings.SettingsError, match="server_momentum"):
        settings.resolve({"server_momentum": 1.0})


@pytest.mark.parametrize(
    "script",
    [
        *("simulation.py", "server.py", "client.py", "predict.py", "report.py"),
        *("sweep.py", "benchmark.py", "bench.py", "audit.py"),
    ],
)
def test_help_does_not_load_the_training_stack(script):
    # --help is read before anything heavy: no PyTorch or Opacus (3-4 s of CPU here).
    shown = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0 and "usage:" in shown.stdout
    loaded = {line.rsplit("|", 1)[-1].strip() for line in shown.stderr.splitlines()}
    assert "securehealth.results" in loaded  # the imports were read
    heavy = {"torch", "opacus", "securehealth.model"}
    assert not heavy & loaded, sorted(heavy & loaded)


def test_the_wheel_installs_the_package_and_its_commands_only(tmp_path):
    # `pip wheel .` (here without build isolation: the pinned setuptools of
    # requirements-dev.txt), from a copy so that the checkout gains no build/.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "securehealth", source / "securehealth")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "out").glob("securehealth_ml-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "securehealth",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    assert "securehealth/config.py" in names and "securehealth/model.py" in names
    assert "securehealth/schemas/data-dictionary.schema.json" in names
    [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in ("simulation", "server", "client", "predict", "report", "sweep"):
        assert f"securehealth-{command} = securehealth.commands:{command}" in scripts
    for command in ("benchmark", "bench", "audit"):
        assert f"securehealth-{command} = securehealth.commands:{command}" in scripts
    # Installed elsewhere, away from the checkout, the commands answer.
    installed = tmp_path / "site"
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", installed, wheel], check=True)
    helped = subprocess.run(
        [sys.executable, "-c", "import sys; from securehealth.commands import predict; predict()"]
        + ["--help"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helped.returncode == 0 and "--run-dir" in helped.stdout, helped.stderr
