"""Token formats: minting ES256 access tokens and opaque refresh tokens.

Session ids carry a hash tag of their subject (``subject_tag``): every Redis key of a
subject -- its families, its session index, its revocation watermark, its revoked jtis --
lands in one Redis Cluster hash slot, so Refresh and Introspect are single atomic steps
and revoke-by-subject's watermark is one atomic O(1) write. A refresh token carries its
session id, so the key a Refresh touches is known from the token alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from typing import Any, Final

from jwcrypto import jwk, jws

from tokensvc_client.verifier import (
    ALGORITHM,
    P256_HALF_ORDER,
    P256_ORDER,
    REFRESH_TOKEN_PREFIX,
    TOKEN_TYPE,
    b64url_decode,
)

_TAG_HEX: Final = 32  # 128-bit subject tag
_SESSION_ID = re.compile(r"[0-9a-f]{64}")
_REFRESH_TOKEN = re.compile(re.escape(REFRESH_TOKEN_PREFIX) + r"([0-9a-f]{64})_[0-9a-f]{64}")


def subject_tag(subject: str) -> str:
    """128-bit hex tag of a subject: the Redis hash tag of everything of that subject."""
    return hashlib.sha256(subject.encode("utf-8")).hexdigest()[:_TAG_HEX]


def new_session_id(subject: str) -> str:
    """A fresh session id: the subject's tag followed by 128 random bits."""
    return subject_tag(subject) + secrets.token_hex(16)


def is_session_id(value: str) -> bool:
    return _SESSION_ID.fullmatch(value) is not None


def tag_of(session_id: str) -> str:
    return session_id[:_TAG_HEX]


def new_refresh_token(session_id: str) -> str:
    """An opaque refresh token: prefix, session id, 256 random bits."""
    return f"{REFRESH_TOKEN_PREFIX}{session_id}_{secrets.token_hex(32)}"


def refresh_session_id(token: str) -> str | None:
    """The session id inside a well-formed refresh token, else ``None``."""
    match = _REFRESH_TOKEN.fullmatch(token)
    return match.group(1) if match else None


def refresh_hash(token: str) -> str:
    """What Redis stores instead of the refresh token (256-bit random input: no salt needed)."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def new_token_id() -> str:
    return secrets.token_urlsafe(16)


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def sign_access_token(key: jwk.JWK, kid: str, claims: dict[str, Any]) -> str:
    """Sign claims as a compact ES256 JWS with ``typ: at+jwt`` (RFC 9068)."""
    header = _compact_json({"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": kid})
    payload = _compact_json(claims).encode("utf-8")
    signed = jws.JWSCore(ALGORITHM, key, header, payload, [ALGORITHM]).sign()
    return (
        f"{signed['protected']}.{signed['payload'].decode('ascii')}.{_low_s(signed['signature'])}"
    )


def _low_s(signature_b64: str) -> str:
    """Normalise an ECDSA signature to low-S form; the verifier accepts only that spelling."""
    raw = b64url_decode(signature_b64)
    s = int.from_bytes(raw[32:], "big")
    if s <= P256_HALF_ORDER:
        return signature_b64
    fixed = raw[:32] + (P256_ORDER - s).to_bytes(32, "big")
    return base64.urlsafe_b64encode(fixed).rstrip(b"=").decode("ascii")
