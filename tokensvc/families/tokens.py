"""Token formats: minting ES256 access tokens and opaque refresh tokens.

Session ids carry a hash tag of their subject (:class:`SubjectTags`): every Redis key of a
subject -- its families, its session index, its revocation watermark, its revoked jtis --
lands in one Redis Cluster hash slot, so Refresh and Introspect are single atomic steps
and revoke-by-subject's watermark is one atomic O(1) write. A refresh token carries its
session id, so the key a Refresh touches is known from the token alone.

Refresh tokens (both start with ``tsr1_``, the mark interceptors and log redaction know)::

    v1  tsr1_<sid>_<256 random bits>                          (before families v2)
    v2  tsr1_<sid>_<generation>_<end>_<256 random bits>_<mac>  (hex)

``generation`` counts the family's tokens from 1; ``end`` is the family's absolute end
(UNIX seconds); ``mac`` is HMAC-SHA256 (truncated to 128 bits) of everything before it
under the deployment's ``refresh-mac`` secret (:meth:`tokensvc.keys.ring.KeyRing.secret`).
So the service recognises a token it issued, which generation of its family it was and
when that family ends, without remembering it: that keeps a family's state constant-size
(see :mod:`tokensvc.store.families`), and a token of a session that ended is answered
``expired`` -- never "unknown", which counts as guessing -- however long after the family
left Redis. The random part stays: the MAC key alone does not make a usable token, because
the current one is also checked against its stored hash.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jwcrypto import jwk

from tokensvc_client.verifier import (
    ALGORITHM,
    P256_HALF_ORDER,
    P256_ORDER,
    REFRESH_TOKEN_PREFIX,
    TOKEN_TYPE,
)

_TAG_HEX: Final = 32  # 128-bit subject tag
_SESSION_ID = re.compile(r"[0-9a-f]{64}")
_REFRESH_TOKEN = re.compile(re.escape(REFRESH_TOKEN_PREFIX) + r"([0-9a-f]{64})_[0-9a-f]{64}")
_REFRESH_V2 = re.compile(
    re.escape(REFRESH_TOKEN_PREFIX)
    + r"(?P<sid>[0-9a-f]{64})_(?P<gen>[1-9a-f][0-9a-f]{0,11})_(?P<end>[1-9a-f][0-9a-f]{0,11})"
    + r"_(?P<rand>[0-9a-f]{64})_(?P<mac>[0-9a-f]{32})"
)
_SEAL_INFO: Final = b"tokensvc refresh grace seal v1"


class SubjectTags:
    """A subject's tag: the Redis hash tag of everything of that subject and the first half
    of its session ids, HMAC-SHA256 of the subject under the deployment's ``subject-tag``
    secret (:meth:`tokensvc.keys.ring.KeyRing.secret`), 128 bits. Session ids, tokens and
    the revocation feed carry only tags, so nobody who sees them can test guesses of the
    subject without that secret.

    Sessions from before keyed tags start with the :meth:`legacy` tag, an unsalted
    SHA-256 of the subject: they keep working and every per-subject operation also covers
    them (the store's ``revoke_subject``, ``unlock_subject``, ``list_sessions``).
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the subject-tag key must have 256 bits")
        self._key = key

    def of(self, subject: str) -> str:
        return hmac.new(self._key, subject.encode("utf-8"), hashlib.sha256).hexdigest()[:_TAG_HEX]

    @staticmethod
    def legacy(subject: str) -> str:
        """The tag the service used before keyed tags."""
        return hashlib.sha256(subject.encode("utf-8")).hexdigest()[:_TAG_HEX]


def new_session_id(tag: str) -> str:
    """A fresh session id: the subject's tag followed by 128 random bits."""
    return tag + secrets.token_hex(16)


def is_session_id(value: str) -> bool:
    return _SESSION_ID.fullmatch(value) is not None


def tag_of(session_id: str) -> str:
    return session_id[:_TAG_HEX]


@dataclass(frozen=True, slots=True)
class PresentedRefresh:
    """A refresh token as presented: its session, generation (0: a v1 token), its
    family's end (UNIX s; 0: unknown, v1), stored-form hash, and whether its MAC proves
    the service issued it (v2 only)."""

    token: str
    session_id: str
    generation: int
    ends_at: int
    hash: str
    genuine: bool


class RefreshTokens:
    """Makes and reads refresh tokens under the deployment's MAC key (module doc)."""

    def __init__(self, mac_key: bytes) -> None:
        if len(mac_key) < 32:
            raise ValueError("the refresh-token MAC key must have 256 bits")
        self._key = mac_key

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode("ascii"), hashlib.sha256).hexdigest()[:32]

    def new(
        self, session_id: str, generation: int, ends_at: int, random_part: bytes | None = None
    ) -> str:
        """A v2 token of ``generation`` (>= 1) of a family ending at ``ends_at`` (UNIX s);
        ``random_part``: 32 bytes, fresh if None."""
        rand = (random_part if random_part is not None else secrets.token_bytes(32)).hex()
        body = f"{_v2_head(session_id, generation, ends_at)}{rand}"
        return f"{body}_{self._mac(body)}"

    def parse(self, token: str) -> PresentedRefresh | None:
        """The parts of a well-formed refresh token, else ``None``."""
        v2 = _REFRESH_V2.fullmatch(token)
        if v2 is not None:
            body = token[: v2.start("mac") - 1]
            genuine = hmac.compare_digest(self._mac(body), v2.group("mac"))
            gen, end = int(v2.group("gen"), 16), int(v2.group("end"), 16)
            return PresentedRefresh(token, v2.group("sid"), gen, end, refresh_hash(token), genuine)
        v1 = _REFRESH_TOKEN.fullmatch(token)
        if v1 is not None:
            return PresentedRefresh(token, v1.group(1), 0, 0, refresh_hash(token), False)
        return None

    @staticmethod
    def seal(presented: str, successor: str) -> bytes:
        """The successor's random part, encrypted under a key only the presenter of
        ``presented`` can derive (HKDF of the token itself; Redis holds just its hash):
        what a grace-window replay returns (tokensvc.api.servicer). 60 bytes."""
        match = _REFRESH_V2.fullmatch(successor)
        if match is None:
            raise ValueError("not a v2 refresh token")
        nonce = secrets.token_bytes(12)
        aad = successor[: match.start("rand")].encode("ascii")
        return nonce + _sealer(presented).encrypt(nonce, bytes.fromhex(match["rand"]), aad)

    def unseal(
        self, presented: PresentedRefresh, generation: int, ends_at: int, box: bytes
    ) -> str | None:
        """The successor sealed by :meth:`seal`, or ``None`` if ``box`` does not open."""
        sid = presented.session_id
        aad = _v2_head(sid, generation, ends_at).encode("ascii")
        try:
            rand = _sealer(presented.token).decrypt(box[:12], box[12:], aad)
        except (InvalidTag, ValueError):
            return None
        return self.new(sid, generation, ends_at, rand)


