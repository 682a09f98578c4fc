"""One hospital: trains the shared model on its own patients with DP-SGD (Opacus)
and sends back only the new weights and a privacy report (scalars). `app` is the
Flower ClientApp, run in simulation (simulation.py) and deployment alike.

Run as a script, it is a hospital in a deployment: a SuperNode that connects to the
server (`python server.py`), trains when asked, and exits when the run ends:

    python client.py --client-id N [--server-address host:port] [--name value ...]

The hospital owns its privacy budget: epsilon, delta and accountant come from this
hospital's own settings, whatever the server asks for, and its privacy ledger lives
in its own state directory, so that every run on the same patients spends from the
same budget.
"""

import json
import secrets
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from opacus import PrivacyEngine
from rich.markup import escape
from torch.utils.data import DataLoader, TensorDataset

import data_utils
import reporting
import runtime
import settings
from model import build_model, get_weights, set_weights
from privacy import BudgetExhausted, PrivacyLedger
from results import run_directory, write_json

STATUS_FILE = "status.json"  # in a hospital's state directory: what it did last
END_GRACE = 3  # seconds between the server's end-of-run notice and leaving
# Settings that belong to the hospital, not the server (see the module docstring);
# the others are the server's to decide for the run.
HOSPITAL_SETTINGS = ("epsilon", "delta", "accountant")

# Opacus repeats this on every PrivacyEngine; metrics.json records secure_rng=false
# and the README explains what it means, once.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
# Harmless for Opacus' per-sample gradient hooks, which need no input gradients.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


class HospitalClient(NumPyClient):
    """A hospital's training for one round, accounted in its privacy ledger."""

    def __init__(self, hospital, cfg, run_id, ledger_dir, status_path=None):
        self.hospital, self.cfg, self.run_id = hospital, cfg, run_id
        self.status_path = status_path
        (self.x, self.y), _ = data_utils.load_hospital(cfg, hospital)
        self.ledger = PrivacyLedger(
            ledger_dir,
            data_utils.fingerprint(self.x, self.y),
            cfg.epsilon,
            cfg.delta,
            cfg.accountant,
        )

    def fit(self, parameters, config):
        cfg = self.cfg
        # Secret randomness for batch sampling and noise: with a seed known to
        # others they could replay the noise and subtract it.
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        dataset = TensorDataset(torch.from_numpy(self.x), torch.from_numpy(self.y))
        loader = DataLoader(dataset, batch_size=cfg.batch_size, generator=generator)
        sample_rate = 1 / len(loader)  # the Poisson rate Opacus really uses
        steps = cfg.local_epochs * len(loader)
        try:
            sigma = self.ledger.noise_for_round(
                self.run_id, sample_rate, steps, planned_steps=cfg.rounds * steps
            )
        except BudgetExhausted as refusal:
            return parameters, 0, self._report("refused", config, str(refusal))

        model = build_model(self.x.shape[1], cfg.hidden_layers)
        set_weights(model, parameters)
        engine = PrivacyEngine(accountant=cfg.accountant)
        engine.accountant.history = self.ledger.history  # resume, never reset
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
        dp_model, optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=True,
            noise_generator=generator,
        )
        if dp_loader.sample_rate != sample_rate:
            raise RuntimeError("Opacus sampled at another rate than was calibrated")

        loss_fn = torch.nn.BCEWithLogitsLoss()
        dp_model.train()
        for _ in range(cfg.local_epochs):
            for x, y in dp_loader:
                optimizer.zero_grad()
                loss_fn(dp_model(x).squeeze(-1), y).backward()
                optimizer.step()

        steps_taken = sum(s for *_, s in engine.accountant.history) - self.ledger.steps
        self.ledger.record(
            self.run_id, int(config["server_round"]), sigma, sample_rate, steps_taken
        )
        return get_weights(model), len(self.y), self._report("trained", config)

    def get_properties(self, config):
        """The server's notice that the run has ended (see server.tell_hospitals)."""
        self._report(config["run-status"], config)
        return {}

    def _report(self, status, config, reason=""):
        """Scalars the server may see: this hospital's privacy spending, no data.
        In deployment they also go to the hospital's status file, for its operator."""
        history = self.ledger.history
        sigma, sample_rate, _ = history[-1] if history else (0.0, 0.0, 0)
        report = {
            "hospital": self.hospital,
            "patients": len(self.y),
            "status": status,
            "reason": reason,
            "epsilon": self.ledger.epsilon(),
            "epsilon_budget": self.cfg.epsilon,
            "delta": self.cfg.delta,
            "noise_multiplier": sigma,
            "sample_rate": sample_rate,
            "steps": self.ledger.steps,
            "history": json.dumps(history),
        }
        if self.status_path:
            round_number = config.get("server_round", 0)
            now = datetime.now(UTC).isoformat(timespec="seconds")
            write_json(self.status_path, {**report, "round": round_number, "utc": now})
        return report


