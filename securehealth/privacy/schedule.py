"""The arithmetic of a DP-SGD run, without PyTorch: weights, steps, sample rate, noise bound.

What a forecast needs before anything trains (forecast.py, simulation.py's checks), so that
planning a run loads no training stack; dpsgd.py trains by the same numbers.
"""

import math
from collections.abc import Sequence
from itertools import pairwise

from securehealth.config import Settings


def weight_count(in_features: int, hidden_layers: Sequence[int]) -> int:
    """How many weights build_model's model has (each layer's matrix and bias)."""
    widths = [in_features, *hidden_layers, 1]
    return sum((width + 1) * following for width, following in pairwise(widths))


def sample_rate_and_steps(n: int, cfg: Settings) -> tuple[float, int]:
    """The Poisson sample rate and the noisy steps of one round, for n training patients.

    The rate is 1/ceil(n/batch_size), as Opacus' own loader would use, not batch_size/n.
    """
    batches = -(-n // cfg.batch_size)
    return 1 / batches, cfg.local_epochs * batches


def noise_limit(n: int, weights: int, cfg: Settings) -> float:
    """The largest noise multiplier with which one round's update stays within max_update_norm.

    For a hospital of n training patients and a model of `weights` weights, counting
    the noise alone. Beyond it the server rejects every update as corrupt, so a budget
    that needs more noise cannot train usefully.

    Each step adds Gaussian noise of std sigma * max_grad_norm to every weight's
    summed gradient, divided by the expected batch size; SGD with momentum m
    (reset every round) carries step t's noise into the round's change with weight
    lr * (1 - m^(s - t + 1)) / (1 - m) over the round's s steps. The expected squared
    norm of the change's noise is the sum of those squared, times weights.
    """
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
