"""A pre-loaded Flower command: one process imports it once and forks a child per message.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message a SuperNode receives
(and a `flwr-serverapp` for every run), and each spends over a second importing Flower
before it does anything. `preloaded` starts a zygote that imports the command's code once,
then waits; the launcher Flower starts (pinning.install_launcher) hands it each message
(`hand_over`), and the zygote forks a child that runs the command as that launcher would
have: with the launcher's arguments, environment, working folder and standard streams.
The child reports its exit code back, and the launcher exits with it. The idea is Python's
own `multiprocessing.forkserver`, which serves only the process that started it.

What a child may not inherit (tests/test_zygote.py proves each):
- state of an earlier message: the zygote only imports and forks; no message runs in it,
  so each child starts from the same freshly imported state;
- the app's code: the zygote imports this copy of the package to load its libraries, then
  unloads it (pinning.forget_this_copy), so that each child loads the app Flower installed
  from what was shipped, after pinning.py has checked it, exactly as a fresh process does;
- randomness: every generator is seeded from `secrets` in the child, after the fork (the
  product's own are made per use from `secrets`; Python's, NumPy's and PyTorch's global
  ones are re-seeded here), so two messages never draw the same noise. Python's string
  hashing (PYTHONHASHSEED) is the zygote's in every child: it decides no draw.

Who may use it, and for how long:
- The launcher of client.py or server.py binds the socket (a random name in Linux's
  abstract namespace) before the zygote starts and hands it over, so no one can take the
  name first; calls wait while the zygote imports, and it forks only for processes of
  the hospital's own user. A launcher that finds another user's socket, or none, or one
  that does not take its call within CONNECT_TIMEOUT, or no child within
  HANDOVER_TIMEOUT, runs the command in its own process, as before; a child runs only
  once its launcher has said GO, so a message never runs twice.
- A child ends with its launcher (the connection closes: it and all it started) and
  with the zygote (PR_SET_PDEATHSIG), the zygote with the launcher that started it
  (WATCH_S): after kill -9 of client.py nothing of it trains on. Another user can still
  connect, and slow the zygote by calling in a loop (nothing is forked for them).
"""

import json
import os
import random
import secrets
import select
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import NoReturn

from securehealth.local_socket import peer_uid, random_name, socket_address

LENGTH = struct.Struct("!I")
MAX_REQUEST = 1 << 20  # bytes: a launcher's arguments and environment
BACKLOG = 64  # launchers whose calls wait to be taken
CONNECT_TIMEOUT = 5  # seconds a launcher waits for its call to be taken before it runs alone
HANDOVER_TIMEOUT = 10  # seconds it waits for the child's pid before it runs alone
GO = b"g"  # the launcher's word that the child may run: it will not run the message itself
READY = "Ready: imported, forking a child per message"  # the zygote's log, once it serves
REQUEST_TIMEOUT = 10  # seconds a child waits for its launcher's request, then its GO
WATCH_S = 0.2  # how often the zygote checks that its launcher (client.py, server.py) lives
STREAMS = 3  # stdin, stdout and stderr travel with the launcher's GO
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends


# The launcher's side: what Flower starts for each message.


