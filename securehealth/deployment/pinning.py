"""A hospital runs only the code it approved, and so does the server.

Before Flower installs a shipped app, every file in it must be identical to this copy of
the code (`differences`); anything else is refused and never runs. `install_launcher`
writes the `flwr-clientapp` (or `flwr-serverapp`) that Flower starts and that checks the
app first (`run_pinned`), in a child of the command's zygote where one runs (zygote.py,
which imports what `preload` names once). Why and how: docs/explanation/threat-model.md.
"""

import io
import json
import os
import sys
import tomllib
import zipfile
from datetime import UTC, datetime
from importlib import import_module
from pathlib import Path, PurePosixPath

from securehealth.authorisation import shipped_files
from securehealth.flower import install_app_check, load_flower_command, run_flower_command

APP_DIR = Path(__file__).resolve().parents[2]
# Flower's command -> the component of the app it runs ([tool.flwr.app.components]).
COMPONENTS = {"flwr-clientapp": "clientapp", "flwr-serverapp": "serverapp"}
REFUSED = "untrusted-app"  # the status a refused app leaves in the hospital's status file


def differences(bundle_bytes: bytes, app_dir: Path = APP_DIR) -> list[str]:
    """List the files in which a shipped app bundle differs from `app_dir`.

    Parameters
    ----------
    bundle_bytes : bytes
        The shipped app bundle (a FAB: a zip file).
    app_dir : Path
        The approved copy of the app.

    Returns
    -------
    list[str]
        The bundle's files that are not exactly as in `app_dir` (pyproject.toml: not the
        same once parsed, as Flower rewrites its layout) or that lie outside it, and the
        files `app_dir` ships that the bundle lacks ("NAME (missing)"); [] if none.
    """
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
    zygote: str | None = None,
) -> Path:
    """Write a launcher for Flower's `command` that runs only this copy of the app.

    Put the returned `bin_dir` first on the PATH of the process that starts `command`.

    Parameters
    ----------
    bin_dir : Path
        The folder to write the launcher in (made if missing).
    status_file : Path | None
        The hospital's status file, where a refusal is also recorded; None on the server.
    pinned : bool
        False: the launcher runs whatever app is shipped (client.py --trust-server-app).
    command : str
        flwr-clientapp for a hospital's SuperNode, flwr-serverapp for the server's SuperLink.
    zygote : str | None
        The socket name of the command's zygote (zygote.py), which runs each message in a
        child it forks; None, or where it does not answer: the launcher runs it itself.

    Returns
    -------
    Path
        `bin_dir`.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / command
    status = str(status_file) if status_file else None
    launcher.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.append({str(APP_DIR)!r})  # last: nothing in it shadows a library\n"
        "from securehealth.deployment import zygote\n"
        f"code = zygote.hand_over({zygote!r}, sys.argv) if {zygote!r} else None\n"
        "if code is not None:\n"
        "    sys.exit(code)\n"
        "from securehealth.deployment import pinning\n"
        "sys.path.pop()\n"
        "pinning.forget_this_copy()\n"
        f"pinning.run_pinned({command!r}, {status!r}, pinned={pinned!r})\n"
    )
    launcher.chmod(0o755)
    return bin_dir


def run_pinned(command: str, status_file: str | None = None, pinned: bool = True) -> None:
    """Run Flower's `command`, installing and loading a shipped app only if it matches this copy.

    securehealth/flower.py wraps Flower's installer; tests/test_security.py proves the
    refusals. A hospital (with a `status_file`) keeps the details of a refusal to itself:
    its path and files are none of the server's business.

    Raises
    ------
    PermissionError
        In Flower's installer, where the app differs from this copy (and `pinned`).
    """
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


def preload(command: str) -> None:
    """Import Flower's `command` and everything this copy's app for it imports.

    What a zygote does once, before it forgets this copy (`forget_this_copy`): the libraries
    stay loaded for its children, the app's own modules do not.
    """
    load_flower_command(command)
    pyproject = tomllib.loads((APP_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    component = pyproject["tool"]["flwr"]["app"]["components"][COMPONENTS[command]]
    import_module(component.partition(":")[0])


def forget_this_copy() -> None:
    """Unload this copy's package from the launcher's process.

    The app then runs from Flower's install of what was shipped, never from this copy.
    """
    for name in [m for m in sys.modules if m.split(".")[0] == "securehealth"]:
        del sys.modules[name]


def _record_refusal(status_file, reason):
    """Record a refusal in the status file that the hospital's client.py watches.

    The file is written whole, then renamed, as results.write_json does, without
    importing the app's modules.
    """
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    partial = status_file.with_name(f".{status_file.name}.partial")
    partial.write_text(json.dumps({**status, "status": REFUSED, "reason": reason, "utc": now}))
    os.replace(partial, status_file)
