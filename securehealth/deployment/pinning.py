"""A hospital runs only the code it approved, and so does the server.

In a Flower deployment the server ships the app (this repository's modules) and
every SuperNode runs what it receives: a hostile or compromised server could ship
a client that uploads patient rows. Flower 1.42's own app verification
(`flower-supernode --trusted-entities`) accepts only apps signed through Flower's
hosted platform, which an open-source SuperLink cannot supply. So the hospital pins
the app to its own reviewed copy of the code instead: before Flower installs a
shipped app, every file in it must be identical to the hospital's copy (for
pyproject.toml: the same content once parsed, as Flower rewrites its layout).
Anything else is refused and never runs.

How it is enforced: a SuperNode starts each ClientApp with the first
`flwr-clientapp` command on its PATH; client.py puts the launcher written by
`install_launcher` there, which checks the app before handing it to Flower. The
server's SuperLink starts each ServerApp with `flwr-serverapp` the same way, and
server.py pins it to the operator's checkout: a run submitted with other code (say,
through the Control API) never runs on the server's machine.
"""

import io
import json
import os
import sys
import tomllib
import zipfile
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from securehealth.authorisation import shipped_files
from securehealth.flower import install_app_check, run_flower_command

APP_DIR = Path(__file__).resolve().parents[2]
REFUSED = "untrusted-app"  # the status a refused app leaves in the hospital's status file


def differences(bundle_bytes: bytes, app_dir: Path = APP_DIR) -> list[str]:
    """The files of a shipped app bundle (a FAB, a zip file) that are not exactly as
    in `app_dir`, or that lie outside it, and the files `app_dir` ships that the
    bundle lacks ("(missing)")."""
    differing = []
    with zipfile.ZipFile(io.BytesIO(bundle_bytes)) as bundle:
        shipped = {p.relative_to(app_dir).as_posix() for p in shipped_files(app_dir)}
        absent = sorted({*shipped, "pyproject.toml"} - set(bundle.namelist()))
        differing += [f"{name} (missing)" for name in absent]
        for name in bundle.namelist():
            path = PurePosixPath(name)
            if name.endswith("/") or path.parts[0] == ".info":  # Flower's manifest
                continue
            local = Path(app_dir, *path.parts)
            if path.is_absolute() or ".." in path.parts or not local.is_file():
                differing.append(name)
            elif name == "pyproject.toml":
                shipped = tomllib.loads(bundle.read(name).decode())
                if shipped != tomllib.loads(local.read_text(encoding="utf-8")):
                    differing.append(name)
            elif bundle.read(name) != local.read_bytes():
                differing.append(name)
    return differing


def install_launcher(
    bin_dir: Path,
    status_file: Path | None = None,
    pinned: bool = True,
    command: str = "flwr-clientapp",
) -> Path:
    """Write Flower's `command` (flwr-clientapp for a hospital's SuperNode,
    flwr-serverapp for the server's SuperLink), pinned to this copy of the app
    unless `pinned` is false; put `bin_dir` first on the PATH of the process that
    runs it. Refusals also go to `status_file` (the hospital's), if given."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / command
    status = str(status_file) if status_file else None
    launcher.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.append({str(APP_DIR)!r})  # last: nothing in it shadows a library\n"
        "from securehealth.deployment import pinning\n"
        "sys.path.pop()\n"
        "pinning.forget_this_copy()\n"
        f"pinning.run_pinned({command!r}, {status!r}, pinned={pinned!r})\n"
    )
    launcher.chmod(0o755)
    return bin_dir


def run_pinned(command: str, status_file: str | None = None, pinned: bool = True) -> None:
    """Flower's `command`, installing and loading a shipped app only if it matches
    this copy (securehealth/flower.py wraps Flower's installer; tests/test_security.py
    proves the refusals). A hospital (with a `status_file`) keeps the details of a
    refusal to itself: its path and files are none of the server's business."""
    if pinned:

        def approve(bundle_bytes):
            differing = differences(bundle_bytes)
            if differing:
                reason = (
                    f"the app submitted differs from the approved copy ({APP_DIR}) in "
                    f"{', '.join(differing)}; it was not run"
                )
                if status_file:
                    _record_refusal(Path(status_file), reason)
                    reason = "the app submitted differs from this hospital's approved copy"
                raise PermissionError(reason)

        install_app_check(command, approve)
    run_flower_command(command)


def forget_this_copy() -> None:
    """Unload this copy's package from the launcher's process, so that the app runs
    from Flower's install of what was shipped, never from this copy."""
    for name in [m for m in sys.modules if m.split(".")[0] == "securehealth"]:
        del sys.modules[name]


def _record_refusal(status_file, reason):
    """Tell the hospital's launcher (client.py), which watches its status file
    (written whole, then renamed, as results.write_json does, without importing the
    app's modules)."""
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    partial = status_file.with_name(f".{status_file.name}.partial")
    partial.write_text(json.dumps({**status, "status": REFUSED, "reason": reason, "utc": now}))
    os.replace(partial, status_file)
