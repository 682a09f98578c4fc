"""Effective settings: config.py's defaults overridden by flags or a Flower run config.

`resolve` validates them once, so that bad input stops early with one clear line
instead of a traceback halfway through training; `make_parser` and `parse` give
every script its --name flags.
"""

import argparse
import difflib
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import fields
from enum import StrEnum
from typing import Any, NoReturn

from securehealth import operating_point
from securehealth.aggregation import AGGREGATIONS
from securehealth.config import Settings
from securehealth.data import SOURCES
from securehealth.data.schema import MISSING_MODES
from securehealth.privacy.report import Adjacency
from securehealth.text import quoted, shortened

DEFAULTS: dict[str, Any] = {setting.name: setting.default for setting in fields(Settings)}
HELP = {setting.name: setting.metadata["help"] for setting in fields(Settings)}

SWITCH = ("on", "off", "auto")
FLOAT32_MAX = 3.4028234663852886e38  # the model's weights are float32

RULES = {
    "num_clients": (lambda v: v >= 1, "must be at least 1"),
    "rounds": (lambda v: v >= 1, "must be at least 1"),
    "local_epochs": (lambda v: v >= 1, "must be at least 1"),
    "server_momentum": (lambda v: 0 <= v < 1, "must be in [0, 1) (0 = plain FedAvg)"),
    "join_timeout": (lambda v: v >= 1, "must be at least 1 (seconds)"),
    "min_available_clients": (lambda v: v >= 1, "must be at least 1"),
    "min_fit_clients": (lambda v: v >= 1, "must be at least 1"),
    "dataset": (lambda v: v in SOURCES, f"must be one of {', '.join(SOURCES)}"),
    "missing_values": (lambda v: v in MISSING_MODES, f"must be one of {', '.join(MISSING_MODES)}"),
    "num_patients": (lambda v: v >= 1, "must be at least 1"),
    "test_fraction": (lambda v: 0 < v < 1, "must be between 0 and 1 (exclusive)"),
    "global_test_patients": (lambda v: v >= 50, "must be at least 50"),
    "hidden_layers": (lambda v: all(w >= 1 for w in v), "widths must be >= 1"),
    "decision_threshold": (
        lambda v: operating_point.setting_problem(v) is None,
        operating_point.setting_problem(""),
    ),
    "batch_size": (lambda v: v >= 1, "must be at least 1"),
    "learning_rate": (lambda v: v > 0, "must be > 0"),
    "momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "max_grad_norm": (lambda v: v > 0, "must be > 0"),
    "epsilon": (lambda v: v > 0, "must be > 0 (it is the total privacy budget)"),
    "delta": (lambda v: 0 < v < 1, "must be between 0 and 1 (exclusive), e.g. 1e-5"),
    "adjacency": (
        lambda v: v in set(Adjacency),
        "must be 'replace-one' or 'add-remove' (see docs/explanation/privacy-guarantee.md)",
    ),
    "seed": (lambda v: v >= 0, "must be >= 0"),
    "secure_aggregation": (lambda v: v in SWITCH, "must be 'on', 'off' or 'auto'"),
    "max_patients": (lambda v: v >= 1, "must be at least 1"),
    "aggregation": (lambda v: v in AGGREGATIONS, f"must be one of {', '.join(AGGREGATIONS)}"),
    "max_update_norm": (lambda v: v > 0, "must be > 0"),
    "max_weight": (
        lambda v: 0 < v <= FLOAT32_MAX,
        f"must be > 0 and at most {FLOAT32_MAX:g} (the largest weight the model can hold)",
    ),
    "client_cpus": (lambda v: v >= 1, "must be a whole number >= 1 (Flower 1.42's limit)"),
    "client_gpus": (lambda v: v >= 0, "must be >= 0 (fractions share a GPU)"),
}


class SettingsError(ValueError):
    """A setting has an invalid value; the message names it and says what is allowed."""


def _convert(name, raw):
    """Turn a command-line or JSON value into the type of config.py's default."""
    default = DEFAULTS[name]
    try:
        if isinstance(default, tuple):
            if isinstance(raw, (list, tuple)):
                return tuple(int(w) for w in raw)
            # "32,16", or as config.py writes it, "(32, 16)"; "" or "()": none
            return tuple(int(w) for w in str(raw).replace(" ", "").strip("()").split(",") if w)
        if isinstance(default, float):
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        if isinstance(default, int):
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        return str(raw)
    except (TypeError, ValueError):
        kind = {tuple: "comma-separated integers, e.g. 32,16", float: "a finite number"}
        expected = kind.get(type(default), "an integer")
        raise SettingsError(f"{name} must be {expected}, got {quoted(raw)}") from None


