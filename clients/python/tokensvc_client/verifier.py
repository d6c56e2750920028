"""The one place that decides whether an access token -- or a Transaction Token -- is
acceptable (docs/design.md, Verification rules); Transaction Tokens: docs/call-chains.md.

Used by the server's Introspect and Exchange and by :class:`~tokensvc_client.AuthInterceptor`
alike. The two token kinds are told apart by their JOSE ``typ`` and nothing else: an
access token (``at+jwt``) is never accepted where a Transaction Token (``txntoken+jwt``,
draft-ietf-oauth-transaction-tokens-10) is expected, nor the other way round.

Verification is three steps, each rejecting with one stable :class:`Reason`:

1. :func:`parse` -- shape only: size cap, exactly three canonical base64url segments, a
   strictly parsed header with ``alg`` ES256, ``typ`` at+jwt (``txntoken+jwt`` for
   :class:`TransactionVerifier`), a ``kid`` and nothing else
   (so no ``jwk``/``jku``/``x5u``/``x5c``/``crit``/``zip``), a 64-byte raw R||S signature.
2. :meth:`Verifier.check_signature` -- ``kid`` looked up in a :class:`KeySet` that came from
   the configured JWKS source (never from the token), r and s in range, then jwcrypto's
   ES256 verification.
3. :meth:`Verifier.check_claims` -- strictly typed claims, ``exp``/``nbf``/``iat`` against an
   injectable clock with a small leeway, ``iss`` and ``aud``.

What jwcrypto does not check and this module does: canonical base64url (jwcrypto's decoder
ignores stray characters and non-zero padding bits), the signature length (jwcrypto splits
any byte string in half), duplicate JSON keys, header members beyond the three we emit,
claim types. Revocation is not decided here: the server asks Redis, the interceptor asks
its revocation source; both call this module first.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from jwcrypto import jwa, jwk

from tokensvc_client import _metrics
from tokensvc_client.cache import BoundedCache
from tokensvc_client.errors import InvalidToken, KeysUnavailable, Reason

ALGORITHM: Final = "ES256"
TOKEN_TYPE: Final = "at+jwt"
#: JOSE ``typ`` of a Transaction Token (draft-ietf-oauth-transaction-tokens-10).
TXN_TOKEN_TYPE: Final = "txntoken+jwt"
#: How deep a verifier follows nested ``act`` claims before calling the token malformed
#: (the service mints far fewer: ``--max-act-depth``).
MAX_ACT_NESTING: Final = 16
#: Refresh tokens start with this prefix; see tokensvc.families.tokens.
REFRESH_TOKEN_PREFIX: Final = "tsr1_"
DEFAULT_MAX_TOKEN_BYTES: Final = 4096
DEFAULT_LEEWAY_SECONDS: Final = 30

# Order of the P-256 group: r and s must lie in [1, n-1] (SEC 1, 4.1.4).
P256_ORDER: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P256_HALF_ORDER: Final = P256_ORDER // 2
_ES256: Final = jwa.JWA.signing_alg(ALGORITHM)
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_ALLOWED_HEADER: Final = frozenset({"alg", "typ", "kid"})
_ACCEPTED_TYP: Final = frozenset({"at+jwt", "application/at+jwt"})
_ACCEPTED_TXN_TYP: Final = frozenset({TXN_TOKEN_TYPE, "application/txntoken+jwt"})
# Exclusive bound: 10000-01-01T00:00:00Z, the first instant a protobuf Timestamp cannot hold.
_MAX_NUMERIC_DATE: Final = 253_402_300_800


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


def _check_header(segment: str, accepted: frozenset[str] = _ACCEPTED_TYP) -> str:
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
    accepted: frozenset[str] = _ACCEPTED_TYP,
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


class KeySet:
    """Immutable set of ES256 public verification keys, indexed by ``kid``.

    Built only from a JWK Set obtained from the configured source (GetKeys or a pinned
    URL). Keys that are not EC P-256, carry private material or lack a ``kid`` are refused.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, jwk.JWK]) -> None:
        self._keys = dict(keys)

    @classmethod
    def from_jwks(cls, jwks_json: str) -> KeySet:
        """Parse an RFC 7517 JWK Set.

        Raises:
            KeysUnavailable: the document is not a usable JWK Set.
        """
        try:
            doc = json.loads(jwks_json)
            entries = doc["keys"]
            if not isinstance(entries, list):
                raise TypeError("keys is not a list")
            keys: dict[str, jwk.JWK] = {}
            for entry in entries:
                if not isinstance(entry, dict):
                    raise TypeError("JWK is not an object")
                if entry.get("kty") != "EC" or entry.get("crv") != "P-256" or "d" in entry:
                    raise ValueError("only public EC P-256 keys are accepted")
                if entry.get("use", "sig") != "sig" or entry.get("alg", ALGORITHM) != ALGORITHM:
                    continue
                kid = entry.get("kid")
                if not isinstance(kid, str) or not kid:
                    raise ValueError("JWK without kid")
                keys[kid] = jwk.JWK(**entry)
        except (ValueError, TypeError, KeyError) as err:
            raise KeysUnavailable(f"unusable JWK Set: {err}") from err
        return cls(keys)

    @classmethod
    def of(cls, keys: Iterable[jwk.JWK]) -> KeySet:
        """Build from jwcrypto keys (public parts are taken)."""
        return cls.from_jwks(json.dumps({"keys": [json.loads(k.export_public()) for k in keys]}))

    def get(self, kid: str) -> jwk.JWK | None:
        return self._keys.get(kid)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified claims of an access token."""

    issuer: str
    subject: str
    audience: tuple[str, ...]
    expires_at: int
    issued_at: int
    not_before: int
    token_id: str
    session_id: str
    client_id: str
    roles: tuple[str, ...]
    acr: str = ""
    amr: tuple[str, ...] = ()
    auth_time: int | None = None
    cnf_x5t_s256: str = ""
    #: The ``kid`` of the key that signed the token (its JOSE header); empty when the
    #: claims did not come from a verified token (e.g. :func:`claims_from_dict` alone).
    key_id: str = ""
    #: The actor chain of an exchanged token (RFC 8693 ``act``): the workload that made
    #: the last exchange first, then the earlier ones; empty for a token never exchanged
    #: (or exchanged by impersonation).
    actors: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _str(claims: Mapping[str, Any], name: str, *, required: bool, nonempty: bool = False) -> str:
    value = claims.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (nonempty and not value):
        raise InvalidToken(Reason.BAD_CLAIMS, f"{name} must be a string")
    return value


def _str_list(claims: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidToken(Reason.BAD_CLAIMS, f"{name} must be a list of strings")
    return tuple(value)


def _date(claims: Mapping[str, Any], name: str) -> int:
    """A required NumericDate: an integer (not a bool, not a float), 0 <= v < 2**53."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_NUMERIC_DATE:
        raise InvalidToken(Reason.BAD_CLAIMS, f"{name} must be an integer NumericDate")
    return value


