"""The subcommands `server.py make-certs` and `client.py make-key`: the same as their flags."""

import stat

from conftest import run_script
from cryptography import x509

from securehealth.commands import CLIENT_USAGE, SERVER_USAGE
from securehealth.deployment.client_cli import client_parser
from securehealth.deployment.server_cli import server_parser


def files_in(folder):
    """{name: permission bits} of the files in `folder`."""
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}


def server_names(certs):
    """The names and addresses the server certificate in `certs` is valid for."""
    certificate = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sorted(map(str, names.get_values_for_type(x509.DNSName))) + sorted(
        map(str, names.get_values_for_type(x509.IPAddress))
    )


def said(result):
    """What a command printed, its line breaks (the console's wrapping) aside."""
    return " ".join(result.stdout.split())


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(word in result.stderr for word in words), result.stderr


def test_the_subcommands_stand_for_their_flags_and_are_listed_in_help():
    server = server_parser(SERVER_USAGE)
    _, args = server.parse(["make-certs", "--certs-dir", "elsewhere", "--cert-hosts", "a,b"])
    assert (args.make_certs, args.certs_dir, args.cert_hosts) == (True, "elsewhere", "a,b")
    _, args = server.parse(["--certs-dir", "elsewhere"])
    assert not args.make_certs
    assert "subcommands:" in server.parser.format_help()
    assert "make-certs" in server.parser.format_help().split("subcommands:")[1]

    client = client_parser(CLIENT_USAGE)
    cfg, args = client.parse(["make-key", "--client-id", "3", "--dataset", "heart-disease"])
    assert (args.make_key, args.client_id, cfg.num_clients) == (True, 3, 4)
    assert "make-key" in client.parser.format_help().split("subcommands:")[1]


def test_make_certs_makes_what_the_flag_makes_and_never_overwrites(tmp_path):
    hosts = ["--cert-hosts", "fl.example.org,10.0.0.7"]
    by_flag = run_script("server.py", "--make-certs", "--certs-dir", "flag", *hosts, cwd=tmp_path)
    by_subcommand = run_script(
        "server.py", "make-certs", "--certs-dir", "subcommand", *hosts, cwd=tmp_path
    )
    for made in (by_flag, by_subcommand):
        assert made.returncode == 0, made.stdout + made.stderr
    assert said(by_subcommand).replace("subcommand", "flag") == said(by_flag)
    flag, subcommand = tmp_path / "flag", tmp_path / "subcommand"
    assert files_in(subcommand) == files_in(flag)
    assert files_in(flag)["ca.key"] == files_in(flag)["operator.key"] == 0o600
    assert server_names(subcommand) == server_names(flag)
    assert server_names(flag) == ["fl.example.org", "localhost", "10.0.0.7", "127.0.0.1"]

    before = {path.name: path.read_bytes() for path in subcommand.iterdir()}
    again = run_script("server.py", "make-certs", "--certs-dir", "subcommand", cwd=tmp_path)
    assert_one_line_error(again, "already exists")
    assert {path.name: path.read_bytes() for path in subcommand.iterdir()} == before


def test_make_key_makes_what_the_flag_makes_and_never_overwrites(tmp_path):
    by_flag = run_script(
        "client.py", "--client-id", "1", "--make-key", "--state-dir", "flag", cwd=tmp_path
    )
    by_subcommand = run_script(
        "client.py", "make-key", "--client-id", "1", "--state-dir", "subcommand", cwd=tmp_path
    )
    for made in (by_flag, by_subcommand):
        assert made.returncode == 0, made.stdout + made.stderr
    assert said(by_subcommand).replace("subcommand", "flag") == said(by_flag)
    flag, subcommand = tmp_path / "flag", tmp_path / "subcommand"
    assert files_in(subcommand) == files_in(flag)
    assert files_in(flag)["hospital.key"] == 0o600
    assert set(files_in(flag)) == {"hospital.key", "hospital.pub"}

    key = (subcommand / "hospital.key").read_bytes()
    again = run_script(
        "client.py", "make-key", "--client-id", "1", "--state-dir", "subcommand", cwd=tmp_path
    )
    assert_one_line_error(again, "already exists")
    assert (subcommand / "hospital.key").read_bytes() == key
    assert_one_line_error(
        run_script("client.py", "make-key", "--client-id", "3", cwd=tmp_path), "0..2"
    )
