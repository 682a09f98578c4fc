"""Local training of the diagnosis model on one hospital's rows: with DP-SGD
(Opacus), as every hospital trains, or without, for the non-private baselines.
Training runs on the GPU when there is one (`cuda`), else on the CPU; the model
comes back on the CPU either way."""

import math
import secrets
import warnings
from types import SimpleNamespace

import numpy as np
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, RandomSampler, Sampler, TensorDataset

# Opacus repeats this on every PrivacyEngine; metrics.json records secure_rng=false
# and the README explains what it means, once.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
# Harmless for Opacus' per-sample gradient hooks, which need no input gradients.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def secret_seed() -> int:
    """A seed nobody else can replay: with a seed known to others, they could
    regenerate the sampling and the noise, and subtract the noise."""
    return secrets.randbits(63)


class Rows(TensorDataset):
    """The rows as tensors on the training device, handed out a batch at a time:
    a DataLoader fetching and stacking rows one by one spent a third of a DP-SGD
    step on it (measured on the default job)."""

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, dtype=torch.long, device=self.tensors[0].device)
        return tuple(t[index] for t in self.tensors)


class PoissonBatches(Sampler):
    """Poisson sampling, as DP-SGD's accounting assumes: in each step every patient
    is in the batch independently with probability `sample_rate`. Drawn as a batch
    size from Binomial(n, sample_rate) and then a uniformly random subset of that
    size, which is the same distribution, in time proportional to the batch rather
    than to n (Opacus' own sampler draws a number per patient per step: 8.8 ms a
    step at 1M patients, against 6 us here)."""

    def __init__(self, n, sample_rate, steps):
        self.n, self.sample_rate, self.steps = n, sample_rate, steps
        self.random = np.random.default_rng(secret_seed())

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            size = self.random.binomial(self.n, self.sample_rate)
            yield self.random.choice(self.n, size, replace=False)


def data_loader(x: np.ndarray, y: np.ndarray, sampler: Sampler) -> DataLoader:
    """Batches of (x, y) on the training device, as `sampler` draws them."""
    rows = Rows(torch.as_tensor(x, device=DEVICE), torch.as_tensor(y, device=DEVICE))
    return DataLoader(rows, batch_sampler=sampler, collate_fn=lambda batch: batch)


def sample_rate_and_steps(n: int, cfg: SimpleNamespace) -> tuple[float, int]:
    """The Poisson sample rate (1/ceil(n/batch_size), as Opacus' own loader would
    use, not batch_size/n) and the noisy steps of one round."""
    batches = -(-n // cfg.batch_size)
    return 1 / batches, cfg.local_epochs * batches


def noise_limit(n: int, weights: int, cfg: SimpleNamespace) -> float:
    """The largest noise multiplier with which one round's update of a hospital of n
    training patients and a model of `weights` weights stays within max_update_norm,
    counting the noise alone. Beyond it the server rejects every update as corrupt,
    so a budget that needs more noise cannot train usefully.

    Each step adds Gaussian noise of std sigma * max_grad_norm to every weight's
    summed gradient, divided by the expected batch size; SGD with momentum m
    (reset every round) carries step t's noise into the round's change with weight
    lr * (1 - m^(s - t + 1)) / (1 - m) over the round's s steps. The expected squared
    norm of the change's noise is the sum of those squared, times weights."""
    sample_rate, steps = sample_rate_and_steps(n, cfg)
    m = cfg.momentum
    carried = [(1 - m**j) / (1 - m) if m else 1.0 for j in range(1, steps + 1)]
    per_unit_sigma = (
        cfg.learning_rate
        * cfg.max_grad_norm
        / (sample_rate * n)
        * math.sqrt(weights * sum(c * c for c in carried))
    )
    return cfg.max_update_norm / per_unit_sigma


def _epochs(model, loader, optimizer, epochs):
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x).squeeze(-1), y).backward()
            optimizer.step()


def _optimizer(model, cfg):
    return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)


def train_private(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: SimpleNamespace,
    noise_multiplier: float,
) -> int:
    """local_epochs of DP-SGD on (x, y), in place; returns the number of noisy steps
    Opacus took. Its accountant serves only as that step counter: the hospital's
    epsilon comes from its privacy ledger (ledger.py), over all its releases."""
    sample_rate, steps = sample_rate_and_steps(len(y), cfg)
    batches = PoissonBatches(len(y), sample_rate, steps // cfg.local_epochs)
    engine = PrivacyEngine(accountant="rdp")
    private_model, optimizer, private_loader = engine.make_private(
        module=model.to(DEVICE),
        optimizer=_optimizer(model, cfg),
        data_loader=data_loader(x, y, batches),
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        # The loader above already samples as Poisson sampling requires; Opacus
        # then scales the noisy sum by the expected batch size.
        poisson_sampling=False,
        noise_generator=torch.Generator(device=DEVICE).manual_seed(secret_seed()),
    )
    if 1 / len(private_loader) != sample_rate:
        raise RuntimeError("Opacus samples at another rate than was calibrated")
    _epochs(private_model, private_loader, optimizer, cfg.local_epochs)
    model.to("cpu")
    return sum(steps for *_, steps in engine.accountant.history)


def train_plain(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, cfg: SimpleNamespace, epochs: int
) -> None:
    """Ordinary mini-batch SGD, no clipping or noise: only for the baselines."""
    order = RandomSampler(range(len(y)), generator=torch.Generator().manual_seed(secret_seed()))
    batches = torch.utils.data.BatchSampler(order, cfg.batch_size, drop_last=False)
    _epochs(model.to(DEVICE), data_loader(x, y, batches), _optimizer(model, cfg), epochs)
    model.to("cpu")
