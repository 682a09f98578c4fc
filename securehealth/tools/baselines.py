"""Reference points for the federated DP model (`python simulation.py --baselines`).

Pooled training and FedAvg without DP, and each hospital alone, trained in this process with the
federated run's model, initial weights, learning rate, batch size and passes over the data, and
judged on the same reference test set. Entry point: `run_baselines`.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch

from securehealth import data, operating_point
from securehealth.config import Settings
from securehealth.model import build_model, clinical_metrics, get_weights, predict_risk, set_weights
from securehealth.privacy import dpsgd
from securehealth.privacy.accountant import calibrate_noise_multiplier
from securehealth.privacy.schedule import sample_rate_and_steps
from securehealth.tools.federation import federate


def _initial_model(cfg, inputs):
    """The server's initial model, the same for every baseline (seeded by cfg.seed)."""
    torch.manual_seed(cfg.seed)  # the server's initial model
    return build_model(inputs, cfg.hidden_layers)


Rows = tuple[np.ndarray, np.ndarray]


def training_rows_and_judge(
    cfg: Settings,
) -> tuple[list[Rows], Callable[[torch.nn.Module], dict[str, float | None]]]:
    """Every hospital's training rows, and a judge that scores a model on the reference test set.

    Returns
    -------
    hospitals : list of (np.ndarray, np.ndarray)
        Each hospital's training features and labels.
    judge : callable
        A model's clinical metrics on the server's reference test set at its decision
        threshold: the fixed one, or one chosen for the run's target as the server chooses
        it, from histograms of all the training rows' scores, here without noise (the
        baselines are reference points computed in one place; their epsilon covers their
        training alone).
    """
    torch.set_num_threads(1)
    hospitals = [data.hospital_data(cfg, h)[0] for h in range(cfg.num_clients)]
    test_x, test_y, _ = data.reference_test_set(cfg)
    target = operating_point.Target.parse(cfg.decision_threshold)

    def judge(model):
        threshold = (
            float(cfg.decision_threshold)
            if target is None
            else operating_point.choose_without_noise(model, hospitals, target)
        )
        return clinical_metrics(test_y, predict_risk(model, test_x), threshold)

    return hospitals, judge


def pooled_no_dp(cfg: Settings, hospitals: Sequence[Rows]) -> torch.nn.Module:
    """Every hospital's training rows in one place, trained without DP.

    The upper bound nobody can have in reality.
    """
    model = _initial_model(cfg, hospitals[0][0].shape[1])
    pooled_x = np.concatenate([x for x, _ in hospitals])
    pooled_y = np.concatenate([y for _, y in hospitals])
    dpsgd.train_plain(model, pooled_x, pooled_y, cfg, cfg.rounds * cfg.local_epochs)
    return model


def _local_round(cfg, inputs, x, y, train):
    """A hospital's round in the in-process FedAvg loop, training with `train(model)`.

    It trains a copy of the global model, as a hospital trains each round.
    """

    def train_round(weights, server_round):
        local = _initial_model(cfg, inputs)
        set_weights(local, weights)
        train(local)
        return get_weights(local), len(y)

    return train_round


def fedavg_no_dp(cfg: Settings, hospitals: Sequence[Rows]) -> torch.nn.Module:
    """The same federation without clipping or noise."""
    inputs = hospitals[0][0].shape[1]
    model = _initial_model(cfg, inputs)
    plain = [
        _local_round(
            cfg, inputs, x, y, lambda m, x=x, y=y: dpsgd.train_plain(m, x, y, cfg, cfg.local_epochs)
        )
        for x, y in hospitals
    ]
    set_weights(model, federate(get_weights(model), plain, cfg))
    return model


def hospital_alone(cfg: Settings, x: np.ndarray, y: np.ndarray, private: bool) -> torch.nn.Module:
    """One hospital training only on its own rows, for the federation's rounds.

    With DP at its own budget where `private` (what it would get without the federation),
    else without (the published benchmark's comparison).
    """
    inputs = x.shape[1]
    if private:
        sample_rate, steps = sample_rate_and_steps(len(y), cfg)
        sigma = calibrate_noise_multiplier(
            cfg.epsilon, cfg.delta, sample_rate, cfg.rounds * steps, cfg.adjacency
        )

    def train(model):
        if private:
            dpsgd.train_private(model, x, y, cfg, sigma)
        else:
            dpsgd.train_plain(model, x, y, cfg, cfg.local_epochs)

    model = _initial_model(cfg, inputs)
    rounds = [_local_round(cfg, inputs, x, y, train)]
    set_weights(model, federate(get_weights(model), rounds, cfg))
    return model


def run_baselines(cfg: Settings) -> dict[str, dict[str, float | None]]:
    """{name: clinical metrics on the reference test set} for each baseline."""
    hospitals, judge = training_rows_and_judge(cfg)
    results = {
        "Pooled data, no DP": judge(pooled_no_dp(cfg, hospitals)),
        "FedAvg, no DP": judge(fedavg_no_dp(cfg, hospitals)),
    }
    for hospital, (x, y) in enumerate(hospitals):
        results[f"Hospital {hospital} alone, DP"] = judge(hospital_alone(cfg, x, y, private=True))
    return results
