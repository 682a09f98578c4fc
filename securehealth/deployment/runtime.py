"""Flower's own runtime, driven for the user: `run_federation` and `supernode`.

A SuperLink and `flwr run` on the server's side, a SuperNode on a hospital's, with Flower's
state and logs kept in the run's (or the hospital's) directory, and nothing left running
afterwards (also after Ctrl-C or an error).
"""

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console

from securehealth import authorisation, display, settings
from securehealth.config import Settings
from securehealth.deployment import pinning
from securehealth.deployment.processes import (
    adopt_orphans,
    adopted,
    alive,
    follow_launcher,
    process_tree,
    send,
)
from securehealth.deployment.zygote import preloaded
from securehealth.results import (
    EXIT_WARNINGS,
    RunStatus,
    has_finished,
    mark_stopped,
)

APP_DIR = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 60  # seconds for a SuperLink to answer its health check
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SUPERNODE_LOG = "supernode.log"  # in a hospital's Flower folder
DEFAULT_PORT = 9092  # where hospitals reach the server (Flower's traditional Fleet API port)
# How often a hospital's SuperNode asks the server for a message (Flower 1.42: every 3 s,
# fixed) and a SuperExec asks its SuperNode or SuperLink for one to start a process for (1 s):
# SecAgg+ sends four messages a round, each waited for at every hop. Measured, 10 rounds
# with SecAgg+ on this 2-core machine: 0.25 s, 5.9 s a round; 0.1 s, 4.4 s.
POLL_S = 0.1
_started: set[int] = set()  # pids of the Flower processes this launcher started


class FlowerError(RuntimeError):
    """Flower could not be started or the run did not complete."""


def flower_env(flwr_home: Path, environment: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment for Flower's processes, with `environment` on top.

    This Python's scripts come first on PATH (Flower starts its own commands by name, also
    where the venv is not activated: cron, systemd, `/path/to/venv/bin/python
    simulation.py`); state goes under flwr_home; no telemetry or update checks (these
    machines may have no internet); Ray is quiet; a SuperExec asks for work every POLL_S.
    """
    scripts = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")]),
        **(environment or {}),
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(POLL_S),
    }


def split_address(address: str) -> tuple[str, int]:
    """Split "host:port" into ("host", port); ValueError saying what is expected if it is not."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, e.g. 127.0.0.1:9092, got {address!r}")
    return host.strip("[]"), int(port)


