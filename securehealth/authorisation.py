"""Who may make a hospital spend its privacy budget, proven with signatures.

Flower's open-source Control API is unauthenticated, so a run's arrival proves nothing about who
started it. Two proofs travel with a deployed run instead: the operator's run authorisation
(`authorise`, checked by `verify_run` before anything is trained or written, and good for one run:
`claim`, `first_use`), and each hospital's proof of identity (`prove_identity`, checked by the
server with `identity_proven` before it admits the node as that hospital).
"""

import base64
import binascii
import fcntl
import hashlib
import json
import secrets
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securehealth.state_directory import StateDirectory

APP_DIR = Path(__file__).resolve().parents[1]
SIGNED_RUN_KEYS = ("authorisation", "signature")  # run config keys the signature adds
CLAIM_FILE = "authorisation.json"  # in a run's results folder: the run that used it
# In a hospital's state directory: which run used each of the operator's authorisations.
SIGNATURE = ec.ECDSA(hashes.SHA256())


class Unauthorised(Exception):
    """A run or a hospital could not prove who it comes from; the message says why."""


def _canonical(document):
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def shipped_files(app_dir: Path = APP_DIR) -> list[Path]:
    """The files the app ships (pyproject's fab-include less fab-exclude), pyproject aside.

    pyproject.toml itself is left out because Flower rewrites it in the bundle.
    """
    app_dir = Path(app_dir)
    app = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    excluded = {
        p for pattern in app.get("fab-exclude", []) for p in app_dir.glob(pattern.lstrip("/"))
    }
    return sorted(
        {p for pattern in app["fab-include"] for p in app_dir.glob(pattern.lstrip("/"))} - excluded
    )


def app_digest(app_dir: Path = APP_DIR) -> str:
    """SHA-256 (hex) over the files the app ships.

    It is the same in the operator's checkout and in the copy a SuperNode or SuperExec installs.
    """
    app_dir = Path(app_dir)
    digest = hashlib.sha256()
    for path in shipped_files(app_dir):
        digest.update(_canonical([path.relative_to(app_dir).as_posix()]).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _settings_digest(run_config):
    """SHA-256 of every run config entry but the signature's own: the settings."""
    signed = {k: v for k, v in run_config.items() if k not in SIGNED_RUN_KEYS}
    return hashlib.sha256(_canonical(signed).encode()).hexdigest()


def authorise(run_config: dict, operator_key: Path) -> dict:
    """The run config entries that authorise one run with these settings, signed by the operator.

    server.py calls this before it submits a run. The signed document holds a fresh nonce, the
    time it was issued, the digest of the settings (every run config entry but the signature's
    own) and the digest of the app's code (app_digest).

    Parameters
    ----------
    run_config : dict
        The run's effective settings.
    operator_key : Path
        The operator's private key, a PEM file (certs/operator.key).

    Returns
    -------
    dict
        `authorisation` (the signed document, JSON) and `signature` (base64), to add to the run
        config.
    """
    key = serialization.load_pem_private_key(Path(operator_key).read_bytes(), None)
    document = _canonical(
        {
            "nonce": secrets.token_hex(16),
            "issued": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings_sha256": _settings_digest(run_config),
            "app_sha256": app_digest(),
        }
    )
    signature = key.sign(document.encode(), SIGNATURE)
    return {"authorisation": document, "signature": base64.b64encode(signature).decode()}


def verify_run(
    run_config: Mapping[str, Any], operator_pub: str, app_dir: Path = APP_DIR
) -> dict[str, Any]:
    """The run's authorisation, once it is shown to be signed by the operator for this run.

    The ServerApp and every hospital call this and refuse a run they cannot verify.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        The run config, with the entries `authorise` added.
    operator_pub : str
        The operator's public key, a PEM file (operator.pub).
    app_dir : Path
        The app's installed copy, whose digest must be the one signed.

    Returns
    -------
    dict[str, Any]
        The signed document (nonce, issued, settings_sha256, app_sha256).

    Raises
    ------
    Unauthorised
        With the reason: no authorisation, an unreadable key, a signature that is not the
        operator's, or settings or code other than the ones signed.
    """
    document = str(run_config.get("authorisation", ""))
    if not document:
        raise Unauthorised(
            "the run carries no authorisation from the federation's operator: it was not "
            "started by server.py (someone may have submitted it with `flwr run`)"
        )
    try:
        key = serialization.load_pem_public_key(Path(operator_pub).read_bytes())
        signature = base64.b64decode(str(run_config.get("signature", "")), validate=True)
        key.verify(signature, document.encode(), SIGNATURE)
    except OSError as error:
        raise Unauthorised(f"cannot read the operator's key {operator_pub}: {error}") from None
    except (ValueError, InvalidSignature, binascii.Error):
        raise Unauthorised(
            f"the run's authorisation is not signed by the operator key {operator_pub}"
        ) from None
    authorisation = json.loads(document)
    if _settings_digest(run_config) != authorisation["settings_sha256"]:
        raise Unauthorised("the run's settings differ from the ones the operator signed")
    if app_digest(app_dir) != authorisation["app_sha256"]:
        raise Unauthorised("the run's code differs from the code the operator signed")
    return authorisation


def claim(directory: Path, authorisation: dict[str, Any], run_id: int) -> None:
    """Bind an authorisation to the first run that uses it, with a file created once.

    The file is CLAIM_FILE in `directory` (the run's results folder).

    Raises
    ------
    Unauthorised
        Another run used the same authorisation already (a replay); nothing is written.
    """
    path = Path(directory) / CLAIM_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"nonce": authorisation["nonce"], "run_id": str(run_id)}
    try:
        with open(path, "x") as file:  # exclusive creation: one run wins
            json.dump(record, file)
    except FileExistsError:
        held = json.loads(path.read_text() or "{}")
        if held != record:
            raise Unauthorised(
                f"its authorisation was used by run {held.get('run_id')} already (a replay)"
            ) from None


