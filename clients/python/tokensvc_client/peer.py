"""Who is calling: the mTLS identity and certificate thumbprint of a gRPC peer.

Used by the token service (caller policy, certificate-bound tokens) and by the
interceptors (RFC 8705 proof of possession), so both read a peer the same way.

gRPC fills the call's auth context after the TLS handshake has verified the client
certificate against the server's client CA; this module reads the leaf certificate
itself (``x509_pem_cert``, parsed with ``cryptography``, which jwcrypto already needs)
rather than trusting gRPC's looser ``peer_spiffe_id``/common-name fields:

- **SPIFFE ID** (X.509-SVID rules): the certificate is not a CA and carries exactly one
  URI SAN, which is a valid SPIFFE ID (:func:`spiffe_id_error`). That ID is the identity.
- A certificate with **several URI SANs, or one that is not a valid SPIFFE ID**, or that
  is a CA, is *refused*: it has no identity and no thumbprint, as if there were no
  certificate (:attr:`Peer.refused` says why). Ambiguity never picks one of the names.
- A certificate **without any URI SAN** has, by default, no identity (its thumbprint
  still proves possession for bound tokens). Only when the caller asks for
  ``common_names`` is its subject common name the identity, namespaced ``cn:NAME``, so
  no common name -- whatever characters it holds -- equals a SPIFFE ID.

Each distinct certificate is parsed once: results are kept in a bounded LRU cache, so a
call pays for a dictionary lookup, not for X.509 parsing.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from tokensvc_client.verifier import b64url_decode

log = logging.getLogger("tokensvc_client.peer")

AuthContext = Mapping[str, Sequence[bytes]]
#: Prefix of a common-name identity (only with ``common_names``).
CN_PREFIX: Final = "cn:"
#: Distinct certificates whose reading is remembered.
CACHE_SIZE: Final = 4096

_SPIFFE_MAX: Final = 2048
_TRUST_DOMAIN_MAX: Final = 255
_TRUST_DOMAIN: Final = re.compile(r"[a-z0-9._-]+")
_SEGMENT: Final = re.compile(r"[A-Za-z0-9._-]+")


class _HasAuthContext(Protocol):
    def auth_context(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class Peer:
    """``identity``: SPIFFE ID, or ``cn:NAME`` where common names are enabled ("" for
    none); ``thumbprint``: RFC 8705 ``x5t#S256`` of the client certificate ("" without
    one, or when it was refused); ``refused``: why a presented certificate gives no
    identity at all ("" otherwise)."""

    identity: str
    thumbprint: str
    refused: str = ""

    @property
    def authenticated(self) -> bool:
        return bool(self.identity)


ANONYMOUS = Peer("", "")


def spiffe_id_error(value: str) -> str | None:
    """Why ``value`` is not a valid SPIFFE ID (the SPIFFE-ID standard), or ``None``.

    ``spiffe://`` in lower case, a trust domain of ``[a-z0-9._-]`` (so no port, user
    info or upper case), then an optional path of non-empty segments of
    ``[A-Za-z0-9._-]`` that are neither ``.`` nor ``..``, no trailing slash; no query or
    fragment (their characters are not allowed); at most 2048 bytes.
    """
    if len(value.encode("utf-8", "surrogatepass")) > _SPIFFE_MAX:
        return "longer than 2048 bytes"
    if not value.startswith("spiffe://"):
        return "scheme is not spiffe://"
    domain, slash, path = value[len("spiffe://") :].partition("/")
    if not domain:
        return "trust domain is empty"
    if len(domain) > _TRUST_DOMAIN_MAX or not _TRUST_DOMAIN.fullmatch(domain):
        return "trust domain has characters outside [a-z0-9._-] (port, user info, case)"
    if not slash:
        return None
    for segment in path.split("/"):
        if not segment:
            return "path has an empty segment or a trailing slash"
        if segment in (".", ".."):
            return "path has a '.' or '..' segment"
        if not _SEGMENT.fullmatch(segment):
            return "path has characters outside [A-Za-z0-9._-] (query, fragment, escapes)"
    return None


def is_identity(value: str) -> bool:
    """Whether ``value`` can be a peer's identity: a valid SPIFFE ID or ``cn:NAME``."""
    if value.startswith(CN_PREFIX):
        return len(value) > len(CN_PREFIX)
    return spiffe_id_error(value) is None


