"""The figures of bench.py: where the time of a simulation and a deployment goes.

The default simulation and deployment timed through their metrics.json, the in-process compute
floor, imports per message, DP-SGD against plain steps, and scaling in hospitals and patients.
Entry point: `main`.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from rich.table import Table

from securehealth import data, display, settings
from securehealth.certificates import make_certificates
from securehealth.deployment import runtime
from securehealth.deployment.processes import process_tree
from securehealth.results import METRICS_FILE, read_json, write_json

# The training stack (PyTorch, Opacus) is imported where it is measured, so that
# --help answers at once.

APP_DIR = Path(__file__).resolve().parents[2]
HOSPITALS = (3, 10, 50, 100)
PATIENTS = (4_000, 40_000, 400_000, 1_000_000)
SCALING_PATIENTS = 40_000  # while the hospitals vary
POLL = 0.1  # seconds between looks at a running job
DEFAULT_ROUNDS = settings.resolve().rounds
# The table's "Before" and "Goal" columns: an earlier version's seconds and the targets set
# for them (10 rounds of the defaults, deployment with TLS on loopback, 3 hospitals, this
# project's 2-core machine).
BEFORE = {"simulation": 19.1, "deployment off": 112.0, "deployment on": 432.0}
GOALS = {"simulation": 12.0, "deployment off": 45.0, "deployment on": 90.0}
# What a fresh process imports to handle one message, by kind: Flower starts one
# flwr-clientapp (or flwr-serverapp) process per message.
IMPORTS = {
    "ClientApp, a message that does not train (admission, SecAgg+ stages)": (
        "flwr.supernode.cli.flwr_clientapp, securehealth.clientapp"
    ),
    "ClientApp, a training message": (
        "flwr.supernode.cli.flwr_clientapp, securehealth.clientapp, securehealth.hospital"
    ),
    "ServerApp, once per run": "flwr.superlink.cli.flwr_serverapp, securehealth.serverapp",
}


def resident_mb(pid: int) -> float:
    """Resident memory of pid and everything it started, in MB (Linux /proc)."""
    total = 0
    for child in process_tree(pid):
        try:
            with open(f"/proc/{child}/statm") as statm:
                total += int(statm.read().split()[1])
        except (OSError, IndexError):
            pass
    return total * 4096 / 1e6


def watch(processes: list[subprocess.Popen[bytes]], metrics_path: Path) -> dict[str, Any]:
    """Wait for `processes` (the first is the server side), timing the run by its metrics.json.

    Returns
    -------
    dict
        total_s, startup_s, rounds_s, shutdown_s, peak_mb (all the processes' resident
        memory), and the run's metrics.

    Raises
    ------
    RuntimeError
        The server side exited with an error.
    """
    start, first, finished, peak = time.monotonic(), None, None, 0.0
    samples = 0
    while processes[0].poll() is None:
        if samples % 5 == 0:  # ps is not free: memory every 5th look
            peak = max(peak, sum(resident_mb(p.pid) for p in processes))
        samples += 1
        if first is None and metrics_path.exists():
            first = time.monotonic()
        if first and finished is None and read_json(metrics_path)["status"] == "finished":
            finished = time.monotonic()
        time.sleep(POLL)
    end = time.monotonic()
    for process in processes[1:]:
        process.wait(timeout=120)
    if processes[0].returncode != 0:
        raise RuntimeError(f"{processes[0].args} exited {processes[0].returncode}")
    finished = finished or end
    return {
        "total_s": end - start,
        "startup_s": (first or end) - start,
        "rounds_s": finished - (first or end),
        "shutdown_s": end - finished,
        "peak_mb": peak,
        "metrics": read_json(metrics_path),
    }


def simulate(workdir: str, *args: str) -> dict[str, Any]:
    """Time simulation.py with `args`, its run directory in `workdir` (see `watch`)."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    command = [sys.executable, str(APP_DIR / "simulation.py"), "--run-dir", str(run_dir), *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return watch([process], run_dir / METRICS_FILE)


def deploy(workdir: str, rounds: int, secure_aggregation: str) -> dict[str, Any]:
    """Time server.py and 3 client.py processes on loopback, with TLS (see `watch`).

    The result also holds per_round_s: the seconds per round after the first.
    """
    home = Path(tempfile.mkdtemp(dir=workdir))
    make_certificates(home / "certs", ["localhost", "127.0.0.1"])
    port = runtime.free_port()
    mode = ["--secure-aggregation", secure_aggregation]

    # The hospitals' ledgers in the benchmark's own folder, never the machine's real ones.
    environment = {**os.environ, "XDG_STATE_HOME": str(home / "state")}

    def start(script, *args):
        command = [sys.executable, str(APP_DIR / script), *args, *mode]
        return subprocess.Popen(
            command, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=environment
        )

    server = start("server.py", "--port", str(port), "--rounds", str(rounds), "--run-dir", "run")
    address = f"127.0.0.1:{port}"
    clients = [
        start("client.py", "--client-id", str(h), "--server-address", address) for h in range(3)
    ]
    result = watch([server, *clients], home / "run" / METRICS_FILE)
    ends = [r["seconds"] for r in result["metrics"]["rounds"]]
    result["per_round_s"] = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else ends[0]
    return result


