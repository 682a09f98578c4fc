"""`python client.py --client-id N`: a hospital in a deployment (`join`).

Flower's SuperNode, connected to the server, with its ClientApps pinned to this copy of the
app (pinning.py), its privacy ledger in the hospital's own state directory, and a line per
round on the console until the server ends the run; or, with the subcommand `make-key` (or
the flag --make-key), the hospital's identity key.
"""

import argparse
import fcntl
import json
import os
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape

from securehealth import data, display, settings
from securehealth.admission import NOT_ADMITTED
from securehealth.certificates import OPERATOR_PUB, make_hospital_key
from securehealth.config import Settings
from securehealth.data import heart_disease
from securehealth.data.demonstration import is_demonstration
from securehealth.deployment import pinning, runtime
from securehealth.deployment.subcommands import CommandLine
from securehealth.deployment.worker import warm_worker
from securehealth.node import HOSPITAL_SETTINGS, REFUSED_RUN
from securehealth.privacy.accountant import MIN_BUDGET_LEFT, nearly_spent
from securehealth.privacy.ledger import (
    LedgerError,
    PrivacyLedger,
    add_reset_flag,
    check_before_start,
)
from securehealth.privacy.report import OPERATING_POINT_STATUSES, ReportStatus
from securehealth.relay import NODE_CONFIG_KEY
from securehealth.results import default_state_root, has_finished, read_json
from securehealth.state_directory import EVALUATION_FILE, StateDirectory
from securehealth.text import quoted

END_GRACE = 3  # seconds at most between the server's end-of-run notice and leaving
# What Flower 1.42's SuperNode logs as it receives a message, and once it sent a reply.
RECEIVED, SENT = "Receiving: ", "Sent successfully"
STATUS_POLL_S = 0.2  # how often client.py looks at what its hospital did
# What Flower 1.42's SuperNode logs when a server with --hospital-keys turns it away:
# its key is not enrolled there, or it has no key.
KEY_NOT_REGISTERED = ("Failed to activate SuperNode", "All SuperNodes must be registered")
# Bytes free on the state directory's disk that a hospital needs to join (Flower
# installs the server's app there, 0.5 MB a version; logs, ledger and status take
# kilobytes a round), and below which it leaves a run before a write fails.
ROOM_TO_JOIN, ROOM_TO_GO_ON = 20_000_000, 1_000_000
FILES_TO_GO_ON = 1000  # free inodes below which the disk is as good as full
JOIN_RETRY_S = 3  # seconds between asks to join a server that does not admit this hospital yet
LOCK_FILE = "client.lock"  # in the state directory: the pid of the client.py holding it
MAKE_KEY = "make-key"  # the subcommand that does what --make-key does
MAKE_KEY_HELP = (
    "create this hospital's identity key in --state-dir for a server that admits only "
    "enrolled hospitals, then exit"
)


@dataclass(frozen=True)
class Hospital:
    """This hospital, checked and ready to join: what the steps of `join` pass on."""

    cfg: Settings
    args: argparse.Namespace
    state_dir: Path
    lock: TextIO  # held until join returns (or the process ends): see hold
    ca_cert: Path | None  # None: --insecure
    operator_pub: Path | None  # None: --insecure
    own_data: dict[str, str]  # the node config naming its own data; {} if it reads none
    demonstration: bool  # its data is a demonstration's: a fresh budget per run
    budget: str  # what is left of its privacy budget, in words


def join(description: str, argv: list[str] | None = None) -> int:
    """Run `python client.py --client-id N`: this hospital's SuperNode, until the run ends.

    Parameters
    ----------
    description : str
        The command's usage text, shown by --help.
    argv : list[str] | None
        The command line without the program's name; None: sys.argv's.

    Returns
    -------
    int
        The exit code: 0 once the run finished (or the key is made), 1 where this
        hospital could not take part to the end, 130 after Ctrl-C; 2 (argparse's exit)
        for bad input, said in one line.
    """
    runtime.start_launcher()
    command_line = client_parser(description)
    cfg, args = command_line.parse(argv)
    parser = command_line.parser
    check_client_id(parser, cfg, args)
    state_dir = Path(args.state_dir or default_state_root() / f"hospital-{args.client_id}")
    state_dir = state_dir.resolve()
    if args.make_key:
        return make_key(parser, StateDirectory(state_dir).key_file)
    console = display.make_console()
    hospital = check_hospital(parser, cfg, args, state_dir, console)
    warn(hospital, console)
    try:
        wait_for_server(args.server_address, args.connect_timeout, console)
        runtime.check_server(args.server_address, hospital.ca_cert)
    except runtime.FlowerError as error:
        console.print(f"[red]{escape(str(error))}[/]")
        return 1
    except KeyboardInterrupt:
        console.print("[red]Interrupted[/] before joining the server.")
        return 130
    return take_part(hospital, console)