def ensure_port_free(host: str, port: int) -> None:
    """Fail early, with the port named, rather than deep inside Flower's logs."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As the SuperLink binds: a port whose last server left only TIME_WAIT
        # connections behind (say after kill -9) is free for it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError as error:
            raise FlowerError(f"port {port} on {host} is not free ({error.strerror})") from None


def executable(name: str) -> str:
    """A Flower command from this Python's environment, even if it is not on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that is free at the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 15, since: int = 0) -> str:
    """Return the last `lines` lines of a log, of what was written after its first `since` bytes.

    `since` leaves out what an earlier process wrote to the same log; "(no log)" where
    there is none.
    """
    try:
        with open(path, "rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def log_size(path: Path) -> int:
    """How many bytes a log holds so far (0 where there is none yet)."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def stop(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Stop a process and everything it started: politely, then by force.

    A second Ctrl-C meanwhile must not leave half of it running.
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _stop_tree(process, timeout)
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_tree(process, timeout, grace=1.0):
    """Send SIGTERM to the tree, wait, and SIGKILL what remains.

    It waits for the process itself, then `grace` seconds for the rest (Flower's simulation
    process alone takes 3 s to shut down, with nothing left to save once the run's results
    are written).
    """
    # What it started, and what this launcher adopted when a process in between died.
    tree = process_tree(process.pid) + adopted(_started)
    for pid in tree:
        send(pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(pid) for pid in tree):
        time.sleep(0.05)
    for pid in tree:
        send(pid, signal.SIGKILL)
    process.wait()


@contextmanager
def flower_process(
    command: list[str],
    flwr_home: Path,
    log_name: str,
    bin_dir: Path | None = None,
    environment: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a Flower command with its output in flwr_home/log_name; stop it on leaving the block.

    bin_dir (if given) comes first on its PATH, `environment` is added to its own, and the
    file descriptors `pass_fds` stay open in it. Leaving the block stops it and all it
    started.
    """
    env = flower_env(flwr_home, environment)
    if bin_dir:
        env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    with open(flwr_home / log_name, "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=flwr_home,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us only; we stop it in order
            pass_fds=pass_fds,
        )
    _started.add(process.pid)
    try:
        yield process
    finally:
        stop(process)


def this_copy_runs(code: str, follow: bool = True) -> list[str]:
    """Return the command that runs the Python `code` with this copy of the package importable.

    `code` then takes the command's further arguments as its own. The package is last on
    the path (it shadows nothing) and the working folder is not on it; the process, and all
    it starts, ends with this one (processes.follow_launcher; `follow` False: `code` sees
    to that itself, as a zygote, which must stay single-threaded, does).
    """
    path = "import sys; sys.path[:] = [*filter(None, sys.path), sys.argv.pop(1)]"
    if follow:
        module = follow_launcher.__module__
        path += f"; from {module} import follow_launcher; follow_launcher({os.getpid()})"
    return [sys.executable, "-c", f"{path}; {code}", str(APP_DIR)]


@contextmanager
def zygote(
    flwr_home: Path,
    command: str,
    status_file: Path | None = None,
    pinned: bool = True,
    environment: dict[str, str] | None = None,
) -> Iterator[str | None]:
    """Run a zygote of the pinned Flower `command` for the duration (deployment/zygote.py).

    It runs with the environment of the process that starts `command` (flower_env), and
    logs to flwr_home/zygote.log.

    Yields
    ------
    str | None
        Its socket's name, for pinning.install_launcher; None where none can run here.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    arguments = [command, str(status_file or ""), "1" if pinned else "0"]

    def start(listener: int) -> AbstractContextManager[subprocess.Popen[bytes]]:
        code = "from securehealth.deployment.zygote import main; main(*sys.argv[1:])"
        process = [*this_copy_runs(code, follow=False), *arguments, str(listener)]
        process.append(str(os.getpid()))  # the zygote ends with this process
        return flower_process(
            process, flwr_home, "zygote.log", environment=environment, pass_fds=[listener]
        )

    with preloaded(start) as name:
        yield name


@contextmanager
def superlink(
    flwr_home: Path,
    *extra_args: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    ca_cert: Path | None = None,
    environment: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run `flower-superlink` behind superlink_gate.py; yield the address `flwr run` reaches it at.

    TLS when `ca_cert` is given, with the certificate and key in extra_args. Its ServerApps
    are pinned to this copy of the app (pinning.py).

    Raises
    ------
    FlowerError
        Where the SuperLink exits at start-up, does not start within STARTUP_TIMEOUT, or
        presents a certificate that does not verify.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [
        *this_copy_runs("from securehealth.deployment.superlink_gate import main; main()"),
        "--host",
        host,
        "--port",
        str(port),
        # Use the installed packages; never `uv sync` the app into a per-run venv.
        "--disable-runtime-dependency-installation",
        *extra_args,
    ]
    address = f"{'127.0.0.1' if host in WILDCARD_HOSTS else host}:{port}"
    # A simulation's SuperLink starts flwr-simulation, never flwr-serverapp: no zygote.
    serverapps = (
        nullcontext()
        if "--simulation" in extra_args
        else zygote(flwr_home, "flwr-serverapp", environment=environment)
    )
    with serverapps as name:
        bin_dir = pinning.install_launcher(flwr_home / "bin", command="flwr-serverapp", zygote=name)
        with flower_process(command, flwr_home, "superlink.log", bin_dir, environment) as process:
            wait_until_healthy(process, address, ca_cert, flwr_home / "superlink.log")
            yield address


def wait_until_healthy(process, address, ca_cert, log_path):
    """Wait until the SuperLink answers its health check; FlowerError where it does not."""
    scheme = "https" if ca_cert else "http"
    context = ssl.create_default_context(cafile=ca_cert) if ca_cert else None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerError(f"the SuperLink exited at start-up:\n{log_tail(log_path)}")
        try:
            url = f"{scheme}://{address}/health"
            with urllib.request.urlopen(url, timeout=1, context=context):
                return
        except ssl.SSLCertVerificationError as error:
            raise FlowerError(
                f"the server certificate does not verify for {address}: {error.verify_message}"
            ) from None
        except OSError:
            time.sleep(0.1)
    raise FlowerError(f"the SuperLink did not start within {STARTUP_TIMEOUT} s")


def connect_cli(flwr_home: Path, address: str, ca_cert: Path | None = None) -> None:
    """Point the `flwr` command at the SuperLink, as the federation named `run`."""
    tls = {"root-certificates": str(ca_cert)} if ca_cert else {"insecure": True}
    connection = {"superlink": {"run": {"address": address, **tls}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(connection))


def enroll(flwr_home: Path, public_keys: Iterable[Path]) -> None:
    """Register each hospital's public key with the SuperLink, so that only they may join.

    The SuperLink runs with --enable-supernode-auth: only SuperNodes holding a matching
    private key join.

    Raises
    ------
    FlowerError
        Where `flwr supernode register` refuses a key.
    """
    for key in public_keys:
        result = subprocess.run(
            [executable("flwr"), "supernode", "register", str(Path(key).resolve()), "run"],
            cwd=flwr_home,
            env=flower_env(flwr_home),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0 or "registered successfully" not in result.stdout:
            output = (result.stdout + result.stderr).strip()
            raise FlowerError(f"could not enroll the hospital key {key}: {output[-500:]}")


def stopped_by_flower(flwr_home: Path) -> bool:
    """Whether Flower records this SuperLink's run as stopped, i.e. someone ran `flwr stop` on it.

    The run is the one `flwr run` started (see flwr-run.log).
    """
    started = re.search(r"started run (\d+)", log_tail(flwr_home / "flwr-run.log", 10**6))
    if not started:
        return False
    command = [executable("flwr"), "ls", "run", "--run-id", started[1], "--format", "json"]
    try:
        listing = subprocess.run(
            command, cwd=flwr_home, env=flower_env(flwr_home), capture_output=True, timeout=60
        )
        return json.loads(listing.stdout)["runs"][0]["status"] == "finished:stopped"
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
        return False


def flwr_run(
    flwr_home: Path,
    address: str,
    cfg: Settings,
    federation_config: Sequence[str] = (),
    operator_key: Path | None = None,
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """Submit this app to the SuperLink (see connect_cli) with `flwr run --stream`.

    The run config is signed with `operator_key` if given (authorisation.py).

    Returns
    -------
    AbstractContextManager[subprocess.Popen[bytes]]
        A context manager yielding the process, whose output goes to flwr-run.log.
    """
    run_config = settings.to_run_config(cfg)
    signed = authorisation.authorise(run_config, operator_key) if operator_key else {}
    run_config_file = flwr_home / "run-config.toml"
    run_config_file.write_text(tomli_w.dumps({**run_config, **signed}))
    app = shipped_copy(flwr_home / "app")
    command = [executable("flwr"), "run", str(app), "run", "--stream"]
    command += ["--run-config", str(run_config_file)]
    if federation_config:
        command += ["--federation-config", " ".join(federation_config)]
    return flower_process(command, flwr_home, "flwr-run.log")


def shipped_copy(folder: Path) -> Path:
    """Copy the files this app ships, and its pyproject.toml, into `folder`; return it.

    `flwr run` of the copy bundles the same files as of this folder: Flower's bundler reads
    every file under the folder it is given before it picks those to ship, 3.9 s here for
    this repository with its .venv, against 0.01 s for the copy. A copy left in `folder`
    by an earlier run is replaced whole.
    """
    shutil.rmtree(folder, ignore_errors=True)
    for path in [*authorisation.shipped_files(APP_DIR), APP_DIR / "pyproject.toml"]:
        copy = folder / path.relative_to(APP_DIR)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    return folder


def supernode(
    flwr_home: Path,
    server_address: str,
    node_config: dict[str, Any],
    ca_cert: Path | None = None,
    auth_key: Path | None = None,
    bin_dir: Path | None = None,
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """Run `flower-supernode` for one hospital, connected to the server's SuperLink.

    Its own Runtime API listens on a free port of 127.0.0.1 only: a hospital opens no port
    to the outside.

    Parameters
    ----------
    flwr_home : Path
        Flower's folder of this hospital: its state and supernode.log.
    server_address : str
        host:port of the server's SuperLink.
    node_config : dict[str, Any]
        The SuperNode's node config (client_cli.node_config).
    ca_cert : Path | None
        The federation's CA certificate; None: no TLS.
    auth_key : Path | None
        The private key it proves its identity with, for a server that admits only
        enrolled hospitals; None: none.
    bin_dir : Path | None
        The folder of the `flwr-clientapp` it starts ClientApps with (pinning.py).

    Returns
    -------
    AbstractContextManager[subprocess.Popen[bytes]]
        A context manager yielding the process.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
    command = [
        *this_copy_runs(f"from securehealth.flower import run_supernode; run_supernode({POLL_S})"),
        "--superlink",
        server_address,
        *(["--root-certificates", str(ca_cert)] if ca_cert else ["--insecure"]),
        *(["--auth-supernode-private-key", str(auth_key)] if auth_key else []),
        "--node-config",
        config,
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
    ]
    return flower_process(command, flwr_home, SUPERNODE_LOG, bin_dir)


def server_reachable(address: str) -> bool:
    """Whether something accepts connections at host:port."""
    try:
        with socket.create_connection(split_address(address), timeout=2):
            return True
    except OSError:
        return False


def check_server(address: str, ca_cert: Path | None = None) -> None:
    """Talk to the server once before starting a SuperNode.

    A certificate or TLS mismatch is then reported in words instead of as endless retries.

    Raises
    ------
    FlowerError
        Where the server does not answer as `ca_cert` (or, without it, plain HTTP) expects.
    """
    host, port = split_address(address)
    if not ca_cert:
        try:
            with urllib.request.urlopen(f"http://{address}/health", timeout=5):
                return
        except OSError as error:
            raise FlowerError(
                f"the server at {address} does not answer plain HTTP ({error}); it "
                f"probably uses TLS: drop --insecure and pass --root-certificates"
            ) from None
    context = ssl.create_default_context(cafile=ca_cert)
    try:
        with socket.create_connection((host, port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as error:
        raise FlowerError(
            f"the server at {address} is not the one {ca_cert} vouches for "
            f"({error.verify_message}); copy the server's certs/ca.crt"
        ) from None
    except (ssl.SSLError, OSError) as error:
        raise FlowerError(
            f"no TLS handshake with {address} ({error}); is the server in --insecure mode?"
        ) from None


def start_launcher() -> None:
    """Do what simulation.py, server.py and client.py do first.

    SIGTERM and SIGHUP stop them like Ctrl-C does: everything they started is stopped and
    the run's status recorded. Whatever they and Flower's processes create (state and run
    folders, logs, ledgers, keys, results) is readable by this user only: umask 077. They
    adopt the orphans of a Flower process that dies (processes.adopt_orphans), so stopping
    finds those too.
    """

    def interrupt(signal_number, frame):
        """Stop as Ctrl-C does."""
        raise KeyboardInterrupt

    for signal_number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signal_number, interrupt)
    os.umask(0o077)
    adopt_orphans()


def run_federation(
    cfg: Settings,
    console: Console,
    superlink_args: Sequence[str],
    federation_config: Sequence[str] = (),
    ca_cert: Path | None = None,
    hospital_keys: Iterable[Path] = (),
    operator_key: Path | None = None,
    environment: dict[str, str] | None = None,
    **where: Any,
) -> tuple[int, dict[str, Any] | None]:
    """Run one whole training on a SuperLink of our own, and leave nothing running (also on Ctrl-C).

    Parameters
    ----------
    cfg : Settings
        The run's settings; its run_dir holds the results and Flower's state and logs.
    superlink_args : Sequence[str]
        More arguments for `flower-superlink` (TLS files, --simulation, ...).
    federation_config : Sequence[str]
        `flwr run --federation-config` entries ("key=value").
    ca_cert : Path | None
        The CA certificate the SuperLink's TLS is verified with; None: no TLS.
    hospital_keys : Iterable[Path]
        The public keys of the hospitals to enroll (none: any hospital may join).
    operator_key : Path | None
        The operator's private key the run is signed with (authorisation.py); None: unsigned.
    environment : dict[str, str] | None
        Added to the SuperLink's environment.
    **where : Any
        host and port: where the SuperLink listens.

    Returns
    -------
    tuple[int, dict[str, Any] | None]
        The exit code, and the finished run's metrics (None after saying what went wrong).
    """
    run_dir = Path(cfg.run_dir)
    flwr_home = run_dir / "flower"
    environment = _with_body_limit(cfg, environment)
    try:
        with superlink(
            flwr_home, *superlink_args, ca_cert=ca_cert, environment=environment, **where
        ) as address:
            connect_cli(flwr_home, address, ca_cert)
            enroll(flwr_home, hospital_keys)
            with flwr_run(flwr_home, address, cfg, federation_config, operator_key) as process:
                metrics = display.follow(process, run_dir, cfg, console)
            # A stopped run's ServerApp may record the stop as its own failure first.
            ended = (metrics or {}).get("status") in (RunStatus.RUNNING, RunStatus.FAILED)
            stopped = ended and stopped_by_flower(flwr_home)
    except KeyboardInterrupt:
        mark_stopped(run_dir, RunStatus.INTERRUPTED)
        console.print(f"[red]Interrupted.[/] Flower was stopped; partial results in {run_dir}")
        return 130, None
    except FlowerError as error:
        mark_stopped(run_dir, RunStatus.FAILED)
        console.print(f"[red]Flower failed:[/] {error}")
        return 1, None
    return _outcome(run_dir, metrics, stopped, console)


def _with_body_limit(cfg: Settings, environment: dict[str, str] | None) -> dict[str, str]:
    """`environment` with the bound on a Fleet API body for this run's model (superlink_gate)."""
    from securehealth import data  # the data dictionary and the model: loaded by now
    from securehealth.deployment.superlink_gate import BODY_LIMIT_VARIABLE, fleet_body_limit
    from securehealth.privacy.schedule import weight_count

    weights = weight_count(len(data.load_schema(cfg).input_names), cfg.hidden_layers)
    return {**(environment or {}), BODY_LIMIT_VARIABLE: str(fleet_body_limit(weights))}


def _outcome(
    run_dir: Path, metrics: dict[str, Any] | None, stopped: bool, console: Console
) -> tuple[int, dict[str, Any] | None]:
    """How a run that Flower completed ended: run_federation's (exit code, metrics or None)."""
    if stopped:
        reason = (
            "stopped through Flower's Control API (`flwr stop`), which answers on this "
            "machine's loopback only; Flower's open-source SuperLink does not record who "
            "stopped it. Hospitals that trained in the unfinished round have recorded it "
            "as spent; they leave once they lose the server (client.py --connect-timeout)"
        )
        replacing = (RunStatus.RUNNING, RunStatus.FAILED)
        mark_stopped(run_dir, RunStatus.STOPPED, reason, replacing=replacing)
        console.print(f"[red]The run was stopped:[/] {reason}. Partial results in {run_dir}")
        return 1, None
    if not metrics or not has_finished(metrics["status"]):
        mark_stopped(run_dir, RunStatus.FAILED)
        error = (metrics or {}).get("error", "the server stopped without a result")
        log = run_dir / "flower" / "flwr-run.log"
        console.print(
            f"[red]The run failed:[/] {error}\nEach hospital's own privacy ledger records "
            f"what it spent, including a round it trained that did not finish here.\n"
            f"Last lines of {log}:\n{log_tail(log)}"
        )
        return 1, None
    # Dropouts are tolerated (min_fit_clients); a round that trained nobody is not.
    if display.idle_rounds(metrics):
        return 1, metrics
    warned = metrics["status"] == RunStatus.FINISHED_WITH_WARNINGS
    return (EXIT_WARNINGS if warned else 0), metrics
