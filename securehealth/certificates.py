"""TLS for deployment: a local certificate authority (CA) and a server certificate
signed by it, made with the `cryptography` package.

The server presents certs/server.crt (its private key certs/server.key never leaves
the server); every hospital verifies it with a copy of certs/ca.crt. The CA's own
key (certs/ca.key) signs new server certificates and should be kept offline.
Private keys are written with mode 0600 and are git-ignored.

Run authorisation: the federation's operator signs every run it starts with
certs/operator.key (authorisation.py); hospitals check the signature with a copy of
certs/operator.pub, so a run submitted by anyone else trains nowhere.

Hospital authentication: each hospital's identity is an EC key pair
(`make_hospital_key`); the server's operator enrolls the public halves, one file
per hospital named after its number (hospital-N.pub).
"""

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, SERVER_CERT, SERVER_KEY, CA_KEY = "ca.crt", "server.crt", "server.key", "ca.key"
OPERATOR_KEY, OPERATOR_PUB = "operator.key", "operator.pub"  # signs runs; hospitals verify
ENROLLED_KEY_NAME = re.compile(r"hospital-(\d+)\.pub")
# Set by `python server.py` for its own ServerApp, never by whoever submits a run: the
# operator's public key (runs must be signed with its private half) and the folder
# of enrolled hospitals' keys (hospital-N.pub).
OPERATOR_PUB_VARIABLE = "SECUREHEALTH_OPERATOR_PUB"
ENROLLED_KEYS_VARIABLE = "SECUREHEALTH_ENROLLED_KEYS"
VALID_DAYS = 825  # the longest validity browsers and TLS libraries still accept


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path, key, key_format=serialization.PrivateFormat.PKCS8):
    """Create the file with mode 0600 from the start: never readable by others."""
    pem = key.private_bytes(serialization.Encoding.PEM, key_format, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _subject_alternative_name(hosts):
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(directory: Path, hosts: list[str]) -> Path:
    """Create ca.crt, ca.key, server.crt and server.key in `directory`, the server
    certificate valid for each of `hosts` (names or IP addresses), and the operator's
    run-signing key (make_operator_key). Existing files are never overwritten:
    hospitals may already trust the old CA."""
    directory = Path(directory)
    names = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, OPERATOR_KEY, OPERATOR_PUB)
    existing = [n for n in names if (directory / n).exists()]
    if existing:
        raise FileExistsError(
            f"{directory / existing[0]} already exists; hospitals may trust it. "
            f"Delete {directory} deliberately to make new certificates"
        )
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    validity = {"not_valid_before": now, "not_valid_after": now + datetime.timedelta(VALID_DAYS)}

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("SecureHealth-ML federation CA")
    ca_cert = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, **validity)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder(subject_name=_name(hosts[0]), issuer_name=ca_name, **validity)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(_subject_alternative_name(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    _write_key(directory / CA_KEY, ca_key)
    _write_key(directory / SERVER_KEY, server_key)
    (directory / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / SERVER_CERT).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    make_operator_key(directory)
    return directory


def make_operator_key(directory: Path) -> Path:
    """Create the operator's run-signing key pair (EC P-256, PEM): operator.key, mode
    0600, stays with the server's operator; operator.pub goes to every hospital with
    ca.crt. For certificates made before run signing existed, `--make-certs` adds it."""
    directory = Path(directory)
    for name in (OPERATOR_KEY, OPERATOR_PUB):
        if (directory / name).exists():
            raise FileExistsError(
                f"{directory / name} already exists; hospitals may trust it. Delete it "
                f"deliberately to make a new one"
            )
    key = ec.generate_private_key(ec.SECP256R1())
    _write_key(directory / OPERATOR_KEY, key)
    (directory / OPERATOR_PUB).write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return directory / OPERATOR_PUB


def make_hospital_key(private_key_path: Path) -> Path:
    """Create a hospital's identity for SuperNode authentication: an EC (P-384) key
    pair in OpenSSH format, the private key with mode 0600 and the public key beside
    it (.pub), for the server's operator to enroll. Never overwrites a key."""
    private_key_path = Path(private_key_path)
    public_key_path = private_key_path.with_suffix(".pub")
    for path in (private_key_path, public_key_path):
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; the server may have enrolled it. Delete it "
                f"deliberately to make a new identity"
            )
    private_key_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_key(private_key_path, key, serialization.PrivateFormat.OpenSSH)
    public_key_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return public_key_path


def check_hospital_keys(directory: str, num_clients: int) -> dict[int, Path]:
    """The enrolled hospitals' public keys in `directory`: {hospital number: path}.
    Each file is named hospital-N.pub after the number the key is enrolled for, for
    N in 0..num_clients-1, and holds a key the SuperLink accepts (EC on a NIST curve,
    OpenSSH format); ValueError, naming the file, otherwise."""
    paths = sorted(Path(directory).glob("*.pub"))
    if not paths:
        raise ValueError(
            f"no hospital public keys (*.pub) in {directory}: each hospital makes one with "
            f"`python client.py --client-id N --make-key` and sends you the .pub file"
        )
    enrolled, seen = {}, set()
    for path in paths:
        name = ENROLLED_KEY_NAME.fullmatch(path.name)
        if not name or int(name[1]) >= num_clients:
            raise ValueError(
                f"{path}: name each enrolled key hospital-N.pub after the number of the "
                f"hospital it belongs to, N in 0..{num_clients - 1}"
            )
        key = load_hospital_key(path).public_numbers()
        if key in seen:
            raise ValueError(f"{path} holds the same key as another hospital's file")
        seen.add(key)
        enrolled[int(name[1])] = path
    return enrolled


def load_hospital_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A hospital's public key (OpenSSH, elliptic curve), or ValueError naming the file."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except ValueError as error:
        raise ValueError(f"{path} is not an OpenSSH public key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path} is not an elliptic-curve key: make it with --make-key")
    return key