def client_parser(description: str) -> CommandLine:
    """The command line of client.py: the hospital's settings, its flags and its subcommand."""
    names = ("num_clients", "dataset", *HOSPITAL_SETTINGS)
    command_line = CommandLine(settings.make_parser(description, names))
    add_client_flags(command_line.parser)
    command_line.add_subcommand(
        MAKE_KEY,
        MAKE_KEY_HELP + " (the same as --make-key)",
        lambda parser: add_client_flags(parser, subcommand=True),
        make_key=True,
    )
    return command_line


def add_client_flags(parser: argparse.ArgumentParser, subcommand: bool = False) -> None:
    """Add client.py's own flags (--client-id, --server-address, ...) to `parser`.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The command's parser, or its subcommand's.
    subcommand : bool
        Whether `parser` is the make-key subcommand's, which has no --make-key flag.
    """
    group = parser.add_argument_group("hospital")
    _add_connection_flags(group)
    _add_own_flags(group, subcommand)


def _add_connection_flags(group: argparse._ArgumentGroup) -> None:
    """The flags that say which server this hospital joins and how it trusts it."""
    group.add_argument(
        "--client-id", type=int, required=True, help="this hospital's number, 0 to num_clients - 1"
    )
    group.add_argument(
        "--server-address",
        default=f"127.0.0.1:{runtime.DEFAULT_PORT}",
        help="host:port of the server",
    )
    group.add_argument(
        "--root-certificates",
        default="certs/ca.crt",
        help="the federation's CA certificate (a copy of the server's)",
    )
    group.add_argument(
        "--operator-key",
        default="",
        help="the operator's public key, which every run must be signed with (a copy of "
        "the server's certs/operator.pub) [default: operator.pub beside --root-certificates]",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS, and runs are not checked for the operator's signature: only "
        "against a server started with --insecure",
    )


def _add_own_flags(group: argparse._ArgumentGroup, subcommand: bool) -> None:
    """The flags of this hospital's own: its state, its data, its ledger and its patience."""
    group.add_argument(
        "--state-dir",
        default="",
        help="the hospital's own directory: privacy ledger, status, Flower's "
        f"state and logs [default: {default_state_root()}/hospital-<client id>]",
    )
    group.add_argument(
        "--data",
        default="",
        help="this hospital's own CSV file (with --schema): dataset csv (with --dataset "
        "heart-disease it reads its own site's file shipped in data/ instead)",
    )
    group.add_argument(
        "--schema", default="", help="the federation's data dictionary (schema.json or .yaml)"
    )
    if not subcommand:
        group.add_argument("--make-key", action="store_true", help=MAKE_KEY_HELP)
    add_reset_flag(group)
    group.add_argument(
        "--trust-server-app",
        action="store_true",
        help="run whatever app the server ships, not only one identical to this copy",
    )
    group.add_argument(
        "--connect-timeout",
        type=settings.positive_float,
        default=300,
        help="seconds to keep trying to reach the server and, where it admits only "
        "enrolled hospitals, to be admitted (its operator may still be enrolling the keys)",
    )


def check_client_id(
    parser: argparse.ArgumentParser, cfg: Settings, args: argparse.Namespace
) -> None:
    """Exit 2 with one line where --client-id is not one of the federation's hospitals."""
    if not 0 <= args.client_id < cfg.num_clients:
        parser.error(
            f"--client-id must be in 0..{cfg.num_clients - 1} "
            f"(num_clients is {cfg.num_clients}), got {args.client_id}"
        )


