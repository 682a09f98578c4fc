"""The server: averages the hospitals' models (FedAvg, weighted by patients),
evaluates the global model on its own reference test set after every round, and
writes the run's results (securehealth/results.py). `app` is the Flower ServerApp.

It never computes a hospital's epsilon itself: each hospital accounts for its own
data and reports what it has spent; the server checks and records those reports.
Only nodes admitted as the run's hospitals take part, and in deployment the
ServerApp runs only a run its operator signed.

Run as a script, it is the deployment server: a TLS SuperLink that hospitals
(`python client.py --client-id N`) connect to, and one training run on it:

    python server.py --make-certs            # once: a CA and server certificate
    python server.py [--host H] [--port P] [--name value ...]
"""

import sys

if __name__ == "__main__":  # the deployment launcher, before the ServerApp's heavy imports
    from securehealth.deployment.server_cli import serve

    sys.exit(serve(__doc__))

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
