"""One in-process FedAvg loop, without Flower's processes.

The same rounds the server runs (every hospital trains from the global weights, the registry's
aggregation combines the updates), for the tools that train many federations in one process
(sweep, baselines, bench, benchmark), where the runtime would cost 20 s each. Entry points:
`federate`, `dp_federation`.
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from securehealth import operating_point
from securehealth.aggregation import ServerMomentum, combine
from securehealth.config import Settings
from securehealth.model import build_model, get_weights, set_weights

Weights = list[np.ndarray]
# One hospital's round: (global weights, round number) -> (new weights, patients);
# 0 patients means it did not train (e.g. its budget is spent).
TrainRound = Callable[[Weights, int], tuple[Weights, int]]


def federate(weights: Weights, hospitals: Sequence[TrainRound], cfg: Settings) -> Weights:
    """The global weights after cfg.rounds rounds of the hospitals' training.

    Each round's updates are combined by the run's aggregation and stepped to with its server
    momentum, as the server does.

    Parameters
    ----------
    weights : list of np.ndarray
        The initial global weights.
    hospitals : sequence of TrainRound
        Each hospital's round: (global weights, round number) -> (new weights, patients).
    cfg : Settings
        The run's settings: rounds, aggregation, server_momentum.
    """
    server = ServerMomentum(cfg.server_momentum)
    for server_round in range(1, cfg.rounds + 1):
        updates = [train(weights, server_round) for train in hospitals]
        trained = [(w, n) for w, n in updates if n > 0]
        if trained:
            weights = server.step(weights, combine(cfg.aggregation, trained))
    return weights


def dp_federation(
    cfg: Settings,
    state_root: Path,
    patients: Sequence[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]
    | None = None,
) -> tuple[torch.nn.Module, float]:
    """The federated DP model and its decision threshold, trained here by the real hospitals.

    Opacus DP-SGD and calibrated noise, a privacy ledger each under `state_root`
    (hospital-N), on their own data or on `patients` (each hospital's (training, held-out)
    rows) where given. The threshold is the fixed one, or chosen as the server chooses it,
    from their DP histograms (the provisional one where none can be chosen).
    """
    from securehealth.hospital import Hospital  # the training stack

    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)  # the server's initial model
    hospitals = [
        Hospital(h, cfg, "in-process", Path(state_root) / f"hospital-{h}", patients=rows)
        for h, rows in enumerate(patients or [None] * cfg.num_clients)
    ]
    model = build_model(hospitals[0].x.shape[1], cfg.hidden_layers)
    weights = federate(
        get_weights(model),
        [lambda w, r, h=h: h.train_round(w, r)[:2] for h in hospitals],
        cfg,
    )
    set_weights(model, weights)
    target = operating_point.Target.parse(cfg.decision_threshold)
    if target is None:
        return model, float(cfg.decision_threshold)
    released = []
    for hospital in hospitals:
        histograms, report = hospital.release_operating_point(weights, cfg.rounds)
        if histograms is not None:
            releases = json.loads(report["releases"])
            released.append(operating_point.Release.of(histograms, releases))
    try:
        point = operating_point.choose(released, target)
    except operating_point.NoOperatingPoint:
        return model, operating_point.PROVISIONAL_THRESHOLD
    return model, point.threshold
