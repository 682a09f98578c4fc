"""The zygote of a Flower command (deployment/zygote.py): a child per message, nothing shared.

Real zygote processes, real launchers (pinning.install_launcher), real forks; the probe's
messages report what they find (tests/zygote_probe.py). The attacks of the review of issue
30 are played: another user's calls, a name taken by another user, a garbled request, a
killed launcher, zygote or client.py.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from securehealth.deployment import pinning, runtime, zygote
from securehealth.local_socket import random_name, socket_address

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534


@pytest.fixture
def probe(tmp_path):
    """A probe zygote (tests/zygote_probe.py), started as runtime.zygote starts the real one.

    Yields the real launcher that hands it messages, the zygote's process and its name.
    """
    started = []

    @contextmanager
    def start(listener):
        command = [sys.executable, "-m", "tests.zygote_probe", str(listener), str(os.getpid())]
        log = open(tmp_path / "zygote.log", "w")
        started.append(subprocess.Popen(command, cwd=ROOT, pass_fds=[listener], stderr=log))
        yield started[0]
        started[0].kill()
        started[0].wait()
        log.close()

    with zygote.preloaded(start) as name:
        bin_dir = pinning.install_launcher(tmp_path / "bin", command="flwr-serverapp", zygote=name)
        wait_until_ready(tmp_path / "zygote.log")
        yield bin_dir / "flwr-serverapp", started[0], name


def listening(name):
    """Whether a socket listens on `name` (Linux /proc/net/unix)."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Flags 00010000: a listening socket; its path, "@" for the abstract namespace.
        if fields[-1] == f"@{socket_address(name)[1:]}" and fields[3] == "00010000":
            return True
    return False


def wait_until_ready(log, within=120.0):
    """Wait until the zygote's log says it has imported and serves.

    A call that came sooner would wait for its imports, and run alone after
    HANDOVER_TIMEOUT on a machine loaded enough.
    """
    deadline = time.monotonic() + within
    while not (log.exists() and zygote.READY in log.read_text()):
        assert time.monotonic() < deadline, f"the zygote never said it was ready in {log}"
        time.sleep(0.05)


