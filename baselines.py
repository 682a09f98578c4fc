"""Reference points for the federated DP model, trained in this process on the same
data and judged on the same reference test set (`python simulation.py --baselines`):

    pooled, no DP      every hospital's training rows in one place, no privacy:
                       the upper bound nobody can have in reality
    FedAvg, no DP      the same federation without clipping or noise
    hospital N alone   each hospital training only on its own rows, with DP at
                       its own budget: what it would get without the federation

All use the same model, initial weights, learning rate, batch size and number of
passes over the data as the federated run.
"""

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate

import data_utils
import training
from model import build_model, clinical_metrics, get_weights, predict_risk, set_weights
from privacy import calibrate_noise_multiplier


def _initial_model(cfg, inputs):
    torch.manual_seed(cfg.seed)  # the server's initial model
    return build_model(inputs, cfg.hidden_layers)


def _hospitals_and_judge(cfg):
    """Every hospital's training rows, and a function that scores a model on the
    server's reference test set."""
    torch.set_num_threads(1)
    hospitals = [data_utils.hospital_data(cfg, h)[0] for h in range(cfg.num_clients)]
    test_x, test_y, _ = data_utils.reference_test_set(cfg)

    def judge(model):
        return clinical_metrics(test_y, predict_risk(model, test_x), cfg.decision_threshold)

    return hospitals, judge


def pooled_no_dp(cfg):
    hospitals, judge = _hospitals_and_judge(cfg)
    model = _initial_model(cfg, hospitals[0][0].shape[1])
    pooled_x = np.concatenate([x for x, _ in hospitals])
    pooled_y = np.concatenate([y for _, y in hospitals])
    training.train_plain(model, pooled_x, pooled_y, cfg, cfg.rounds * cfg.local_epochs)
    return judge(model)


def fedavg_no_dp(cfg):
    hospitals, judge = _hospitals_and_judge(cfg)
    inputs = hospitals[0][0].shape[1]
    model = _initial_model(cfg, inputs)
    for _ in range(cfg.rounds):
        updates = []
        for x, y in hospitals:
            local = _initial_model(cfg, inputs)
            set_weights(local, get_weights(model))
            training.train_plain(local, x, y, cfg, cfg.local_epochs)
            updates.append((get_weights(local), len(y)))
        set_weights(model, aggregate(updates))  # Flower's FedAvg average
    return judge(model)


def hospitals_alone(cfg):
    """{hospital: metrics} of each hospital training alone with DP at its budget."""
    hospitals, judge = _hospitals_and_judge(cfg)
    inputs = hospitals[0][0].shape[1]
    results = {}
    for hospital, (x, y) in enumerate(hospitals):
        sample_rate, steps = training.sample_rate_and_steps(len(y), cfg)
        sigma = calibrate_noise_multiplier(
            cfg.epsilon, cfg.delta, sample_rate, cfg.rounds * steps, cfg.adjacency
        )
        alone = _initial_model(cfg, inputs)
        for _ in range(cfg.rounds):  # a fresh copy per round, as the hospital trains
            copy = _initial_model(cfg, inputs)
            set_weights(copy, get_weights(alone))
            training.train_private(copy, x, y, cfg, sigma)
            set_weights(alone, get_weights(copy))
        results[hospital] = judge(alone)
    return results


def run_baselines(cfg):
    """{name: clinical metrics on the reference test set} for each baseline."""
    results = {"Pooled data, no DP": pooled_no_dp(cfg), "FedAvg, no DP": fedavg_no_dp(cfg)}
    for hospital, metrics in hospitals_alone(cfg).items():
        results[f"Hospital {hospital} alone, DP"] = metrics
    return results
