"""TLS, run signing and hospital identities for deployment, made with the `cryptography` package.

make_certificates: a local CA (ca.key, to keep offline), the server's certificate and key, and the
operator's run-signing key pair (make_operator_key; authorisation.py); every hospital gets copies
of ca.crt and operator.pub. make_hospital_key: a hospital's identity, whose public half the
operator enrolls as hospital-N.pub. Private keys are written with mode 0600 and are git-ignored.
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
    """Create the CA, the server's certificate and the operator's run-signing key in `directory`.

    The server presents server.crt (its key server.key never leaves the server) and every
    hospital verifies it with a copy of ca.crt; the CA's own key, ca.key, signs new server
    certificates and should be kept offline.

    Parameters
    ----------
    directory : Path
        Where to write ca.crt, ca.key, server.crt, server.key, operator.key and operator.pub.
    hosts : list[str]
        The names or IP addresses the server certificate is valid for; the first is its subject.

    Returns
    -------
    Path
        `directory`.

    Raises
    ------
    FileExistsError
        One of the files exists already: hospitals may trust the old CA, so none is overwritten.
    """
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
    ca_key, ca_cert = _certificate_authority(validity)
    server_key, server_cert = _server_certificate(hosts, ca_key, ca_cert.subject, validity)
    _write_key(directory / CA_KEY, ca_key)
    _write_key(directory / SERVER_KEY, server_key)
    (directory / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / SERVER_CERT).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    make_operator_key(directory)
    return directory


def _certificate_authority(validity):
    """The federation CA's new key and self-signed certificate (EC P-256)."""
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
    return ca_key, ca_cert


def _server_certificate(hosts, ca_key, ca_name, validity):
    """The server's new key (EC P-256) and its certificate for `hosts`, signed by the CA."""
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
    return server_key, server_cert


def make_operator_key(directory: Path) -> Path:
    """Create the operator's run-signing key pair (EC P-256, PEM) in `directory`.

    The federation's operator signs every run it starts with operator.key (mode 0600, it stays
    with the server's operator); hospitals check the signature with a copy of operator.pub, sent
    with ca.crt, so a run submitted by anyone else trains nowhere. `--make-certs` adds the pair
    to a certificates folder that lacks one.

    Returns
    -------
    Path
        The public key's file, operator.pub.

    Raises
    ------
    FileExistsError
        operator.key or operator.pub exists already: hospitals may trust it.
    """
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
    """Create a hospital's identity for SuperNode authentication: an EC (P-384) key pair.

    Both halves are in OpenSSH format: the private key at `private_key_path` with mode 0600, the
    public key beside it (.pub), for the server's operator to enroll.

    Returns
    -------
    Path
        The public key's file.

    Raises
    ------
    FileExistsError
        Either file exists already (the server may have enrolled it): a key is never overwritten.
    """
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
    """The enrolled hospitals' public keys in `directory`, checked, by hospital number.

    Parameters
    ----------
    directory : str
        The folder of enrolled keys, one hospital-N.pub per hospital.
    num_clients : int
        How many hospitals the federation has (N in 0..num_clients-1).

    Returns
    -------
    dict[int, Path]
        Each hospital number and its key's file.

    Raises
    ------
    ValueError
        Naming the file: there are no keys, a file is not named hospital-N.pub for such an N,
        holds no key the SuperLink accepts (EC on a NIST curve, OpenSSH format), or holds the
        same key as another hospital's.
    """
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
