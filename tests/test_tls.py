"""TLS between the edge and the cloud: a certificate authority and a server certificate for 127.0.0.1 are
made in the test (with the ``cryptography`` package, else the ``openssl`` command), the server subprocess
serves HTTPS with uvicorn's own TLS (``--tls-cert/--tls-key``), and a real round trip goes through it.
A client that does not trust the authority refuses the server in one line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import torch
from test_server import TOKEN, ServerProcess, tiny_checkpoint

import splitshield as ss
from splitshield.errors import ConfigError
from splitshield.runtime.artifacts import export
from splitshield.runtime.client import EdgeClient, ServerError
from splitshield.runtime.server import check_tls


def _with_cryptography(out: Path) -> tuple[Path, Path, Path]:
    """CA and server certificate (``IP:127.0.0.1``, ``DNS:localhost``) made with ``cryptography``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "splitshield test CA")])
    usage = {"content_commitment": False, "data_encipherment": False, "key_agreement": False,
             "encipher_only": False, "decipher_only": False}

    def builder(subject: x509.Name, public_key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2)))

    ca = (builder(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True,
                                       key_encipherment=False, **usage), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    server = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), key.public_key())
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                          x509.DNSName("localhost")]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                           key_encipherment=False, **usage), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (out / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return out / "ca.pem", out / "server.pem", out / "server.key"


def _with_openssl(out: Path) -> tuple[Path, Path, Path]:
    """The same certificates made with the ``openssl`` command."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=out, check=True, capture_output=True, timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=splitshield test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (out / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
                                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                                    "authorityKeyIdentifier=keyid\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "2", "-days", "2",
        "-out", "server.pem", "-extfile", "server.ext")
    return out / "ca.pem", out / "server.pem", out / "server.key"


def make_certificates(out: Path) -> tuple[Path, Path, Path]:
    """``(ca.pem, server.pem, server.key)`` for a server on 127.0.0.1; skips if no tool can make them."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is here to make a certificate")
        return _with_openssl(out)
    return _with_cryptography(out)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(full checkpoint, edge artifact, cloud artifact) of an untrained LeNet split at ReLU2."""
    directory = tmp_path_factory.mktemp("ckpt")
    checkpoint = tiny_checkpoint(directory)
    done = export(checkpoint, directory / "edge.safetensors", directory / "cloud.safetensors")
    return checkpoint, done.edge, done.cloud


@pytest.fixture(scope="module")
def https_server(tls: tuple[Path, Path, Path], artifacts: tuple[Path, Path, Path],
                 tmp_path_factory: pytest.TempPathFactory):
    ca, cert, key = tls
    token_file = tmp_path_factory.mktemp("tok") / "token.txt"
    token_file.write_text(TOKEN)
    proc = ServerProcess(artifacts[2], "--token-file", str(token_file), "--tls-cert", str(cert), "--tls-key",
                         str(key), ca=ca)
    yield proc
    proc.stop()


def test_https_round_trip_through_a_server_subprocess(https_server: ServerProcess, tls: tuple[Path, Path, Path],
                                                      artifacts: tuple[Path, Path, Path]) -> None:
    checkpoint, edge, _ = artifacts
    assert https_server.url.startswith("https://")
    target, _, _ = ss.load_checkpoint(checkpoint)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with EdgeClient(edge, https_server.url, TOKEN, ca=tls[0]) as client:
        logits = client.predict(x)
        streamed = client.predict_stream(x)  # wss://, verified with the same authority
    with torch.no_grad():
        assert torch.allclose(logits, target(x), atol=1e-5)
        assert torch.allclose(streamed, target(x), atol=1e-5)
    # Plain HTTP to the TLS port gets no answer: nothing is served in clear.
    with pytest.raises(httpx.TransportError):
        httpx.get(https_server.url.replace("https://", "http://") + "/healthz", timeout=5)


def test_a_client_without_the_ca_refuses_the_server(https_server: ServerProcess,
                                                    artifacts: tuple[Path, Path, Path]) -> None:
    with EdgeClient(artifacts[1], https_server.url, TOKEN, retries=3) as client, \
            pytest.raises(ServerError) as info:
        client.predict(torch.rand(1, 1, 28, 28))
    message = str(info.value)
    assert info.value.code == "tls" and "\n" not in message
    assert "certificate" in message and "--ca" in message


def test_cli_infer_over_https(https_server: ServerProcess, tls: tuple[Path, Path, Path],
                              artifacts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from splitshield.cli import app

    Image.new("L", (28, 28), 100).save(tmp_path / "a.png")
    (tmp_path / "token.txt").write_text(TOKEN)
    args = ["infer", str(artifacts[1]), str(tmp_path / "a.png"), "--server", https_server.url,
            "--token-file", str(tmp_path / "token.txt")]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--ca", str(tls[0])])
    assert result.exit_code == 0, result.output
    assert "a.png" in result.output
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "certificate" in refused.output and "Traceback" not in refused.output


def test_tls_options_are_checked_in_one_line(tls: tuple[Path, Path, Path], artifacts: tuple[Path, Path, Path],
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from splitshield.runtime.server import main

    ca, cert, key = tls
    check_tls(cert, key)
    check_tls(None, None)
    with pytest.raises(ConfigError, match="go together"):
        check_tls(cert, None)
    with pytest.raises(ConfigError, match="does not exist"):
        check_tls(tmp_path / "missing.pem", key)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        check_tls(tmp_path / "junk.pem", key)
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        check_tls(ca, key)  # the CA's certificate with the server's key: a mismatched pair
    (tmp_path / "token.txt").write_text(TOKEN)
    # main() checks the options before loading anything, so this runs in-process.
    assert main([str(artifacts[2]), "--token-file", str(tmp_path / "token.txt"), "--tls-cert", str(cert)]) == 2
    err = capsys.readouterr().err
    assert "--tls-key" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="https://"):
        EdgeClient(artifacts[1], "http://127.0.0.1:1", TOKEN, ca=ca)
    with pytest.raises(ConfigError, match="does not exist"):
        EdgeClient(artifacts[1], "https://127.0.0.1:1", TOKEN, ca=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        EdgeClient(artifacts[1], "https://127.0.0.1:1", TOKEN, ca=tmp_path / "junk.pem")


def test_https_to_a_plain_http_server_is_one_line(artifacts: tuple[Path, Path, Path],
                                                  tls: tuple[Path, Path, Path]) -> None:
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_in_clear() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer_in_clear, daemon=True)
    thread.start()
    try:
        with EdgeClient(artifacts[1], f"https://127.0.0.1:{port}", TOKEN, ca=tls[0], retries=2) as client, \
                pytest.raises(ServerError) as info:
            client.predict(torch.rand(1, 1, 28, 28))
    finally:
        listener.close()
    assert info.value.code == "tls" and "does the server serve https" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_tls_handshake_that_never_finishes_is_closed_after_the_header_timeout(
        tls: tuple[Path, Path, Path], artifacts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import socket
    import time

    from test_server import closed_by_server

    ca, cert, key = tls
    (tmp_path / "token.txt").write_text(TOKEN)
    proc = ServerProcess(artifacts[2], "--token-file", str(tmp_path / "token.txt"), "--tls-cert", str(cert),
                         "--tls-key", str(key), "--header-timeout", "1", ca=ca)
    try:
        start = time.monotonic()
        silent = socket.create_connection(("127.0.0.1", proc.port), timeout=10)  # no ClientHello at all
        partial = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
        partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
        assert closed_by_server(silent, 10.0) and closed_by_server(partial, 10.0)
        assert time.monotonic() - start < 5.0  # asyncio's own handshake timeout is 60 s
        with httpx.Client(verify=__import__("ssl").create_default_context(cafile=str(ca))) as http:
            assert http.get(f"{proc.url}/healthz").status_code == 200  # a real client is served meanwhile
    finally:
        proc.stop()
