"""Server TLS: certificate and client-CA rotation without restart, refusal of a half-written
rotation, TLS 1.2+ only, client certificates required exactly with a client CA.

Real servers and real TLS over loopback; every test makes its own CAs with
:class:`tokensvc.cli.devcerts.DevCA`. The server looks at its files at most once a second, so
tests wait for a change to show with a deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support import ServerThread, wait_until
from tokensvc.cli.devcerts import DevCA, Issued
from tokensvc.config import ConfigError
from tokensvc.security.tls import CertificateReloader, TlsFilesError, load_tls_files
from tokensvc_client.channels import channel
from tokensvc_client.v1 import tokensvc_pb2, tokensvc_pb2_grpc

DEADLINE = 10.0  # seconds a rotation may take to show (the server looks once a second)
HOSTS = ("127.0.0.1", "localhost")


# -- helpers -------------------------------------------------------------------------------


def _server_pair(tmp_path: Path, ca_name: str) -> tuple[DevCA, Issued]:
    ca = DevCA(tmp_path / ca_name, name=f"{ca_name} CA")
    return ca, ca.issue("server", hosts=HOSTS, server=True)


def _install(issued: Issued, cert: Path, key: Path) -> None:
    """Overwrite the live files in place: certificate first, then key (as a careless
    rotation script would)."""
    cert.write_bytes(issued.cert.read_bytes())
    key.write_bytes(issued.key.read_bytes())


def _der(pem_file: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem_file.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def _get_keys(
    port: int, ca: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.StatusCode | None:
    """GetKeys over a fresh connection (own subchannel pool); None on success, else the code."""
    ch = channel(
        f"127.0.0.1:{port}",
        ca=ca,
        cert=cert,
        key=key,
        options=[("grpc.use_local_subchannel_pool", 1)],
    )
    try:
        stub = tokensvc_pb2_grpc.TokenServiceStub(ch)
        reply = stub.GetKeys(tokensvc_pb2.GetKeysRequest(), timeout=10)
        assert '"keys"' in reply.jwks
        return None
    except grpc.RpcError as err:
        return err.code()
    finally:
        ch.close()


def _client_context(
    ca: Path | None = None,
    *,
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:  # only look at what the server presents
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(ca)
    ctx.minimum_version = minimum
    ctx.maximum_version = maximum
    if minimum < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("ALL:@SECLEVEL=0")  # let OpenSSL offer TLS 1.0/1.1 at all
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _handshake(port: int, ctx: ssl.SSLContext) -> tuple[str, bytes, str | None]:
    """TLS handshake with the port: (version, server certificate DER, ALPN protocol)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=False) as tls,
    ):
        tls.do_handshake()
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return str(tls.version()), der, tls.selected_alpn_protocol()


def _served_cert(port: int) -> bytes:
    return _handshake(port, _client_context())[1]


@pytest.fixture
def tls_server(
    tmp_path: Path, make_settings: Callable[..., object], start_server: Callable[..., ServerThread]
) -> Callable[..., ServerThread]:
    """``tls_server(issued, client_ca=None, live_dir="live")``: a TLS server on copies of the
    files in ``tmp_path/<live_dir>``; its settings name those live files."""

    def start(
        issued: Issued, client_ca: Path | None = None, live_dir: str = "live"
    ) -> ServerThread:
        live = tmp_path / live_dir
        live.mkdir()
        cert, key = live / "server.pem", live / "server.key"
        _install(issued, cert, key)
        live_ca = None
        if client_ca is not None:
            live_ca = live / "client-ca.pem"
            live_ca.write_bytes(client_ca.read_bytes())
        settings = make_settings(insecure=False, tls_cert=cert, tls_key=key, tls_client_ca=live_ca)
        return start_server(settings)

    return start


# -- rotation on a running server -----------------------------------------------------------


def test_server_certificate_rotation_needs_no_restart(tmp_path, tls_server):
    ca1, a = _server_pair(tmp_path, "ca1")
    ca2, b = _server_pair(tmp_path, "ca2")
    srv = tls_server(a)
    assert _get_keys(srv.port, ca1.ca_path) is None
    assert _get_keys(srv.port, ca2.ca_path) == grpc.StatusCode.UNAVAILABLE
    # a connection opened before the rotation
    options = [("grpc.use_local_subchannel_pool", 1)]
    with channel(srv.target, ca=ca1.ca_path, options=options) as before:
        stub = tokensvc_pb2_grpc.TokenServiceStub(before)
        stub.GetKeys(tokensvc_pb2.GetKeysRequest(), timeout=10)

        _install(b, srv.settings.tls_cert, srv.settings.tls_key)
        wait_until(
            lambda: _served_cert(srv.port) == _der(b.cert),
            DEADLINE,
            what="certificate B in service",
            interval=0.1,
        )

        assert _get_keys(srv.port, ca2.ca_path) is None
        assert _get_keys(srv.port, ca1.ca_path) == grpc.StatusCode.UNAVAILABLE
        # the connection made with certificate A keeps working on the same server
        stub.GetKeys(tokensvc_pb2.GetKeysRequest(), timeout=10)


