"""SecureHealth-ML's settings and their defaults: edit a default here.

Any script overrides a setting with `--name value` (e.g. `python simulation.py
--epsilon 2 --rounds 5`); every value is validated before anything starts
(securehealth/settings.py). A bare `flwr run .` reads its defaults from
pyproject.toml's [tool.flwr.app.config]: change a value there too (the ServerApp
refuses a default that differs from here). docs/reference/settings.md lists them all.
"""

from dataclasses import dataclass, field
from typing import Any

from securehealth.privacy.report import Adjacency


def setting(default: Any, description: str) -> Any:
    """Return a dataclass field: a setting's default and its one-line description.

    The description is the scripts' --help text and docs/reference/settings.md's.
    """
    return field(default=default, metadata={"help": description})


@dataclass
class Settings:
    """Every setting of a run, with its default: what a run, a hospital and the tools are told."""

    # --- Federation
    num_clients: int = setting(3, "hospitals taking part (simulated SuperNodes in simulation.py)")
    rounds: int = setting(
        10,
        "federated rounds: the server averages the hospitals' models once per round",
    )
    local_epochs: int = setting(1, "passes over its own data each hospital makes per round")
    # Server momentum (FedAvgM): each round the server moves the model by the combined
    # update plus this share of its previous move; no privacy cost (post-processing).
    # Off by default: 0.5 helped small hospitals a little and hurt the noisiest runs
    # (docs/results/clinical-benchmark.md, "Server-side optimisers").
    server_momentum: float = setting(
        0.0,
        "share of the server's previous move added to each round's; 0 = FedAvg",
    )
    join_timeout: int = setting(
        120,
        "seconds the server waits for all hospitals to connect before round 1",
    )
    min_available_clients: int = setting(
        2,
        "after round 1, hospitals that must be connected for a round",
    )
    min_fit_clients: int = setting(
        2,
        "hospitals a round trains with at the least (others may drop out)",
    )

    # --- Security (server.py, client.py)
    secure_aggregation: str = setting(
        "auto",
        'SecAgg+: "on", "off" or "auto" (on in deployment, off in simulation)',
    )
    max_patients: int = setting(
        10000,
        "most training patients a hospital may claim: caps its FedAvg weight",
    )
    aggregation: str = setting(
        "fedavg",
        '"fedavg" (weighted mean), "median" or "trimmed-mean" (robust; no SecAgg+)',
    )
    max_update_norm: float = setting(
        100.0,
        "an update moving the model further than this (L2) is rejected as corrupt",
    )
    max_weight: float = setting(
        10000.0,
        "a hospital refuses a global model with any weight beyond this in magnitude",
    )

    # --- Simulation on Ray (simulation.py)
    ray_address: str = setting(
        "",
        'an existing Ray cluster ("auto" or host:port); empty = a new private one',
    )
    client_cpus: int = setting(
        1,
        "CPUs Ray reserves for each simulated hospital while it trains (whole)",
    )
    client_gpus: float = setting(
        0.0,
        "GPUs (fractions allowed) Ray reserves for each simulated hospital",
    )

    # --- Data (securehealth/data)
    dataset: str = setting(
        "synthetic",
        '"synthetic", "breast-cancer", "heart-disease" (4 real sites) or "csv"',
    )
    data_dir: str = setting(
        "",
        "csv: folder with hospital_<i>.csv, schema.json (data dictionary), test.csv",
    )
    missing_values: str = setting(
        "indicator",
        'gaps: "indicator" (fill + was-missing input), "fail" or "drop"',
    )
    test_fraction: float = setting(
        0.2,
        "share of each hospital's patients it holds out from training",
    )
    num_patients: int = setting(
        4000,
        "synthetic: patients over all hospitals; sizes follow a 5:3:2 pattern",
    )
    global_test_patients: int = setting(
        2000,
        "synthetic: the server's separate reference test population",
    )

    # --- Model (model.py)
    # Logistic regression by default, on every data set: with 30-300 patients a
    # hospital samples nearly all of them each step, and DP noise on the update grows
    # with the square root of the number of weights, so the 16-unit MLP's 16-18x more
    # weights cost more than its capacity gives (docs/results/clinical-benchmark.md).
    hidden_layers: tuple[int, ...] = setting(
        (),
        "widths of the MLP's hidden layers, e.g. (32, 16); () = logistic",
    )
    # The operating point: "auto" (the largest sensitivity + specificity - 1),
    # "sensitivity:0.9" or "specificity:0.9" (at least that), chosen from the hospitals'
    # DP score histograms after training; or a fixed risk, e.g. "0.3" (no release).
    decision_threshold: str = setting("auto", "auto, sensitivity:V, specificity:V, or a fixed risk")

    # --- Local training: DP-SGD with Opacus
    batch_size: int = setting(
        128,
        "expected batch size; batches are Poisson-sampled at rate 1/ceil(n/batch)",
    )
    learning_rate: float = setting(
        0.3,
        "SGD step size (small data under DP favours SGD+momentum over Adam)",
    )
    momentum: float = setting(0.9, "SGD momentum, reset at the start of every round")
    max_grad_norm: float = setting(
        1.0,
        "per-patient gradient clipping bound C; noise std is sigma * C",
    )

    # --- Privacy budget (per hospital, over the whole training)
    epsilon: float = setting(1.0, "TOTAL epsilon each hospital may spend over all rounds together")
    delta: float = setting(
        1e-5,
        "delta of the (epsilon, delta) guarantee; keep it well below 1/patients",
    )
    adjacency: Adjacency = setting(
        Adjacency.REPLACE_ONE,
        '"replace-one" (patient counts are released) or "add-remove"',
    )

    # --- Run
    seed: int = setting(
        42,
        "seeds the synthetic data and the initial model (DP noise uses secret randomness)",
    )
    run_dir: str = setting("", "where results go; empty = a new runs/<UTC timestamp>/")
