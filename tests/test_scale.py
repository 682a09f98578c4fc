"""Scale: Poisson sampling and a simulation on a Ray cluster that was already running.

Each step of the Poisson sampling costs what its batch costs, not the whole hospital.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_ran_to_the_end

from securehealth.deployment import runtime
from securehealth.privacy.dpsgd import PoissonBatches
from securehealth.results import HOSPITALS_DIR_VARIABLE


def test_poisson_batches_include_each_patient_independently_at_the_rate():
    n, rate, steps = 40, 0.25, 20_000
    counts, pairs, sizes = np.zeros(n), np.zeros((n, n)), []
    for batch in PoissonBatches(n, rate, steps):
        assert len(set(batch)) == len(batch)  # without replacement within a step
        member = np.zeros(n)
        member[batch] = 1
        counts += member
        pairs += np.outer(member, member)
        sizes.append(len(batch))
    assert len(sizes) == steps == len(PoissonBatches(n, rate, steps))
    tolerance = 4 * np.sqrt(rate * (1 - rate) / steps)  # 4 standard errors
    assert np.abs(counts / steps - rate).max() < tolerance
    off_diagonal = pairs[~np.eye(n, dtype=bool)] / steps  # both in the same step
    assert abs(off_diagonal.mean() - rate**2) < 0.002  # independent of each other
    assert abs(np.mean(sizes) - n * rate) < 0.1 and abs(np.var(sizes) - n * rate * (1 - rate)) < 0.4


def test_a_huge_hospital_is_sampled_quickly():
    batches = PoissonBatches(1_000_000, 128 / 1_000_000, 2_000)
    start = time.perf_counter()
    sizes = [len(b) for b in batches]
    elapsed = time.perf_counter() - start
    assert abs(np.mean(sizes) - 128) < 2
    # Opacus' own sampler draws a million numbers per step (about 9 ms here).
    assert elapsed < 2.0, f"{elapsed:.2f} s for 2,000 steps"


def stop_ray(temp_dir):
    """Stop the Ray cluster whose files are in temp_dir, and nothing else."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(temp_dir).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.mark.e2e
def test_simulation_runs_on_an_existing_ray_cluster(tmp_path):
    ray = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must be short
    port = runtime.free_port()
    head = [ray, "start", "--head", "--port", str(port), "--num-cpus", "2"]
    head += ["--temp-dir", temp_dir, "--include-dashboard=false", "--disable-usage-stats"]
    # The cluster's owner tells its workers where simulated hospitals keep their
    # lasting state; a demonstration's (here: generated patients) never goes there.
    cluster_env = {
        **os.environ,
        HOSPITALS_DIR_VARIABLE: str(tmp_path / "hospitals"),
        "XDG_STATE_HOME": str(tmp_path / "workers-state"),
    }
    try:
        subprocess.run(head, check=True, capture_output=True, timeout=120, env=cluster_env)
        address = f"127.0.0.1:{port}"
        result = subprocess.run(
            [sys.executable, str(ROOT / "simulation.py"), "--ray-address", address, "--rounds", "2"]
            + ["--num-patients", "600", "--global-test-patients", "200"]
            + ["--run-dir", str(tmp_path / "run")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert_ran_to_the_end(result.returncode, tmp_path / "run", result.stdout + result.stderr)
        assert f"on the Ray cluster at {address}" in " ".join(result.stdout.split())
        # The hospitals ran as actors of that cluster, which is still up afterwards:
        # the simulation only joined it, and leaves it to its owner.
        logs = Path(temp_dir, "session_latest", "logs")
        assert any("ClientAppActor" in p.read_text(errors="ignore") for p in logs.glob("*.err"))
        demo_runs = tmp_path / "workers-state" / "securehealth-ml" / "demo-runs"
        assert len(list(demo_runs.glob("*/hospital-*/privacy-ledger.json"))) == 3
        assert not list((tmp_path / "hospitals").glob("hospital-*/privacy-ledger.json"))
        status = subprocess.run([ray, "status", "--address", address], capture_output=True)
        assert status.returncode == 0, status.stderr
    finally:
        stop_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_bench_growth_rates_are_the_slopes_of_each_series():
    from securehealth.tools import bench

    points = [
        {"hospitals": h, "patients": bench.SCALING_PATIENTS, "rounds": 1, "rounds_s": 5 + 0.1 * h}
        for h in bench.HOSPITALS
    ] + [
        {"hospitals": 3, "patients": n, "rounds": 1, "rounds_s": 5 + 2e-6 * n}
        for n in bench.PATIENTS
    ]
    points.append({"hospitals": 100, "patients": 10**6, "rounds": 10, "rounds_s": 60.0})
    growth = bench.growth_rates(points)
    assert growth["per_hospital_s"] == pytest.approx(0.1)
    assert growth["per_patient_s"] == pytest.approx(2e-6)


def test_bench_sets_the_best_runs_against_issue_30s_goals():
    from rich.console import Console

    from securehealth.tools import bench

    figures = {
        "simulation": {"best_s": 30.0},
        "minimal_app": {"best_s": 25.0},
        "deployment": {"off": {"best_s": 50.0}, "on": {"best_s": 80.0}},
    }
    console = Console(record=True, width=200)
    console.print(bench.against_before(figures))
    lines = [line for line in console.export_text().splitlines() if line.startswith("│")]
    rows = {line.split("│")[1].strip(): line for line in lines}
    simulation = rows["python simulation.py / the minimal Flower app"]
    assert "1.60x" in simulation and "1.20x" in simulation  # 20.3 / 12.7; 30 / 25
    assert simulation.rstrip(" │").endswith("yes")
    assert rows["server.py + 3 client.py, TLS, no SecAgg+"].rstrip(" │").endswith("no")  # 50 > 45
    assert " 80 s" in rows["server.py + 3 client.py, TLS, SecAgg+"]


@pytest.mark.e2e
def test_the_minimal_flower_app_runs_on_flowers_simulation_runtime(tmp_path):
    """bench.py's floor for the simulation: Flower's own app, still running on this Flower."""
    from securehealth.tools import bench

    assert bench.minimal_flower_app(str(tmp_path), supernodes=2) > 0
