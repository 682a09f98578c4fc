"""`python server.py`: the deployment server. A TLS SuperLink of Flower's (behind
superlink_gate.py) that hospitals connect to, and one training run on it, signed
with the operator's key; or, with --make-certs, the federation's certificates."""

from pathlib import Path

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
from securehealth.deployment import runtime
from securehealth.results import RunDirError, new_run_dir


def serve(description: str, argv: list[str] | None = None) -> int:
    """`python server.py`: the deployment server, with TLS unless --insecure."""
    runtime.start_launcher()
    parser = settings.make_parser(description)
    group = parser.add_argument_group("deployment")
    group.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for hospitals on other machines",
    )
    group.add_argument("--port", type=int, default=runtime.DEFAULT_PORT, help="port to listen on")
    group.add_argument("--certs-dir", default="certs", help="where the TLS files are")
    group.add_argument(
        "--make-certs",
        action="store_true",
        help="create a CA and a server certificate in --certs-dir, then exit",
    )
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
    cfg, args = settings.parse(parser, argv)
    data.locate(cfg)
    certs = Path(args.certs_dir).resolve()
    console = display.make_console()
    if args.make_certs:
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
    if args.insecure:
        console.print(
            "[bold red]WARNING: --insecure: no TLS, model updates cross the "
            "network unencrypted and the server is not authenticated.[/]"
        )
        tls_args, ca_cert, operator_key = ["--insecure"], None, None
    else:
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY, OPERATOR_KEY, OPERATOR_PUB):
            if not (certs / name).is_file():
                parser.error(
                    f"no file {certs / name}: create it with `python server.py "
                    f"--make-certs` (it keeps existing certificates; or use --insecure to test)"
                )
        ca_cert, operator_key = certs / CA_CERT, certs / OPERATOR_KEY
        tls_args = [
            *(["--enable-supernode-auth"] if args.hospital_keys else []),
            "--ssl-certfile",
            str(certs / SERVER_CERT),
            "--ssl-keyfile",
            str(certs / SERVER_KEY),
            "--ssl-ca-certfile",
            str(ca_cert),
        ]
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
    console.print(
        f"[bold]SecureHealth-ML[/] server on {args.host}:{args.port} "
        f"({'TLS' if ca_cert else 'no TLS'}; secure aggregation {cfg.secure_aggregation}; "
        f"{f'{len(hospital_keys)} enrolled hospitals' if hospital_keys else 'any hospital'} "
        f"may join): {cfg.rounds} rounds once {cfg.num_clients} "
        f"hospitals have joined. Start each with: python client.py --client-id N"
    )
    if not hospital_keys:
        console.print(
            "[yellow]Any machine that reaches this port can join as a hospital and claim "
            "a free hospital number: enrol the hospitals' keys with --hospital-keys.[/]"
        )
    exit_code, metrics = runtime.run_federation(
        cfg,
        console,
        tls_args,
        ca_cert=ca_cert,
        hospital_keys=list(hospital_keys.values()),
        operator_key=operator_key,
        environment=environment,
        host=args.host,
        port=args.port,
    )
    if metrics is not None:
        display.print_summary(metrics, cfg.run_dir, console)
    return exit_code
