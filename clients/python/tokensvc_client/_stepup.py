"""Step-up requirements (RFC 9470): what a token must show, beyond being valid, to call
a method.

:class:`StepUp` is one requirement (roles, ``acr``, authentication age),
:class:`StepUpTable` finds the one for a method (exact name or longest prefix), and
:func:`insufficient_user_authentication` builds the refusal with the ``www-authenticate``
challenge telling the caller how to step up. The decision applying them is
:meth:`tokensvc_client._auth.Authenticator.decide`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc

from tokensvc_client._handlers import method_key
from tokensvc_client._rejection import Rejection
from tokensvc_client.cache import BoundedCache
from tokensvc_client.errors import REASON_TRAILER, Reason

# Printable ASCII but space, double quote and backslash: safe inside a quoted auth-param
# of www-authenticate, and separable by spaces in its acr_values.
_ACR_VALUE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


@dataclass(frozen=True, slots=True, init=False)
class StepUp:
    """What a token must show, beyond being valid, to call a method (RFC 9470 step-up).

    Args:
        roles: every one of these must be in the token's ``roles``.
        acr: if not empty, the token's ``acr`` must be one of these.
        max_auth_age: if set, the token's ``auth_time`` must be at most this many seconds
            before now (the verifier's clock, without leeway); a token without
            ``auth_time`` fails.

    A missing role is PERMISSION_DENIED ``insufficient role``; a failed ``acr`` or age
    requirement is PERMISSION_DENIED ``insufficient user authentication`` with a
    ``www-authenticate`` trailer (RFC 9470 section 3) naming the ``acr_values`` and
    ``max_age`` to satisfy. ``StepUp()`` requires nothing: as an exact entry it exempts
    one method from a prefix entry.

    Raises:
        TypeError: ``roles`` or ``acr`` given as one string instead of a collection.
        ValueError: an empty role, an ``acr`` value that cannot be sent in the
            ``www-authenticate`` header (only printable ASCII without spaces, quotes or
            backslashes), or a negative ``max_auth_age``.
    """

    roles: frozenset[str]
    acr: frozenset[str]
    max_auth_age: int | None

    def __init__(
        self,
        roles: Iterable[str] = frozenset(),
        acr: Iterable[str] = frozenset(),
        max_auth_age: int | None = None,
    ) -> None:
        if isinstance(roles, str) or isinstance(acr, str):
            raise TypeError("pass roles and acr as collections of strings, not one string")
        role_set, acr_set = frozenset(roles), frozenset(acr)
        if not all(isinstance(r, str) and r for r in role_set):
            raise ValueError("roles must be non-empty strings")
        if not all(isinstance(a, str) and _ACR_VALUE.fullmatch(a) for a in acr_set):
            raise ValueError("acr values must be printable ASCII without spaces or quotes")
        if max_auth_age is not None and (
            isinstance(max_auth_age, bool) or not isinstance(max_auth_age, int) or max_auth_age < 0
        ):
            raise ValueError("max_auth_age must be a non-negative number of seconds")
        object.__setattr__(self, "roles", role_set)
        object.__setattr__(self, "acr", acr_set)
        object.__setattr__(self, "max_auth_age", max_auth_age)


@functools.lru_cache(maxsize=256)
def insufficient_user_authentication(step_up: StepUp, description: str) -> Rejection:
    """PERMISSION_DENIED with the RFC 9470 challenge telling the caller how to step up."""
    challenge = (
        f'Bearer error="insufficient_user_authentication", error_description="{description}"'
    )
    if step_up.acr:
        challenge += f', acr_values="{" ".join(sorted(step_up.acr))}"'
    if step_up.max_auth_age is not None:
        challenge += f', max_age="{step_up.max_auth_age}"'
    return Rejection(
        grpc.StatusCode.PERMISSION_DENIED,
        "insufficient user authentication",
        (
            (REASON_TRAILER, Reason.INSUFFICIENT_USER_AUTHENTICATION.value),
            ("www-authenticate", challenge),
        ),
    )


class StepUpTable:
    """Step-up requirements by full method name, or by prefix (an entry ending in "/", as
    in :class:`~tokensvc_client._handlers.MethodFilter`). An exact entry wins over
    prefixes; of several prefixes the longest wins."""

    #: lookups remembered; gRPC only asks about registered methods, so few are ever seen
    _MEMO_MAX = 4096

    def __init__(self, entries: Mapping[str, StepUp]) -> None:
        for key in entries:
            method_key(key, "step_up key")
        if not all(isinstance(v, StepUp) for v in entries.values()):
            raise TypeError("step-up requirements must be StepUp instances")
        self._exact = {k: v for k, v in entries.items() if not k.endswith("/")}
        self._prefixes = sorted(
            ((k, v) for k, v in entries.items() if k.endswith("/")),
            key=lambda item: len(item[0]),
            reverse=True,
        )
        # method -> (its requirement or None,): a hit is never mistaken for "none required"
        self._memo: BoundedCache[str, tuple[StepUp | None]] = BoundedCache(self._MEMO_MAX)

    def __len__(self) -> int:
        return len(self._exact) + len(self._prefixes)

    def lookup(self, method: str) -> StepUp | None:
        """The requirement for ``method``, or ``None``."""
        hit = self._memo.get(method)
        if hit is not None:
            return hit[0]
        found = self._exact.get(method)
        if found is None:
            found = next((v for k, v in self._prefixes if method.startswith(k)), None)
        self._memo.put(method, (found,))
        return found
