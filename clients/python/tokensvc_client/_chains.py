"""Call chains in the interceptors' decision (docs/call-chains.md): the Transaction Token
of a call and the actor chain of its access token.

- :class:`TransactionTokens`: verifies the inbound ``txn-token`` metadata entry when one is
  present, or refuses calls to the methods that require one without it. A rejected
  Transaction Token answers UNAUTHENTICATED ``invalid txn-token: <reason code>``.
- :class:`ActorChain`: the actor chains (RFC 8693 ``act``, see
  :attr:`~tokensvc_client.verifier.Claims.actors`) a method accepts -- how many workloads
  at least or at most, and which. Refused with PERMISSION_DENIED ``actor chain not
  accepted`` (trailer ``tokensvc-reason: actor_chain``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc

from tokensvc_client._handlers import MethodFilter, method_key
from tokensvc_client._rejection import TXN_PREFIX, Rejection
from tokensvc_client.errors import REASON_TRAILER, Reason
from tokensvc_client.verifier import Claims, TransactionVerifier

ACTOR_CHAIN_DENIED = Rejection(
    grpc.StatusCode.PERMISSION_DENIED,
    "actor chain not accepted",
    ((REASON_TRAILER, Reason.ACTOR_CHAIN.value),),
)


def invalid_txn_token(reason: Reason) -> Rejection:
    """UNAUTHENTICATED with the stable reason code of the Transaction Token's refusal."""
    return Rejection(grpc.StatusCode.UNAUTHENTICATED, TXN_PREFIX + reason.value)


@dataclass(frozen=True, slots=True)
class TransactionTokens:
    """How an interceptor treats Transaction Tokens.

    Args:
        verifier: checks them for this trust domain (the same keys as access tokens).
        required: methods (and prefixes ending in "/") refused without one.
    """

    verifier: TransactionVerifier
    required: MethodFilter

    @classmethod
    def of(
        cls,
        trust_domain: str | None,
        require: Iterable[str],
        *,
        issuer: str,
        leeway: int,
        clock: Callable[[], float],
    ) -> TransactionTokens | None:
        """The interceptors' arguments -> this, or ``None`` without a trust domain.

        Raises:
            ValueError: ``require_txn_token`` without a ``trust_domain``.
        """
        required = tuple(require)
        if not trust_domain:
            if required:
                raise ValueError("require_txn_token needs the trust_domain to verify them")
            return None
        verifier = TransactionVerifier(
            trust_domain,
            issuer=issuer,
            leeway=leeway,
            clock=clock,
        )
        return cls(verifier, MethodFilter(required))


@dataclass(frozen=True, slots=True)
class ActorChain:
    """The actor chains a method accepts (RFC 8693 ``act``: the workloads a token was
    exchanged by, the last exchange first).

    Attributes:
        min_depth: at least this many actors (1: the token must have been exchanged, so
            the call comes through a known workload, not straight from a user's client).
        max_depth: at most this many (``None``: no limit; 0: never an exchanged token).
        actors: when not empty, every actor must be one of these identities.
    """

    min_depth: int = 0
    max_depth: int | None = None
    actors: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.min_depth < 0 or (self.max_depth is not None and self.max_depth < self.min_depth):
            raise ValueError("ActorChain needs 0 <= min_depth <= max_depth")
        if isinstance(self.actors, str):
            raise TypeError("actors is a collection of identities, not one string")

    def accepts(self, claims: Claims) -> bool:
        chain = claims.actors
        if len(chain) < self.min_depth:
            return False
        if self.max_depth is not None and len(chain) > self.max_depth:
            return False
        return not self.actors or all(actor in self.actors for actor in chain)


class ActorChainTable:
    """Actor-chain requirements by full method name or prefix ending in "/" (an exact entry
    wins; of several prefixes the longest)."""

    def __init__(self, entries: Mapping[str, ActorChain]) -> None:
        for key in entries:
            method_key(key, "actor_chains key")
        if not all(isinstance(v, ActorChain) for v in entries.values()):
            raise TypeError("actor-chain requirements must be ActorChain instances")
        self._exact = {k: v for k, v in entries.items() if not k.endswith("/")}
        self._prefixes = sorted(
            ((k, v) for k, v in entries.items() if k.endswith("/")),
            key=lambda item: len(item[0]),
            reverse=True,
        )

    def __len__(self) -> int:
        return len(self._exact) + len(self._prefixes)

    def lookup(self, method: str) -> ActorChain | None:
        found = self._exact.get(method)
        if found is None:
            found = next((v for k, v in self._prefixes if method.startswith(k)), None)
        return found


try:  # the OpenTelemetry API is optional: without it there is no span to annotate
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - the test environment has it
    _trace = None  # type: ignore[assignment]

#: Span attribute (and log record attribute ``txn``) carrying the transaction id.
TXN_ATTRIBUTE = "tokensvc.txn"


def annotate_span(transaction_id: str) -> None:
    """Put the transaction id on the current span, so a trace and a transaction can be
    joined (a no-op without OpenTelemetry or outside a recording span)."""
    if _trace is not None:
        _trace.get_current_span().set_attribute(TXN_ATTRIBUTE, transaction_id)