def resolve(overrides: dict[str, Any] | None = None) -> Settings:
    """Return config.py's defaults updated with `overrides`, converted and validated.

    Parameters
    ----------
    overrides : dict, optional
        Settings by name; values may be text (a flag) or JSON/run-config values.

    Returns
    -------
    Settings
        The run's settings.

    Raises
    ------
    SettingsError
        On an unknown name, a value of the wrong type, a value outside its range, or
        settings that cannot go together; the message names the setting.
    """
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise SettingsError(_unknown_message(unknown[0]))
    values = dict(DEFAULTS)
    values.update({k: _convert(k, v) for k, v in overrides.items()})
    for name, (is_valid, requirement) in RULES.items():
        if not is_valid(values[name]):
            raise SettingsError(f"{name} {requirement}, got {quoted(values[name])}")
    if not values["min_fit_clients"] <= values["min_available_clients"] <= values["num_clients"]:
        raise SettingsError(
            "min_fit_clients <= min_available_clients <= num_clients must hold, got "
            f"{values['min_fit_clients']}, {values['min_available_clients']}, "
            f"{values['num_clients']}: lower the first two"
        )
    sites = getattr(SOURCES[values["dataset"]], "SITES", ())
    if sites and values["num_clients"] != len(sites):
        raise SettingsError(
            f"dataset {values['dataset']} has {len(sites)} hospitals, one per site "
            f"({', '.join(sites)}): num_clients must be {len(sites)}, got "
            f"{values['num_clients']} (the scripts set it when --num-clients is not given)"
        )
    if values["missing_values"] == "drop" and values["adjacency"] == "replace-one":
        raise SettingsError(
            "missing_values 'drop' cannot keep replace-one's promise: a hospital releases "
            "how many patients it trains on, and replacing one patient's record by one with "
            "a gap would change that count; use 'indicator' (or 'fail'), or adjacency "
            "add-remove"
        )
    if values["aggregation"] != "fedavg" and values["secure_aggregation"] == "on":
        raise SettingsError(
            f"aggregation {values['aggregation']!r} needs each hospital's update, which "
            f"secure aggregation hides: set secure_aggregation off, or aggregation fedavg"
        )
    return Settings(**{**values, "adjacency": Adjacency(values["adjacency"])})


def decide_auto(cfg: Settings, simulation: bool = False) -> Settings:
    """Return `cfg` with secure_aggregation "auto" decided: on between machines, off in simulation.

    A simulation's machine holds every hospital's data, so there is nothing to hide from
    the server, and the protocol costs three more exchanges a round.
    """
    if cfg.secure_aggregation != "auto":
        return cfg
    return resolve({**vars(cfg), "secure_aggregation": "off" if simulation else "on"})


UNACCOUNTED_FLAG = "--unaccounted-privacy-spend"


def add_unaccounted_flag(parser: argparse.ArgumentParser) -> None:
    """Add the flag that lets a tool train on real (csv) patients outside their privacy ledgers."""
    parser.add_argument(
        UNACCOUNTED_FLAG,
        dest="unaccounted_privacy_spend",
        action="store_true",
        help="allow this on dataset csv: it trains on the hospitals' patients (partly "
        "without DP) and none of it is charged to their privacy ledgers",
    )


def check_accounted(cfg: Settings, allowed: bool, what: str) -> None:
    """Refuse `what` on real patients unless the operator accepted its unaccounted privacy spend.

    A demonstration's data (generated, or shipped with this code:
    securehealth/data/demonstration.py) is free to use.

    Parameters
    ----------
    cfg : Settings
        The run's settings (its data sets are checked).
    allowed : bool
        Whether the operator passed --unaccounted-privacy-spend.
    what : str
        The tool, as the error message names it.

    Raises
    ------
    SettingsError
        If the data are real patients' and `allowed` is false.
    """
    from securehealth.data.demonstration import all_demonstration

    if not allowed and not all_demonstration(cfg):
        raise SettingsError(
            f"{what} trains on the hospitals' own patients outside their privacy "
            f"ledgers (partly without DP): pass {UNACCOUNTED_FLAG} to accept that this "
            f"spend is not accounted, or use data generated or shipped with this code"
        )


def _unknown_message(name):
    close = difflib.get_close_matches(name, DEFAULTS, n=1)
    hint = (
        f" (did you mean {close[0]}?)" if close else " (see securehealth/config.py for the names)"
    )
    return f"unknown setting {quoted(name)}{hint}"


def _run_config_value(value):
    """Return a setting as a Flower run config value (bool, int, float or str).

    A tuple of layer widths becomes "32,16".
    """
    if isinstance(value, StrEnum):
        return str(value)
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def as_text(value: Any) -> str:
    """A setting's value as a script's flag takes it (layer widths as "32,16")."""
    return str(_run_config_value(value))


def to_run_config(cfg: Settings) -> dict:
    """Return the settings as Flower's typed run config.

    One key per setting, as in pyproject.toml's [tool.flwr.app.config].
    """
    return {name: _run_config_value(value) for name, value in vars(cfg).items()}


def from_run_config(run_config: Mapping[str, Any]) -> Settings:
    """Return the settings a Flower app was started with, converted and validated.

    They are its run config's keys: those of pyproject.toml, with
    `flwr run --run-config` overrides. Raises SettingsError as `resolve` does.
    """
    return resolve({name: run_config[name] for name in DEFAULTS if name in run_config})


