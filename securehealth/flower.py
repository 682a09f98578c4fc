"""Every piece of Flower that SecureHealth-ML uses but Flower does not publish as API.

They are checked against the one Flower version they were written for: importing this module
fails closed, with one line, on any other, and tests/test_flower_internals.py imports each name
below, so that an upgrade breaks here, loudly, rather than somewhere in a run. Everything else in
the package uses Flower's public API. Why each piece is used is noted beside it.
"""

import hashlib
import time
from collections.abc import Callable
from importlib import import_module
from importlib.metadata import version
from types import SimpleNamespace
from typing import Any

# The Flower release these internals were checked against (requirements.txt pins it).
FLOWER_VERSION = "1.42.0"

if version("flwr") != FLOWER_VERSION:
    raise ImportError(
        f"SecureHealth-ML relies on Flower {FLOWER_VERSION}'s internals (securehealth/"
        f"flower.py) but flwr {version('flwr')} is installed: "
        f"pip install -r requirements.txt"
    )

# ErrorCode: the code of the error reply that replaces a node's malformed reply.
from flwr.common.constant import ErrorCode  # noqa: E402

# RECORD_KEY_CONFIGS tells a SecAgg+ stage of a training message from a plain one (a hospital
# that expects secure aggregation never sends its update in the clear).
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS  # noqa: E402

# Flower's Message records to and from the legacy NumPyClient types, where the product speaks to
# nodes itself, outside the strategy: admission, the request for the operating point's
# histograms, the end-of-run notice, and checking a reply before Flower's own workflow decodes it.
from flwr.compat.common.recorddict_compat import (  # noqa: E402
    evaluateins_to_recorddict,
    getpropertiesins_to_recorddict,
    getpropertiesres_to_recorddict,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
    recorddict_to_getpropertiesins,
    recorddict_to_getpropertiesres,
)

# Flower's command -> (module with its app installer, module with its CLI entry point). The
# launchers in deployment/pinning.py wrap the installer (install_from_fab) to refuse an app that
# differs from the approved copy, and the ClientApp's task input (pull_task_input) to refuse a run
# that names another installed app than the one shipped: Flower has no hook for this.
APP_LAUNCHERS = {
    "flwr-clientapp": ("flwr.supernode.runtime.run_clientapp", "flwr.supernode.cli.flwr_clientapp"),
    "flwr-serverapp": ("flwr.superlink.runtime.run_serverapp", "flwr.superlink.cli.flwr_serverapp"),
}
# (module with the SuperNode's pull loop, module with flower_supernode). The loop's waits are
# fixed in code (3 s between asks for a message, 0.5 s while its ClientApp's reply is pending);
# SecAgg+ sends each hospital four messages a round, each waiting for the next ask, so
# run_supernode shortens them.
SUPERNODE = ("flwr.supernode.start_client_internal", "flwr.supernode.cli.flower_supernode")
# (module with the SuperLink's app factory create_app, module with flower_superlink), wrapped by
# deployment/superlink_gate.py to serve only the Fleet API to the network.
SUPERLINK_APP = ("flwr.superlink.main", "flwr.superlink.cli")

__all__ = [
    "APP_LAUNCHERS",
    "FLOWER_VERSION",
    "RECORD_KEY_CONFIGS",
    "SUPERLINK_APP",
    "SUPERNODE",
    "ErrorCode",
    "evaluateins_to_recorddict",
    "getpropertiesins_to_recorddict",
    "getpropertiesres_to_recorddict",
    "check_loaded_as_shipped",
    "install_app_check",
    "load_flower_command",
    "recorddict_to_evaluateres",
    "recorddict_to_fitres",
    "recorddict_to_getpropertiesins",
    "recorddict_to_getpropertiesres",
    "run_flower_command",
    "run_supernode",
    "wrap_superlink_app",
]


def install_app_check(command: str, check: Callable[[bytes], None]) -> None:
    """Make Flower's `command` refuse to install, or load, any app but the shipped one.

    A ClientApp is loaded from the folder Flower names after the run's app id, version and hash,
    as the server sends them: for flwr-clientapp those must also be the shipped bytes' own
    (check_loaded_as_shipped), or a server could have another installed app (an older one, or any
    folder through "..") loaded.

    Parameters
    ----------
    command : str
        flwr-clientapp or flwr-serverapp.
    check : Callable[[bytes], None]
        Called with the app bundle's bytes before Flower installs it; raises to refuse it.
    """
    installer = import_module(APP_LAUNCHERS[command][0])
    install = installer.install_from_fab

    def install_if_approved(fab_bytes, *args, **kwargs):
        check(fab_bytes)
        return install(fab_bytes, *args, **kwargs)

    installer.install_from_fab = install_if_approved
    if command == "flwr-clientapp":
        pull_task_input = installer.pull_task_input

        def pull_as_shipped(*args, **kwargs):
            message, context, run, fab = pull_task_input(*args, **kwargs)
            check_loaded_as_shipped(run.fab_id, run.fab_version, fab.hash_str, fab.content)
            return message, context, run, fab

        installer.pull_task_input = pull_as_shipped


def check_loaded_as_shipped(fab_id: str, fab_version: str, fab_hash: str, content: bytes) -> None:
    """Refuse a run whose app id, version or hash are not those of the bundle it shipped.

    Flower installs by the bytes, but loads by the names.

    Raises
    ------
    PermissionError
        The names differ from the bundle's own (`content`, the bundle's bytes).
    """
    from flwr.cli.config_utils import get_fab_metadata

    shipped = (*get_fab_metadata(content), hashlib.sha256(content).hexdigest())
    if (fab_id, fab_version, fab_hash) != shipped:
        raise PermissionError(
            "the run names another app than the one it shipped (id, version or hash); "
            "it was not run"
        )


def load_flower_command(command: str) -> Callable[[], None]:
    """Import Flower's `command` (flwr-clientapp or flwr-serverapp); return its entry point."""
    return getattr(import_module(APP_LAUNCHERS[command][1]), command.replace("-", "_"))


def run_flower_command(command: str) -> None:
    """Run Flower's `command` (flwr-clientapp or flwr-serverapp) in this process."""
    load_flower_command(command)()


def wrap_superlink_app(wrap: Callable[[Any], Any]) -> None:
    """Run flower-superlink in this process with wrap(app) applied to its web app."""
    factory_module = import_module(SUPERLINK_APP[0])
    create_app = factory_module.create_app

    def create_wrapped_app(*args, **kwargs):
        return wrap(create_app(*args, **kwargs))

    factory_module.create_app = create_wrapped_app
    import_module(SUPERLINK_APP[1]).flower_superlink()


def run_supernode(poll_interval: float) -> None:
    """Run flower-supernode in this process, its pull loop's fixed waits cut to `poll_interval`.

    The waits are 3 s between asks for a message and 0.5 s for a pending reply; `poll_interval`
    is in seconds.
    """
    pull_loop = import_module(SUPERNODE[0])

    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, poll_interval))

    pull_loop.time = SimpleNamespace(sleep=sleep)  # the loop uses `time` only to wait
    import_module(SUPERNODE[1]).flower_supernode()
