import ssl
import stat

import pytest
from cryptography import x509

from securehealth.certificates import make_certificates


def test_certificates_verify_for_each_host_and_keys_are_private(tmp_path):
    certs = make_certificates(tmp_path / "certs", ["localhost", "127.0.0.1", "fl.example.org"])
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(map(str, names.get_values_for_type(x509.DNSName))) == {"localhost", "fl.example.org"}
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # A TLS client trusting only ca.crt accepts the server's certificate chain.
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(certs / "server.crt", certs / "server.key")
    client_side = ssl.create_default_context(cafile=certs / "ca.crt")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_side.wrap_bio(incoming, outgoing, server_hostname="fl.example.org")
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server_side.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):  # drive the handshake in memory
        for side in (client, srv):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        server_in.write(outgoing.read())
        incoming.write(server_out.read())
    assert client.getpeercert()["subject"] == ((("commonName", "localhost"),),)


def test_existing_certificates_are_never_overwritten(tmp_path):
    certs = make_certificates(tmp_path / "certs", ["localhost"])
    before = (certs / "ca.crt").read_bytes()
    with pytest.raises(FileExistsError, match="hospitals may trust it"):
        make_certificates(certs, ["localhost"])
    assert (certs / "ca.crt").read_bytes() == before
