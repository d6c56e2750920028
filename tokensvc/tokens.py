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

from jwcrypto import jwa, jwk

from tokensvc_client.verifier import (
    ALGORITHM,
    P256_HALF_ORDER,
    P256_ORDER,
    REFRESH_TOKEN_PREFIX,
    TOKEN_TYPE,
)

_TAG_HEX: Final = 32  # 128-bit subject tag
# jwcrypto's ES256 algorithm object, created once: JWSCore would rebuild its header
# registries for every token, which cost more than the signature itself
_ES256: Final = jwa.JWA.signing_alg(ALGORITHM)
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
    header = _b64url(_compact_json({"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": kid}))
    payload = _b64url(_compact_json(claims))
    signing_input = f"{header}.{payload}"
    signature = _low_s(_ES256.sign(key, signing_input.encode("ascii")))
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode('ascii')}"


def _b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8")).rstrip(b"=").decode("ascii")


def _low_s(raw: bytes) -> bytes:
    """Normalise an R||S signature to low-S form; the verifier accepts only that spelling."""
    s = int.from_bytes(raw[32:], "big")
    if s <= P256_HALF_ORDER:
        return raw
    return raw[:32] + (P256_ORDER - s).to_bytes(32, "big")
