"""`python simulation.py`: the whole federation on this machine, on Flower's simulation runtime.

Its entry point is `main` (usage: securehealth/commands.py; docs/tutorial/first-simulation.md).
"""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from securehealth import data, display, forecast, settings
from securehealth.config import Settings
from securehealth.data import demonstration
from securehealth.deployment import runtime
from securehealth.privacy.ledger import LedgerError, add_reset_flag
from securehealth.results import (
    DEMO_HOSPITALS_DIR_VARIABLE,
    HOSPITALS_DIR_VARIABLE,
    METRICS_FILE,
    RunDirError,
    lasting_hospitals_dir,
    new_run_dir,
    simulated_hospitals_dir,
    write_json,
)
from securehealth.simulated_ledgers import check_lasting_ledgers, state_dirs


@dataclass(frozen=True)
class Checked:
    """A simulation checked before it starts: what `main` passes from its checks on."""

    lasting: bool  # some hospital's data is not a demonstration's: its ledger lasts
    warnings: list[str | None]  # to print before the run (None: nothing to say)
    outlook: forecast.Forecast | None  # None where the Ray cluster's workers hold the ledgers


def main(description: str, argv: list[str] | None = None) -> int:
    """Run `python simulation.py`: the whole federation on this machine.

    Parameters
    ----------
    description : str
        The command's usage text, shown by --help.
    argv : list[str] | None
        The command line without the program's name; None: sys.argv's.

    Returns
    -------
    int
        The exit code: how the run ended (with --plan: 1 if the run would be refused).
    """
    runtime.start_launcher()
    parser = simulation_parser(description)
    cfg, args = settings.parse(parser, argv, simulation=True)
    data.locate(cfg)
    console = display.make_console()
    if args.make_twin:
        return write_twin(cfg, Path(args.make_twin), parser, console)
    checked = check_simulation(parser, cfg, args)
    for warning in filter(None, checked.warnings):
        console.print(f"[yellow]Warning: {escape(warning)}[/]", soft_wrap=True)
    if args.plan:
        ledgers = lasting_hospitals_dir() if checked.lasting else None
        display.print_plan(cfg, checked.outlook, ledgers, console)
        return 0 if checked.outlook.training else 1  # 1: the planned run would be refused
    exit_code, metrics = run_simulation(cfg, checked.lasting, console)
    if metrics is None:
        return exit_code
    if args.baselines:
        add_baselines(cfg, metrics, console)
    display.print_summary(metrics, cfg.run_dir, console)
    return exit_code


def simulation_parser(description: str) -> argparse.ArgumentParser:
    """The command line of simulation.py: every setting and the simulation's own flags."""
    parser = settings.make_parser(description)
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also train the baselines (pooled and FedAvg without DP, each hospital "
        "alone with DP) and compare them in the summary and report",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print what each hospital would train with and spend in this run, and the "
        "forecast, then exit (1 if that run would be refused): nothing is trained or spent",
    )
    parser.add_argument(
        "--make-twin",
        metavar="FOLDER",
        help="write a synthetic twin of --data-dir's data dictionary into the new FOLDER "
        "(no patient's row is read), to rehearse every command on it for free, then exit",
    )
    settings.add_unaccounted_flag(parser)
    add_reset_flag(parser)
    return parser


def check_simulation(
    parser: argparse.ArgumentParser, cfg: Settings, args: argparse.Namespace
) -> Checked:
    """Check the data, the hospitals' ledgers and the forecast, and make the run directory.

    Exits 2 with one line where the run cannot start; with --plan nothing is created.
    """
    outlook = None
    try:
        if args.baselines:
            settings.check_accounted(cfg, args.unaccounted_privacy_spend, "--baselines")
        # Demonstrations' hospitals start afresh in each run (data/demonstration.py).
        demonstrations = demonstration.hospitals_demonstrating(cfg)
        lasting = not all(demonstrations)
        if args.plan:
            check_plan(cfg, args, lasting)
        warnings = data.check_all(cfg)
        check_lasting_ledgers(cfg, args.reset_ledger, demonstrations)
        if not (cfg.ray_address and lasting):  # else the cluster's workers hold the ledgers
            outlook = forecast.forecast_here(cfg, state_dirs(cfg, demonstrations), spend=args.plan)
            if outlook.training == 0 and not args.plan:
                raise LedgerError(outlook.refusal(lasting_hospitals_dir()))
            warnings.append(outlook.warning)
        if not args.plan:
            cfg.run_dir = str(new_run_dir(cfg.run_dir, overwrite=args.overwrite))
    except (settings.SettingsError, data.DataError, RunDirError, LedgerError) as error:
        parser.error(str(error))
    return Checked(lasting=lasting, warnings=warnings, outlook=outlook)