def check_defaults(run_config: Mapping[str, Any], overridden: Collection[str]) -> None:
    """Refuse a default from pyproject.toml's [tool.flwr.app.config] that differs from config.py.

    config.py is where defaults live, and a bare `flwr run` must not train with others.

    Parameters
    ----------
    run_config : Mapping
        The Flower run config the app was started with.
    overridden : Collection of str
        The keys that `flwr run --run-config`, or simulation.py and server.py, set.

    Raises
    ------
    SettingsError
        If a key not in `overridden` has a value other than config.py's default.
    """
    for name, default in DEFAULTS.items():
        if name in run_config and name not in overridden:
            if _convert(name, run_config[name]) != default:
                raise SettingsError(
                    f"pyproject.toml's [tool.flwr.app.config] says {name} = "
                    f"{quoted(run_config[name])} but securehealth/config.py says "
                    f"{_run_config_value(default)!r}: "
                    f"`flwr run` takes its defaults from pyproject.toml, so make them agree "
                    f'(or pass --run-config "{name}=...")'
                )


def epsilon_list(text: str) -> list[float]:
    """A tool's --epsilons ("0.5,1,2"): positive budgets, sorted (an argparse type)."""
    try:
        epsilons = sorted(float(e) for e in text.split(","))
        if min(epsilons) > 0 and all(map(math.isfinite, epsilons)):
            return epsilons
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"needs positive numbers, e.g. 0.5,1,2; got {quoted(text)}")


def positive_int(text: str) -> int:
    """A count such as --seeds: a whole number >= 1 (an argparse type)."""
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"needs a whole number >= 1; got {quoted(text)}")


def positive_float(text: str) -> float:
    """A finite number > 0, such as --search-budget (an argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isfinite(value) and value > 0:
        return value
    raise argparse.ArgumentTypeError(f"needs a number > 0; got {quoted(text)}")


class SettingsParser(argparse.ArgumentParser):
    """A script's command line: a flag per setting it takes, and one-line errors."""

    settings_names: Sequence[str] = ()  # the settings the script takes

    def error(self, message: str) -> NoReturn:
        """Exit with code 2 and one line on stderr.

        Never a usage dump or traceback, nor a huge value echoed back (text.shortened).
        """
        self.exit(2, f"{self.prog}: error: {shortened(message)}\n")


def make_parser(description: str | None, names: Sequence[str] = tuple(DEFAULTS)) -> SettingsParser:
    """Return an argparse parser with a flag for each setting in `names`.

    Each setting is --name or --name-with-dashes; a script offers only the settings it
    really uses, and --overwrite with run_dir.

    Parameters
    ----------
    description : str or None
        The script's --help text.
    names : Sequence of str
        The settings the script takes (by default, all of them).

    Returns
    -------
    SettingsParser
        A parser whose errors are one line and exit code 2; pass it to `parse`.
    """
    parser = SettingsParser(
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.settings_names = names
    group = parser.add_argument_group("settings (defaults from securehealth/config.py)")
    for name in names:
        default = DEFAULTS[name]
        flags = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])
        shown = as_text(default) if isinstance(default, tuple | StrEnum) else default
        group.add_argument(
            *flags,
            dest=name,
            metavar="VALUE",
            help=f"{HELP.get(name, '')} [default: {shown!r}]".replace("%", "%%"),
        )
    if "run_dir" in names:
        group.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the run already in --run-dir (its files are deleted first) "
            "instead of refusing a folder that is not empty",
        )
    return parser


def parse(
    parser: SettingsParser, argv: list[str] | None = None, simulation: bool = False
) -> tuple[Settings, argparse.Namespace]:
    """Parse the command line into the run's settings and the parsed arguments.

    On an unknown flag or an invalid value, exit with code 2 and one line on stderr.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        A parser from `make_parser`, to which the script may have added its own flags.
    argv : list of str, optional
        The arguments; None reads sys.argv.
    simulation : bool
        Whether secure_aggregation "auto" is decided for a simulation (off) or a
        deployment (on).

    Returns
    -------
    tuple of (Settings, argparse.Namespace)
        The validated settings, and every parsed argument (the script's own flags too).
    """
    args, unknown = parser.parse_known_args(argv)
    try:
        if unknown:
            flag = next((u for u in unknown if u.startswith("-")), unknown[0])
            name = flag.lstrip("-").replace("-", "_")
            if name in DEFAULTS:
                raise SettingsError(
                    f"{name} is not this script's to set; it takes: "
                    + ", ".join(parser.settings_names)
                )
            raise SettingsError(_unknown_message(name))
        names = parser.settings_names
        given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
        source = SOURCES.get(given.get("dataset", DEFAULTS["dataset"]))
        if "num_clients" not in given and getattr(source, "SITES", ()):
            given["num_clients"] = len(source.SITES)  # a data set of fixed hospitals
        return decide_auto(resolve(given), simulation), args
    except SettingsError as error:
        parser.error(str(error))