def import_times(repeats: int) -> dict[str, float]:
    """Median wall seconds a fresh Python takes to import what each kind of message needs.

    The kinds and their modules are IMPORTS.
    """

    def once(modules):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {modules}"], cwd=APP_DIR, check=True)
        return time.perf_counter() - start

    return {
        kind: statistics.median(once(modules) for _ in range(repeats))
        for kind, modules in IMPORTS.items()
    }


def compute_floor(workdir: str) -> float:
    """The default job's training and evaluation in this process, without Flower."""
    from securehealth.tools.federation import dp_federation

    cfg = settings.resolve({"secure_aggregation": "off"})
    start = time.perf_counter()
    dp_federation(cfg, Path(tempfile.mkdtemp(dir=workdir)))
    return time.perf_counter() - start


def step_times(repeats: int, epochs: int = 10) -> tuple[float, float]:
    """Median seconds per step of DP-SGD (Opacus) and of plain SGD: same model, data, loader.

    The data are the default job's largest hospital's.
    """
    from opacus import PrivacyEngine

    from securehealth.model import build_model
    from securehealth.privacy import dpsgd

    cfg = settings.resolve({})
    (x, y), _ = data.hospital_data(cfg, 0)
    sample_rate, steps = dpsgd.sample_rate_and_steps(len(y), cfg)

    def plain():
        model = build_model(x.shape[1], cfg.hidden_layers)
        start = time.perf_counter()
        dpsgd.train_plain(model, x, y, cfg, epochs)
        return (time.perf_counter() - start) / (epochs * steps)

    def private():
        model = build_model(x.shape[1], cfg.hidden_layers)
        loader = dpsgd.data_loader(x, y, dpsgd.PoissonBatches(len(y), sample_rate, steps))
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=dpsgd._optimizer(model, cfg),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=False,
        )
        start = time.perf_counter()
        dpsgd._epochs(model, loader, optimizer, epochs)
        return (time.perf_counter() - start) / (epochs * steps)

    return (
        statistics.median(private() for _ in range(repeats)),
        statistics.median(plain() for _ in range(repeats)),
    )


def scaling(workdir: str) -> list[dict[str, Any]]:
    """One round at each size, then the largest federation for the default rounds.

    Each point holds its wall time, the rounds' time and peak memory.
    """
    points = []
    sizes = [(h, SCALING_PATIENTS, 1) for h in HOSPITALS] + [(3, n, 1) for n in PATIENTS]
    for hospitals, patients, rounds in [*sizes, (HOSPITALS[-1], PATIENTS[-1], DEFAULT_ROUNDS)]:
        run = simulate(
            workdir,
            *("--rounds", str(rounds), "--num-clients", str(hospitals)),
            *("--num-patients", str(patients), "--join-timeout", "600"),
            *("--max-patients", str(patients)),  # the cap on a hospital's FedAvg weight
        )
        points.append(
            {
                "hospitals": hospitals,
                "patients": patients,
                "rounds": rounds,
                "total_s": run["total_s"],
                "rounds_s": run["rounds_s"],
                "peak_mb": run["peak_mb"],
            }
        )
    return points


def growth_rates(points: list[dict[str, Any]]) -> dict[str, float]:
    """What one more patient and one more hospital add to a round.

    The slopes between the smallest and largest one-round runs of each series.
    """
    by_hospitals = [p for p in points if p["patients"] == SCALING_PATIENTS and p["rounds"] == 1]
    by_patients = [p for p in points if p["hospitals"] == 3 and p["rounds"] == 1]

    def slope(series, key):
        first, last = min(series, key=lambda p: p[key]), max(series, key=lambda p: p[key])
        return (last["rounds_s"] - first["rounds_s"]) / (last[key] - first[key])

    return {
        "per_patient_s": slope(by_patients, "patients"),
        "per_hospital_s": slope(by_hospitals, "hospitals"),
    }


