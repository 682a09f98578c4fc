"""Deployment end to end: `python server.py` and three `python client.py` processes.

They run on loopback, with TLS, Flower's real SuperLink and SuperNodes, and real files.
"""

import json
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    Processes,
    assert_ran_to_the_end,
    demo_ledger,
    flower_processes,
    hospital_state,
    left_running,
    own_data_copy,
    run_script,
)

from securehealth.certificates import make_certificates, make_hospital_key
from securehealth.deployment import runtime
from securehealth.model import load_model
from securehealth.privacy.ledger import PrivacyLedger


def read_metrics(run_dir):
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def hand_out_csv_files(workdir):
    """The example CSV directory as it lies in a real deployment.

    The server holds the data dictionary and its own test set, each hospital its own
    table only.
    """
    example = own_data_copy(ROOT / "examples" / "csv", workdir / "own-data")
    (workdir / "server-data").mkdir()
    for name in ("schema.json", "test.csv"):
        shutil.copy(example / name, workdir / "server-data" / name)
    own = []
    for hospital in range(3):
        home = workdir / f"hospital-{hospital}-data"
        home.mkdir()
        shutil.copy(example / f"hospital_{hospital}.csv", home / "patients.csv")
        shutil.copy(example / "schema.json", home / "schema.json")
        own.append(["--data", str(home / "patients.csv"), "--schema", str(home / "schema.json")])
    return own


@pytest.mark.e2e
def test_server_and_three_hospitals_over_tls_with_their_own_csv_files(federation):
    processes, workdir, port = federation
    own = hand_out_csv_files(workdir)
    address = ["--server-address", f"127.0.0.1:{port}"]
    # A hospital may start before the server: it waits.
    first = processes.start("client.py", "--client-id", "0", *address, *own[0], name="c0")
    time.sleep(2)
    server = processes.server(
        port, 2, "run", "--dataset", "csv", "--data-dir", "server-data", name="server"
    )
    others = [
        processes.start("client.py", "--client-id", "1", *address, *own[1], name="c1"),
        # This hospital's own budget is smaller than what the server's config says.
        processes.start(
            "client.py", "--client-id", "2", "--epsilon", "0.5", *address, *own[2], name="c2"
        ),
    ]
    assert_ran_to_the_end(server.wait(timeout=300), workdir / "run", processes.output("server"))
    for client in (first, *others):
        assert client.wait(timeout=60) == 0, processes.output(client.name)

    assert "Waiting for server at" in processes.output("c0")
    for name in ("c0", "c1", "c2"):
        out = processes.output(name)
        assert "Round 2: trained" in out and "The server ended the run (finished" in out
        assert "Operating point's histograms released" in out  # once, after round 2
        assert "Final model on this hospital's" in out  # its own evaluation, kept there
    summary = processes.output("server")
    assert "Round   2/2" in summary and "Privacy spent per hospital" in summary
    outputs = [p.read_text() for p in workdir.glob("*.out")]
    outputs += [p.read_text() for p in workdir.glob("**/flower/*.log")]
    assert not any("DEPRECATED" in text or "Traceback" in text for text in outputs)
    # Each message's ClientApp, and the run's ServerApp, was forked from a zygote.
    for hospital in range(3):
        forks = (hospital_state(workdir, hospital) / "flower" / "zygote.log").read_text()
        assert forks.count("Forked") >= 5  # admission, 2 rounds, operating point, the end
    assert (workdir / "run" / "flower" / "zygote.log").read_text().count("Forked") == 1

    metrics = read_metrics(workdir / "run")
    assert metrics["data"]["test_set"] == str(workdir / "server-data" / "test.csv")
    released = metrics["operating_point"]["hospitals"]
    assert {h: r["status"] for h, r in released.items()} == dict.fromkeys("012", "released")
    _, saved = load_model(workdir / "run" / "model.pt")
    assert saved["decision_threshold"] == metrics["final"]["global"]["threshold"]
    assert [sorted(r["hospitals"]) for r in metrics["rounds"]] == [["0", "1", "2"]] * 2
    assert (workdir / "run" / "model.pt").exists() and (workdir / "run" / "report.md").exists()
    budgets = {h: p["epsilon_budget"] for h, p in metrics["privacy"]["hospitals"].items()}
    assert budgets == {"0": 1.0, "1": 1.0, "2": 0.5}  # each hospital's own
    assert metrics["privacy"]["adjacency"] == "replace-one"
    for hospital, p in metrics["privacy"]["hospitals"].items():
        assert 0.95 * p["epsilon_budget"] <= p["epsilon"] <= p["epsilon_budget"]
        ledger = json.loads((hospital_state(workdir, hospital) / "privacy-ledger.json").read_text())
        # At the hospital: two rounds, then the operating point's histograms.
        assert [r["mechanism"] for r in ledger["releases"]] == [
            "dp-sgd",
            "dp-sgd",
            "operating-point",
        ]
    assert not (workdir / "run" / "hospitals").exists()  # not at the server
    time.sleep(1)
    assert flower_processes(workdir) == []

    # The reset attack: the server changes what decided the first run's held-out rows
    # (seed, test_fraction). The hospitals' ledgers still hold one budget for their
    # patients, and it is spent: each hospital refuses at start, in one line, before
    # it reaches the server, saying what is left and what to do; nothing more is spent.
    server = processes.server(
        port,
        1,
        "run2",
        "--dataset",
        "csv",
        "--data-dir",
        "server-data",
        "--seed",
        "43",
        "--test-fraction",
        "0.3",
        "--join-timeout",
        "15",
        name="server2",
    )
    clients = [
        processes.start("client.py", "--client-id", "0", *address, *own[0], name="again0"),
        processes.start("client.py", "--client-id", "1", *address, *own[1], name="again1"),
        processes.start(
            "client.py", "--client-id", "2", "--epsilon", "0.5", *address, *own[2], name="again2"
        ),
    ]
    assert all(client.wait(timeout=60) == 2 for client in clients)
    for name in ("again0", "again1", "again2"):
        said = processes.output(name)
        assert "less than 1% left, so it cannot train in any run" in said, said
        assert "for a new cohort of patients, give it a new --state-dir" in said
        assert "Traceback" not in said and "joining the server" not in said
    assert server.wait(timeout=300) != 0  # nobody joined
    assert "were not admitted within 15 s" in processes.output("server2")
    for hospital in range(3):
        ledger = json.loads((hospital_state(workdir, hospital) / "privacy-ledger.json").read_text())
        assert len(ledger["releases"]) == 3  # the first run's, and nothing more
        budget = 0.5 if hospital == 2 else 1.0
        assert ledger["releases"][-1]["epsilon_after"] <= budget


