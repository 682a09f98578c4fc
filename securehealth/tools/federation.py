"""One in-process FedAvg loop, without Flower's processes: the same rounds the
server runs (every hospital trains from the global weights, the registry's
aggregation combines the updates), for the tools that train many federations in
one process (sweep, baselines, bench), where the runtime would cost 20 s each."""

from collections.abc import Callable, Sequence

import numpy as np

from securehealth.aggregation import combine

Weights = list[np.ndarray]
# One hospital's round: (global weights, round number) -> (new weights, patients);
# 0 patients means it did not train (e.g. its budget is spent).
TrainRound = Callable[[Weights, int], tuple[Weights, int]]


def federate(
    weights: Weights, hospitals: Sequence[TrainRound], rounds: int, aggregation: str = "fedavg"
) -> Weights:
    """The global weights after `rounds` rounds of the hospitals' training."""
    for server_round in range(1, rounds + 1):
        updates = [train(weights, server_round) for train in hospitals]
        trained = [(w, n) for w, n in updates if n > 0]
        weights = combine(aggregation, trained) if trained else weights
    return weights
