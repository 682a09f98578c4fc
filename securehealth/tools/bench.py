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
from securehealth.deployment import pinning, runtime
from securehealth.deployment.processes import process_tree
from securehealth.privacy.schedule import sample_rate_and_steps
from securehealth.results import METRICS_FILE, read_json, write_json

# The training stack (PyTorch, Opacus) is imported where it is measured, so that
# --help answers at once.

APP_DIR = Path(__file__).resolve().parents[2]
HOSPITALS = (3, 10, 50, 100)
PATIENTS = (4_000, 40_000, 400_000, 1_000_000)
SCALING_PATIENTS = 40_000  # while the hospitals vary
POLL = 0.1  # seconds between looks at a running job
DEFAULT_ROUNDS = settings.resolve().rounds
MINIMAL_APP = APP_DIR / "benchmarks" / "minimal_flower_app"  # the floor of the simulation
# The jobs set against each other: the default simulation against the minimal Flower app
# (a ratio), the default deployment with TLS on loopback with and without SecAgg+ (seconds),
# each DEFAULT_ROUNDS rounds, 3 hospitals, timed until every process exits with every run
# file written, best of --repeats. "Before": issue 30's figures on this project's 2-core
# machine; "Goal": what issue 30 set.
JOBS = {
    "simulation": "python simulation.py / the minimal Flower app",
    "deployment off": "server.py + 3 client.py, TLS, no SecAgg+",
    "deployment on": "server.py + 3 client.py, TLS, SecAgg+",
}
BEFORE_SIMULATION_S = (20.3, 12.7)  # python simulation.py, the minimal Flower app
BEFORE = {
    "simulation": BEFORE_SIMULATION_S[0] / BEFORE_SIMULATION_S[1],
    "deployment off": 61.0,
    "deployment on": 139.0,
}
GOALS = {"simulation": 1.2, "deployment off": 45.0, "deployment on": 90.0}
# What a process imports once, by kind: a hospital's zygote of Flower's flwr-clientapp
# (each message's process is forked from it), its warm worker, and the server's zygote of
# flwr-serverapp.
IMPORTS = {
    "a hospital's ClientApp zygote: Flower's flwr-clientapp and the ClientApp": (
        "flwr.supernode.cli.flwr_clientapp, securehealth.clientapp"
    ),
    "a hospital's warm worker: the training stack": "securehealth.hospital",
    "the server's ServerApp zygote": "flwr.superlink.cli.flwr_serverapp, securehealth.serverapp",
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
        total_s (until the last process exits), startup_s, rounds_s, shutdown_s, peak_mb
        (all the processes' resident memory), and the run's metrics.

    Raises
    ------
    RuntimeError
        A process exited with an error.
    """
    start, first, finished, peak = time.monotonic(), None, None, 0.0
    samples = 0
    while any(process.poll() is None for process in processes):
        if samples % 5 == 0:  # ps is not free: memory every 5th look
            peak = max(peak, sum(resident_mb(p.pid) for p in processes if p.poll() is None))
        samples += 1
        if first is None and metrics_path.exists():
            first = time.monotonic()
        if first and finished is None and read_json(metrics_path)["status"] == "finished":
            finished = time.monotonic()
        time.sleep(POLL)
    end = time.monotonic()
    failed = [process.args for process in processes if process.returncode != 0]
    if failed:
        raise RuntimeError(f"{failed[0]} exited with an error")
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


def minimal_flower_app(workdir: str, supernodes: int = 3) -> float:
    """Seconds of the minimal Flower app (MINIMAL_APP) on Flower's simulation runtime.

    From starting a fresh local SuperLink to its end, after `flwr run . --stream` with
    `supernodes` SuperNodes returned: the floor `python simulation.py` is set against.
    """
    home = Path(tempfile.mkdtemp(dir=workdir))
    address = f"127.0.0.1:{runtime.free_port()}"
    host, port = runtime.split_address(address)
    superlink = [runtime.executable("flower-superlink"), "--simulation", "--insecure"]
    superlink += ["--host", host, "--port", str(port)]
    run = [runtime.executable("flwr"), "run", ".", "run", "--stream"]
    run += ["--federation-config", f"num-supernodes={supernodes}"]
    start = time.monotonic()
    with runtime.flower_process(superlink, home, "superlink.log") as process:
        runtime.wait_until_healthy(process, address, None, home / "superlink.log")
        runtime.connect_cli(home, address)
        subprocess.run(
            run, cwd=MINIMAL_APP, env=runtime.flower_env(home), capture_output=True, check=True
        )
    return time.monotonic() - start


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


def message_process_times(workdir: str, repeats: int) -> dict[str, float]:
    """Median wall seconds of one message's process, fresh as Flower starts it and forked.

    The pinned launcher of `flwr-clientapp` runs Flower's command (`--help`, which needs
    no SuperNode) in a process of its own, and through a hospital's zygote.
    """
    home = Path(tempfile.mkdtemp(dir=workdir))

    def median_run(launcher: Path) -> float:
        def once():
            start = time.perf_counter()
            subprocess.run([launcher, "--help"], capture_output=True, check=True)
            return time.perf_counter() - start

        once()  # the first waits for the zygote's imports: counted under imports, once
        return statistics.median(once() for _ in range(repeats))

    fresh = pinning.install_launcher(home / "fresh") / "flwr-clientapp"
    times = {"fresh": median_run(fresh)}
    with runtime.zygote(home, "flwr-clientapp") as name:
        forked = pinning.install_launcher(home / "forked", zygote=name) / "flwr-clientapp"
        times["forked"] = median_run(forked)
    return times


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
    sample_rate, steps = sample_rate_and_steps(len(y), cfg)

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
    parser.add_argument("--repeats", type=int, default=3, help="runs per best and median")
    parser.add_argument("--out", default="runs", help="where bench.json goes")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    console = display.make_console()
    figures = {"machine": machine()}
    with tempfile.TemporaryDirectory() as workdir, console.status("") as status:
        figures |= default_jobs(workdir, args.repeats, status)
        status.update("The same training without Flower")
        floor = statistics.median(compute_floor(workdir) for _ in range(args.repeats))
        figures["simulation"]["compute_s"] = floor
        status.update("A message's process, fresh and forked; imports")
        figures["message_process"] = message_process_times(workdir, args.repeats)
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


def default_jobs(workdir: str, repeats: int, status: Any) -> dict[str, Any]:
    """The default simulation beside the minimal Flower app, and the default deployments.

    Each `repeats` times, the simulation and the app alternately (so that whatever else
    slows the machine meanwhile slows both). Returns the figures' "simulation",
    "minimal_app" and "deployment" entries: best totals, and medians of the parts.
    """
    status.update(f"Default simulation and the minimal Flower app, {repeats} runs each")
    simulations, minimal = [], []
    for _ in range(repeats):
        simulations.append(simulate(workdir))
        minimal.append(minimal_flower_app(workdir))
    deployments = {}
    for mode in ("off", "on"):
        status.update(f"Deployment, secure aggregation {mode}, {repeats} runs")
        runs = [deploy(workdir, DEFAULT_ROUNDS, mode) for _ in range(repeats)]
        deployments[mode] = summary(runs) | {
            "per_round_s": statistics.median(run["per_round_s"] for run in runs)
        }
    return {
        "simulation": summary(simulations),
        "minimal_app": {"best_s": min(minimal), "median_s": statistics.median(minimal)},
        "deployment": deployments,
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The best total of `runs` (see `watch`), and the median of each part."""
    parts = ("total_s", "startup_s", "rounds_s", "shutdown_s", "peak_mb")
    return {"best_s": min(run["total_s"] for run in runs)} | {
        key: statistics.median(run[key] for run in runs) for key in parts
    }


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
    """The default jobs: issue 30's BEFORE figures, this machine's now, and its GOALS.

    Each "now" is the best of the runs: the simulation as a ratio to the minimal Flower app
    measured in the same bench run, the deployments in seconds.
    """
    simulation, minimal = figures["simulation"]["best_s"], figures["minimal_app"]["best_s"]
    now = {"simulation": simulation / minimal}
    for mode, run in figures["deployment"].items():
        now[f"deployment {mode}"] = run["best_s"]
    rows = Table(
        title=f"{DEFAULT_ROUNDS} rounds of the defaults, 3 hospitals: before, now, goal",
        caption=f"the simulation: {simulation:.1f} s against {minimal:.1f} s for the minimal "
        f"Flower app; best of the runs; before: {BEFORE_SIMULATION_S[0]} s against "
        f"{BEFORE_SIMULATION_S[1]} s",
    )
    for column in ("Job", "Before", "Now", "Goal", "Reached"):
        rows.add_column(column, justify="left" if column == "Job" else "right")
    for job, name in JOBS.items():
        unit = "x" if job == "simulation" else " s"
        figure = "{:.2f}" if job == "simulation" else "{:.0f}"
        rows.add_row(
            name,
            figure.format(BEFORE[job]) + unit,
            figure.format(now[job]) + unit,
            figure.format(GOALS[job]) + unit,
            "yes" if now[job] <= GOALS[job] else "no",
        )
    return rows


def table(figures: dict[str, Any], args: argparse.Namespace) -> Table:
    """Every figure of the benchmark, as one table."""
    rows = Table(
        title=f"bench.py on {figures['machine']['cpus']} CPUs, {figures['machine']['device']}"
    )
    rows.add_column("Figure")
    rows.add_column("Value", justify="right")
    sim, minimal = figures["simulation"], figures["minimal_app"]
    rows.add_row(
        f"simulation.py, defaults (best; median of {args.repeats})",
        f"{sim['best_s']:.1f} s; {sim['total_s']:.1f} s",
    )
    rows.add_row("  start-up: imports, SuperLink, Ray, ServerApp", f"{sim['startup_s']:.1f} s")
    rows.add_row(f"  {DEFAULT_ROUNDS} rounds", f"{sim['rounds_s']:.1f} s")
    rows.add_row("  shutdown", f"{sim['shutdown_s']:.1f} s")
    rows.add_row("  the same training in-process, no Flower", f"{sim['compute_s']:.2f} s")
    rows.add_row("  peak memory, all processes", f"{sim['peak_mb']:.0f} MB")
    rows.add_row(
        "The minimal Flower app, 3 SuperNodes (best; median)",
        f"{minimal['best_s']:.1f} s; {minimal['median_s']:.1f} s",
    )
    for mode, run in figures["deployment"].items():
        rows.add_row(
            f"Deployment, TLS, secure aggregation {mode}, {DEFAULT_ROUNDS} rounds (best; median)",
            f"{run['best_s']:.1f} s; {run['total_s']:.1f} s",
        )
        rows.add_row(
            "  start-up; per round", f"{run['startup_s']:.1f} s; {run['per_round_s']:.1f} s"
        )
    process = figures["message_process"]
    rows.add_row(
        "A message's process: fresh, as Flower starts it; forked from a zygote",
        f"{process['fresh']:.2f} s; {process['forked']:.2f} s",
    )
    for kind, seconds in figures["imports"].items():
        rows.add_row(f"Imports, once, of {kind}", f"{seconds:.2f} s")
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
