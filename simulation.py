"""Train the diagnosis model across simulated hospitals on this machine:

    python simulation.py [--name value ...]   (names and defaults: config.py)

It runs the same ServerApp (server.py) and ClientApp (client.py) as a real
deployment, on Flower's simulation runtime: a local SuperLink in simulation mode
with one simulated SuperNode per hospital on Ray, submitted with `flwr run`.
Results land in the run directory (see results.py); Flower's own logs in its
flower/ folder.
"""

import sys

import reporting
import runtime
import settings
from results import new_run_dir


def main(argv=None):
    runtime.interrupt_on_signals()
    parser = settings.make_parser(__doc__)
    cfg, _ = settings.parse(parser, argv)
    try:
        cfg.run_dir = str(new_run_dir(cfg.run_dir))
    except FileExistsError as error:
        parser.error(str(error))
    console = reporting.make_console()
    console.print(
        f"[bold]SecureHealth-ML[/] simulation: {cfg.num_clients} hospitals, "
        f"{cfg.rounds} rounds, privacy budget epsilon {cfg.epsilon:g} "
        f"(delta {cfg.delta:g}) per hospital"
    )
    return runtime.run_federation(
        cfg,
        console,
        superlink_args=["--simulation", "--insecure"],
        federation_config=[f"num-supernodes={cfg.num_clients}", "client-resources-num-cpus=1"],
    )


if __name__ == "__main__":
    sys.exit(main())
