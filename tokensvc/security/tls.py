"""Server TLS credentials that follow the certificate files on disk.

:func:`server_credentials` builds ``grpc.dynamic_ssl_server_credentials``: gRPC calls a
*fetcher* (a :class:`CertificateReloader`) before the TLS handshake of every new
connection; it answers ``None`` ("keep the current configuration") or a new
``grpc.ServerCertificateConfiguration``. Rotating the server certificate, its key or the
client CA bundle (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``) therefore needs no
restart: write the new files; connections opened about a second later use them.
Connections already open keep the certificate they were established with.

The fetcher runs on a gRPC core thread while the handshake waits, so it is cheap: at most
once per :data:`CHECK_INTERVAL` (monotonic clock) it stats the files, and only when the
``(st_mtime_ns, st_ctime_ns, st_size, st_ino)`` of one of them changed does it read and
check them. A new set is used only if every file parses and the private key belongs to the
(leaf) certificate -- compared by public key with ``cryptography``. Otherwise the last good
configuration stays in service and one warning per change is logged (file names and the
reason; never key material). A half-written rotation -- new certificate, old key -- is such
a mismatch: the old pair is served until the new key arrives.

The fetcher contract (``grpc.dynamic_ssl_server_credentials`` in ``grpc/__init__.py`` and
``_server_cert_config_fetcher_wrapper`` in gRPC's Cython layer): the first handshake uses
the initial configuration; later ones call the fetcher, which returns ``None`` for "no
change" or a new configuration; an exception is logged by gRPC and the current
configuration kept. gRPC core would itself refuse a key that does not match its certificate
(``Handshaker factory creation failed``), but checking first keeps :attr:`material` equal to
what is actually served and gives a useful warning.

Protocol versions: TLS 1.2 and 1.3 only. gRPC core's SSL server configuration defaults to
``min_tls_version = TLS1_2`` and ``max_tls_version = TLS1_3``
(``src/core/credentials/transport/ssl/ssl_security_connector.h``), and gRPC Python exposes
no setting to lower it (``grpc.ssl_server_credentials`` and
``grpc.dynamic_ssl_server_credentials`` take no version arguments). ``tests/security/test_tls.py``
checks it against a running server: a client limited to TLS 1.1 (which the same client
demonstrably negotiates with a server that allows it) fails the handshake, TLS 1.2 and
TLS 1.3 clients succeed.

Client certificates are requested and required (verified against the client CA bundle)
exactly when ``--tls-client-ca`` is set; that choice is fixed at start-up, only the bundle's
contents can change.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from tokensvc.config import ConfigError, Settings

log = logging.getLogger("tokensvc.tls")

#: Seconds between two looks at the files (the fetcher answers ``None`` in between).
CHECK_INTERVAL = 1.0

#: ``(st_mtime_ns, st_ctime_ns, st_size, st_ino)``, or ``None`` for a file stat cannot see.
Stamp = tuple[int, int, int, int] | None


class TlsFilesError(ConfigError):
    """The TLS files cannot be used; the message names the file and the reason (never key
    material)."""


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """One checked set of PEM files: the key matches the first certificate of the chain."""

    cert_chain: bytes
    key: bytes = field(repr=False)
    client_ca: bytes | None
    #: the leaf certificate of ``cert_chain``
    certificate: x509.Certificate = field(compare=False)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert_chain)], root_certificates=self.client_ca
        )

    def validity_problem(self, now: datetime.datetime | None = None) -> str | None:
        """Why the leaf certificate cannot be served at ``now`` (expired, not yet valid),
        with its dates; ``None`` when it is valid."""
        cert = self.certificate
        now = now or datetime.datetime.now(datetime.UTC)
        dates = (
            f"valid from {cert.not_valid_before_utc.isoformat()} "
            f"to {cert.not_valid_after_utc.isoformat()}"
        )
        subject = cert.subject.rfc4514_string()
        if now > cert.not_valid_after_utc:
            return f"the TLS certificate {subject!r} has expired ({dates}): renew it"
        if now < cert.not_valid_before_utc:
            return f"the TLS certificate {subject!r} is not valid yet ({dates})"
        return None

    def seconds_left(self, now: float | None = None) -> float:
        """Seconds until the leaf certificate expires (negative once it has)."""
        return self.certificate.not_valid_after_utc.timestamp() - (
            time.time() if now is None else now
        )

    def describe(self) -> str:
        """Subject, expiry and SHA-256 fingerprint of the leaf certificate (for logs)."""
        cert = self.certificate
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        return (
            f"subject={cert.subject.rfc4514_string()!r} "
            f"not_after={cert.not_valid_after_utc.isoformat()} sha256={fingerprint}"
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise TlsFilesError(f"cannot read {path}: {err.strerror or err}") from None


def _certificates(path: Path, data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TlsFilesError(f"{path}: no readable PEM {what}")
    return certs


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_tls_files(cert: Path, key: Path, client_ca: Path | None = None) -> TlsMaterial:
    """Read and check a certificate chain, its private key and an optional client CA bundle.

    Raises:
        TlsFilesError: a file is unreadable or not PEM of the expected kind, or the key
            does not belong to the chain's first certificate.
    """
    chain = _read(cert)
    key_pem = _read(key)
    ca = _read(client_ca) if client_ca is not None else None
    leaf = _certificates(cert, chain, "certificate")[0]
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # the exception text is not logged: it is about the key
        raise TlsFilesError(f"{key}: no readable unencrypted PEM private key") from None
    if _spki(private_key.public_key()) != _spki(leaf.public_key()):
        raise TlsFilesError(f"private key {key} does not belong to certificate {cert}")
    if client_ca is not None and ca is not None:
        _certificates(client_ca, ca, "CA certificate")
    return TlsMaterial(chain, key_pem, ca, leaf)


def _stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


class CertificateReloader:
    """The certificate configuration fetcher of ``grpc.dynamic_ssl_server_credentials``.

    Reads and checks the files once at construction (raising :class:`TlsFilesError` when
    they cannot be used); :attr:`initial_configuration` is the configuration to start with.
    Calling the reloader returns a new configuration when the files changed into a usable
    set since the last call that looked, else ``None``. Thread-safe; a call that finds
    another one reloading returns ``None`` at once.
    """

    def __init__(
        self,
        cert: Path,
        key: Path,
        client_ca: Path | None = None,
        *,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self.paths: tuple[Path, ...] = (cert, key) if client_ca is None else (cert, key, client_ca)
        self._cert, self._key, self._client_ca = cert, key, client_ca
        self._interval = interval
        self._lock = threading.Lock()
        self._stamps = self._stat()
        self.material = load_tls_files(cert, key, client_ca)
        self._next_check = time.monotonic() + interval

    @property
    def initial_configuration(self) -> grpc.ServerCertificateConfiguration:
        return self.material.configuration()

    def _stat(self) -> tuple[Stamp, ...]:
        return tuple(_stamp(path) for path in self.paths)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        now = time.monotonic()
        if now < self._next_check or not self._lock.acquire(blocking=False):
            return None
        try:
            self._next_check = now + self._interval
            return self._check()
        finally:
            self._lock.release()

    def _check(self) -> grpc.ServerCertificateConfiguration | None:
        stamps = self._stat()
        if stamps == self._stamps:
            return None
        self._stamps = stamps
        try:
            material = load_tls_files(self._cert, self._key, self._client_ca)
        except TlsFilesError as err:
            # once per change: the same stamps are not looked at again
            log.warning(
                "TLS files changed but cannot be used, still serving the previous certificate: %s",
                err,
            )
            return None
        if material == self.material:
            return None
        problem = material.validity_problem()
        if problem is not None:
            log.warning("TLS files changed, still serving the previous certificate: %s", problem)
            return None
        previous, self.material = self.material, material
        if material.cert_chain != previous.cert_chain or material.key != previous.key:
            log.info("TLS certificate reloaded: %s", material.describe())
        if material.client_ca != previous.client_ca:
            log.info("TLS client CA bundle reloaded from %s", self._client_ca)
        return material.configuration()


#: Below this many seconds of remaining life the start-up line is a WARNING.
EXPIRY_WARNING_S = 14 * 86400


def check_validity(material: TlsMaterial) -> None:
    """Refuse a certificate that is expired or not yet valid (every client would refuse the
    handshake, and would be told to try plaintext); warn when it expires within 14 days.

    Raises:
        TlsFilesError: the certificate is not valid now (the message has its dates).
    """
    problem = material.validity_problem()
    if problem is not None:
        raise TlsFilesError(problem)
    days = material.seconds_left() / 86400
    if material.seconds_left() < EXPIRY_WARNING_S:
        log.warning("TLS certificate expires in %.1f days: %s", days, material.describe())
    else:
        log.info("TLS certificate: %s", material.describe())


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS credentials of the server that reload ``settings.tls_*`` when the files change.

    Client certificates are required, and verified against ``settings.tls_client_ca``,
    exactly when that is set.

    Raises:
        TlsFilesError: the files cannot be used at start-up.
        ConfigError: ``tls_cert`` or ``tls_key`` is not set.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        raise ConfigError("TLS needs --tls-cert and --tls-key")
    reloader = CertificateReloader(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    check_validity(reloader.material)
    # grpc-stubs types the fetcher's result as non-optional; grpc documents None as
    # "no change" (grpc/__init__.py, dynamic_ssl_server_credentials).
    fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], reloader)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial_configuration,
        fetcher,
        require_client_authentication=settings.tls_client_ca is not None,
    )