def _identity_statement(challenge, run_id, node_id, hospital):
    return _canonical(
        {"challenge": challenge, "run": str(run_id), "node": str(node_id), "hospital": hospital}
    ).encode()


def prove_identity(
    private_key: Path, challenge: str, run_id: int, node_id: int, hospital: int
) -> str:
    """The hospital's answer to the server's challenge: its signature (hex) with its enrolled key.

    The signature covers the challenge bound to this run, this Flower node and this hospital
    number, so that it cannot be replayed elsewhere. `private_key` is the hospital's enrolled key,
    an OpenSSH private key file (hospital.key).
    """
    key = serialization.load_ssh_private_key(Path(private_key).read_bytes(), None)
    statement = _identity_statement(challenge, run_id, node_id, hospital)
    return key.sign(statement, SIGNATURE).hex()


def identity_proven(
    public_key: ec.EllipticCurvePublicKey,
    proof: str,
    challenge: str,
    run_id: int,
    node_id: int,
    hospital: int,
) -> bool:
    """Whether `proof` is hospital `hospital`'s signature of the challenge for this run and node.

    It must be made with the private half of `public_key` (a loaded EC public key).
    """
    try:
        signature = bytes.fromhex(proof)
        statement = _identity_statement(challenge, run_id, node_id, hospital)
        public_key.verify(signature, statement, SIGNATURE)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def first_use(state_dir: Path, nonce: str, run_id: int | str) -> bool:
    """Whether run `run_id` may use the operator's authorisation `nonce` at this hospital.

    The first run that presents it may, and no other, so a replayed authorisation spends
    nothing. The use is recorded at once, under a lock, in the register in the hospital's state
    directory (its register_file), for every run, a demonstration's too, so an authorisation used on
    one is never good for a run on its own patients. The register is apart from the privacy
    ledger, whose guarantee a demonstration must not touch; authorisations listed in the ledger's
    own `authorisations` entry count as used too.

    Raises
    ------
    Unauthorised
        The register cannot be read or written.
    """
    from securehealth.results import read_json, write_json

    state = StateDirectory(Path(state_dir))
    path, ledger = state.register_file, state.ledger_file
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            runs = read_json(path) if path.exists() else {}
            earlier = read_json(ledger).get("authorisations", {}) if ledger.exists() else {}
            used = {**earlier, **runs}
            if nonce not in used:
                write_json(path, {**runs, nonce: str(run_id)})
                return True
            return used[nonce] == str(run_id)
    except (OSError, ValueError, AttributeError) as error:
        raise Unauthorised(
            f"its register of the authorisations it used ({path}) cannot be kept "
            f"({type(error).__name__}): restore it from a backup"
        ) from None