@pytest.mark.e2e
def test_a_hospital_that_crashes_and_comes_back(federation):
    processes, workdir, port = federation
    # Also the plain-text mode, which both sides must ask for explicitly; without
    # SecAgg+ (four times faster here; tests/test_security.py covers it).
    plain = ["--insecure", "--secure-aggregation", "off"]
    address = ["--server-address", f"127.0.0.1:{port}", *plain]
    server = processes.server(port, 4, "run", *plain)
    sockets = Path(tempfile.gettempdir()).glob("securehealth-*/worker.sock")
    sockets_before = set(sockets)
    clients = [
        processes.start("client.py", "--client-id", str(h), *address, name=f"c{h}")
        for h in range(3)
    ]
    deadline = time.monotonic() + 180
    while not ((m := read_metrics(workdir / "run")) and m["rounds"]):
        assert time.monotonic() < deadline and server.poll() is None
        time.sleep(0.5)
    clients[2].kill()  # kill -9 of client.py alone: hospital 2 crashes after round 1
    clients[2].wait()
    assert left_running(hospital_state(workdir, 2)) == []  # its SuperNode went with it
    # Its worker's socket has no file, so a crash leaves no socket folder in /tmp.
    assert set(Path(tempfile.gettempdir()).glob("securehealth-*/worker.sock")) <= sockets_before
    ledger_path = demo_ledger(hospital_state(workdir, 2))  # generated patients
    spent_before = json.loads(ledger_path.read_text())["releases"]
    processes.start("client.py", "--client-id", "2", *address, name="c2-again")

    assert_ran_to_the_end(server.wait(timeout=400), workdir / "run", processes.output("server"))
    metrics = read_metrics(workdir / "run")
    assert len(metrics["rounds"]) == 4
    trained = [r["hospitals_trained"] for r in metrics["rounds"]]
    assert trained[0] == 3 and min(trained) >= 2  # the others carried on
    assert "2" in metrics["rounds"][-1]["hospitals"]  # it rejoined the live run
    ledger = json.loads(ledger_path.read_text())
    releases = ledger["releases"]
    assert releases[: len(spent_before)] == spent_before  # never from zero
    assert demo_ledger(hospital_state(workdir, 2)) == ledger_path  # the run's own
    assert len(releases) > len(spent_before) and len(ledger["plans"]) == 1
    assert metrics["privacy"]["hospitals"]["2"]["epsilon"] <= 1.0
    assert "WARNING: --insecure" in processes.output("server") + processes.output("c0")
    # Private to this user: the hospital's state and logs, the server's run folder.
    for folder in (hospital_state(workdir, 0), workdir / "run", workdir / "run" / "flower"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    log = hospital_state(workdir, 0) / "flower" / "supernode.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


@pytest.mark.e2e
def test_kill_9_of_server_py_leaves_nothing_running(federation):
    processes, workdir, port = federation
    server = processes.server(port, 3, "run", "--insecure")
    run_dir = workdir / "run"
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.json").exists():  # the ServerApp waits for hospitals
        assert time.monotonic() < deadline and server.poll() is None, processes.output("server")
        time.sleep(0.2)
    assert len(flower_processes(run_dir)) >= 4  # SuperLink, SuperExec, flwr run, ServerApp
    server.kill()
    server.wait()
    assert left_running(run_dir) == []
    assert not runtime.server_reachable(f"127.0.0.1:{port}")  # the port is free again
    # The killed run's metrics.json says "running"; the next reader marks it interrupted.
    predicted = run_script("predict.py", "--run-dir", run_dir, "--data", "x.csv", cwd=workdir)
    assert predicted.returncode == 2 and "(its run is interrupted)" in predicted.stderr
    assert read_metrics(run_dir)["status"] == "interrupted"


def test_one_client_py_per_hospital_state_directory(tmp_path):
    state_dir = tmp_path / "hospital-0"
    nobody = ["--server-address", f"127.0.0.1:{runtime.free_port()}", "--insecure"]
    join = [sys.executable, str(ROOT / "client.py"), "--client-id", "0", *nobody]
    first = subprocess.Popen(
        [*join, "--state-dir", str(state_dir), "--connect-timeout", "60"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = state_dir / "client.lock"
        deadline = time.monotonic() + 30
        while not (lock.exists() and lock.read_text().strip()):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = run_script(*join[1:], "--state-dir", str(state_dir), cwd=tmp_path)
        assert_one_line_error(second, 2, "in use by another client.py", f"pid {first.pid}")
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700  # the hospital's alone
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    finally:
        first.kill()  # kill -9: the kernel releases its lock
        first.wait()
    again = run_script(
        *join[1:], "--state-dir", str(state_dir), "--connect-timeout", "1", cwd=tmp_path
    )
    assert_one_line_error(again, 1, "no server at")  # past the lock, to the server

    (tmp_path / "precious").write_text("kept")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "client.lock").symlink_to(tmp_path / "precious")  # planted in its place
    refused = run_script(*join[1:], "--state-dir", str(linked), cwd=tmp_path)
    assert_one_line_error(refused, 2, "client.lock", "remove it if it is a link")
    assert (tmp_path / "precious").read_text() == "kept"


def test_a_hospital_whose_budget_is_spent_refuses_before_it_reaches_the_server(tmp_path):
    state_dir = tmp_path / "hospital-0"
    ledger = PrivacyLedger(state_dir, 1.0, 1e-5, "replace-one")
    with ledger.transaction():
        ledger.record("an earlier run", 1, 1.0, 1.0, 10)
    # A port that nobody listens on: the refusal must come before any attempt to join.
    own = own_data_copy(ROOT / "examples" / "csv", tmp_path / "own")  # a lasting ledger
    join = ["--client-id", "0", "--server-address", f"127.0.0.1:{runtime.free_port()}"]
    join += ["--data", str(own / "hospital_0.csv"), "--schema", str(own / "schema.json")]
    refused = run_script(
        "client.py", *join, "--insecure", "--state-dir", str(state_dir), cwd=tmp_path
    )
    # Its earlier run spent far past the budget of 1 (a record made for the test).
    assert_one_line_error(
        refused, 2, "past its budget of 1, so it cannot train in any run", "a new --state-dir"
    )
    assert "Waiting for server" not in refused.stdout
    assert not (state_dir / "flower").exists()  # no SuperNode was started

    fresh = PrivacyLedger(tmp_path / "hospital-1", 1.0, 1e-5, "replace-one")
    with fresh.transaction():
        fresh.record("an earlier run", 1, 20.0, 0.5, 1)  # a little spent
        spent = fresh.epsilon()
    join = ["--client-id", "1", "--server-address", f"127.0.0.1:{runtime.free_port()}"]
    join += ["--data", str(own / "hospital_1.csv"), "--schema", str(own / "schema.json")]
    told = run_script(
        "client.py",
        *join,
        "--insecure",
        "--state-dir",
        str(tmp_path / "hospital-1"),
        "--connect-timeout",
        "1",
        cwd=tmp_path,
    )
    assert_one_line_error(told, 1, "no server at")  # past the ledger, to the server
    assert (
        f"Hospital 1's privacy budget: epsilon 1 over all runs on its patients, {spent:.3f} "
        f"spent before, {1 - spent:.3f} left; a run spends up to all that is left"
    ) in told.stdout


def assert_one_line_error(result, code, *words):
    assert result.returncode == code, result.stdout + result.stderr
    text = (result.stderr or result.stdout).strip()
    assert "Traceback" not in result.stderr + result.stdout
    assert all(word in text for word in words), text


def test_bad_input_is_reported_in_one_line(tmp_path):
    # The run's settings are the server's: a hospital cannot silently "set" them.
    assert_one_line_error(
        run_script("client.py", "--client-id", "0", "--rounds", "5", cwd=tmp_path),
        2,
        "rounds is not this script's to set",
    )
    assert_one_line_error(run_script("client.py", "--client-id", "3", cwd=tmp_path), 2, "0..2")
    assert_one_line_error(
        run_script("client.py", "--client-id", "0", cwd=tmp_path),
        2,
        "no CA certificate",
        "--make-certs",
    )
    assert_one_line_error(
        run_script("client.py", "--client-id", "0", "--server-address", "nowhere", cwd=tmp_path),
        2,
        "host:port",
    )
    assert_one_line_error(run_script("server.py", cwd=tmp_path), 2, "--make-certs")

    make_certificates(tmp_path / "certs", ["localhost", "127.0.0.1"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert_one_line_error(
            run_script("server.py", "--port", port, cwd=tmp_path), 2, f"port {port}"
        )

    nobody = str(runtime.free_port())
    result = run_script(
        "client.py",
        "--client-id",
        "0",
        "--server-address",
        f"127.0.0.1:{nobody}",
        "--connect-timeout",
        "2",
        cwd=tmp_path,
    )
    assert_one_line_error(result, 1, "no server at", nobody)


def test_the_operator_key_is_required_added_and_hospital_keys_named(tmp_path):
    certs = make_certificates(tmp_path / "certs", ["localhost", "127.0.0.1"])
    ca = (certs / "ca.crt").read_bytes()
    for name in ("operator.key", "operator.pub"):  # certificates from before signed runs
        (certs / name).unlink()
    assert_one_line_error(run_script("server.py", cwd=tmp_path), 2, "operator.key", "--make-certs")
    assert_one_line_error(
        run_script("client.py", "--client-id", "0", cwd=tmp_path),
        2,
        "no operator key",
        "operator.pub",
    )
    made = run_script("server.py", "--make-certs", cwd=tmp_path)
    assert made.returncode == 0 and "operator's run-signing key" in made.stdout, made.stdout
    assert stat.S_IMODE((certs / "operator.key").stat().st_mode) == 0o600
    assert (certs / "ca.crt").read_bytes() == ca  # the hospitals' trust is kept
    assert_one_line_error(
        run_script("server.py", "--make-certs", cwd=tmp_path), 2, "already exists"
    )
    enrolled = tmp_path / "enrolled"
    enrolled.mkdir()
    key = make_hospital_key(tmp_path / "hospital" / "hospital.key")
    shutil.copy(key, enrolled / "st-marys.pub")  # not bound to a hospital number
    assert_one_line_error(
        run_script("server.py", "--hospital-keys", str(enrolled), cwd=tmp_path),
        2,
        "st-marys.pub",
        "hospital-N.pub",
    )
    (enrolled / "st-marys.pub").rename(enrolled / "hospital-0.pub")
    shutil.copy(key, enrolled / "hospital-1.pub")  # one key for two hospitals
    assert_one_line_error(
        run_script("server.py", "--hospital-keys", str(enrolled), cwd=tmp_path),
        2,
        "holds the same key as another hospital's file",
    )


def test_a_server_the_hospital_cannot_trust_is_refused(tmp_path):
    make_certificates(tmp_path / "ours", ["localhost", "127.0.0.1"])
    make_certificates(tmp_path / "theirs", ["localhost", "127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "theirs" / "server.crt", tmp_path / "theirs" / "server.key")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer():  # a TLS server that presents the other CA's certificate
            while True:
                connection, _ = listener.accept()
                try:
                    context.wrap_socket(connection, server_side=True).close()
                except (ssl.SSLError, OSError):
                    connection.close()

        threading.Thread(target=answer, daemon=True).start()
        port = listener.getsockname()[1]
        result = run_script(
            "client.py",
            "--client-id",
            "0",
            "--server-address",
            f"127.0.0.1:{port}",
            "--root-certificates",
            str(tmp_path / "ours" / "ca.crt"),
            cwd=tmp_path,
        )
        assert_one_line_error(result, 1, "copy the server's certs/ca.crt")
        plain = run_script(
            "client.py",
            "--client-id",
            "0",
            "--server-address",
            f"127.0.0.1:{port}",
            "--insecure",
            cwd=tmp_path,
        )
        assert_one_line_error(plain, 1, "probably uses TLS")


@pytest.mark.e2e
def test_four_real_hospitals_each_with_its_own_sites_file(federation):
    processes, workdir, port = federation
    address = ["--server-address", f"127.0.0.1:{port}"]
    server = processes.server(port, 1, "run", "--dataset", "heart-disease", name="server")
    hospitals = [
        processes.start(
            "client.py", "--client-id", str(h), "--dataset", "heart-disease", *address, name=f"c{h}"
        )
        for h in range(4)
    ]
    assert_ran_to_the_end(server.wait(timeout=300), workdir / "run", processes.output("server"))
    for hospital in hospitals:
        assert hospital.wait(timeout=60) == 0, processes.output(hospital.name)
        assert "Round 1: trained" in processes.output(hospital.name)
    metrics = read_metrics(workdir / "run")
    assert sorted(metrics["rounds"][0]["hospitals"]) == [
        "0",
        "1",
        "2",
        "3",
    ]
    patients = {h: p["patients"] for h, p in metrics["privacy"]["hospitals"].items()}
    assert patients == {"0": 242, "1": 235, "2": 98, "3": 160}  # each site's own file
    for hospital in range(4):  # the shipped sites' files: a demonstration
        ledger = json.loads(demo_ledger(hospital_state(workdir, hospital)).read_text())
        # One round, then the operating point's histograms.
        assert [r["mechanism"] for r in ledger["releases"]] == ["dp-sgd", "operating-point"]


# A command's own small file system (tmpfs, in a mount namespace of its own, so no
# privilege is needed): $1 is its size, $2 what to fill at once; FILL_WHEN a file
# whose appearance fills the rest, KEEP where its contents go when the command ends.
SMALL_DISK = """
disk=$(mktemp -d) && mount -t tmpfs -o size=$1 tmpfs "$disk" || exit 97
head -c $2 /dev/zero > "$disk/filler"
shift 2
cd "$disk" && "$@" &
command=$!
while [ ! -e "$FILL_WHEN" ] && kill -0 $command 2>/dev/null; do sleep 0.2; done
[ -e "$FILL_WHEN" ] && cat /dev/zero >> "$disk/filler" 2>/dev/null
wait $command
code=$?
cp -a "$disk/." "$KEEP/"
exit $code
"""


def on_a_small_disk(workdir, size, filled, fill_when=None):
    """The prefix that runs a command in its own tmpfs of `size` bytes.

    The tmpfs is the command's working directory: `filled` of its bytes are taken at
    once and all the rest once `fill_when` exists; what it holds is then copied to
    workdir/small-disk. Skips where this machine cannot make one (no user namespaces).
    """
    if subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine cannot mount a small file system without privileges")
    (workdir / "small-disk").mkdir()
    fill = fill_when or workdir / "never"
    keep = workdir / "small-disk"
    script = f"FILL_WHEN={shlex.quote(str(fill))}; KEEP={shlex.quote(str(keep))}" + SMALL_DISK
    return ["unshare", "-Urm", "sh", "-c", script, "sh", str(size), str(filled)]


def test_a_hospital_on_a_full_disk_says_so_in_one_line_before_joining(tmp_path):
    # client.py refuses before it joins, in one line, rather than leaving a traceback
    # in supernode.log only, the console silent and the server waiting.
    processes = Processes(tmp_path)
    try:
        full = on_a_small_disk(tmp_path, 30_000_000, 29_500_000)
        client = processes.start(
            "client.py", "--client-id", "0", "--insecure", "--state-dir", "state",
            "--server-address", "127.0.0.1:9", name="full", prefix=full,
        )  # fmt: skip
        assert client.wait(timeout=120) == 2
    finally:
        processes.stop_all()
    said = processes.output("full").strip().splitlines()
    assert len(said) == 1 and "Traceback" not in said[0], said
    assert "the disk of this hospital's state directory" in said[0] and "is full" in said[0]
    assert "MB free; it needs 20 MB" in said[0]


@pytest.mark.e2e
def test_a_hospital_whose_disk_fills_mid_run_leaves_in_one_line_and_the_run_goes_on(
    federation,
):
    # The disk fills up during the run: the hospital says why and leaves, the server
    # is told and carries on with the others, and the ledger is whole.
    processes, workdir, port = federation
    plain = ["--insecure", "--secure-aggregation", "off"]
    address = ["--server-address", f"127.0.0.1:{port}", *plain]
    server = processes.server(port, 4, "run", *plain)
    for number in (0, 1):
        processes.start("client.py", "--client-id", str(number), *address, name=f"c{number}")
    fill_now = workdir / "fill-now"
    small = on_a_small_disk(workdir, 40_000_000, 0, fill_when=fill_now)
    state = ["--state-dir", "state"]  # on the small disk
    filling = processes.start(
        "client.py", "--client-id", "2", *address, *state, name="c2", prefix=small
    )
    deadline = time.monotonic() + 180
    while not ((m := read_metrics(workdir / "run")) and m["rounds"]):
        assert time.monotonic() < deadline and server.poll() is None
        time.sleep(0.5)
    fill_now.touch()
    assert filling.wait(timeout=120) == 1
    left = processes.output("c2")
    assert "Leaving the run: the disk of this hospital's state directory" in " ".join(left.split())
    assert "Traceback" not in left
    assert_ran_to_the_end(server.wait(timeout=400), workdir / "run", processes.output("server"))
    metrics = read_metrics(workdir / "run")
    assert metrics["rounds"][0]["hospitals_trained"] == 3
    assert metrics["rounds"][-1]["hospitals_trained"] == 2
    # Its ledger is whole: every round it trained in, nothing half-written beside it.
    ledger = demo_ledger(workdir / "small-disk" / "state")
    releases = json.loads(ledger.read_text())["releases"]
    trained = [r for r in metrics["rounds"] if "2" in r["hospitals"]]
    assert 1 <= len(releases) and len(releases) >= len(trained) - 1
    assert not [p.name for p in ledger.parent.iterdir() if p.name.startswith(".")]