def hand_over(name: str, argv: list[str]) -> int | None:
    """Have the zygote `name` run this launcher's command; return its exit code.

    The child gets `argv` (as sys.argv, the command's name first), this process'
    environment, working folder and standard streams; signals this process receives are
    passed on to it. None where no zygote of this user takes the call: the caller then runs
    the command itself.
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(CONNECT_TIMEOUT)  # a full backlog: a socket nobody serves
        connection.connect(socket_address(name))
        if peer_uid(connection) != os.getuid():
            raise ConnectionError("another user's socket")
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)})
        payload = request.encode()
        connection.sendall(LENGTH.pack(len(payload)) + payload)
        connection.settimeout(HANDOVER_TIMEOUT)  # a zygote stopped or stuck: run alone
        replies = connection.makefile("rb")
        child = int(json.loads(replies.readline())["pid"])
        # Only now does the child run (and get the streams): never both it and this process.
        socket.send_fds(connection, [GO], list(range(STREAMS)))
        connection.settimeout(None)
    except (OSError, ValueError, KeyError):
        connection.close()
        return None
    forwarded: list[int] = []

    def forward(signal_number: int, frame: object) -> None:
        forwarded.append(signal_number)
        _signal(child, signal_number)

    for signal_number in FORWARDED_SIGNALS:
        signal.signal(signal_number, forward)
    with connection:
        try:
            return int(json.loads(replies.readline())["exit"])
        except (OSError, ValueError, KeyError):  # the child died without saying how
            _end_as(forwarded[-1] if forwarded else None)
            return 1


def _end_as(signal_number: int | None) -> None:
    """End this launcher by the signal it passed on to the child, as the child was ended."""
    if signal_number is not None:
        signal.signal(signal_number, signal.SIG_DFL)
        os.kill(os.getpid(), signal_number)


def _signal(pid: int, signal_number: int) -> None:
    """Pass a signal on to the child, if it still exists."""
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        pass


# The zygote's side.


@contextmanager
def preloaded(
    start: Callable[[int], AbstractContextManager[object]],
) -> Iterator[str | None]:
    """Start a zygote for the duration; yield its socket's name, for the launcher.

    Parameters
    ----------
    start : Callable[[int], AbstractContextManager[object]]
        Starts the zygote's process with the listening socket's file descriptor, which it
        must pass on (see `main`), as a context manager that stops it on leaving:
        runtime.zygote.

    Yields
    ------
    str | None
        The zygote's socket name; None where a zygote cannot run here (not Linux).
    """
    if not hasattr(socket, "SO_PEERCRED") or not hasattr(os, "fork"):
        yield None
        return
    name = random_name("zygote")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(socket_address(name))  # before anyone can learn the name
        listener.listen(BACKLOG)  # calls wait while the zygote imports (HANDOVER_TIMEOUT)
        with start(listener.fileno()):
            listener.close()  # the zygote's alone: when it ends, calls are refused
            yield name


def serve(
    listener: socket.socket, launcher: int, prepare: Callable[[], Callable[[], None]]
) -> None:
    """Be a zygote: `prepare`, then fork a child per call on `listener`.

    Parameters
    ----------
    listener : socket.socket
        The listening socket (see `preloaded`); calls that come meanwhile wait.
    launcher : int
        The pid of the process that started this one: the zygote ends when it does.
    prepare : Callable[[], Callable[[], None]]
        Imports what every child needs and returns what a child runs, with the request's
        arguments in sys.argv; the child's exit code is that of the SystemExit this raises
        (0 if it returns).
    """
    run = prepare()
    print(READY, file=sys.stderr, flush=True)
    zygote = os.getpid()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    while os.getppid() == launcher:
        if not select.select([listener], [], [], WATCH_S)[0]:
            continue
        try:
            connection, _ = listener.accept()
            with connection:
                if peer_uid(connection) != os.getuid():
                    continue  # another user's call: no child, no answer
                child = os.fork()
                if child == 0:
                    listener.close()
                    _child(connection, zygote, run)
                print(f"Forked {child} for a message", file=sys.stderr, flush=True)
        except OSError as error:  # no process left to fork (a limit), a call gone at once
            print(f"No child for a message: {error}", file=sys.stderr, flush=True)


def _child(connection: socket.socket, zygote: int, run: Callable[[], None]) -> NoReturn:
    """Take one request in this forked child, run it, report its exit code, and end."""
    code = 1
    try:
        _end_with(zygote)
        os.setpgid(0, 0)  # what the message starts ends with it (_end_with_launcher)
        connection.settimeout(REQUEST_TIMEOUT)  # a caller that stops talking costs nothing
        request = _receive(connection)
        connection.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        go, streams, _, _ = socket.recv_fds(connection, len(GO), STREAMS)
        if go != GO or len(streams) != STREAMS:  # the launcher gave up waiting and runs it
            os._exit(1)
        connection.settimeout(None)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for standard, received in enumerate(streams):  # stdin, stdout, stderr
            os.dup2(received, standard)
            os.close(received)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv[:] = request["argv"]
        reseed_generators()
        threading.Thread(target=_end_with_launcher, args=(connection,), daemon=True).start()
        code = _exit_code(run)
    except BaseException:
        traceback.print_exc()
    finally:
        for output in (sys.stdout, sys.stderr):  # before the launcher can end, and this with it
            try:
                output.flush()
            except (OSError, ValueError):
                pass
        try:
            connection.sendall(json.dumps({"exit": code}).encode() + b"\n")
        except OSError:
            pass
        os._exit(code)


def _end_with(zygote: int) -> None:
    """Have the kernel kill this child when the zygote ends; end now if it already has."""
    import ctypes  # the zygote's side only: a launcher imports this module first

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != zygote:
        os._exit(1)


def _end_with_launcher(connection: socket.socket) -> None:
    """End this child, and what it started, once its launcher is gone.

    The launcher sends nothing after GO: the connection's end is the launcher's.
    """
    try:
        connection.recv(1)
    except OSError:
        pass
    os.killpg(0, signal.SIGKILL)


def _receive(connection: socket.socket) -> dict:
    """A launcher's request: its arguments, working folder and environment.

    Raises
    ------
    ValueError
        Where it is not a launcher's request, or came slower than the connection's timeout.
    """
    try:
        (size,) = LENGTH.unpack(_read(connection, LENGTH.size))
        if size > MAX_REQUEST:
            raise ValueError("not a launcher's request")
        request = json.loads(_read(connection, size))
    except (OSError, struct.error) as error:
        raise ValueError(f"not a launcher's request ({error})") from None
    if not isinstance(request, dict) or not isinstance(request.get("argv"), list):
        raise ValueError("not a launcher's request")
    if not isinstance(request.get("env"), dict) or not isinstance(request.get("cwd"), str):
        raise ValueError("not a launcher's request")
    return request


def _read(connection: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from `connection`; ValueError where it ends sooner."""
    data = bytearray()
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ValueError("cut short")
        data += chunk
    return bytes(data)


