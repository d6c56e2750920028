"""A throw-away development PKI: one CA, a server certificate, workload client certificates.

For local trials (``make certs``, ``tokensvc certs DIR``) and the tests; never for
production. Keys are P-256, certificates are valid for 30 days, private keys are written
with mode 0600. Client certificates carry a SPIFFE ID as URI SAN (the identity the caller
policy matches) and the workload name as common name.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "spiffe://tokensvc.test"
#: Workloads of the development PKI and their SPIFFE IDs.
DEFAULT_WORKLOADS: dict[str, str] = {
    "login": f"{TRUST_DOMAIN}/ns/auth/sa/login",
    "admin": f"{TRUST_DOMAIN}/ns/ops/sa/admin",
    "orders": f"{TRUST_DOMAIN}/ns/shop/sa/orders",
    "billing": f"{TRUST_DOMAIN}/ns/shop/sa/billing",
}
_VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class Issued:
    """PEM files of one certificate: ``cert``, ``key`` (and the CA that signed it)."""

    cert: Path
    key: Path
    ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


class DevCA:
    """A CA kept in memory that writes certificates it signs into ``directory``."""

    def __init__(self, directory: Path, name: str = "tokensvc development CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
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
            .sign(self._key, hashes.SHA256())
        )
        self.ca_path = self.directory / "ca.pem"
        self.ca_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        *,
        common_name: str | None = None,
        spiffe_id: str | None = None,
        hosts: tuple[str, ...] = (),
        server: bool = False,
        uris: tuple[str, ...] = (),
        valid: tuple[datetime.datetime, datetime.datetime] | None = None,
    ) -> Issued:
        """Sign a leaf certificate; write ``<name>.pem`` and ``<name>.key``.

        ``uris`` are URI SANs added after ``spiffe_id`` as they are, valid or not (the
        tests build ambiguous and invalid identities with them); ``valid`` overrides the
        validity period (``(not_before, not_after)``: the tests build expired certificates).
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        for uri in (spiffe_id, *uris) if spiffe_id else uris:
            sans.append(x509.UniformResourceIdentifier(uri))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name or name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0] if valid else now - datetime.timedelta(minutes=5))
            .not_valid_after(valid[1] if valid else now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(
            self.directory / f"{name}.pem", self.directory / f"{name}.key", self.ca_path
        )
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(issued.key, key)
        return issued


def write_dev_pki(
    directory: Path,
    *,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
    workloads: dict[str, str] | None = None,
) -> dict[str, Issued]:
    """Write ``ca.pem``, ``server.pem/.key`` and one client pair per workload into
    ``directory``; returns them by name ("server" and each workload name)."""
    ca = DevCA(directory)
    out = {"server": ca.issue("server", hosts=hosts, server=True)}
    for name, spiffe_id in (DEFAULT_WORKLOADS if workloads is None else workloads).items():
        out[name] = ca.issue(name, spiffe_id=spiffe_id)
    return out


def _describe(cert_path: Path) -> tuple[str, int]:
    """The identity a certificate carries (URI SANs, else DNS/IP SANs, else its common
    name) and its expiry in epoch seconds."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = sans.get_values_for_type(x509.UniformResourceIdentifier) or [
            *sans.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)),
        ]
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return ",".join(names), int(cert.not_valid_after_utc.timestamp())


def files_written(issued: dict[str, Issued]) -> list[dict[str, object]]:
    """One row per file of :func:`write_dev_pki` (what ``tokensvc certs`` prints): path,
    kind, identity (a client's SPIFFE ID, the server's names, the CA's name) and expiry in
    epoch seconds."""
    ca = issued["server"].ca
    identity, expires_at = _describe(ca)
    rows: list[dict[str, object]] = [
        {"path": str(ca), "kind": "ca_cert", "identity": identity, "expires_at": expires_at}
    ]
    for name, pair in issued.items():
        role = "server" if name == "server" else "client"
        identity, expires_at = _describe(pair.cert)
        for path, what in ((pair.cert, "cert"), (pair.key, "key")):
            rows.append(
                {
                    "path": str(path),
                    "kind": f"{role}_{what}",
                    "identity": identity,
                    "expires_at": expires_at,
                }
            )
    return rows
