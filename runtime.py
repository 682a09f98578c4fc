"""Flower's own runtime, driven for the user: a SuperLink and `flwr run`, with
Flower's state and logs in the run directory, and nothing left running afterwards
(also after Ctrl-C or an error)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import tomli_w

import settings

APP_DIR = Path(__file__).resolve().parent
STARTUP_TIMEOUT = 60  # seconds for a SuperLink to answer its health check


class FlowerError(RuntimeError):
    """Flower could not be started or the run did not complete."""


def flower_env(flwr_home):
    """Environment for Flower's processes: state under flwr_home, no telemetry or
    update checks (these machines may have no internet), quiet Ray."""
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }


def executable(name):
    """A Flower command from this Python's environment, even if it is not on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path, lines=15):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def process_tree(pid):
    """pid and all its descendants. Flower's SuperExec and Ray's processes run in
    sessions of their own, so stopping the SuperLink's process group is not enough."""
    try:
        listing = subprocess.run(
            ["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return [pid]
    children = {}
    for line in listing.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def stop(process, timeout=10):
    """Stop a process and everything it started: politely, then by force. A second
    Ctrl-C meanwhile must not leave half of it running."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _stop_tree(process, timeout)
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_tree(process, timeout, grace=1.0):
    """SIGTERM to all; wait for the process itself, then `grace` seconds for the
    rest (Flower's simulation process alone takes 3 s to shut down, with nothing
    left to save once the run's results are written); SIGKILL what remains."""
    tree = process_tree(process.pid)
    for pid in tree:
        _signal(pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
        time.sleep(0.05)
    for pid in tree:
        _signal(pid, signal.SIGKILL)
    process.wait()


def _alive(pid):
    """Whether pid still runs (a zombie, dead but not yet reaped by its parent,
    does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the process itself
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _signal(pid, signal_number):
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        pass


@contextmanager
def flower_process(command, flwr_home, log_name):
    """Run a Flower command with its output in flwr_home/log_name; stop it (and
    all it started) on leaving the block."""
    with open(flwr_home / log_name, "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=flwr_home,
            env=flower_env(flwr_home),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us only; we stop it in order
        )
    try:
        yield process
    finally:
        stop(process)


@contextmanager
def superlink(flwr_home, *extra_args):
    """Run `flower-superlink` on a free local port; yield its address."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        executable("flower-superlink"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # Use the installed packages; never `uv sync` the app into a per-run venv.
        "--disable-runtime-dependency-installation",
        *extra_args,
    ]
    with flower_process(command, flwr_home, "superlink.log") as process:
        _wait_until_healthy(process, port, flwr_home / "superlink.log")
        yield f"127.0.0.1:{port}"


def _wait_until_healthy(process, port, log_path):
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerError(f"the SuperLink exited at start-up:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise FlowerError(f"the SuperLink did not start within {STARTUP_TIMEOUT} s")


def flwr_run(flwr_home, address, cfg, federation_config=()):
    """Submit this app to the SuperLink with `flwr run --stream`: a context manager
    yielding the process, whose output (Flower's logs) goes to flwr-run.log."""
    connection = {"superlink": {"run": {"address": address, "insecure": True}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(connection))
    run_config = flwr_home / "run-config.toml"
    run_config.write_text(tomli_w.dumps({"settings": settings.to_json(cfg)}))
    command = [executable("flwr"), "run", str(APP_DIR), "run", "--stream"]
    command += ["--run-config", str(run_config)]
    if federation_config:
        command += ["--federation-config", " ".join(federation_config)]
    return flower_process(command, flwr_home, "flwr-run.log")
