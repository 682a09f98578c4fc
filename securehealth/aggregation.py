"""How the hospitals' accepted updates become the new global model.

`AGGREGATIONS` is the one registry, read by the settings (the `aggregation` setting's choices),
the server's strategy and the in-process FedAvg loop (sweep, baselines, bench); `combine` applies
an entry, and `ServerMomentum` takes the server's step towards what it combined.
"""

import numpy as np

# name -> (Flower strategy class in flwr.server.strategy, its arguments, what it does).
# Each strategy is used only for its combination step; the median is robust because one wild
# update cannot drag it.
AGGREGATIONS = {
    "fedavg": ("FedAvg", {}, "the mean, weighted by training patients"),
    "median": ("FedMedian", {}, "coordinate-wise median (robust; needs every update)"),
    "trimmed-mean": (
        "FedTrimmedAvg",
        {"beta": 0.2},
        "mean without the top and bottom 20% (int(0.2 x hospitals): none below 5)",
    ),
}


def combine(aggregation: str, updates: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """The new global weights, combined from the hospitals' updates.

    Parameters
    ----------
    aggregation : str
        A name in AGGREGATIONS.
    updates : list[tuple[list[np.ndarray], int]]
        Each update's weights and its hospital's number of training patients.

    Returns
    -------
    list[np.ndarray]
        The combined weights.
    """
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


class ServerMomentum:
    """The server's step with heavy-ball momentum (FedAvgM; Hsu, Qi and Brown 2019).

    Each round the global model moves to the combined weights plus `momentum` (the run's
    `server_momentum`) times its previous move. Flower's FedAvgM takes the same step at server
    learning rate 1, but only after its own weighted mean; this one follows whichever
    combination the run uses, SecAgg+'s sum included.

    With momentum 0 (the default) the new weights are exactly the combined ones (plain FedAvg).
    A round without any update leaves the previous move as it was. The step changes nothing
    about privacy: it only post-processes what the hospitals released.
    """

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.previous_move: list[np.ndarray] | None = None

    def step(self, current: list[np.ndarray], combined: list[np.ndarray]) -> list[np.ndarray]:
        """The new global weights after a round whose updates combined to `combined`."""
        carried = self.previous_move or [np.zeros_like(w) for w in current]
        new = [
            (target + self.momentum * move).astype(now.dtype)
            for now, target, move in zip(current, combined, carried, strict=True)
        ]
        self.previous_move = [after - now for after, now in zip(new, current, strict=True)]
        return new
