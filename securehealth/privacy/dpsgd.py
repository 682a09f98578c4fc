"""Local training of the diagnosis model on one hospital's rows, with DP-SGD or without.

train_private is Opacus' own DP-SGD, with one change for a hostile server:
FiniteDPOptimizer counts a NaN or infinite per-patient gradient as zero, since clipping
does not bound it. train_plain is for the non-private baselines. Training runs on the
GPU when there is one; the model comes back on the CPU.
"""

import secrets
import warnings

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, RandomSampler, Sampler, TensorDataset

from securehealth.config import Settings
from securehealth.privacy.schedule import sample_rate_and_steps

# Harmless for Opacus' per-sample gradient hooks, which need no input gradients.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def secret_seed() -> int:
    """A seed nobody else can replay.

    With a seed known to others, they could regenerate the sampling and the noise, and
    subtract the noise.
    """
    return secrets.randbits(63)


class Rows(TensorDataset):
    """The rows as tensors on the training device, handed out a batch at a time.

    A DataLoader fetching and stacking rows one by one spent a third of a DP-SGD step
    on it (measured on the default job).
    """

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, dtype=torch.long, device=self.tensors[0].device)
        return tuple(t[index] for t in self.tensors)


class PoissonBatches(Sampler):
    """Poisson sampling, as DP-SGD's accounting assumes, in time proportional to the batch.

    In each step every patient is in the batch independently with probability
    `sample_rate`. Drawn as a batch size from Binomial(n, sample_rate) and then a
    uniformly random subset of that size, which is the same distribution, in time
    proportional to the batch rather than to n (Opacus' own sampler draws a number per
    patient per step: 8.8 ms a step at 1M patients, against 6 us here).
    """

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


def _epochs(model, loader, optimizer, epochs):
    """`epochs` passes of `loader`; returns the optimizer steps taken."""
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x).squeeze(-1), y).backward()
            optimizer.step()
            steps += 1
    return steps


def _optimizer(model, cfg):
    """SGD with the run's learning rate and momentum."""
    return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)


class FiniteDPOptimizer(DPOptimizer):
    """Opacus' DP-SGD optimizer, for any model a server can send.

    A patient whose per-patient gradient holds a NaN or an infinite value counts as a
    zero gradient before clipping. Clipping bounds every finite gradient (one too large
    for its norm to be finite is scaled to zero), but not NaN or infinity, which would
    pass through the noise and mark the update exactly when that patient was sampled.
    """

    def clip_and_accumulate(self) -> None:
        """Zero every non-finite per-patient gradient, then clip and accumulate as Opacus does."""
        gradients = self.grad_samples
        if len(gradients[0]):
            finite = torch.stack(
                [g.reshape(len(g), -1).isfinite().all(dim=1) for g in gradients]
            ).all(dim=0)
            for parameter, gradient in zip(self.params, gradients, strict=True):
                keep = finite.view(-1, *[1] * (gradient.dim() - 1))
                parameter.grad_sample = torch.where(keep, gradient, 0.0)
        super().clip_and_accumulate()


def train_private(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: Settings,
    noise_multiplier: float,
    *,
    sampling: tuple[float, int] | None = None,
    optimizer_class: type[DPOptimizer] = FiniteDPOptimizer,
    batches_class: type[PoissonBatches] = PoissonBatches,
) -> int:
    """Train `model` in place with local_epochs of DP-SGD on (x, y).

    Each of the round's noisy steps takes a Poisson sample of the rows, clips every
    patient's gradient to max_grad_norm and adds Gaussian noise of std
    noise_multiplier * max_grad_norm. The hospital's epsilon comes from its privacy
    ledger (ledger.py).

    Parameters
    ----------
    model : torch.nn.Module
        The model, trained in place and returned on the CPU.
    x, y : np.ndarray
        The hospital's training rows and their labels.
    cfg : Settings
        The run's settings (local_epochs, batch_size, learning_rate, momentum,
        max_grad_norm).
    noise_multiplier : float
        The noise multiplier its privacy ledger planned.
    sampling : tuple of (float, int), optional
        (sample rate, steps), by default sample_rate_and_steps(len(y)); the privacy
        self-test sets it.
    optimizer_class, batches_class : type
        The DP optimizer and the batch sampler, replaced by the privacy self-test's
        broken variants.

    Returns
    -------
    int
        The steps taken.
    """
    sample_rate, steps = sampling or sample_rate_and_steps(len(y), cfg)
    ModuleValidator.validate(model, strict=True)
    batches = batches_class(len(y), sample_rate, steps // cfg.local_epochs)
    private_model = GradSampleModule(model.to(DEVICE), batch_first=True, loss_reduction="mean")
    optimizer = optimizer_class(
        _optimizer(model, cfg),
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        # The noisy sum is divided by the expected batch size, as Opacus does (at
        # least 1: int() of 98 * (1/98) is 0).
        expected_batch_size=max(1, round(len(y) * sample_rate)),
        generator=torch.Generator(device=DEVICE).manual_seed(secret_seed()),
    )
    taken = _epochs(private_model, data_loader(x, y, batches), optimizer, cfg.local_epochs)
    private_model.remove_hooks()
    model.to("cpu")
    return taken


def train_plain(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, cfg: Settings, epochs: int
) -> None:
    """Ordinary mini-batch SGD, no clipping or noise: only for the baselines."""
    order = RandomSampler(range(len(y)), generator=torch.Generator().manual_seed(secret_seed()))
    batches = torch.utils.data.BatchSampler(order, cfg.batch_size, drop_last=False)
    _epochs(model.to(DEVICE), data_loader(x, y, batches), _optimizer(model, cfg), epochs)
    model.to("cpu")
