"""The lasting privacy ledgers of the hospitals simulated on this machine.

One per hospital of your own data (results.lasting_hospitals_dir): `state_dirs` says where they
are, `check_lasting_ledgers` checks them before anything trains (simulation.py, sweep.py's
accounted search).
"""

from pathlib import Path

from securehealth import data
from securehealth.config import Settings
from securehealth.privacy.ledger import LedgerError, check_before_start
from securehealth.results import lasting_hospitals_dir
from securehealth.state_directory import LEDGER_FILE


def state_dirs(cfg: Settings, demonstrations: list[bool]) -> list[Path | None]:
    """The simulated hospitals' lasting state directories, their privacy ledgers' homes.

    Parameters
    ----------
    cfg : Settings
        The run's settings.
    demonstrations : list[bool]
        For each hospital, whether its data is a demonstration's (generated or shipped).

    Returns
    -------
    list[Path | None]
        One directory per hospital; None for a demonstration's hospital, which starts afresh
        in every run.
    """
    return [
        None if demo else lasting_hospitals_dir() / f"hospital-{h}"
        for h, demo in enumerate(demonstrations)
    ]


def check_lasting_ledgers(
    cfg: Settings, reset_reason: str | None, demonstrations: list[bool]
) -> None:
    """Check the simulated hospitals' lasting ledgers (your own data) before anything starts.

    A demonstration's hospitals start afresh in every run, and a Ray cluster's workers hold
    their own ledgers: neither is checked here.

    Parameters
    ----------
    cfg : Settings
        The run's settings.
    reset_reason : str or None
        Given, missing ledgers are started afresh with this reason recorded (see
        ledger.check_before_start).
    demonstrations : list[bool]
        For each hospital, whether its data is a demonstration's.

    Raises
    ------
    LedgerError
        A ledger fails its check, or `reset_reason` is given where no ledger is missing or
        only a demonstration's hospitals (or a cluster's) would run.
    """
    if all(demonstrations) or cfg.ray_address:  # a cluster's workers hold theirs
        if reset_reason is not None:
            raise LedgerError(
                "--reset-ledger is for the lasting ledgers of your own data (on this "
                "machine); a demonstration's hospitals (data generated or shipped with "
                "this code) start afresh in every run"
            )
        return
    hospitals_dir = lasting_hospitals_dir()
    lasting = {h: d for h, d in enumerate(state_dirs(cfg, demonstrations)) if d is not None}
    missing = {h: not (d / LEDGER_FILE).exists() for h, d in lasting.items()}
    if reset_reason is not None and not any(missing.values()):
        raise LedgerError(
            f"every simulated hospital's privacy ledger in {hospitals_dir} exists, and a "
            f"budget is never reset while its ledger exists: leave out --reset-ledger"
        )
    for hospital, state_dir in lasting.items():
        reset = reset_reason if missing[hospital] else None
        everyone = data.patients_fingerprint(data.hospital_data(cfg, hospital))
        check_before_start(state_dir, cfg, data.own_file(cfg, hospital), reset, everyone)