def _exit_code(run: Callable[[], None]) -> int:
    """Call `run`; the exit code a process ending so would have."""
    try:
        run()
    except SystemExit as end:
        if end.code is None or isinstance(end.code, int):
            return end.code or 0
        print(end.code, file=sys.stderr)
        return 1
    return 0


def reseed_generators() -> None:
    """Seed every global random generator afresh from `secrets`: called in a child, after the fork.

    The product makes its own generators per use from `secrets` (privacy/dpsgd.py); the
    global ones of Python, NumPy (Flower's SecAgg+ rounds with it) and PyTorch would
    otherwise be the zygote's, the same in every child. 256 bits each where they take it.
    """
    random.seed(secrets.randbits(256))
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed([secrets.randbits(32) for _ in range(8)])
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(secrets.randbits(63))


def main(command: str, status_file: str, pinned: str, listener: str, launcher: str) -> None:
    """Be the zygote of a pinned Flower command (started by runtime.zygote).

    Parameters
    ----------
    command : str
        flwr-clientapp or flwr-serverapp.
    status_file : str
        The hospital's status file ("" on the server), for pinning.run_pinned.
    pinned : str
        "1" to run only an app identical to this copy, "0" for any (--trust-server-app).
    listener : str
        The file descriptor of the listening socket it was handed.
    launcher : str
        The pid of the process that started the zygote.
    """

    def prepare() -> Callable[[], None]:
        from securehealth.deployment import pinning

        pinning.preload(command)
        pinning.forget_this_copy()
        return partial(pinning.run_pinned, command, status_file or None, pinned=pinned == "1")

    bound = socket.socket(fileno=int(listener))
    bound.set_inheritable(False)  # nothing this process starts holds the name
    serve(bound, int(launcher), prepare)
