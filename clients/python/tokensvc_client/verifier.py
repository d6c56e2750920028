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

This module is the public home of every name of the verifier; the parts live in private
siblings: the token's shape and header (``_jws``: :func:`parse`), the claim types
(``_claims``: :class:`Claims`, :class:`TransactionClaims`) and the key set (``_keyset``:
:class:`KeySet`). The verifiers and the signature check are here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from jwcrypto import jwa, jwk

from tokensvc_client import _metrics
from tokensvc_client._claims import (
    MAX_ACT_NESTING,
    Claims,
    TransactionClaims,
    actor_chain,
    claims_from_dict,
    transaction_claims_from_dict,
)
from tokensvc_client._jws import (
    ACCEPTED_TXN_TYP,
    ALGORITHM,
    DEFAULT_MAX_TOKEN_BYTES,
    REFRESH_TOKEN_PREFIX,
    TOKEN_TYPE,
    TXN_TOKEN_TYPE,
    ParsedToken,
    b64url_decode,
    parse,
    strict_json_object,
)
from tokensvc_client._keyset import KeySet
from tokensvc_client.cache import BoundedCache
from tokensvc_client.errors import InvalidToken, KeysUnavailable, Reason

#: Every public name of the verifier (the classes and functions of the private parts too),
#: and the errors it raises.
__all__ = [
    "ALGORITHM",
    "DEFAULT_LEEWAY_SECONDS",
    "DEFAULT_MAX_TOKEN_BYTES",
    "MAX_ACT_NESTING",
    "P256_HALF_ORDER",
    "P256_ORDER",
    "REFRESH_TOKEN_PREFIX",
    "TOKEN_TYPE",
    "TXN_TOKEN_TYPE",
    "Claims",
    "InvalidToken",
    "KeySet",
    "KeysUnavailable",
    "ParsedToken",
    "Reason",
    "TransactionClaims",
    "TransactionVerifier",
    "Verifier",
    "actor_chain",
    "b64url_decode",
    "claims_from_dict",
    "parse",
    "strict_json_object",
    "transaction_claims_from_dict",
]

DEFAULT_LEEWAY_SECONDS: Final = 30

# Order of the P-256 group: r and s must lie in [1, n-1] (SEC 1, 4.1.4).
P256_ORDER: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P256_HALF_ORDER: Final = P256_ORDER // 2
_ES256: Final = jwa.JWA.signing_alg(ALGORITHM)


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
        parsed = parse(token, self.max_token_bytes, accepted=ACCEPTED_TXN_TYP)
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
