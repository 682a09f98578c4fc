"""The processes of a run: the tree a launcher started, and its end.

Flower's SuperExec and Ray's processes run in sessions of their own, so the tree is read
from `ps` (`process_tree`), not a process group. A launcher stops it after Ctrl-C or an
error (runtime.stop); after kill -9, each process it started ends itself
(`follow_launcher`), so that no SuperNode trains on headless.
"""

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

WATCH_S = 0.2  # how often a started process checks that its launcher is alive
PR_SET_CHILD_SUBREAPER = 36  # prctl(2): orphans below this process become its children
_adopting = False  # whether this process is a subreaper (adopt_orphans)


def _children() -> dict[int, list[int]]:
    """{pid: its child pids} of every process, from `ps` (leaving out that `ps`)."""
    try:
        ps = subprocess.Popen(["ps", "-A", "-o", "pid=,ppid="], stdout=subprocess.PIPE, text=True)
        listing, _ = ps.communicate()
    except OSError:
        return {}
    children = {}
    for line in listing.splitlines():
        child, parent = map(int, line.split())
        if child != ps.pid:
            children.setdefault(parent, []).append(child)
    return children


def process_tree(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """pid and all its descendants, pid first."""
    children = _children() if children is None else children
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def adopt_orphans() -> None:
    """Make this launcher the parent of any process whose own parent dies below it.

    Linux only (elsewhere nothing): if Flower's SuperLink or SuperNode process dies, what
    it started is then still found (adopted) and stopped, not left training.
    """
    global _adopting
    if sys.platform == "linux":
        _adopting = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) == 0


def adopted(started: set[int]) -> list[int]:
    """List the processes this launcher adopted, with all below them.

    Its children that are not in `started` (none unless it adopts orphans).
    """
    if not _adopting:
        return []
    children = _children()
    orphans = [c for c in children.get(os.getpid(), []) if c not in started]
    return [pid for orphan in orphans for pid in process_tree(orphan, children)]


def alive(pid: int) -> bool:
    """Whether pid still runs (a zombie, dead but not yet reaped by its parent, does not)."""
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


def send(pid: int, signal_number: int) -> None:
    """Signal pid, if it still exists."""
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        pass


def follow_launcher(launcher: int) -> None:
    """End this process and all it started once its launcher (pid `launcher`) is gone.

    Called in a process that `launcher` started; its parent is another process once the
    launcher is gone. The tree is whole at that moment, so nothing of the run is left over.
    """

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(WATCH_S)
        for pid in reversed(process_tree(os.getpid())):  # this process last
            send(pid, signal.SIGKILL)

    threading.Thread(target=watch, name="follow-launcher", daemon=True).start()
