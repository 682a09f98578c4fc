"""Fixtures and helpers shared by the deployment and security tests.

They run the product's scripts as real processes, always stopped afterwards.
"""

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from securehealth.certificates import make_certificates
from securehealth.deployment import runtime
from securehealth.deployment.processes import process_tree

ROOT = Path(__file__).resolve().parents[1]  # the repository: the app and its scripts
EXAMPLE = ROOT / "examples" / "csv"  # the shipped CSV data directory
TINY = ["--num-patients", "600", "--global-test-patients", "200"]  # seconds, not minutes
# How a run that ran to its end exits: 0, or 3 where it finished with warnings (a
# tiny run's model may be too weak to use, which the product says; results.py).
EXIT_CODES = {"finished": 0, "finished with warnings": 3}


def assert_ran_to_the_end(returncode, run_dir, output=""):
    """The run in run_dir ran to its end, and its exit code says how."""
    status = json.loads((Path(run_dir) / "metrics.json").read_text())["status"]
    assert status in EXIT_CODES and returncode == EXIT_CODES[status], output


def flower_pids(directory):
    """Live processes whose Flower state (FLWR_HOME) lies under `directory`.

    That is what a run or a hospital started, Ray's included (read from Linux /proc).
    """
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"FLWR_HOME={directory}".encode() in (proc / "environ").read_bytes():
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(proc.name))
        except OSError:
            pass  # gone meanwhile, or not ours to read
    return found


def flower_processes(directory):
    """The command lines of flower_pids(directory), shortened."""
    found = []
    for pid in flower_pids(directory):
        try:
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:100])
        except OSError:
            pass
    return found


def listening_addresses(pids):
    """The IP addresses that `pids` accept TCP connections on (Linux /proc)."""
    sockets = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                sockets.add(os.readlink(fd))
            except OSError:
                pass
    addresses = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            listening, inode = fields[3] == "0A", f"socket:[{fields[9]}]"
            if listening and inode in sockets:
                host = fields[1].split(":")[0]  # 32-bit words, each little-endian
                raw = b"".join(bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, len(host), 8))
                addresses.add(ipaddress.ip_address(raw))
    return addresses


def left_running(directory, seconds=5):
    """flower_processes(directory) once they are all gone, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while (found := flower_processes(directory)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


class Processes:
    """Launch the product's scripts; whatever happens, stop them all by pid."""

    def __init__(self, workdir):
        self.workdir, self.started = workdir, []

    def start(self, script, *args, name, prefix=()):
        """Run one of the product's scripts, after the command `prefix` if given.

        `prefix` is a wrapper that runs the rest of its arguments.
        """
        out = open(self.workdir / f"{name}.out", "w")
        process = subprocess.Popen(
            [*prefix, sys.executable, str(ROOT / script), *args],
            cwd=self.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        process.name = name
        self.started.append(process)
        return process

    def server(self, port, rounds, run_dir, *more, name="server"):
        args = ["--port", str(port), "--rounds", str(rounds), "--run-dir", run_dir, *TINY]
        return self.start("server.py", *args, *more, name=name)

    def output(self, name):
        return (self.workdir / f"{name}.out").read_text()

    def kill(self, process):
        """Like a crash: the launcher and all it started die at once."""
        for pid in process_tree(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()

    def stop_all(self):
        for process in self.started:
            if process.poll() is None:
                self.kill(process)


@pytest.fixture(autouse=True)
def own_state_home(tmp_path, monkeypatch):
    """Hospitals' default state directories lie inside the test's folder.

    That is results.default_state_root, never in the home directory of whoever runs
    the tests.
    """
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


def flower_context(node_config, run_config, run_id=1, node_id=1):
    """The Context Flower gives a ClientApp on a node, for a run."""
    return Context(
        run_id=run_id,
        node_id=node_id,
        node_config=node_config,
        state=RecordDict(),
        run_config=run_config,
    )


def run_script(script, *args, cwd, timeout=300):
    """One of the product's scripts (`script` under the repository), run to its end."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def own_data_copy(source, destination):
    """A copy of a folder of shipped patient files as "your own data".

    The folder is examples/csv or a heart-disease data_dir. The copy has the same
    patients, each file's rows in reverse order, so that no file is byte for byte a
    shipped one and every hospital spends from a lasting ledger
    (securehealth/data/demonstration.py).
    """
    folder = Path(shutil.copytree(source, destination))
    for path in [*folder.glob("hospital_*.csv"), *folder.glob("processed.*.data")]:
        lines = path.read_text().splitlines()
        header = lines[:1] if path.suffix == ".csv" else []
        path.write_text("\n".join(header + lines[len(header) :][::-1]) + "\n")
    return folder


def demo_ledger(state_dir):
    """The privacy ledger of a deployed hospital's one run on demonstration data.

    It is the run's own, in demo-runs/<run id>/; the lasting one (the register of the
    operator's authorisations it used) holds no release.
    """
    lasting = Path(state_dir) / "privacy-ledger.json"
    assert not lasting.exists() or not json.loads(lasting.read_text())["releases"]
    [ledger] = Path(state_dir).glob("demo-runs/*/privacy-ledger.json")
    return ledger


def as_simulated_hospitals(monkeypatch, hospitals_dir):
    """Make this process run as simulation.py's ClientApps do.

    That is in Flower's simulation engine (a Ray worker), with the machine naming
    where simulated hospitals keep their state.
    """
    from securehealth import node
    from securehealth.results import HOSPITALS_DIR_VARIABLE

    monkeypatch.setattr(node, "in_simulation_engine", lambda: True)
    monkeypatch.setenv(HOSPITALS_DIR_VARIABLE, str(hospitals_dir))


def hospital_state(workdir, hospital):
    """client.py's default state directory for a hospital, under own_state_home."""
    return workdir / "xdg-state" / "securehealth-ml" / f"hospital-{hospital}"


@pytest.fixture
def federation(tmp_path):
    make_certificates(tmp_path / "certs", ["localhost", "127.0.0.1"])
    processes = Processes(tmp_path)
    yield processes, tmp_path, runtime.free_port()
    processes.stop_all()