def make_key(parser: argparse.ArgumentParser, auth_key: Path) -> int:
    """Create this hospital's identity key at `auth_key` and say what to do with it; exit code 0.

    An existing key is never overwritten (a one-line error, exit 2): the server may
    have enrolled it.
    """
    try:
        public_key = make_hospital_key(auth_key)
    except FileExistsError as error:
        parser.error(str(error))
    print(
        f"Created this hospital's identity: {auth_key} (private: it never leaves this "
        f"machine) and {public_key}. Send {public_key.name} to the server's operator "
        f"to be enrolled (server.py --hospital-keys)."
    )
    return 0


def check_hospital(
    parser: argparse.ArgumentParser,
    cfg: Settings,
    args: argparse.Namespace,
    state_dir: Path,
    console: Console,
) -> Hospital:
    """Check all this hospital needs to join, holding its state directory; exit 2 if not.

    Checks its disk, its state directory (held from here on), the server's address, the
    CA certificate and operator key, its own data and its privacy ledger.
    """
    try:
        check_room(state_dir, ROOM_TO_JOIN)
        lock = hold(state_dir)
    except (StateDirError, OSError) as error:
        parser.error(str(error))
    try:
        runtime.split_address(args.server_address)
    except ValueError as error:
        parser.error(f"--server-address: {error}")
    ca_cert, operator_pub = _trust_files(parser, args)
    try:
        own_data = own_data_files(cfg, args, console)
    except data.DataError as error:
        parser.error(str(error))
    except OSError as error:  # a path the file system cannot even look up
        parser.error(f"cannot read {quoted(error.filename)}: {error.strerror}")
    demonstration = is_demonstration(Path(own_data["data-file"]) if own_data else None)
    try:
        budget = (
            demonstration_budget(state_dir, cfg, args)
            if demonstration
            else lasting_budget(state_dir, cfg, args, own_data, console)
        )
    except LedgerError as error:
        parser.error(str(error))
    return Hospital(
        cfg=cfg,
        args=args,
        state_dir=state_dir,
        lock=lock,
        ca_cert=ca_cert,
        operator_pub=operator_pub,
        own_data=own_data,
        demonstration=demonstration,
        budget=budget,
    )