def test_client_ca_rotation_accepts_clients_of_the_new_ca(tmp_path, tls_server):
    server_ca, server = _server_pair(tmp_path, "server")
    old_ca, new_ca = DevCA(tmp_path / "old", "old client CA"), DevCA(tmp_path / "new", "new CA")
    old_client = old_ca.issue("orders", spiffe_id="spiffe://tokensvc.test/ns/shop/sa/orders")
    new_client = new_ca.issue("orders", spiffe_id="spiffe://tokensvc.test/ns/shop/sa/orders")
    srv = tls_server(server, client_ca=old_ca.ca_path)
    ca = server_ca.ca_path
    assert _get_keys(srv.port, ca, old_client.cert, old_client.key) is None
    assert _get_keys(srv.port, ca, new_client.cert, new_client.key) == grpc.StatusCode.UNAVAILABLE

    # atomic replacement (write a temporary file, rename over the live one)
    live_ca = srv.settings.tls_client_ca
    assert live_ca is not None
    tmp = live_ca.with_suffix(".tmp")
    tmp.write_bytes(new_ca.ca_path.read_bytes())
    os.replace(tmp, live_ca)
    wait_until(
        lambda: _get_keys(srv.port, ca, new_client.cert, new_client.key) is None,
        DEADLINE,
        what="client certificate of the new CA accepted",
        interval=0.1,
    )
    assert _get_keys(srv.port, ca, old_client.cert, old_client.key) == grpc.StatusCode.UNAVAILABLE
    # the server certificate itself did not change
    assert _served_cert(srv.port) == _der(server.cert)


