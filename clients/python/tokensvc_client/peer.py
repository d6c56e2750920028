"""Who is calling: the mTLS identity and certificate thumbprint of a gRPC peer.

Used by the token service (caller policy, certificate-bound tokens) and by the
interceptors (RFC 8705 proof of possession), so both read a peer the same way.

gRPC fills the call's auth context after the TLS handshake has verified the client
certificate against the server's client CA. The identity is the peer's SPIFFE ID (gRPC's
``peer_spiffe_id``: exactly one URI SAN that is a valid ``spiffe://`` ID) or, without one,
the certificate subject's common name. A connection without a client certificate has no
identity (``""``).
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tokensvc_client.verifier import b64url_decode

AuthContext = Mapping[str, Sequence[bytes]]


class _HasAuthContext(Protocol):
    def auth_context(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class Peer:
    """``identity``: SPIFFE ID or CN ("" without a client certificate); ``thumbprint``:
    RFC 8705 ``x5t#S256`` of the client certificate ("" without one)."""

    identity: str
    thumbprint: str

    @property
    def authenticated(self) -> bool:
        return bool(self.identity)


ANONYMOUS = Peer("", "")


def _first(context: AuthContext, key: str) -> str:
    values = context.get(key) or ()
    return values[0].decode("utf-8", "replace") if values else ""


def certificate_thumbprint(pem: str | bytes) -> str:
    """RFC 8705 ``x5t#S256``: base64url (unpadded) SHA-256 of the DER certificate."""
    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    der = ssl.PEM_cert_to_DER_cert(text.strip())
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def peer_from_auth_context(context: AuthContext | None) -> Peer:
    """The peer described by a gRPC auth context (``ServicerContext.auth_context()``)."""
    if not context:
        return ANONYMOUS
    pem = _first(context, "x509_pem_cert")
    if not pem:
        return ANONYMOUS
    identity = _first(context, "peer_spiffe_id") or _first(context, "x509_common_name")
    try:
        thumbprint = certificate_thumbprint(pem)
    except ValueError:  # not reachable with a certificate gRPC verified; fail closed
        return ANONYMOUS
    return Peer(identity, thumbprint)


def peer_of(context: _HasAuthContext) -> Peer:
    """The peer of a call, from a blocking or asyncio ``ServicerContext``."""
    return peer_from_auth_context(context.auth_context())


def is_thumbprint(value: str) -> bool:
    """Whether ``value`` is a well-formed x5t#S256: canonical unpadded base64url of 32 bytes."""
    try:
        return len(value) == 43 and len(b64url_decode(value)) == 32
    except ValueError:
        return False
