"""The server: averages the hospitals' models (FedAvg, weighted by patients),
evaluates the global model on its own reference test set after every round, and
writes the run's results (results.py).

It never computes a hospital's epsilon itself: each hospital accounts for its own
data and reports what it has spent; the server records those reports.
"""

import json
import re
import time
from logging import INFO, WARNING

import torch
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

import data_utils
import settings
from model import (
    build_model,
    clinical_metrics,
    get_weights,
    predict_risk,
    save_model,
    set_weights,
)
from results import METRICS_FILE, MODEL_FILE, run_directory, write_json

# What a hospital reports about its own privacy spending, as metrics.json records it.
PRIVACY_KEYS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "history")


class HospitalFedAvg(FedAvg):
    """FedAvg over every hospital each round, recording each hospital's privacy
    report and leaving out of the average any hospital that refused to train."""

    def __init__(self, cfg, run_dir):
        torch.manual_seed(cfg.seed)
        self.model = build_model(len(data_utils.FEATURE_NAMES), cfg.hidden_layers)
        super().__init__(
            fraction_fit=1.0,
            # No evaluation at the hospitals: metrics on their test rows would be a
            # release about those patients without DP. The server evaluates instead.
            fraction_evaluate=0.0,
            min_fit_clients=cfg.num_clients,
            min_available_clients=cfg.num_clients,
            initial_parameters=ndarrays_to_parameters(get_weights(self.model)),
            on_fit_config_fn=lambda server_round: {"server_round": server_round},
            evaluate_fn=self._evaluate_global,
        )
        self.cfg, self.run_dir = cfg, run_dir
        self.test_x, self.test_y = data_utils.global_test_set(cfg)
        self.started = time.monotonic()
        self.reports = {}  # hospital id -> its latest report
        self.round_reports, self.round_failures = {}, []
        self.results = {
            "status": "running",
            "config": vars(cfg),
            "rounds": [],
            "final": None,
            "privacy": None,
        }
        self.save()

    def aggregate_fit(self, server_round, results, failures):
        self.round_reports = {}
        trained = []
        for proxy, fit_res in results:
            report = dict(fit_res.metrics)
            hospital = str(report.pop("hospital"))
            report["history"] = json.loads(report["history"])
            self.round_reports[hospital] = report
            if report["status"] == "trained":
                trained.append((proxy, fit_res))
            else:
                log(
                    WARNING,
                    "Hospital %s did not train in round %d: %s",
                    hospital,
                    server_round,
                    report["reason"],
                )
        self.round_failures = [failure_reason(f) for f in failures]
        for reason in self.round_failures:
            log(WARNING, "A hospital failed in round %d: %s", server_round, reason)
        self.reports.update(self.round_reports)
        return super().aggregate_fit(server_round, trained, failures)

    def _evaluate_global(self, server_round, weights, config):
        set_weights(self.model, weights)
        risk = predict_risk(self.model, self.test_x)
        metrics = clinical_metrics(self.test_y, risk, self.cfg.decision_threshold)
        if server_round > 0:
            self._record_round(server_round, metrics)
        return metrics["loss"], metrics

    def _record_round(self, server_round, metrics):
        trained = sum(r["status"] == "trained" for r in self.round_reports.values())
        self.results["rounds"].append(
            {
                "round": server_round,
                "seconds": round(time.monotonic() - self.started, 3),
                "global": metrics,
                "hospitals_trained": trained,
                "failures": self.round_failures,
                "hospitals": self.round_reports,
            }
        )
        max_epsilon = max((r["epsilon"] for r in self.reports.values()), default=0.0)
        log(
            INFO,
            "Round %d/%d: global AUC %.3f, accuracy %.3f, max epsilon %.3f of %g",
            server_round,
            self.cfg.rounds,
            metrics["auc"],
            metrics["accuracy"],
            max_epsilon,
            self.cfg.epsilon,
        )
        self.save()

    def finish(self):
        """Write model.pt, then the final figures, then mark the run finished."""
        save_model(
            self.run_dir / MODEL_FILE,
            self.model,
            self.cfg.hidden_layers,
            data_utils.FEATURE_NAMES,
            self.cfg.decision_threshold,
        )
        self.results["final"] = {"global": self.results["rounds"][-1]["global"]}
        self.results["privacy"] = {
            "target_epsilon": self.cfg.epsilon,
            "delta": self.cfg.delta,
            "accountant": self.cfg.accountant,
            # Noise comes from a PRNG seeded from OS entropy, not a CSPRNG.
            "secure_rng": False,
            "hospitals": {
                str(h): (
                    {k: self.reports[str(h)][k] for k in (*PRIVACY_KEYS, "patients", "status")}
                    if str(h) in self.reports
                    else {"status": "no report"}  # it failed in every round
                )
                for h in range(self.cfg.num_clients)
            },
        }
        self.results["status"] = "finished"
        self.save()

    def save(self):
        write_json(self.run_dir / METRICS_FILE, self.results)


def failure_reason(failure):
    """What a failed hospital's exception said. Flower reports it as
    "<class '...'>:<'Exception ClientAppException occurred. Message: what it said'>"."""
    if isinstance(failure, tuple):  # (client, FitRes) with an error status
        return failure[1].status.message
    error = failure.args[0] if failure.args else failure
    reason = str(getattr(error, "reason", error))
    return re.sub(r"(?s)^.*Message: |'>$", "", reason).strip()


def wait_for_hospitals(grid, cfg):
    """Start only when exactly num_clients hospitals are connected; otherwise stop
    with a message that says what to change, instead of waiting for a day."""
    deadline = time.monotonic() + cfg.join_timeout
    while (connected := len(grid.get_node_ids())) < cfg.num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {connected} of {cfg.num_clients} hospitals connected within "
                f"{cfg.join_timeout} s (join_timeout). With `flwr run`, give the "
                f"federation that many nodes: --federation-config "
                f"num-supernodes={cfg.num_clients}"
            )
        log(INFO, "Waiting for hospitals: %d of %d connected", connected, cfg.num_clients)
        time.sleep(2)
    if connected > cfg.num_clients:
        raise RuntimeError(
            f"{connected} hospitals connected but num_clients is {cfg.num_clients}: "
            f"set num_clients to {connected} or connect fewer"
        )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = settings.from_run_config(context.run_config)
    run_dir = run_directory(cfg, context.run_id)
    log(INFO, "SecureHealth-ML: results go to %s", run_dir)
    strategy = HospitalFedAvg(cfg, run_dir)
    legacy_context = LegacyContext(
        context=context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy
    )
    try:
        wait_for_hospitals(grid, cfg)
        DefaultWorkflow()(grid, legacy_context)
        strategy.finish()
    except BaseException as error:
        strategy.results["status"] = "failed"
        strategy.results["error"] = f"{type(error).__name__}: {error}"
        strategy.save()
        raise
