"""One hospital: trains the shared model on its own patients with DP-SGD (Opacus)
and sends back only the new weights and a privacy report (scalars).

The ClientApp below is what Flower runs, in simulation (simulation.py) and in
deployment alike.
"""

import json
import secrets
import warnings
from pathlib import Path

import torch
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

import data_utils
import settings
from model import build_model, get_weights, set_weights
from privacy import BudgetExhausted, PrivacyLedger
from results import run_directory

# Opacus repeats this on every PrivacyEngine; metrics.json records secure_rng=false
# and the README explains what it means, once.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
# Harmless for Opacus' per-sample gradient hooks, which need no input gradients.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


class HospitalClient(NumPyClient):
    """A hospital's training for one round, accounted in its privacy ledger."""

    def __init__(self, hospital, cfg, run_id, ledger_dir):
        self.hospital, self.cfg, self.run_id = hospital, cfg, run_id
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
            return parameters, 0, self._report("refused", str(refusal))

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
        return get_weights(model), len(self.y), self._report("trained")

    def _report(self, status, reason=""):
        """Scalars the server may see: this hospital's privacy spending, no data."""
        history = self.ledger.history
        sigma, sample_rate, _ = history[-1] if history else (0.0, 0.0, 0)
        return {
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


def client_fn(context: Context):
    cfg = settings.from_run_config(context.run_config)
    torch.set_num_threads(1)  # a tiny MLP: threads cost more than they give
    hospital = int(context.node_config["partition-id"])
    if int(context.node_config["num-partitions"]) != cfg.num_clients:
        raise ValueError(
            f"the federation has {context.node_config['num-partitions']} hospitals "
            f"but num_clients is {cfg.num_clients}"
        )
    ledger_dir = Path(run_directory(cfg, context.run_id)) / "privacy"
    return HospitalClient(hospital, cfg, context.run_id, ledger_dir).to_client()


app = ClientApp(client_fn=client_fn)
