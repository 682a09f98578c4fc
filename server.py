"""The server's Flower ServerApp (`app`): admits the run's hospitals, averages their
models (FedAvg, weighted by patients), evaluates the global model on its own reference
test set after every round and writes the run's results. It never computes a
hospital's epsilon: each hospital accounts for its own data and reports it.

Run as a script, it is the deployment server: `python server.py --help` (usage:
securehealth/commands.py; the installed console script `securehealth-server` is the
same command).
"""

import sys

if __name__ == "__main__":  # the deployment launcher, before the ServerApp's heavy imports
    from securehealth.commands import server

    sys.exit(server())

from logging import INFO  # noqa: E402 (the ServerApp's imports, below the launcher)

from flwr.app import Context
from flwr.common import log
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid, ServerApp

from securehealth import settings
from securehealth.admission import Admission
from securehealth.results import run_directory
from securehealth.serverapp import (
    PromptGrid,
    ask_operating_point,
    check_authorised,
    enrolled_keys,
    recorded_outcome,
    wait_for_hospitals,
    workflow,
)
from securehealth.strategy import HospitalFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """One training run: admit the hospitals, `rounds` rounds of FedAvg, then the
    model's operating point from the hospitals' DP score histograms."""
    settings.check_defaults(context.run_config, grid.run.override_config)
    cfg = settings.decide_auto(settings.from_run_config(context.run_config))
    run_dir = run_directory(cfg, context.run_id)
    check_authorised(context, run_dir)  # before anything is written
    log(INFO, "SecureHealth-ML: results go to %s", run_dir)
    grid = PromptGrid(grid)
    admission = Admission(grid, cfg, context.run_id, enrolled_keys(cfg))
    strategy = HospitalFedAvg(cfg, run_dir, admission)
    with recorded_outcome(grid, strategy, admission, run_dir):
        wait_for_hospitals(admission, cfg, strategy)
        rounds = LegacyContext(
            context=context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy
        )
        workflow(cfg)(grid, rounds)
        ask_operating_point(grid, strategy, admission, cfg.rounds)
        strategy.finish()
