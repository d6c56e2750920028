"""The shape and header of a compact ES256 JWS (the first step of
:mod:`tokensvc_client.verifier`): size cap, exactly three canonical base64url segments, a
strictly parsed header with ``alg`` ES256, an accepted ``typ`` and a ``kid`` and nothing
else, a 64-byte raw R||S signature; and the strict JSON object parsing the claims use too.

Private: import these names from :mod:`tokensvc_client.verifier`.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from tokensvc_client.cache import BoundedCache
from tokensvc_client.errors import InvalidToken, Reason

ALGORITHM: Final = "ES256"
TOKEN_TYPE: Final = "at+jwt"
#: JOSE ``typ`` of a Transaction Token (draft-ietf-oauth-transaction-tokens-10).
TXN_TOKEN_TYPE: Final = "txntoken+jwt"
#: Refresh tokens start with this prefix; see tokensvc.families.tokens.
REFRESH_TOKEN_PREFIX: Final = "tsr1_"
DEFAULT_MAX_TOKEN_BYTES: Final = 4096

_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_ALLOWED_HEADER: Final = frozenset({"alg", "typ", "kid"})
#: The ``typ`` values accepted for an access token, and for a Transaction Token.
ACCEPTED_TYP: Final = frozenset({"at+jwt", "application/at+jwt"})
ACCEPTED_TXN_TYP: Final = frozenset({TXN_TOKEN_TYPE, "application/txntoken+jwt"})


def b64url_decode(segment: str) -> bytes:
    """Decode one unpadded, canonical base64url segment or raise ``ValueError``."""
    if not _SEGMENT.fullmatch(segment) or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    # Re-encoding must give the segment back: rejects non-zero trailing bits, so one
    # token has exactly one spelling (and the jwcrypto signing input equals the token's).
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        raise ValueError("non-canonical base64url")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate member {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json_object(raw: bytes) -> dict[str, Any]:
    """Parse UTF-8 JSON that must be an object without duplicate members."""
    try:
        text = raw.decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
        # escaped lone surrogates ("\ud800") are valid JSON but not Unicode text; only text
        # with a \u escape can hold one, so the re-encoding check is rarely needed
        if "\\u" in text:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as err:
        raise ValueError("invalid JSON") from err
    if not isinstance(value, dict):
        raise ValueError("JSON is not an object")
    return value


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A token whose shape and header passed :func:`parse`; signature not yet checked."""

    signing_input: bytes
    payload: bytes
    signature: bytes
    kid: str


# Header segments that passed _check_header for a set of accepted types, mapped to their
# kid. Every token of one key and type has the same header, so this small bounded map
# spares the header's decoding and checks on a first sight; a segment is only stored
# after passing every check, and only for the types it was checked against (an access
# token's header never opens the door for a Transaction Token, nor the other way round).
_ACCEPTED_HEADERS: BoundedCache[tuple[str, frozenset[str]], str] = BoundedCache(64)


def _check_header(segment: str, accepted: frozenset[str] = ACCEPTED_TYP) -> str:
    """Check a JOSE header segment (exactly alg=ES256, typ, kid); return the kid."""
    try:
        header = strict_json_object(b64url_decode(segment))
    except ValueError as err:
        raise InvalidToken(Reason.MALFORMED, str(err)) from None
    alg = header.get("alg")
    if alg != ALGORITHM:
        raise InvalidToken(Reason.BAD_ALGORITHM, repr(alg)[:40])
    extra = set(header) - _ALLOWED_HEADER
    if extra:
        raise InvalidToken(Reason.BAD_HEADER, f"unexpected header {sorted(extra)!r}"[:80])
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in accepted:
        raise InvalidToken(Reason.BAD_TYPE, repr(typ)[:40])
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken(Reason.BAD_HEADER, "kid missing")
    _ACCEPTED_HEADERS.put((segment, accepted), kid)
    return kid


def parse(
    token: str,
    max_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
    *,
    accepted: frozenset[str] = ACCEPTED_TYP,
) -> ParsedToken:
    """Check the shape and header of a compact ES256 JWS access token (or, with
    ``accepted`` the Transaction Token types, of a Transaction Token).

    Raises:
        InvalidToken: with the first rule the token breaks.
    """
    if not isinstance(token, str) or not token:
        raise InvalidToken(Reason.MALFORMED, "empty")
    if len(token) > max_bytes:
        raise InvalidToken(Reason.TOO_LARGE, f"longer than {max_bytes}")
    if token.startswith(REFRESH_TOKEN_PREFIX):
        raise InvalidToken(Reason.REFRESH_AS_ACCESS)
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken(Reason.MALFORMED, "not a compact JWS")
    try:
        payload, signature = b64url_decode(parts[1]), b64url_decode(parts[2])
    except ValueError as err:
        raise InvalidToken(Reason.MALFORMED, str(err)) from None
    kid = _ACCEPTED_HEADERS.get((parts[0], accepted)) or _check_header(parts[0], accepted)
    if len(signature) != 64:
        raise InvalidToken(Reason.BAD_SIGNATURE, "not a 64-byte R||S signature")
    signing_input = token[: token.rindex(".")].encode("ascii")
    return ParsedToken(signing_input=signing_input, payload=payload, signature=signature, kid=kid)
