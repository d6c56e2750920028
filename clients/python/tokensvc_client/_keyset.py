"""Key selection: the :class:`KeySet` a verifier looks a token's ``kid`` up in, built only
from a JWK Set of the configured source (never from the token).

Private: import :class:`KeySet` from :mod:`tokensvc_client.verifier` (or the package).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from jwcrypto import jwk

from tokensvc_client._jws import ALGORITHM
from tokensvc_client.errors import KeysUnavailable


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