def _optional_date(claims: Mapping[str, Any], name: str) -> int | None:
    return None if claims.get(name) is None else _date(claims, name)


def actor_chain(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``sub`` of each nested ``act`` (RFC 8693 4.1), outermost (current actor) first.

    Raises:
        InvalidToken: ``BAD_CLAIMS`` for an ``act`` that is not an object with a string
            ``sub``, or nested deeper than :data:`MAX_ACT_NESTING`.
    """
    actors: list[str] = []
    act = claims.get("act")
    while act is not None:
        if len(actors) >= MAX_ACT_NESTING:
            raise InvalidToken(Reason.BAD_CLAIMS, "act nested too deep")
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
            raise InvalidToken(Reason.BAD_CLAIMS, "act must be an object with a sub")
        actors.append(act["sub"])
        act = act.get("act")
    return tuple(actors)


def claims_from_dict(claims: Mapping[str, Any], *, key_id: str = "") -> Claims:
    """Type-check a claims object into :class:`Claims` (no time or issuer checks);
    ``key_id`` is the signing key's ``kid``, from the token's header."""
    aud = claims.get("aud")
    if isinstance(aud, str):
        audience: tuple[str, ...] = (aud,)
    else:
        audience = _str_list(claims, "aud")
    if not audience:
        raise InvalidToken(Reason.BAD_CLAIMS, "aud missing")
    cnf = claims.get("cnf")
    thumbprint = ""
    if cnf is not None:
        if not isinstance(cnf, dict) or not isinstance(cnf.get("x5t#S256"), str):
            raise InvalidToken(Reason.BAD_CLAIMS, "cnf must hold x5t#S256")
        thumbprint = cnf["x5t#S256"]
    return Claims(
        issuer=_str(claims, "iss", required=True),
        subject=_str(claims, "sub", required=True, nonempty=True),
        audience=audience,
        expires_at=_date(claims, "exp"),
        issued_at=_date(claims, "iat"),
        not_before=_date(claims, "nbf"),
        token_id=_str(claims, "jti", required=True, nonempty=True),
        session_id=_str(claims, "sid", required=True, nonempty=True),
        client_id=_str(claims, "client_id", required=False),
        roles=_str_list(claims, "roles"),
        acr=_str(claims, "acr", required=False),
        amr=_str_list(claims, "amr"),
        auth_time=_optional_date(claims, "auth_time"),
        cnf_x5t_s256=thumbprint,
        key_id=key_id,
        actors=actor_chain(claims),
        raw=claims,
    )


class Verifier:
    """Verifies access tokens against one issuer and one expected audience.

    Args:
        issuer: the only accepted ``iss``.
        audience: the audience this verifier belongs to; must be in the token's ``aud``.
            ``None`` accepts any audience (only the token service itself uses that, for
            Introspect, where the caller checks the audience it cares about).
        leeway: seconds of clock skew tolerated for ``nbf`` and ``iat``. ``exp`` gets none.
        max_token_bytes: tokens longer than this are rejected before any decoding.
        clock: returns the current UNIX time; injectable for tests.
        cache_size: how many verified tokens to remember (0 disables the cache). A repeated
            token then costs a dict lookup instead of a signature check.
    """

    def __init__(
        self,
        issuer: str,
        audience: str | None,
        *,
        leeway: int = DEFAULT_LEEWAY_SECONDS,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        clock: Callable[[], float] = time.time,
        cache_size: int = 4096,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.max_token_bytes = max_token_bytes
        self.clock = clock
        # Verified tokens, keyed by the exact token string (so a different token can never
        # hit another's entry), bounded, each valid only until its exp and while its key is
        # still in the key set. Revocation is checked by the callers on every call, hit or
        # not. Only tokens that passed every check are stored.
        self._cache_size = cache_size
        self._cache: BoundedCache[str, tuple[Claims, str, jwk.JWK | None]] = BoundedCache(
            cache_size
        )

    @property
    def cache_size(self) -> int:
        """How many verified tokens are remembered (0: none)."""
        return self._cache_size

    def verify(self, token: str, keys: KeySet) -> Claims:
        """Run every check of (docs/design.md, Verification rules) except revocation.

        Raises:
            InvalidToken: the token is not acceptable; ``reason`` says why.
        """
        hit = self._cache.get(token) if self._cache_size else None
        if hit is not None:
            claims, kid, key = hit
            # the entry is only as good as its key (still published, same object) and its
            # lifetime; nbf/iat were in the past already when it was stored
            if keys.get(kid) is key and self.clock() < claims.expires_at:
                _metrics.TOTALS.hits += 1
                return claims
            self._cache.pop(token, None)
        _metrics.TOTALS.misses += 1
        parsed = parse(token, self.max_token_bytes)
        self.check_signature(parsed, keys)
        claims = self.check_claims(parsed)
        self._cache.put(token, (claims, parsed.kid, keys.get(parsed.kid)))
        return claims

    @staticmethod
    def check_signature(parsed: ParsedToken, keys: KeySet) -> None:
        """Verify the ES256 signature with the key named by ``kid``.

        Raises:
            InvalidToken: ``UNKNOWN_KEY`` or ``BAD_SIGNATURE``.
        """
        key = keys.get(parsed.kid)
        if key is None:
            raise InvalidToken(Reason.UNKNOWN_KEY)
        r = int.from_bytes(parsed.signature[:32], "big")
        s = int.from_bytes(parsed.signature[32:], "big")
        # low-S only (s <= n/2): otherwise (r, n-s) would be a second valid spelling of
        # every token; tokensvc.families.tokens normalises the signatures it makes.
        if not (0 < r < P256_ORDER and 0 < s <= P256_HALF_ORDER):
            raise InvalidToken(Reason.BAD_SIGNATURE, "r or s out of range")
        try:
            # jwcrypto's ES256 algorithm object, fetched once, over the token's own signing
            # input (JWSCore would re-encode header and payload and redo the algorithm
            # lookup for every token; the header checks JWS adds are done by parse()).
            _ES256.verify(key, parsed.signing_input, parsed.signature)
        except Exception as err:  # jwcrypto raises several types for a bad signature
            raise InvalidToken(Reason.BAD_SIGNATURE) from err

    def check_claims(self, parsed: ParsedToken) -> Claims:
        """Type-check the claims and check time, issuer and audience.

        Raises:
            InvalidToken: ``BAD_CLAIMS``, ``EXPIRED``, ``NOT_YET_VALID``, ``WRONG_ISSUER``
                or ``WRONG_AUDIENCE``.
        """
        try:
            raw = strict_json_object(parsed.payload)
        except ValueError as err:
            raise InvalidToken(Reason.MALFORMED, str(err)) from None
        claims = claims_from_dict(raw, key_id=parsed.kid)
        now = self.clock()
        if now >= claims.expires_at:
            raise InvalidToken(Reason.EXPIRED)
        if claims.not_before > now + self.leeway or claims.issued_at > now + self.leeway:
            raise InvalidToken(Reason.NOT_YET_VALID)
        if claims.issuer != self.issuer:
            raise InvalidToken(Reason.WRONG_ISSUER)
        if self.audience is not None and self.audience not in claims.audience:
            raise InvalidToken(Reason.WRONG_AUDIENCE)
        return claims


# -- Transaction Tokens (draft-ietf-oauth-transaction-tokens-10) ----------------------------


@dataclass(frozen=True, slots=True)
class TransactionClaims:
    """The verified claims of a Transaction Token (draft-ietf-oauth-transaction-tokens-10,
    section "Txn-Token Format"; docs/call-chains.md)."""

    #: ``aud``: the trust domain the token is valid in
    trust_domain: str
    #: ``txn``: the transaction's id, the same in every replacement
    transaction_id: str
    #: ``sub``: the principal of the transaction (a user, or a workload acting on its own)
    subject: str
    #: ``scope`` (space-delimited in the token): the purpose of the transaction
    scope: tuple[str, ...]
    #: ``req_wl``: the workload that requested this token (its mTLS identity)
    requesting_workload: str
    issued_at: int
    expires_at: int
    #: ``req_wl_chain`` (tokensvc): every workload that requested the token or one it
    #: replaces, the edge first, ``requesting_workload`` last (the draft asks a replacement
    #: to keep this call chain and leaves the mechanism open)
    workload_chain: tuple[str, ...] = ()
    #: ``tctx``: the immutable transaction context
    context: Mapping[str, Any] = field(default_factory=dict, compare=False)
    #: ``rctx``: the request context (e.g. ``req_ip``)
    request_context: Mapping[str, Any] = field(default_factory=dict, compare=False)
    #: ``sid`` (tokensvc): the session of the subject token ("" for a workload's own
    #: transaction): revoking the session ends the transaction's tokens
    session_id: str = ""
    #: ``jti`` (tokensvc): this token's id
    token_id: str = ""
    issuer: str = ""
    key_id: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def for_revocation(self) -> Claims:
        """The token as a revocation check sees an access token (session, jti, subject,
        issue time, signing key): one revocation source serves both kinds."""
        return Claims(
            issuer=self.issuer,
            subject=self.subject,
            audience=(self.trust_domain,),
            expires_at=self.expires_at,
            issued_at=self.issued_at,
            not_before=self.issued_at,
            token_id=self.token_id or self.transaction_id,
            session_id=self.session_id,
            client_id="",
            roles=self.scope,
            key_id=self.key_id,
        )


def _object(claims: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = claims.get(name, {})
    if not isinstance(value, dict):
        raise InvalidToken(Reason.BAD_CLAIMS, f"{name} must be a JSON object")
    return value


def transaction_claims_from_dict(
    claims: Mapping[str, Any], *, key_id: str = ""
) -> TransactionClaims:
    """Type-check a Transaction Token's claims (no time or audience checks): every claim
    the draft requires (``iat``, ``aud``, ``exp``, ``txn``, ``sub``, ``scope``,
    ``req_wl``) present and of its type; ``tctx``/``rctx`` objects when present."""
    aud = claims.get("aud")
    audience = (aud,) if isinstance(aud, str) else _str_list(claims, "aud")
    if len(audience) != 1 or not audience[0]:
        raise InvalidToken(Reason.BAD_CLAIMS, "aud must name one trust domain")
    scope = _str(claims, "scope", required=True, nonempty=True)
    chain = _str_list(claims, "req_wl_chain")
    requester = _str(claims, "req_wl", required=True, nonempty=True)
    if chain and chain[-1] != requester:
        raise InvalidToken(Reason.BAD_CLAIMS, "req_wl_chain must end with req_wl")
    return TransactionClaims(
        trust_domain=audience[0],
        transaction_id=_str(claims, "txn", required=True, nonempty=True),
        subject=_str(claims, "sub", required=True, nonempty=True),
        scope=tuple(scope.split()),
        requesting_workload=requester,
        issued_at=_date(claims, "iat"),
        expires_at=_date(claims, "exp"),
        workload_chain=chain or (requester,),
        context=_object(claims, "tctx"),
        request_context=_object(claims, "rctx"),
        session_id=_str(claims, "sid", required=False),
        token_id=_str(claims, "jti", required=False),
        issuer=_str(claims, "iss", required=False),
        key_id=key_id,
        raw=claims,
    )


class TransactionVerifier:
    """Verifies Transaction Tokens for one trust domain (the draft's "Txn-Token
    Validation": signature, ``aud`` = the trust domain, not expired), with the same
    header, signature and claim-type rules as :class:`Verifier`.

    Args:
        trust_domain: the only accepted ``aud``.
        issuer: if set, the ``iss`` every token must carry (tokensvc always sets it; the
            draft makes it optional).
        leeway, max_token_bytes, clock, cache_size: as for :class:`Verifier`.
    """

    def __init__(
        self,
        trust_domain: str,
        *,
        issuer: str | None = None,
        leeway: int = DEFAULT_LEEWAY_SECONDS,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        clock: Callable[[], float] = time.time,
        cache_size: int = 4096,
    ) -> None:
        if not trust_domain:
            raise ValueError("a Transaction Token verifier needs a trust domain")
        self.trust_domain = trust_domain
        self.issuer = issuer
        self.leeway = leeway
        self.max_token_bytes = max_token_bytes
        self.clock = clock
        self._cache_size = cache_size
        self._cache: BoundedCache[str, tuple[TransactionClaims, jwk.JWK | None]] = BoundedCache(
            cache_size
        )

    @property
    def cache_size(self) -> int:
        return self._cache_size

    def verify(self, token: str, keys: KeySet) -> TransactionClaims:
        """Every check except revocation (see :meth:`TransactionClaims.for_revocation`).

        Raises:
            InvalidToken: ``BAD_TYPE`` for an access token (or anything but a Transaction
                Token), ``WRONG_AUDIENCE`` for another trust domain, ``EXPIRED``, ...
        """
        hit = self._cache.get(token) if self._cache_size else None
        if hit is not None:
            claims, key = hit
            if keys.get(claims.key_id) is key and self.clock() < claims.expires_at:
                return claims
            self._cache.pop(token, None)
        parsed = parse(token, self.max_token_bytes, accepted=_ACCEPTED_TXN_TYP)
        Verifier.check_signature(parsed, keys)
        try:
            raw = strict_json_object(parsed.payload)
        except ValueError as err:
            raise InvalidToken(Reason.MALFORMED, str(err)) from None
        claims = transaction_claims_from_dict(raw, key_id=parsed.kid)
        now = self.clock()
        if now >= claims.expires_at:
            raise InvalidToken(Reason.EXPIRED)
        if claims.issued_at > now + self.leeway:
            raise InvalidToken(Reason.NOT_YET_VALID)
        if self.issuer is not None and claims.issuer != self.issuer:
            raise InvalidToken(Reason.WRONG_ISSUER)
        if claims.trust_domain != self.trust_domain:
            raise InvalidToken(Reason.WRONG_AUDIENCE)
        if self._cache_size:
            self._cache.put(token, (claims, keys.get(parsed.kid)))
        return claims