def message(launcher, *argv, env=None, cwd=None):
    """Hand one message to the zygote through the launcher; what its child printed."""
    done = subprocess.run(
        [str(launcher), *argv], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def as_nobody(imports, code):
    """Run Python `code` as the user nobody, after `imports` as root (the tests' user); its stdout.

    The imports come first: this machine's Python may lie where nobody cannot read.
    """
    setuid = f"\nimport os; os.setgid({NOBODY}); os.setuid({NOBODY})\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ran = subprocess.run(
        [sys.executable, "-c", imports + setuid + code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return ran.stdout.strip() or ran.stderr


def gone(pid, within=10.0):
    """Whether process `pid` has ended (or is a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_each_message_starts_from_the_zygote_never_from_the_message_before(probe):
    launcher, process, _ = probe
    first, second = message(launcher, "first"), message(launcher, "second")
    assert first["argv"] == ["first"] and second["argv"] == ["second"]
    assert len({first["pid"], second["pid"], process.pid}) == 3  # a child each
    # The first left a global in a preloaded library, a variable in its environment and
    # the training stack loaded: the second finds none of it.
    assert second["marks"] == first["marks"] == [False, False, False]
    # And neither found the app's own modules loaded: each loads the app Flower installed
    # from what was shipped, after pinning.py checked it, as a fresh process does.
    assert first["app_modules_at_start"] == second["app_modules_at_start"] == []


def test_two_messages_never_draw_the_same_noise(probe):
    launcher, _, _ = probe
    first, second = message(launcher), message(launcher)
    # The zygote loaded Python's, NumPy's and PyTorch's generators before forking; each
    # child seeds them afresh from `secrets`, so that no two messages repeat a draw.
    for generator in ("python", "numpy", "torch"):
        assert first[generator] != second[generator], generator
    # DP-SGD from the same start on the same rows: different batches and noise.
    assert first["dp_sgd"] != second["dp_sgd"]


def test_a_message_gets_the_launchers_environment_folder_and_streams(probe, tmp_path):
    launcher, _, _ = probe
    env = {**os.environ, "PROBE_SETTING": "the launcher's"}
    child = message(launcher, env=env, cwd=tmp_path)  # printed to the launcher's stdout
    assert child["setting"] == "the launcher's" and child["folder"] == str(tmp_path)


def test_the_zygote_forks_nothing_for_another_user(probe):
    if os.getuid() != 0:
        pytest.skip("playing another user takes root")
    launcher, process, name = probe
    said = as_nobody(
        "from securehealth.deployment import zygote", f"print(zygote.hand_over({name!r}, ['x']))"
    )
    assert said == "None"  # no child, no answer: it would run alone
    assert process.poll() is None and message(launcher)["pid"]  # the zygote serves its own


def test_a_name_taken_by_another_user_costs_a_launcher_seconds_not_its_message(tmp_path):
    """Once a zygote is gone, another user may bind its name and never take a call.

    The launcher then runs the message alone, after CONNECT_TIMEOUT.
    """
    if os.getuid() != 0:
        pytest.skip("playing another user takes root")
    name = random_name("zygote")
    squatter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, socket, time; os.setgid({NOBODY}); os.setuid({NOBODY})\n"
            "s = socket.socket(socket.AF_UNIX); "
            f"s.bind({socket_address(name)!r}); s.listen(0)\n"
            "calls = [socket.socket(socket.AF_UNIX) for _ in range(3)]\n"
            "for call in calls:\n"
            "    call.setblocking(False)\n"
            "    try: call.connect(" + repr(socket_address(name)) + ")\n"
            "    except OSError: pass\n"
            "print('ready', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert squatter.stdout.readline().strip() == "ready"  # its backlog is full
        bin_dir = pinning.install_launcher(tmp_path / "bin", zygote=name)
        start = time.monotonic()
        done = subprocess.run(
            [bin_dir / "flwr-clientapp", "--help"], capture_output=True, timeout=120
        )
        assert done.returncode == 0 and b"usage: flwr-clientapp" in done.stdout
        assert time.monotonic() - start < zygote.CONNECT_TIMEOUT + 30
    finally:
        squatter.kill()
        squatter.wait()


def test_no_one_can_take_a_zygotes_name_before_it_serves(tmp_path):
    """The name is bound before the zygote starts, so before anyone can read it anywhere."""
    with runtime.zygote(tmp_path, "flwr-clientapp") as name:
        listed = Path("/proc/net/unix").read_text()
        assert f"@{socket_address(name)[1:]}" in listed
        with socket.socket(socket.AF_UNIX) as thief:
            with pytest.raises(OSError):  # EADDRINUSE
                thief.bind(socket_address(name))


def test_a_garbled_call_costs_its_own_child_and_not_the_zygote(probe):
    launcher, process, name = probe
    with socket.socket(socket.AF_UNIX) as garbled:
        garbled.connect(socket_address(name))
        garbled.sendall(b"\0\0\0\2[]")  # a list, not a request
    with socket.socket(socket.AF_UNIX) as silent:  # calls, and never says anything
        silent.connect(socket_address(name))
        start = time.monotonic()
        assert message(launcher)["pid"]  # served meanwhile: each call is read in its child
        assert time.monotonic() - start < zygote.REQUEST_TIMEOUT  # not after the silent one
    assert process.poll() is None


def test_a_message_ends_with_its_launcher_and_with_its_zygote(probe):
    launcher, process, _ = probe
    for kill_the_zygote in (False, True):
        waiting = subprocess.Popen([str(launcher), "wait"], stdout=subprocess.PIPE, text=True)
        child = json.loads(waiting.stdout.readline())["pid"]
        os.kill(process.pid if kill_the_zygote else waiting.pid, signal.SIGKILL)
        assert gone(child), "the message's child trains on"
        waiting.kill()
        waiting.wait()


def test_a_stopped_zygote_costs_a_launcher_seconds_and_the_message_runs_once(probe, tmp_path):
    """A zygote that takes no call (stopped, stuck): the launcher runs the message itself.

    The child the zygote forks once it resumes finds its launcher gone and never runs it.
    """
    launcher, process, _ = probe
    os.kill(process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        alone = subprocess.run(
            [str(launcher), "mark"], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        waited = time.monotonic() - start
    finally:
        os.kill(process.pid, signal.SIGCONT)
    assert alone.returncode == 2 and "usage: flwr-serverapp" in alone.stderr  # Flower's own
    assert zygote.HANDOVER_TIMEOUT <= waited < zygote.HANDOVER_TIMEOUT + 30
    assert message(launcher)["pid"]  # served again, and the stale call ran nothing
    assert not (tmp_path / "marked").exists()


def test_without_a_zygote_the_launcher_runs_the_command_itself(tmp_path):
    bin_dir = pinning.install_launcher(tmp_path / "bin", zygote=random_name("zygote"))
    done = subprocess.run([str(bin_dir / "flwr-clientapp"), "--help"], capture_output=True)
    assert done.returncode == 0 and b"usage: flwr-clientapp" in done.stdout


def test_a_hospitals_zygote_preloads_flower_and_forks_its_clientapps(tmp_path):
    """The real zygote of flwr-clientapp: a message's child runs Flower's own command."""
    with runtime.zygote(tmp_path, "flwr-clientapp", tmp_path / "status.json") as name:
        bin_dir = pinning.install_launcher(tmp_path / "bin", tmp_path / "status.json", zygote=name)
        wait_until_ready(tmp_path / "zygote.log")
        for _ in range(2):
            done = subprocess.run(
                [str(bin_dir / "flwr-clientapp"), "--no-such-flag"], capture_output=True
            )
            assert done.returncode == 2 and b"flwr-clientapp: error" in done.stderr
    forks = (tmp_path / "zygote.log").read_text().count("Forked")
    assert forks == 2  # both through the zygote, none in a launcher of its own


def test_a_zygote_and_its_message_end_with_the_process_that_started_it(tmp_path):
    """kill -9 of client.py: its zygote ends, and the message it was running with it."""
    code = (
        "import os, socket, subprocess, sys\n"
        "from securehealth.deployment import zygote\n"
        "from securehealth.local_socket import socket_address\n"
        "listener = socket.socket(socket.AF_UNIX)\n"
        "listener.bind(socket_address(sys.argv[1])); listener.listen(8)\n"
        "command = [sys.executable, '-m', 'tests.zygote_probe', str(listener.fileno())]\n"
        "zygote_process = subprocess.Popen(\n"
        "    [*command, str(os.getpid())], pass_fds=[listener.fileno()], stderr=sys.stdout)\n"
        "print(zygote_process.pid, flush=True); sys.stdin.read()"
    )
    name = random_name("zygote")
    starter = subprocess.Popen(
        [sys.executable, "-c", code, name],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    zygote_pid = int(starter.stdout.readline())
    assert starter.stdout.readline().strip() == zygote.READY  # the zygote's log
    launcher = pinning.install_launcher(tmp_path / "bin", command="flwr-serverapp", zygote=name)
    waiting = subprocess.Popen(
        [str(launcher / "flwr-serverapp"), "wait"], stdout=subprocess.PIPE, text=True
    )
    child = json.loads(waiting.stdout.readline())["pid"]
    starter.kill()  # kill -9 of client.py
    try:
        assert gone(zygote_pid) and gone(child)
        assert not listening(name)  # nobody serves the name any more
    finally:
        waiting.kill()
        waiting.wait()
        starter.wait()