def _trust_files(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[Path | None, Path | None]:
    """(the CA certificate, the operator's public key), both present; (None, None) if --insecure."""
    if args.insecure:
        return None, None
    ca_cert = Path(args.root_certificates).resolve()
    if not is_file(ca_cert):
        parser.error(
            f"no CA certificate at {ca_cert}: copy the server's certs/ca.crt "
            f"(made by `python server.py --make-certs`) or pass --root-certificates"
        )
    operator_pub = Path(args.operator_key or ca_cert.with_name(OPERATOR_PUB)).resolve()
    if not is_file(operator_pub):
        parser.error(
            f"no operator key at {operator_pub}: copy the server's certs/{OPERATOR_PUB} "
            f"(made by `python server.py --make-certs`) or pass --operator-key"
        )
    return ca_cert, operator_pub


def warn(hospital: Hospital, console: Console) -> None:
    """Say what is left of this hospital's budget, and warn of flags that lower its guard."""
    args = hospital.args
    console.print(f"Hospital {args.client_id}'s {hospital.budget}", soft_wrap=True)
    if args.insecure:
        console.print(
            "[bold red]WARNING: --insecure: no TLS, this hospital's model updates "
            "cross the network unencrypted to an unauthenticated server, and it trains "
            "for any run, signed by the operator or not.[/]"
        )
    if args.trust_server_app:
        console.print(
            "[bold red]WARNING: --trust-server-app: this hospital runs whatever code the "
            "server ships, with access to its patients' data.[/]"
        )


def node_config(hospital: Hospital) -> dict[str, Any]:
    """The node config of this hospital's SuperNode: who it is, its state and its data."""
    cfg, args = hospital.cfg, hospital.args
    return {
        "partition-id": args.client_id,
        "num-partitions": cfg.num_clients,
        "state-dir": str(hospital.state_dir),
        "operator-key": str(hospital.operator_pub or ""),
        **hospital.own_data,
        **{name: getattr(cfg, name) for name in HOSPITAL_SETTINGS},
    }


def take_part(hospital: Hospital, console: Console) -> int:
    """Run this hospital's SuperNode (and its warm worker) until the run ends; the exit code."""
    args, state_dir = hospital.args, hospital.state_dir
    config = node_config(hospital)
    flwr_home = state_dir / "flower"
    status_file, pinned = StateDirectory(state_dir).status_file, not args.trust_server_app
    try:
        # The warm worker runs this copy's code: not for a hospital that runs the server's.
        worker = nullcontext() if args.trust_server_app else warm_worker(dict(config))
        clientapps = runtime.zygote(flwr_home, "flwr-clientapp", status_file, pinned)
        with worker as worker_socket, clientapps as zygote:
            launcher = pinning.install_launcher(
                flwr_home / "bin", status_file, pinned, zygote=zygote
            )
            console.print(joining_line(hospital))
            config |= {NODE_CONFIG_KEY: worker_socket} if worker_socket else {}
            return run_supernode(hospital, config, launcher, console)
    except KeyboardInterrupt:
        console.print("[red]Interrupted.[/] This hospital left the federation.")
        return 130


def joining_line(hospital: Hospital) -> str:
    """The line that says which server this hospital joins, with what budget and trust."""
    cfg, args, state = hospital.cfg, hospital.args, StateDirectory(hospital.state_dir)
    return (
        f"Hospital {args.client_id} joining the server at {args.server_address}; "
        f"its budget: "
        f"epsilon {cfg.epsilon:g}, delta {cfg.delta:g}, {cfg.adjacency} adjacency, "
        + (
            f"for each run on its demonstration data (ledgers in {state.demo_runs}); "
            if hospital.demonstration
            else f"over all runs on its patients (privacy ledger: {state.ledger_file}); "
        )
        + f"secure aggregation "
        f"{cfg.secure_aggregation}; "
        + ("identified by its key; " if state.key_file.exists() else "")
        + (
            "runs any app the server ships. "
            if args.trust_server_app
            else "runs only an app identical to this copy. "
        )
        + f"State and logs: {state.path}"
    )


def run_supernode(
    hospital: Hospital, config: dict[str, Any], launcher: Path, console: Console
) -> int:
    """Start the SuperNode and follow its rounds; ask again while the server does not admit it.

    Parameters
    ----------
    hospital : Hospital
        This hospital, checked.
    config : dict[str, Any]
        The SuperNode's node config (node_config, and the warm worker's socket).
    launcher : Path
        The folder of the pinned `flwr-clientapp` launcher (pinning.install_launcher).
    console : Console
        Where the rounds are shown.

    Returns
    -------
    int
        The exit code: how the run ended for this hospital.
    """
    args, state_dir, flwr_home = hospital.args, hospital.state_dir, hospital.state_dir / "flower"
    auth_key = StateDirectory(state_dir).key_file
    identity = auth_key if auth_key.exists() and hospital.ca_cert else None
    deadline = time.monotonic() + args.connect_timeout
    while True:
        log_start = runtime.log_size(flwr_home / runtime.SUPERNODE_LOG)
        with runtime.supernode(
            flwr_home, args.server_address, config, hospital.ca_cert, identity, launcher
        ) as node:
            exit_code = follow_rounds(node, state_dir, args, console, log_start)
        if exit_code is not None:
            return exit_code
        if identity is None or time.monotonic() > deadline:  # keyless: never admitted
            return refused(state_dir, console)
        console.print(
            "The server does not admit this hospital yet (its operator may still be "
            "enrolling the hospitals' keys); asking again for up to "
            f"{deadline - time.monotonic():.0f} s more (--connect-timeout) ..."
        )
        time.sleep(JOIN_RETRY_S)


def demonstration_budget(state_dir: Path, cfg: Settings, args: argparse.Namespace) -> str:
    """Say what a hospital on demonstration data (data/demonstration.py) spends, in words.

    A fresh budget per run, in a ledger of the run's own beside (never in) its lasting one.

    Raises
    ------
    LedgerError
        Where --reset-ledger is given: there is no lasting ledger to reset.
    """
    if args.reset_ledger is not None:
        raise LedgerError(
            "--reset-ledger is for a ledger of a hospital's own patients; this hospital's "
            "data is a demonstration's (generated, or shipped with this code), whose "
            "every run starts a fresh ledger: leave out --reset-ledger"
        )
    return (
        f"data is a demonstration's (generated, or shipped with this code, by its "
        f"fingerprint): each run spends epsilon {cfg.epsilon:g} from a fresh ledger in "
        f"{escape(str(StateDirectory(state_dir).demo_runs))}/<run id>, never from the "
        f"lasting budget of the patients of its own"
    )


def lasting_budget(
    state_dir: Path,
    cfg: Settings,
    args: argparse.Namespace,
    own_data: dict[str, str],
    console: Console,
) -> str:
    """Check this hospital's lasting ledger before it joins, and say what is left of its budget.

    The ledger must be sound, writable, the only one of its data, and have budget left.

    Raises
    ------
    LedgerError
        Where it is not, saying what to do.
    """
    data_file, everyone = own_patients(cfg, args.client_id, own_data)
    ledger = check_before_start(state_dir, cfg, data_file, args.reset_ledger, everyone)
    spent = budget_spent_before(ledger, cfg)
    if args.reset_ledger is not None:
        console.print(
            f"[yellow]Started a new privacy ledger {escape(str(ledger.path))}: "
            f"{escape(repr(args.reset_ledger))}[/]"
        )
    return (
        f"privacy budget: epsilon {cfg.epsilon:g} over all runs on its patients, "
        f"{spent:.3f} spent before, {cfg.epsilon - spent:.3f} left; a run spends up to "
        f"all that is left (ledger: {escape(str(ledger.path))})"
    )


def budget_spent_before(ledger: PrivacyLedger, cfg: Settings) -> float:
    """Return the epsilon this hospital's ledger holds.

    Raises
    ------
    LedgerError
        Where too little is left for it to train in any run, saying what to do.
    """
    with ledger.transaction():
        spent = ledger.epsilon()
    if nearly_spent(spent, cfg.epsilon):
        left = (
            f"past its budget of {cfg.epsilon:g}"
            if spent > cfg.epsilon
            else f"of its budget of {cfg.epsilon:g}, less than {MIN_BUDGET_LEFT:.0%} left"
        )
        raise LedgerError(
            f"this hospital's privacy ledger {ledger.path} holds epsilon {spent:.4f}, "
            f"{left}, so it cannot train in any run. The budget is for its patients' "
            f"lifetime and a ledger is never reset: for a new cohort of patients, give it a "
            f"new --state-dir; raise --epsilon only if the hospital's privacy policy allows it"
        )
    return spent


class StateDirError(RuntimeError):
    """This hospital's state directory cannot be held: it is in use, no folder, or its disk full.

    In use: another live client.py holds it (hold). Disk full: check_room.
    """


def is_file(path: Path) -> bool:
    """Whether path is a file; False where the file system cannot look it up (a name too long)."""
    try:
        return path.is_file()
    except OSError:
        return False


def check_room(state_dir: Path, needed: int) -> None:
    """Raise StateDirError where the state directory's disk has less than `needed` bytes free.

    The disk is that of the state directory, or of the folder it will be made in. A
    hospital that cannot write its ledger, status and Flower's copy of the app cannot take
    part, and must say so here rather than fail in a log nobody reads.
    """
    folder = next(p for p in (state_dir, *state_dir.parents) if p.exists())
    disk = os.statvfs(folder)
    free = disk.f_bavail * disk.f_frsize
    if disk.f_files and disk.f_favail < FILES_TO_GO_ON:  # no room for a file's name
        free = 0
    if free < needed:
        raise StateDirError(
            f"the disk of this hospital's state directory {state_dir} is full "
            f"({free / 1e6:.1f} MB free; it needs {needed / 1e6:.0f} MB for its privacy "
            f"ledger, status and Flower's copy of the server's app): free some space, or "
            f"move the state directory with its ledger to another disk (--state-dir)"
        )


def hold(state_dir: Path) -> TextIO:
    """Lock the hospital's state directory (made, mode 0700) for this process; return the lock.

    Two launchers on one ledger and one Flower state would be two nodes of one hospital.
    The kernel releases the lock when the process ends, even by kill -9; the lock file
    names its pid.

    Raises
    ------
    StateDirError
        Where the state directory is a file, its lock file cannot be opened, or another
        live client.py holds it.
    """
    if state_dir.exists() and not state_dir.is_dir():
        raise StateDirError(f"--state-dir {state_dir} is a file, not a folder")
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    try:  # never through a link planted in its place
        descriptor = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        raise StateDirError(
            f"cannot open {state_dir / LOCK_FILE} ({error.strerror}); remove it if it is a link"
        ) from None
    lock = os.fdopen(descriptor, "r+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise StateDirError(
            f"this hospital's state directory {state_dir} is in use by another "
            f"client.py (pid {holder}): stop that one first, or give this one its own "
            "--state-dir"
        ) from None
    lock.seek(0)
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def own_data_files(cfg: Settings, args: argparse.Namespace, console: Console) -> dict[str, str]:
    """Return the node config naming this hospital's own data, checked before it joins.

    Checking it here rather than in the middle of round 1 also warns on the console where
    its training patients are all of one class.

    Returns
    -------
    dict[str, str]
        "dataset", "data-file" and "schema-file": its CSV file and data dictionary (--data,
        --schema), or its site's file of a data set shipped in this copy; {} if it reads none.

    Raises
    ------
    DataError
        Where its data is missing or bad (data.DataError).
    """
    if args.data or args.schema:
        if not (args.data and args.schema):
            raise data.DataError(
                "--data and --schema go together: the file and its data dictionary"
            )
        if cfg.dataset not in ("csv", settings.DEFAULTS["dataset"]):
            raise data.DataError(f"--data and --schema are for dataset csv, not {cfg.dataset}")
        cfg = settings.resolve({**vars(cfg), "dataset": "csv"})
        files = (Path(args.data).resolve(), Path(args.schema).resolve())
    elif cfg.dataset == "csv":
        raise data.DataError("dataset csv needs this hospital's --data FILE and --schema FILE")
    elif cfg.dataset == "heart-disease":
        files = (heart_disease.site_file(args.client_id), heart_disease.SCHEMA_FILE)
    else:
        return {}
    (_, y), _ = data.hospital_data(cfg, args.client_id, *map(str, files))
    if warning := data.single_class(y, args.client_id):
        console.print(f"[yellow]Warning: {escape(warning)}[/]")
    return {"dataset": cfg.dataset, "data-file": str(files[0]), "schema-file": str(files[1])}


def own_patients(cfg: Settings, client_id: int, own_data: dict[str, str]) -> tuple[str | None, str]:
    """Return (the file of this hospital's own patients, their fingerprint), for the ledger index.

    (None, "") where it reads no file.
    """
    if not own_data:
        return None, ""
    own = settings.resolve({**vars(cfg), "dataset": own_data["dataset"]})
    rows = data.hospital_data(own, client_id, own_data["data-file"], own_data["schema-file"])
    return own_data["data-file"], data.patients_fingerprint(rows)


def wait_for_server(address: str, timeout: float, console: Console) -> None:
    """Wait until the server accepts connections (start order does not matter).

    Raises
    ------
    runtime.FlowerError
        Where nothing accepts connections at `address` within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    if not runtime.server_reachable(address):
        console.print(f"Waiting for server at {address} ...")
        while not runtime.server_reachable(address):
            if time.monotonic() > deadline:
                raise runtime.FlowerError(
                    f"no server at {address} after {timeout:g} s: check --server-address "
                    f"and that `python server.py` runs there"
                )
            time.sleep(1)


def follow_rounds(
    node: subprocess.Popen[bytes],
    state_dir: Path,
    args: argparse.Namespace,
    console: Console,
    log_start: int,
) -> int | None:
    """Print what this hospital does each round, until the server ends the run.

    Returns
    -------
    int | None
        The exit code: how the run ended for this hospital. None where the server turned
        the SuperNode away (what it logged after `log_start` says so): its key is not
        enrolled there, or not yet.
    """
    status_path = StateDirectory(state_dir).status_file
    last = status_path.read_text() if status_path.exists() else None
    unreachable_since, next_reach = None, time.monotonic()
    while node.poll() is None:
        text = status_path.read_text() if status_path.exists() else None
        if text != last:
            last = text
            exit_code = show_status(json.loads(text), state_dir, console)
            if exit_code is not None:
                return exit_code
        try:
            check_room(state_dir, ROOM_TO_GO_ON)
        except StateDirError as full:
            console.print(f"[red]Leaving the run:[/] {escape(str(full))}")
            return 1
        if time.monotonic() >= next_reach:  # once a second
            next_reach = time.monotonic() + 1
            if runtime.server_reachable(args.server_address):
                unreachable_since = None
            else:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > args.connect_timeout:
                    console.print(
                        f"[red]Lost the server at {args.server_address} for "
                        f"{args.connect_timeout:g} s; leaving.[/]"
                    )
                    return 1
        time.sleep(STATUS_POLL_S)
    said = runtime.log_tail(state_dir / "flower" / runtime.SUPERNODE_LOG, since=log_start)
    if any(refusal in said for refusal in KEY_NOT_REGISTERED):
        return None
    console.print(f"[red]The SuperNode stopped unexpectedly:[/]\n{said}")
    return 1


def wait_for_acknowledgement(supernode_log: Path) -> None:
    """Wait until the SuperNode has sent its reply to the end-of-run notice, at most END_GRACE s.

    The notice is the last message it received; Flower 1.42's SuperNode logs "Sent
    successfully" once a reply is sent. A hospital that left before would hold the server
    for END_NOTICE_TIMEOUT.
    """
    deadline = time.monotonic() + END_GRACE
    while time.monotonic() < deadline:
        since_last_message = runtime.log_tail(supernode_log, lines=40).rpartition(RECEIVED)[2]
        if SENT in since_last_message:
            return
        time.sleep(0.05)


def refused(state_dir: Path, console: Console) -> int:
    """Say that the server admits only enrolled hospitals and this is not one; exit 1."""
    key = StateDirectory(state_dir).key_file
    console.print(
        "[red]The server refused this hospital: it admits only enrolled hospitals.[/] "
        + (
            f"This hospital's key is not enrolled there: send {key.with_suffix('.pub')} "
            f"to the server's operator."
            if key.exists()
            else "Create this hospital's key with --make-key and send the .pub file "
            "to the server's operator."
        )
    )
    return 1


def show_status(status: dict[str, Any], state_dir: Path, console: Console) -> int | None:
    """Print a change of this hospital's status; return the exit code once its run is over."""
    if status["status"] == pinning.REFUSED:
        console.print(f"[red]Refused to run the server's app:[/] {escape(status['reason'])}")
        return 1
    if status["status"] == NOT_ADMITTED:  # nothing spent; the run goes on without it
        console.print(
            f"[red]The server did not admit this hospital to run {status['run_id']}:[/] "
            f"{escape(status['reason'])}"
        )
        return 1
    if status["status"] == REFUSED_RUN:  # nothing spent; the server's own run may follow
        console.print(
            f"[red]Did not take part in run {status['run_id']}:[/] {escape(status['reason'])}"
        )
        return None
    spent = f"epsilon spent {status['epsilon']:.3f} of {status['epsilon_budget']:g}"
    if status["status"] == ReportStatus.TRAINED:
        console.print(f"Round {status['round']}: trained; {spent}")
    elif status["status"] in OPERATING_POINT_STATUSES:
        released = status["status"] == ReportStatus.RELEASED
        said = "released" if released else f"declined ({status['reason']})"
        console.print(f"Operating point's histograms {escape(said)}; {spent}")
    elif status["status"] == ReportStatus.REFUSED:
        console.print(
            f"[yellow]Round {status['round']}: declined to train: "
            f"{escape(status['reason'])}. Raise --epsilon deliberately to continue.[/]"
        )
    else:
        reason = f": {escape(status['reason'])}" if status["reason"] else ""
        console.print(f"The server ended the run ({escape(status['status'])}{reason}); {spent}.")
        evaluation = Path(status.get("ledger", state_dir / "-")).parent / EVALUATION_FILE
        if has_finished(status["status"]) and evaluation.exists():
            final = read_json(evaluation)[-1]
            console.print(
                f"Final model on this hospital's {final['patients']} held-out patients "
                f"(kept here): {display.metrics_text(final)}"
            )
        wait_for_acknowledgement(state_dir / "flower" / runtime.SUPERNODE_LOG)
        return 0 if has_finished(status["status"]) else 1
    return None