def _v2_head(session_id: str, generation: int, ends_at: int) -> str:
    return f"{REFRESH_TOKEN_PREFIX}{session_id}_{generation:x}_{ends_at:x}_"


def _sealer(presented: str) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SEAL_INFO)
    return AESGCM(hkdf.derive(presented.encode("ascii")))


def refresh_hash(token: str) -> str:
    """What Redis stores instead of the refresh token (256-bit random input: no salt needed)."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def new_token_id() -> str:
    return secrets.token_urlsafe(16)


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def sign_access_token(
    key: jwk.JWK | ec.EllipticCurvePrivateKey,
    kid: str,
    claims: dict[str, Any],
    typ: str = TOKEN_TYPE,
) -> str:
    """Sign claims as a compact ES256 JWS with ``typ: at+jwt`` (RFC 9068), or another
    ``typ`` (``txntoken+jwt`` for a Transaction Token).

    ``key`` is best the ``cryptography`` private key itself (a local signer keeps it, see
    :class:`tokensvc.keys.local.SigningKey`): signing then goes straight to OpenSSL, with
    none of jwcrypto's per-call work (about a third of a token's signing cost). A
    ``jwk.JWK`` is accepted too (tests, tools). The format is the same either way: ECDSA
    over SHA-256 of the signing input, R||S, normalised to low-S by :func:`compact_jws`;
    jwcrypto stays the verifier's library.
    """
    private = key if isinstance(key, ec.EllipticCurvePrivateKey) else key.get_op_key("sign")
    data = signing_input(kid, claims, typ).encode("ascii")
    r, s = decode_dss_signature(private.sign(data, _ECDSA_SHA256))
    return compact_jws_bytes(data, r.to_bytes(32, "big") + s.to_bytes(32, "big"))


_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())


@functools.lru_cache(maxsize=64)
def _header(kid: str, typ: str) -> str:
    """A token's encoded JOSE header (a handful of kids in a ring's life, two typs)."""
    return _b64url(_compact_json({"alg": ALGORITHM, "typ": typ, "kid": kid}))


def signing_input(kid: str, claims: dict[str, Any], typ: str = TOKEN_TYPE) -> str:
    """``header.payload`` of an access token (or, with its ``typ``, a Transaction Token):
    what an ES256 signer signs (SHA-256 of it)."""
    return f"{_header(kid, typ)}.{_b64url(_compact_json(claims))}"


def compact_jws_bytes(data: bytes, signature: bytes) -> str:
    """:func:`compact_jws` of a signing input already encoded."""
    if len(signature) != 64:
        raise ValueError("an ES256 signature is 64 bytes (R||S)")
    encoded = base64.urlsafe_b64encode(_low_s(signature)).rstrip(b"=")
    return (data + b"." + encoded).decode("ascii")


def compact_jws(data: str, signature: bytes) -> str:
    """The compact JWS of a signing input and its raw R||S signature (normalised to low-S,
    the only spelling the verifier accepts), from any signer (in-process or a PKCS#11
    token's CKM_ECDSA)."""
    return compact_jws_bytes(data.encode("ascii"), signature)


def access_token_size(claims: dict[str, Any]) -> int:
    """The length :func:`sign_access_token` gives these claims (header, payload and the
    86-character signature), without signing."""
    header = _compact_json({"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": "k" * 43})
    return len(_b64url(header)) + len(_b64url(_compact_json(claims))) + 2 + 86


def _b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8")).rstrip(b"=").decode("ascii")


def _low_s(raw: bytes) -> bytes:
    """Normalise an R||S signature to low-S form; the verifier accepts only that spelling."""
    s = int.from_bytes(raw[32:], "big")
    if s <= P256_HALF_ORDER:
        return raw
    return raw[:32] + (P256_ORDER - s).to_bytes(32, "big")
