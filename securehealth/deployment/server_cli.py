"""`python server.py`: the deployment server.

A TLS SuperLink of Flower's (behind superlink_gate.py) that hospitals connect to, and one
training run on it, signed with the operator's key (`serve`); or, with the subcommand
`make-certs` (or the flag --make-certs), the federation's certificates.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from securehealth import data, display, settings
from securehealth.certificates import (
    CA_CERT,
    ENROLLED_KEYS_VARIABLE,
    OPERATOR_KEY,
    OPERATOR_PUB,
    OPERATOR_PUB_VARIABLE,
    SERVER_CERT,
    SERVER_KEY,
    check_hospital_keys,
    make_certificates,
    make_operator_key,
)
from securehealth.config import Settings
from securehealth.deployment import runtime
from securehealth.deployment.subcommands import CommandLine
from securehealth.results import RunDirError, new_run_dir

MAKE_CERTS = "make-certs"  # the subcommand that does what --make-certs does
MAKE_CERTS_HELP = "create a CA and a server certificate in --certs-dir, then exit"


@dataclass(frozen=True)
class Deployment:
    """A checked deployment server, ready to start: what `serve` hands to its last step."""

    cfg: Settings
    host: str
    port: int
    tls_args: list[str]
    ca_cert: Path | None
    operator_key: Path | None
    hospital_keys: list[Path]
    environment: dict[str, str]


def serve(description: str, argv: list[str] | None = None) -> int:
    """Run `python server.py`: the deployment server, with TLS unless --insecure.

    Parameters
    ----------
    description : str
        The command's usage text, shown by --help.
    argv : list[str] | None
        The command line without the program's name; None: sys.argv's.

    Returns
    -------
    int
        The exit code: how the run ended (0 once the certificates are made).
    """
    runtime.start_launcher()
    command_line = server_parser(description)
    cfg, args = command_line.parse(argv)
    parser = command_line.parser
    data.locate(cfg)
    certs = Path(args.certs_dir).resolve()
    console = display.make_console()
    if args.make_certs:
        return make_certs(parser, args, certs, console)
    deployment = check_deployment(parser, cfg, args, certs, console)
    announce(deployment, console)
    exit_code, metrics = runtime.run_federation(
        cfg,
        console,
        deployment.tls_args,
        ca_cert=deployment.ca_cert,
        hospital_keys=deployment.hospital_keys,
        operator_key=deployment.operator_key,
        environment=deployment.environment,
        host=deployment.host,
        port=deployment.port,
    )
    if metrics is not None:
        display.print_summary(metrics, cfg.run_dir, console)
    return exit_code


def server_parser(description: str) -> CommandLine:
    """The command line of server.py: the settings, its own flags and its subcommand."""
    command_line = CommandLine(settings.make_parser(description))
    add_server_flags(command_line.parser)
    command_line.add_subcommand(
        MAKE_CERTS,
        MAKE_CERTS_HELP + " (the same as --make-certs)",
        lambda parser: add_server_flags(parser, subcommand=True),
        make_certs=True,
    )
    return command_line


def add_server_flags(parser: argparse.ArgumentParser, subcommand: bool = False) -> None:
    """Add server.py's own flags (--host, --certs-dir, ...) to `parser`.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The command's parser, or its subcommand's.
    subcommand : bool
        Whether `parser` is the make-certs subcommand's, which has no --make-certs flag.
    """
    group = parser.add_argument_group("deployment")
    group.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for hospitals on other machines",
    )
    group.add_argument("--port", type=int, default=runtime.DEFAULT_PORT, help="port to listen on")
    group.add_argument("--certs-dir", default="certs", help="where the TLS files are")
    if not subcommand:
        group.add_argument("--make-certs", action="store_true", help=MAKE_CERTS_HELP)
    group.add_argument(
        "--cert-hosts",
        default="",
        help="with --make-certs: more names or IPs hospitals reach the server by, comma-separated",
    )
    group.add_argument(
        "--insecure", action="store_true", help="no TLS: everything crosses the network unencrypted"
    )
    group.add_argument(
        "--hospital-keys",
        default="",
        help="a folder of enrolled hospitals' public keys (*.pub, from client.py --make-key): "
        "only hospitals holding one of them may join",
    )


def make_certs(
    parser: argparse.ArgumentParser, args: argparse.Namespace, certs: Path, console: Console
) -> int:
    """Create the federation's certificates and the operator's key in `certs`; exit code 0.

    Certificates made before runs were signed are kept: only the operator's key is added.
    An existing file is never overwritten (a one-line error, exit 2).
    """
    named = [args.host] if args.host not in runtime.WILDCARD_HOSTS else []
    hosts = ["localhost", "127.0.0.1", *named, *filter(None, args.cert_hosts.split(","))]
    tls_files = (CA_CERT, SERVER_CERT, SERVER_KEY)
    try:
        if all((certs / name).is_file() for name in tls_files):
            make_operator_key(certs)  # certificates from before runs were signed
            made = "the operator's run-signing key (operator.key, operator.pub)"
        else:
            make_certificates(certs, list(dict.fromkeys(hosts)))
            made = (
                f"server.crt and server.key for {', '.join(dict.fromkeys(hosts))}, the "
                f"CA (ca.crt, ca.key) and the operator's run-signing key (operator.key, "
                f"operator.pub)"
            )
    except FileExistsError as error:
        parser.error(str(error))
    console.print(
        f"Created in {certs}/: {made}. Give every hospital a copy of {certs / CA_CERT} "
        f"and {certs / OPERATOR_PUB}; the .key files never leave this machine."
    )
    return 0


def check_deployment(
    parser: argparse.ArgumentParser,
    cfg: Settings,
    args: argparse.Namespace,
    certs: Path,
    console: Console,
) -> Deployment:
    """Check everything the server needs before it starts; exit 2 with one line if not.

    Checks the TLS files (unless --insecure), the enrolled hospitals' keys, the data,
    the port and the run directory, which it creates.
    """
    if args.insecure:
        console.print(
            "[bold red]WARNING: --insecure: no TLS, model updates cross the "
            "network unencrypted and the server is not authenticated.[/]"
        )
        tls_args, ca_cert, operator_key = ["--insecure"], None, None
    else:
        tls_args = _tls_args(parser, args, certs)
        ca_cert, operator_key = certs / CA_CERT, certs / OPERATOR_KEY
    hospital_keys, environment = {}, {}
    if operator_key:  # the ServerApp refuses any run this operator did not sign
        environment[OPERATOR_PUB_VARIABLE] = str(certs / OPERATOR_PUB)
    if args.hospital_keys:
        if args.insecure:
            parser.error("--hospital-keys needs TLS: drop --insecure")
        try:
            hospital_keys = check_hospital_keys(Path(args.hospital_keys).resolve(), cfg.num_clients)
        except ValueError as error:
            parser.error(str(error))
        environment[ENROLLED_KEYS_VARIABLE] = str(Path(args.hospital_keys).resolve())
    try:
        data.check_all(cfg, pool_held_out=False)
        runtime.ensure_port_free(args.host, args.port)
        cfg.run_dir = str(new_run_dir(cfg.run_dir, overwrite=args.overwrite))
    except (data.DataError, RunDirError) as error:
        parser.error(str(error))
    except runtime.FlowerError as error:  # the port is taken
        parser.error(f"{error}; choose another with --port")
    return Deployment(
        cfg=cfg,
        host=args.host,
        port=args.port,
        tls_args=tls_args,
        ca_cert=ca_cert,
        operator_key=operator_key,
        hospital_keys=list(hospital_keys.values()),
        environment=environment,
    )


def _tls_args(parser: argparse.ArgumentParser, args: argparse.Namespace, certs: Path) -> list[str]:
    """The SuperLink's TLS arguments, once every file they name is in `certs`."""
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY, OPERATOR_KEY, OPERATOR_PUB):
        if not (certs / name).is_file():
            parser.error(
                f"no file {certs / name}: create it with `python server.py "
                f"--make-certs` (it keeps existing certificates; or use --insecure to test)"
            )
    return [
        *(["--enable-supernode-auth"] if args.hospital_keys else []),
        "--ssl-certfile",
        str(certs / SERVER_CERT),
        "--ssl-keyfile",
        str(certs / SERVER_KEY),
        "--ssl-ca-certfile",
        str(certs / CA_CERT),
    ]


def announce(deployment: Deployment, console: Console) -> None:
    """Say where the server listens, who may join and what the run will be."""
    cfg, hospital_keys = deployment.cfg, deployment.hospital_keys
    console.print(
        f"[bold]SecureHealth-ML[/] server on {deployment.host}:{deployment.port} "
        f"({'TLS' if deployment.ca_cert else 'no TLS'}; secure aggregation "
        f"{cfg.secure_aggregation}; "
        f"{f'{len(hospital_keys)} enrolled hospitals' if hospital_keys else 'any hospital'} "
        f"may join): {cfg.rounds} rounds once {cfg.num_clients} "
        f"hospitals have joined. Start each with: python client.py --client-id N"
    )
    if not hospital_keys:
        console.print(
            "[yellow]Any machine that reaches this port can join as a hospital and claim "
            "a free hospital number: enrol the hospitals' keys with --hospital-keys.[/]"
        )