def main(description: str, argv: list[str] | None = None) -> int:
    """`python bench.py`: measure every figure, write bench.json and print the tables."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per median")
    parser.add_argument("--deploy-rounds", type=int, default=3, help="rounds of each deployment")
    parser.add_argument("--out", default="runs", help="where bench.json goes")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.deploy_rounds < 2:
        parser.error("--repeats must be >= 1 and --deploy-rounds >= 2")
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    console = display.make_console()
    figures = {"machine": machine()}
    with tempfile.TemporaryDirectory() as workdir, console.status("") as status:
        status.update(f"Default simulation, {args.repeats} runs")
        runs = [simulate(workdir) for _ in range(args.repeats)]
        status.update("The same training without Flower")
        floor = statistics.median(compute_floor(workdir) for _ in range(args.repeats))
        figures["simulation"] = {
            key: statistics.median(r[key] for r in runs)
            for key in ("total_s", "startup_s", "rounds_s", "shutdown_s", "peak_mb")
        }
        figures["simulation"]["compute_s"] = floor
        status.update("Deployment with and without secure aggregation")
        figures["deployment"] = {
            mode: {
                k: v for k, v in deploy(workdir, args.deploy_rounds, mode).items() if k != "metrics"
            }
            for mode in ("off", "on")
        }
        status.update("Imports per message")
        figures["imports"] = import_times(args.repeats)
        status.update("DP-SGD and plain steps")
        figures["step"] = dict(zip(("dp_s", "plain_s"), step_times(args.repeats), strict=True))
        status.update("Scaling: hospitals and patients")
        figures["scaling"] = scaling(workdir)
        figures["growth"] = growth_rates(figures["scaling"])
    out = Path(args.out)
    write_json(out / "bench.json", figures)
    console.print(against_before(figures))
    console.print(table(figures, args))
    console.print(f"Figures: {out / 'bench.json'}")
    return 0


def machine() -> dict[str, Any]:
    """The machine measured: CPUs, Python, PyTorch, the training device and the processor."""
    import torch

    from securehealth.privacy import dpsgd

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(dpsgd.DEVICE),
        "processor": platform.processor() or platform.machine(),
    }


def against_before(figures: dict[str, Any]) -> Table:
    """The default jobs at 10 rounds: the BEFORE figures, this machine's, and the GOALS.

    The last column sets this machine's figure against the in-process compute floor.
    """
    sim, floor = figures["simulation"], figures["simulation"]["compute_s"]
    now = {"simulation": sim["total_s"]}
    for mode, run in figures["deployment"].items():
        now[f"deployment {mode}"] = run["startup_s"] + 10 * run["per_round_s"]
    rows = Table(
        title=f"{DEFAULT_ROUNDS} rounds of the defaults: before, now, goal",
        caption="* start-up plus 10 times the measured time per round",
    )
    for column in ("Job", "Before", "Now", "Goal", "Now / compute floor"):
        rows.add_column(column, justify="left" if column == "Job" else "right")
    names = {
        "simulation": "python simulation.py",
        "deployment off": "server.py + 3 client.py, TLS, no SecAgg+ *",
        "deployment on": "server.py + 3 client.py, TLS, SecAgg+ *",
    }
    for job, name in names.items():
        rows.add_row(
            name,
            f"{BEFORE[job]:.0f} s",
            f"{now[job]:.1f} s",
            f"{GOALS[job]:.0f} s",
            f"{now[job] / floor:.0f}x",
        )
    return rows


def table(figures: dict[str, Any], args: argparse.Namespace) -> Table:
    """Every figure of the benchmark, as one table."""
    rows = Table(
        title=f"bench.py on {figures['machine']['cpus']} CPUs, {figures['machine']['device']}"
    )
    rows.add_column("Figure")
    rows.add_column("Value", justify="right")
    sim = figures["simulation"]
    rows.add_row(f"simulation.py, defaults (median of {args.repeats})", f"{sim['total_s']:.1f} s")
    rows.add_row("  start-up: imports, SuperLink, Ray, ServerApp", f"{sim['startup_s']:.1f} s")
    rows.add_row(f"  {DEFAULT_ROUNDS} rounds", f"{sim['rounds_s']:.1f} s")
    rows.add_row("  shutdown", f"{sim['shutdown_s']:.1f} s")
    rows.add_row("  the same training in-process, no Flower", f"{sim['compute_s']:.2f} s")
    rows.add_row("  total / compute", f"{sim['total_s'] / sim['compute_s']:.0f}x")
    rows.add_row("  peak memory, all processes", f"{sim['peak_mb']:.0f} MB")
    for mode, run in figures["deployment"].items():
        rows.add_row(
            f"Deployment, TLS, secure aggregation {mode}, {args.deploy_rounds} rounds",
            f"{run['total_s']:.1f} s",
        )
        rows.add_row("  per round", f"{run['per_round_s']:.1f} s")
        rows.add_row(
            "  10 rounds, estimated", f"{run['startup_s'] + 10 * run['per_round_s']:.0f} s"
        )
    for kind, seconds in figures["imports"].items():
        rows.add_row(f"Imports of a process: {kind}", f"{seconds:.2f} s")
    step = figures["step"]
    rows.add_row("DP-SGD step (Opacus)", f"{step['dp_s'] * 1e3:.2f} ms")
    rows.add_row("plain SGD step, same model and loader", f"{step['plain_s'] * 1e3:.2f} ms")
    rows.add_row("  DP / plain", f"{step['dp_s'] / step['plain_s']:.2f}x")
    for point in figures["scaling"]:
        rows.add_row(
            f"{point['hospitals']} hospitals, {point['patients']:,} patients, "
            f"{point['rounds']} round{'s' * (point['rounds'] > 1)}",
            f"{point['total_s']:.1f} s",
        )
        rows.add_row(
            "  rounds; peak memory", f"{point['rounds_s']:.1f} s; {point['peak_mb']:.0f} MB"
        )
    growth = figures["growth"]
    rows.add_row("Growth of a round: per extra patient", f"{growth['per_patient_s'] * 1e6:.2f} us")
    rows.add_row("  per extra hospital", f"{growth['per_hospital_s']:.3f} s")
    return rows