def test_half_written_rotation_keeps_the_old_certificate(tmp_path, tls_server, caplog):
    caplog.set_level(logging.WARNING, logger="tokensvc.tls")
    ca1, a = _server_pair(tmp_path, "ca1")
    ca2, b = _server_pair(tmp_path, "ca2")
    srv = tls_server(a)
    cert, key = srv.settings.tls_cert, srv.settings.tls_key

    def tls_records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "tokensvc.tls"]

    # new certificate, old key: a mismatched pair (renamed into place: one change only)
    cert.with_suffix(".tmp").write_bytes(b.cert.read_bytes())
    os.replace(cert.with_suffix(".tmp"), cert)

    def rejected() -> bool:
        # every new connection meanwhile is served certificate A
        assert _served_cert(srv.port) == _der(a.cert)
        return any("does not belong" in r.getMessage() for r in tls_records())

    wait_until(rejected, DEADLINE, what="the server noticed the mismatched pair", interval=0.1)
    assert _get_keys(srv.port, ca1.ca_path) is None
    assert _get_keys(srv.port, ca2.ca_path) == grpc.StatusCode.UNAVAILABLE
    warnings = [r for r in tls_records() if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(key) in warnings[0].getMessage()
    assert b"PRIVATE KEY" not in warnings[0].getMessage().encode()

    key.write_bytes(b.key.read_bytes())  # the rotation completes
    wait_until(
        lambda: _served_cert(srv.port) == _der(b.cert),
        DEADLINE,
        what="certificate B in service",
        interval=0.1,
    )
    assert _get_keys(srv.port, ca2.ca_path) is None


# -- protocol versions and client certificates ------------------------------------------


def _tls11_server(issued: Issued) -> tuple[int, list[str], threading.Thread]:
    """A Python ssl server that accepts TLS 1.1: shows the client really offers 1.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(issued.cert, issued.key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    listener = socket.create_server(("127.0.0.1", 0))
    versions: list[str] = []

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                versions.append(str(tls.version()))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], versions, thread


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_only_tls_1_2_and_1_3_are_accepted(tmp_path, tls_server):
    ca, server = _server_pair(tmp_path, "ca")
    srv = tls_server(server)
    NAMES = {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = _client_context(ca.ca_path, minimum=version, maximum=version)
        got, der, alpn = _handshake(srv.port, ctx)
        assert (got, alpn) == (NAMES[version], "h2")
        assert der == _der(server.cert)

    tls11 = _client_context(
        ca.ca_path, minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1
    )
    # control: this client negotiates TLS 1.1 with a server that allows it ...
    port, versions, thread = _tls11_server(server)
    assert _handshake(port, tls11)[0] == "TLSv1.1"
    thread.join(10)
    assert versions == ["TLSv1.1"]
    # ... tokensvc refuses it in the handshake (BoringSSL closes the connection: the client
    # sees an EOF, the server logs UNSUPPORTED_PROTOCOL) ...
    with pytest.raises(ssl.SSLError):
        _handshake(srv.port, tls11)
    # ... but takes the same client once it may also offer TLS 1.2
    up_to_12 = _client_context(
        ca.ca_path, minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_2
    )
    assert _handshake(srv.port, up_to_12)[0] == "TLSv1.2"


def test_client_certificates_required_exactly_with_a_client_ca(tmp_path, tls_server):
    server_ca, server = _server_pair(tmp_path, "server")
    client_ca = DevCA(tmp_path / "clients", "client CA")
    login = "spiffe://tokensvc.test/ns/auth/sa/login"
    client = client_ca.issue("login", spiffe_id=login)
    ca = server_ca.ca_path

    plain = tls_server(server)  # server TLS only
    assert _get_keys(plain.port, ca) is None
    assert _get_keys(plain.port, ca, client.cert, client.key) is None

    mutual = tls_server(server, client_ca=client_ca.ca_path, live_dir="live-mutual")
    assert _get_keys(mutual.port, ca, client.cert, client.key) is None
    assert _get_keys(mutual.port, ca) == grpc.StatusCode.UNAVAILABLE
    # a certificate from another CA is no better than none
    stranger = DevCA(tmp_path / "stranger").issue("login", spiffe_id=login)
    assert _get_keys(mutual.port, ca, stranger.cert, stranger.key) == grpc.StatusCode.UNAVAILABLE


# -- the reloader itself (real files, checked on every call) --------------------------------


@pytest.fixture
def rotation(tmp_path: Path) -> Iterator[tuple[Issued, Issued, Path, Path]]:
    _, a = _server_pair(tmp_path, "ca1")
    _, b = _server_pair(tmp_path, "ca2")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    _install(a, cert, key)
    yield a, b, cert, key


def _bump(path: Path, data: bytes) -> None:
    """Write ``data`` and make sure the stat changes even within one timestamp tick."""
    before = os.stat(path).st_mtime_ns if path.exists() else 0
    path.write_bytes(data)
    st = os.stat(path)
    if st.st_mtime_ns == before:
        os.utime(path, ns=(st.st_atime_ns, before + 1_000_000))


def test_reloader_answers_none_until_a_usable_pair_appears(rotation, caplog):
    caplog.set_level(logging.INFO, logger="tokensvc.tls")
    a, b, cert, key = rotation
    reloader = CertificateReloader(cert, key, interval=0)
    assert reloader.material.cert_chain == a.cert.read_bytes()
    assert reloader() is None  # nothing changed

    _bump(cert, b.cert.read_bytes())
    assert reloader() is None  # half-written: the key is still A's
    assert reloader() is None
    assert reloader.material.cert_chain == a.cert.read_bytes()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]  # once for this change

    _bump(key, b.key.read_bytes())
    assert isinstance(reloader(), grpc.ServerCertificateConfiguration)
    assert reloader.material.cert_chain == b.cert.read_bytes()
    assert reloader() is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]

    _bump(cert, b.cert.read_bytes())  # touched, same content: nothing to do
    assert reloader() is None


def test_reloader_survives_unreadable_files_and_never_logs_key_material(rotation, caplog):
    caplog.set_level(logging.DEBUG, logger="tokensvc.tls")
    a, b, cert, key = rotation
    reloader = CertificateReloader(cert, key, interval=0)
    secret = b"MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg" + b"S3CR3T" * 8
    for garbage in (
        b"-----BEGIN PRIVATE KEY-----\n" + secret + b"\n-----END PRIVATE KEY-----\n",
        b"",
    ):
        _bump(key, garbage)
        assert reloader() is None
    key.unlink()
    assert reloader() is None
    assert reloader.material.key == a.key.read_bytes()
    assert len(caplog.records) == 3
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert "S3CR3T" not in caplog.text and "MIGHAgEA" not in caplog.text
    assert "no readable unencrypted PEM private key" in caplog.records[0].getMessage()
    assert "cannot read" in caplog.records[2].getMessage()
    assert "S3CR3T" not in repr(reloader.material)

    _bump(key, b.key.read_bytes())
    _bump(cert, b.cert.read_bytes())
    assert reloader() is not None
    assert reloader.material.key == b.key.read_bytes()


def test_reloader_waits_its_interval_between_looks(rotation):
    a, b, cert, key = rotation
    reloader = CertificateReloader(cert, key, interval=3600)
    _install(b, cert, key)
    assert reloader() is None  # not looked at: the next look is an hour away
    assert reloader.material.cert_chain == a.cert.read_bytes()


def test_unusable_files_at_start_up_are_a_configuration_error(rotation, tmp_path):
    _, b, cert, key = rotation
    with pytest.raises(TlsFilesError, match="does not belong") as err:
        load_tls_files(cert, b.key)
    assert isinstance(err.value, ConfigError)
    with pytest.raises(TlsFilesError, match="no readable PEM CA certificate"):
        load_tls_files(cert, key, client_ca=key)
    with pytest.raises(TlsFilesError, match="cannot read"):
        CertificateReloader(cert, tmp_path / "missing.key")
