"""Local training of the diagnosis model on one hospital's rows: with DP-SGD
(Opacus), as every hospital trains, or without, for the non-private baselines."""

import secrets
import warnings

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

# Opacus repeats this on every PrivacyEngine; metrics.json records secure_rng=false
# and the README explains what it means, once.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
# Harmless for Opacus' per-sample gradient hooks, which need no input gradients.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def secret_generator():
    """Randomness for batch sampling and noise that nobody else can replay: with a
    seed known to others, they could regenerate the noise and subtract it."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def data_loader(x, y, batch_size, generator):
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def sample_rate_and_steps(n, cfg):
    """The Poisson sample rate Opacus really uses (1/ceil(n/batch_size), not
    batch_size/n) and the noisy steps of one round."""
    batches = -(-n // cfg.batch_size)
    return 1 / batches, cfg.local_epochs * batches


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


def train_private(model, x, y, cfg, noise_multiplier, history):
    """local_epochs of DP-SGD on (x, y), in place. `history` is what the hospital's
    accountant already holds; returns it with this training's steps added, as
    Opacus' own accountant counted them."""
    generator = secret_generator()
    loader = data_loader(x, y, cfg.batch_size, generator)
    engine = PrivacyEngine(accountant=cfg.accountant)
    engine.accountant.history = list(history)  # resume, never reset
    private_model, optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=_optimizer(model, cfg),
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=True,
        noise_generator=generator,
    )
    if private_loader.sample_rate != sample_rate_and_steps(len(y), cfg)[0]:
        raise RuntimeError("Opacus samples at another rate than was calibrated")
    _epochs(private_model, private_loader, optimizer, cfg.local_epochs)
    return engine.accountant.history


def train_plain(model, x, y, cfg, epochs):
    """Ordinary mini-batch SGD, no clipping or noise: only for the baselines."""
    loader = data_loader(x, y, cfg.batch_size, secret_generator())
    _epochs(model, loader, _optimizer(model, cfg), epochs)