def client_fn(context: Context):
    """The hospital for this node: the server's settings for the run, with the
    hospital's own budget (deployment: from its node config) taking precedence."""
    node = context.node_config
    run_cfg = settings.from_run_config(context.run_config)
    own = {name: node[name] for name in HOSPITAL_SETTINGS if name in node}
    cfg = settings.resolve({**vars(run_cfg), **own})
    torch.set_num_threads(1)  # a tiny MLP: threads cost more than they give
    hospital = int(node["partition-id"])
    if int(node["num-partitions"]) != cfg.num_clients:
        raise ValueError(
            f"the federation has {node['num-partitions']} hospitals "
            f"but num_clients is {cfg.num_clients}"
        )
    if "state-dir" in node:  # deployment: the hospital's own directory
        state_dir = Path(node["state-dir"])
        hospital_client = HospitalClient(
            hospital, cfg, context.run_id, state_dir, state_dir / STATUS_FILE
        )
    else:  # simulation: each run is a fresh demo federation
        ledger_dir = run_directory(cfg, context.run_id) / "privacy"
        hospital_client = HospitalClient(hospital, cfg, context.run_id, ledger_dir)
    return hospital_client.to_client()


app = ClientApp(client_fn=client_fn)


def join(argv=None):
    """`python client.py --client-id N`: this hospital's SuperNode, until the run ends."""
    runtime.interrupt_on_signals()
    parser = settings.make_parser(__doc__, ("num_clients", *HOSPITAL_SETTINGS))
    group = parser.add_argument_group("hospital")
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
        "--insecure",
        action="store_true",
        help="no TLS: only against a server started with --insecure",
    )
    group.add_argument(
        "--state-dir",
        default="",
        help="the hospital's own directory: privacy ledger, status, Flower's "
        "state and logs [default: state/hospital-<client id>]",
    )
    group.add_argument(
        "--connect-timeout",
        type=float,
        default=300,
        help="seconds to keep trying to reach the server",
    )
    cfg, args = settings.parse(parser, argv)
    if not 0 <= args.client_id < cfg.num_clients:
        parser.error(
            f"--client-id must be in 0..{cfg.num_clients - 1} "
            f"(num_clients is {cfg.num_clients}), got {args.client_id}"
        )
    try:
        runtime.split_address(args.server_address)
    except ValueError as error:
        parser.error(f"--server-address: {error}")
    ca_cert = None if args.insecure else Path(args.root_certificates).resolve()
    if ca_cert and not ca_cert.is_file():
        parser.error(
            f"no CA certificate at {ca_cert}: copy the server's certs/ca.crt "
            f"(made by `python server.py --make-certs`) or pass --root-certificates"
        )
    state_dir = Path(args.state_dir or f"state/hospital-{args.client_id}").resolve()
    console = reporting.make_console()
    if args.insecure:
        console.print(
            "[bold red]WARNING: --insecure: no TLS, this hospital's model updates "
            "cross the network unencrypted to an unauthenticated server.[/]"
        )
    try:
        wait_for_server(args.server_address, args.connect_timeout, console)
        runtime.check_server(args.server_address, ca_cert)
    except runtime.FlowerError as error:
        console.print(f"[red]{escape(str(error))}[/]")
        return 1
    node_config = {
        "partition-id": args.client_id,
        "num-partitions": cfg.num_clients,
        "state-dir": str(state_dir),
        **{name: getattr(cfg, name) for name in HOSPITAL_SETTINGS},
    }
    flwr_home = state_dir / "flower"
    try:
        with runtime.supernode(flwr_home, args.server_address, node_config, ca_cert) as node:
            console.print(
                f"Hospital {args.client_id} connected to {args.server_address}; its budget: "
                f"epsilon {cfg.epsilon:g}, delta {cfg.delta:g}. State and logs: {state_dir}"
            )
            return follow_rounds(node, state_dir, args, console)
    except KeyboardInterrupt:
        console.print("[red]Interrupted.[/] This hospital left the federation.")
        return 130


def wait_for_server(address, timeout, console):
    """Wait until the server accepts connections (start order does not matter)."""
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


def follow_rounds(node, state_dir, args, console):
    """Print what this hospital does each round, until the server ends the run;
    the exit code says how it ended."""
    status_path = state_dir / STATUS_FILE
    last = status_path.read_text() if status_path.exists() else None
    unreachable_since = None
    while node.poll() is None:
        text = status_path.read_text() if status_path.exists() else None
        if text != last:
            last, status = text, json.loads(text)
            spent = f"epsilon spent {status['epsilon']:.3f} of {status['epsilon_budget']:g}"
            if status["status"] == "trained":
                console.print(f"Round {status['round']}: trained; {spent}")
            elif status["status"] == "refused":
                console.print(
                    f"[yellow]Round {status['round']}: declined to train: "
                    f"{escape(status['reason'])}. Raise --epsilon deliberately "
                    f"to continue.[/]"
                )
            else:
                console.print(f"The server ended the run ({status['status']}); {spent}.")
                time.sleep(END_GRACE)  # for the SuperNode to send our acknowledgement
                return 0 if status["status"] == "finished" else 1
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
        time.sleep(1)
    log = state_dir / "flower" / "supernode.log"
    console.print(f"[red]The SuperNode stopped unexpectedly:[/]\n{runtime.log_tail(log)}")
    return 1


if __name__ == "__main__":
    sys.exit(join())
