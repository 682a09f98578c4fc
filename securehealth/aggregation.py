"""How the hospitals' accepted updates become the new global model: one registry,
read by the settings (the `aggregation` setting's choices), the server's strategy
and the in-process FedAvg loop (sweep, baselines, bench).

Each entry is one of Flower's own strategies, used only for its combination step:
the weighted mean (FedAvg), the coordinate-wise median (FedMedian: one wild update
cannot drag it) and the trimmed mean (FedTrimmedAvg, 20% dropped at each end).
"""

import numpy as np

# name -> (Flower strategy class in flwr.server.strategy, its arguments, what it does)
AGGREGATIONS = {
    "fedavg": ("FedAvg", {}, "the mean, weighted by training patients"),
    "median": ("FedMedian", {}, "coordinate-wise median (robust; needs every update)"),
    "trimmed-mean": ("FedTrimmedAvg", {"beta": 0.2}, "mean without the top and bottom 20%"),
}


def combine(aggregation: str, updates: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """The new global weights from (weights, training patients) of each update."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import strategy

    name, arguments, _ = AGGREGATIONS[aggregation]
    combiner = getattr(strategy, name)(fit_metrics_aggregation_fn=lambda _: {}, **arguments)
    results = [
        (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), patients, {}))
        for weights, patients in updates
    ]
    parameters, _ = combiner.aggregate_fit(1, results, [])
    return parameters_to_ndarrays(parameters)