def _thumbprint(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def _der(pem: str | bytes) -> bytes:
    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    return ssl.PEM_cert_to_DER_cert(text.strip())


def certificate_thumbprint(pem: str | bytes) -> str:
    """RFC 8705 ``x5t#S256``: base64url (unpadded) SHA-256 of the DER certificate."""
    return _thumbprint(_der(pem))


def _common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) and value else None


def _read(cert: x509.Certificate, common_names: bool) -> tuple[str, str]:
    """(identity, refusal) of a parsed certificate."""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            return "", "certificate is a CA, not an X.509-SVID leaf"
    except x509.ExtensionNotFound:
        pass
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) > 1:
        return "", f"{len(uris)} URI SANs (an X.509-SVID has exactly one)"
    if uris:
        error = spiffe_id_error(uris[0])
        if error is not None:
            return "", f"URI SAN is not a valid SPIFFE ID: {error}"
        return uris[0], ""
    if not common_names:
        return "", ""
    name = _common_name(cert)
    return (CN_PREFIX + name, "") if name is not None else ("", "")


@functools.lru_cache(maxsize=CACHE_SIZE)
def _peer_of_certificate(pem: bytes, common_names: bool) -> Peer:
    """The peer presenting the PEM certificate ``pem`` (parsed once per certificate)."""
    try:
        der = _der(pem)
        identity, refusal = _read(x509.load_der_x509_certificate(der), common_names)
        thumbprint = _thumbprint(der)
    except (ValueError, UnicodeDecodeError) as err:  # gRPC verified it: not reachable
        log.warning("client certificate unreadable, treated as none: %s", err)
        return Peer("", "", "certificate unreadable")
    if refusal:
        refusal = f"certificate {thumbprint[:16]}: {refusal}"
        log.warning("client %s; the caller has no identity", refusal)
        return Peer("", "", refusal)
    return Peer(identity, thumbprint)


def peer_from_auth_context(context: AuthContext | None, *, common_names: bool = False) -> Peer:
    """The peer described by a gRPC auth context (``ServicerContext.auth_context()``).

    Args:
        context: the call's auth context.
        common_names: without a URI SAN, the certificate's common name is the identity
            (as ``cn:NAME``); off by default (see the module doc).
    """
    if not context:
        return ANONYMOUS
    values = context.get("x509_pem_cert")
    if not values:
        return ANONYMOUS
    return _peer_of_certificate(bytes(values[0]), common_names)


def peer_of(context: _HasAuthContext, *, common_names: bool = False) -> Peer:
    """The peer of a call, from a blocking or asyncio ``ServicerContext``."""
    return peer_from_auth_context(context.auth_context(), common_names=common_names)


def holds_bound_certificate(bound: str, thumbprint: str) -> bool:
    """Whether a peer whose certificate has ``thumbprint`` holds the certificate an
    RFC 8705-bound token names (``bound``: its ``cnf`` ``x5t#S256``), compared in constant
    time; no certificate ("") never does. The one comparison of the server and the
    interceptors."""
    # bytes: compare_digest refuses str with non-ASCII characters
    return bool(thumbprint) and hmac.compare_digest(bound.encode(), thumbprint.encode())


def is_thumbprint(value: str) -> bool:
    """Whether ``value`` is a well-formed x5t#S256: canonical unpadded base64url of 32 bytes."""
    try:
        return len(value) == 43 and len(b64url_decode(value)) == 32
    except ValueError:
        return False
