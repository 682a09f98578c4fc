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
  ones are re-seeded here), so two messages never draw the same noise.

The zygote is single-threaded (a fork copies only the calling thread), answers processes of
the hospital's own user only, on a socket with a random name in Linux's abstract
namespace, and ends with the launcher that started it. Where it cannot run (not Linux), or
does not answer, the launcher runs the command in its own process, as before.
"""

import json
import os
import random
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import NoReturn

from securehealth.local_socket import peer_uid, random_name, socket_address

LENGTH = struct.Struct("!I")
MAX_REQUEST = 1 << 20  # bytes: a launcher's arguments and environment
REQUEST_TIMEOUT = 10  # seconds a launcher has to send its request
START_TIMEOUT = 30  # seconds a zygote has to start listening
WATCH_S = 0.2  # how often the zygote checks that its launcher (client.py, server.py) lives
STREAMS = 3  # stdin, stdout and stderr travel with the request
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)


# The launcher's side: what Flower starts for each message.


def hand_over(name: str, argv: list[str]) -> int | None:
    """Have the zygote `name` run this launcher's command; return its exit code.

    The child gets `argv` (as sys.argv, the command's name first), this process'
    environment, working folder and standard streams; signals this process receives are
    passed on to it. None where no zygote of this user answers: the caller then runs the
    command itself.
    """
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(socket_address(name))
        if peer_uid(connection) != os.getuid():
            return None
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)})
        payload = request.encode()
        socket.send_fds(connection, [LENGTH.pack(len(payload))], list(range(STREAMS)))
        connection.sendall(payload)
        replies = connection.makefile("r")
        child = int(json.loads(replies.readline())["pid"])
    except (OSError, ValueError, KeyError):
        connection.close()
        return None
    for signal_number in FORWARDED_SIGNALS:
        signal.signal(signal_number, lambda number, frame: _signal(child, number))
    with connection:
        try:
            return int(json.loads(replies.readline())["exit"])
        except (OSError, ValueError, KeyError):  # the child died without saying how
            return 1


def _signal(pid: int, signal_number: int) -> None:
    """Pass a signal on to the child, if it still exists."""
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        pass


# The zygote's side.


@contextmanager
def preloaded(
    start: Callable[[list[str]], AbstractContextManager[subprocess.Popen[bytes]]],
) -> Iterator[str | None]:
    """Start a zygote for the duration; yield its socket's name, for the launcher.

    Parameters
    ----------
    start : Callable[[list[str]], AbstractContextManager[subprocess.Popen[bytes]]]
        Starts the zygote's process, with the socket's name as its last argument (see
        `main`), as a context manager that stops it on leaving: runtime.flower_process.

    Yields
    ------
    str | None
        The zygote's socket name, once it listens; None where a zygote cannot run here
        (not Linux) or did not start.
    """
    if not hasattr(socket, "SO_PEERCRED") or not hasattr(os, "fork"):
        yield None
        return
    name = random_name("zygote")
    with start([name]) as process:
        yield name if _listening(name, process) else None


def _listening(name: str, process: subprocess.Popen[bytes]) -> bool:
    """Wait until the zygote `process` listens on `name`; False if it ends or takes too long.

    Its first message may come at once; one sent meanwhile would find no zygote.
    """
    deadline = time.monotonic() + START_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(socket_address(name))  # the zygote ignores an empty request
                return True
            except OSError:
                time.sleep(0.02)
    return False


def serve(name: str, launcher: int, prepare: Callable[[], Callable[[], None]]) -> None:
    """Be a zygote: listen on `name`, `prepare`, then fork a child per request.

    Parameters
    ----------
    name : str
        The socket's name (see `preloaded`).
    launcher : int
        The pid of the process that started this one: the zygote ends when it does.
    prepare : Callable[[], Callable[[], None]]
        Imports what every child needs (requests that arrive meanwhile wait for it) and
        returns what a child runs, with the request's arguments in sys.argv; the child's
        exit code is that of the SystemExit this raises (0 if it returns).
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_address(name))
    listener.listen(64)
    run = prepare()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    while os.getppid() == launcher:
        if not select.select([listener], [], [], WATCH_S)[0]:
            continue
        connection, _ = listener.accept()
        with connection:
            request, streams = _receive(connection)
            if request is None:
                continue
            child = os.fork()
            if child == 0:
                listener.close()
                _child(connection, request, streams, run)
            print(f"Forked {child} for a message", file=sys.stderr, flush=True)
            for stream in streams:
                os.close(stream)


def _receive(connection: socket.socket) -> tuple[dict | None, list[int]]:
    """A launcher's request and standard streams; (None, []) if it is not a valid one."""
    connection.settimeout(REQUEST_TIMEOUT)
    streams: list[int] = []
    try:
        if peer_uid(connection) != os.getuid():
            return None, []
        header, streams, _, _ = socket.recv_fds(connection, LENGTH.size, STREAMS)
        (size,) = LENGTH.unpack(header)
        if len(streams) != STREAMS or size > MAX_REQUEST:
            raise ValueError("not a launcher's request")
        payload = bytearray()
        while len(payload) < size:
            chunk = connection.recv(size - len(payload))
            if not chunk:
                raise ValueError("cut short")
            payload += chunk
        request = json.loads(payload)
        if not isinstance(request.get("argv"), list) or not isinstance(request.get("env"), dict):
            raise ValueError("not a launcher's request")
    except (OSError, ValueError, struct.error):
        for stream in streams:
            os.close(stream)
        return None, []
    connection.settimeout(None)
    return request, streams


def _child(
    connection: socket.socket, request: dict, streams: list[int], run: Callable[[], None]
) -> NoReturn:
    """Run one request in this forked child, report its exit code, and end (never returns)."""
    code = 1
    try:
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
        connection.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        code = _exit_code(run)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            connection.sendall(json.dumps({"exit": code}).encode() + b"\n")
        except OSError:
            pass
        for output in (sys.stdout, sys.stderr):
            try:
                output.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


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
    global ones of Python, NumPy and PyTorch would otherwise be the zygote's, the same in
    every child.
    """
    random.seed(secrets.randbits(128))
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(secrets.randbits(32))
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(secrets.randbits(63))


def main(command: str, status_file: str, pinned: str, name: str, launcher: str) -> None:
    """Be the zygote of a pinned Flower command (started by runtime.zygote).

    Parameters
    ----------
    command : str
        flwr-clientapp or flwr-serverapp.
    status_file : str
        The hospital's status file ("" on the server), for pinning.run_pinned.
    pinned : str
        "1" to run only an app identical to this copy, "0" for any (--trust-server-app).
    name : str
        The socket's name.
    launcher : str
        The pid of the process that started the zygote.
    """

    def prepare() -> Callable[[], None]:
        from securehealth.deployment import pinning  # imports Flower: after the socket is up

        pinning.preload(command)
        pinning.forget_this_copy()
        return partial(pinning.run_pinned, command, status_file or None, pinned=pinned == "1")

    serve(name, int(launcher), prepare)
