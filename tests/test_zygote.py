"""The zygote of a Flower command (deployment/zygote.py): a child per message, nothing shared.

Real zygote processes, real launchers (pinning.install_launcher), real forks; the probe's
messages report what they find (tests/zygote_probe.py).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from securehealth.deployment import pinning, runtime, zygote
from securehealth.local_socket import random_name, socket_address

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def probe(tmp_path):
    """A probe zygote (tests/zygote_probe.py) and the real launcher that hands it messages."""
    name = random_name("zygote")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.zygote_probe", name, str(os.getpid())],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    bin_dir = pinning.install_launcher(tmp_path / "bin", command="flwr-serverapp", zygote=name)
    deadline = time.monotonic() + 60
    while not listening(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield bin_dir / "flwr-serverapp", process, name
    process.kill()
    process.wait()


def listening(name):
    """Whether a socket of this name (abstract) is bound on this machine (Linux)."""
    return f"@{socket_address(name)[1:]}" in Path("/proc/net/unix").read_text()


def message(launcher, *argv, env=None):
    """Hand one message to the zygote through the launcher; what its child printed."""
    done = subprocess.run(
        [str(launcher), *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


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
    found = subprocess.run(
        [str(launcher)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert found.returncode == 0, found.stderr[-2000:]
    child = json.loads(found.stdout)  # what it printed came out of the launcher's stdout
    assert child["setting"] == "the launcher's" and child["folder"] == str(tmp_path)


def test_the_zygote_answers_only_its_own_user(probe):
    """Another user's process connecting to the zygote gets no child; its own launcher does."""
    if os.getuid() != 0:
        pytest.skip("playing another user takes root")
    launcher, process, name = probe
    code = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from securehealth.deployment import zygote
os.setgid(65534); os.setuid(65534)  # nobody
print(zygote.hand_over({name!r}, ["x"]))
"""
    stranger = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert stranger.stdout.strip() == "None", stranger.stderr  # no child was forked for it
    assert process.poll() is None  # and the zygote still serves its own
    assert message(launcher)["pid"]


def test_without_a_zygote_the_launcher_runs_the_command_itself(tmp_path):
    bin_dir = pinning.install_launcher(tmp_path / "bin", zygote=random_name("zygote"))
    done = subprocess.run([str(bin_dir / "flwr-clientapp"), "--help"], capture_output=True)
    assert done.returncode == 0 and b"usage: flwr-clientapp" in done.stdout


def test_a_hospitals_zygote_preloads_flower_and_forks_its_clientapps(tmp_path):
    """The real zygote of flwr-clientapp: a message's child runs Flower's own command."""
    with runtime.zygote(tmp_path, "flwr-clientapp", tmp_path / "status.json") as name:
        bin_dir = pinning.install_launcher(tmp_path / "bin", tmp_path / "status.json", zygote=name)
        for _ in range(2):
            done = subprocess.run(
                [str(bin_dir / "flwr-clientapp"), "--no-such-flag"], capture_output=True
            )
            assert done.returncode == 2 and b"flwr-clientapp: error" in done.stderr
    forks = (tmp_path / "zygote.log").read_text().count("Forked")
    assert forks == 2  # both through the zygote, none in a launcher of its own


def test_a_zygote_ends_with_the_process_that_started_it(tmp_path):
    name = random_name("zygote")
    code = (
        "import subprocess, sys; "
        f"print(subprocess.Popen([sys.executable, '-m', 'tests.zygote_probe', {name!r}, "
        "str(__import__('os').getpid())]).pid)"
    )
    parent = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    orphan = int(parent.stdout)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{orphan}").exists():
        time.sleep(0.1)
    state = Path(f"/proc/{orphan}/stat")
    assert not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert not listening(name)
    assert zygote.hand_over(name, ["x"]) is None