def run_simulation(
    cfg: Settings, lasting: bool, console: Console
) -> tuple[int, dict[str, Any] | None]:
    """Say what will run, and run it on Flower's simulation runtime.

    Returns runtime.run_federation's (exit code, metrics or None).
    """
    hospitals_dir = simulated_hospitals_dir(not lasting, cfg.run_dir)
    where = f"the Ray cluster at {cfg.ray_address}" if cfg.ray_address else "this machine"
    console.print(
        f"[bold]SecureHealth-ML[/] simulation on {where}: {cfg.num_clients} hospitals, "
        f"{cfg.rounds} rounds, privacy budget epsilon {cfg.epsilon:g} "
        f"(delta {cfg.delta:g}, {cfg.adjacency}) per hospital; secure aggregation "
        f"{cfg.secure_aggregation}; hospitals' privacy ledgers in "
        + (
            f"${HOSPITALS_DIR_VARIABLE} of the Ray cluster's workers"
            if cfg.ray_address
            else str(hospitals_dir)
        )
        + ("" if lasting else " (a demonstration's data: nothing lasting is spent)")
    )
    return runtime.run_federation(
        cfg,
        console,
        superlink_args=["--simulation", "--insecure"],
        federation_config=[
            f"num-supernodes={cfg.num_clients}",
            f"client-resources-num-cpus={cfg.client_cpus}",
            f"client-resources-num-gpus={cfg.client_gpus}",
        ],
        # Flower's simulation engine calls ray.init(), which joins the cluster named
        # in RAY_ADDRESS; "local" starts a private one even where `ray start` runs.
        environment={
            "RAY_ADDRESS": cfg.ray_address or "local",
            # A private Ray of this machine listens on loopback only (Ray's own
            # setting: its non-cluster mode, the default on macOS and Windows).
            **({} if cfg.ray_address else {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}),
            # On an existing Ray cluster its workers have their own environment:
            # start it with HOSPITALS_DIR_VARIABLE set (docs/how-to/ray-cluster.md).
            **({HOSPITALS_DIR_VARIABLE: str(hospitals_dir)} if lasting else {}),
            DEMO_HOSPITALS_DIR_VARIABLE: str(simulated_hospitals_dir(True, cfg.run_dir)),
        },
    )


def write_twin(
    cfg: Settings, folder: Path, parser: argparse.ArgumentParser, console: Console
) -> int:
    """Write a synthetic twin of the csv data dictionary into `folder` (--make-twin; twin.py).

    Returns exit code 0; exits 2 with one line where there is no data dictionary to twin.
    """
    from securehealth.data.csv_files import csv_paths
    from securehealth.data.split import hospital_sizes
    from securehealth.data.twin import make_twin

    try:
        if cfg.dataset != "csv":
            raise data.DataError(
                "--make-twin twins your own data dictionary: give --dataset csv --data-dir "
                "DIR (the folder with schema.json); a bundled data set is free to use as it is"
            )
        schema_file = csv_paths(cfg)[0]
        twin = make_twin(schema_file, folder, vars(cfg))
        sizes = hospital_sizes(cfg.num_patients, cfg.num_clients)
    except data.DataError as error:
        parser.error(str(error))
    console.print(
        f"Wrote a synthetic twin of {escape(str(schema_file))} to {escape(str(twin))}: "
        f"{cfg.num_clients} hospitals of {'/'.join(map(str, sizes))} invented patients "
        f"(--num-patients {cfg.num_patients}: give your federation's; 5:3:2 between "
        f"hospitals) and the server's test.csv of {cfg.global_test_patients} "
        f"(--global-test-patients), no row of yours read. "
        f"It is a demonstration: rehearse every command on it for free, e.g. python "
        f"simulation.py --dataset csv --data-dir {escape(str(twin))}",
        soft_wrap=True,
    )
    return 0


def check_plan(cfg: Settings, args: Any, lasting: bool) -> None:
    """Refuse what --plan cannot do: plan where the ledgers are elsewhere, or change a ledger.

    Raises
    ------
    LedgerError
        With --reset-ledger, or where a Ray cluster's workers hold the lasting ledgers.
    """
    if args.reset_ledger is not None:
        raise LedgerError("--plan changes nothing: leave out --reset-ledger")
    if cfg.ray_address and lasting:
        raise LedgerError(
            "--plan reads the hospitals' ledgers, which on a Ray cluster with your own data "
            "are on its workers: run it without --ray-address on a machine that holds them "
            f"(the same ${HOSPITALS_DIR_VARIABLE})"
        )


def add_baselines(cfg: Settings, metrics: dict[str, Any], console: Console) -> None:
    """Train the baselines, add them to metrics.json and write the report again."""
    from securehealth.report import write_report  # loaded only when asked for, after the run
    from securehealth.tools import baselines

    with console.status(
        "Training the baselines: pooled and FedAvg without DP, each hospital alone with DP"
    ):
        metrics["baselines"] = baselines.run_baselines(cfg)
    write_json(Path(cfg.run_dir) / METRICS_FILE, metrics)
    write_report(cfg.run_dir, metrics)
