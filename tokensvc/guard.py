"""Admission of every call: who is calling, may they call this RPC, are they over a limit.

- **Identity** comes from the verified TLS client certificate (:mod:`tokensvc_client.peer`):
  a SPIFFE ID from exactly one valid URI SAN, or ``cn:NAME`` only with
  ``--allow-cn-identities``. A certificate refused as ambiguous or invalid makes its
  caller anonymous; the refusal is logged and audited (``identity_refused``, once per
  certificate and process) and every denied call of that caller carries the reason.
  Anonymous callers' limits are keyed by their network address.
- **Caller policy** (:mod:`tokensvc.policy`) decides per RPC. In plaintext development mode
  (``--insecure``, loopback only) there are no identities and the policy is not enforced;
  the server logs that loudly at start.
- **Rate limits** are GCRA counters in Redis, shared by every replica
  (:mod:`tokensvc.store`): Issue per subject runs inside Issue's own script (no extra round
  trip); Refresh and Introspect per peer, when enabled, cost one round trip each; failed
  authentications per peer (bad or unknown tokens, certificate mismatches, policy
  denials; not expired or revoked ones) cost a round trip only when a call fails, and a
  peer over that limit is then refused its :data:`GUESSABLE` calls locally
  (RESOURCE_EXHAUSTED) until its wait is over.

The admitted caller is kept in a context variable for the handler (binding, audit).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc.aio

from tokensvc.audit import AuditTrail
from tokensvc.config import Rate, Settings
from tokensvc.errors import Denied, RateLimited, ServiceError
from tokensvc.policy import CallerPolicy
from tokensvc.store import FamilyStore, Limit, peer_limit_key
from tokensvc_client.peer import ANONYMOUS, Peer, peer_of

log = logging.getLogger("tokensvc.guard")
_BLOCKED_MAX = 10_000
SELF_SERVICE = frozenset({"ListSessions"})
#: RPCs whose credential is a token the caller presents: where guessing could happen, and
#: the only ones a peer over the failed-authentication limit is refused (so a login
#: service whose users send bad refresh tokens can still Issue and Revoke).
GUESSABLE = frozenset({"Refresh", "ListSessions"})
#: Refusals that are normal life, not guessing: they are audited but not counted.
_NOT_COUNTED = frozenset({"expired", "revoked", "reused"})
#: Distinct refused certificates audited per process (then only logged by the peer module).
_REFUSALS_MAX = 1024


@dataclass(frozen=True, slots=True)
class Caller:
    """The admitted caller of one RPC."""

    peer: Peer
    address: str

    @property
    def name(self) -> str:
        """Identity for logs and the audit trail: the mTLS identity, else the address."""
        return self.peer.identity or self.address

    @property
    def key(self) -> str:
        """What per-peer limits count against."""
        return self.peer.identity or f"addr:{self.address}"


_current: ContextVar[Caller] = ContextVar("tokensvc_caller")


def current_caller() -> Caller:
    """The caller of the RPC being served (set by the ``rpc`` decorator's admission)."""
    return _current.get(Caller(ANONYMOUS, ""))


def _address(peer: str) -> str:
    """``ipv4:10.0.0.1:5000`` -> ``10.0.0.1``; ``ipv6:[::1]:5000`` -> ``::1``."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def _limit(rate: Rate) -> Limit:
    return Limit.of(rate.count, rate.period)


class Guard:
    """Admits calls for the servicer (see :class:`tokensvc.errors.Guarded`)."""

    def __init__(
        self,
        settings: Settings,
        store: FamilyStore,
        audit: AuditTrail,
        policy: CallerPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enforce = not settings.insecure
        self.store = store
        self.audit = audit
        self.policy = policy
        self.clock = clock
        self.failures = _limit(settings.rate_auth_failures)
        self.per_peer = {
            name: _limit(rate)
            for name, rate in (
                ("Refresh", settings.rate_refresh),
                ("Introspect", settings.rate_introspect),
            )
            if rate.enabled
        }
        self.common_names = settings.allow_cn_identities
        self._blocked: dict[str, float] = {}
        self._refusals: set[str] = set()

    async def admit(self, rpc: str, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        """Admit a call or raise :class:`Denied` / :class:`RateLimited`."""
        peer = peer_of(context, common_names=self.common_names)
        caller = Caller(peer, _address(context.peer() or ""))
        _current.set(caller)
        if peer.refused and peer.refused not in self._refusals:
            if len(self._refusals) < _REFUSALS_MAX:
                self._refusals.add(peer.refused)
            self.audit.record("identity_refused", peer=caller.name, reason=peer.refused)
        if rpc in GUESSABLE:
            self._check_blocked(caller)
        # ListSessions also serves the subject itself: its handler decides (tokensvc.sessions)
        if self.enforce and rpc not in SELF_SERVICE and not self.policy.admits(rpc, caller.peer):
            raise Denied(f"caller is not allowed to call {rpc}")
        limit = self.per_peer.get(rpc)
        if limit is not None:
            wait = await self.store.hit(peer_limit_key(rpc, caller.key), limit)
            if wait:
                self.audit.record("rate_limited", peer=caller.name, reason=f"{rpc} per peer")
                raise RateLimited(f"too many {rpc} calls; retry later", wait)
        return caller

    def _check_blocked(self, caller: Caller) -> None:
        until = self._blocked.get(caller.key)
        if until is None:
            return
        left = until - self.clock()
        if left <= 0:
            self._blocked.pop(caller.key, None)
            return
        raise RateLimited("too many failed authentications; retry later", int(left * 1000))

    async def rejected(self, rpc: str, err: ServiceError) -> None:
        """Audit a denied or unauthenticated call and count it against the peer."""
        caller = current_caller()
        event = "denied" if isinstance(err, Denied) else "auth_failed"
        reason = f"{rpc}: {err.message}"
        if caller.peer.refused:
            reason += f" (no identity: {caller.peer.refused})"
        self.audit.record(event, peer=caller.name, reason=reason)
        if not self.failures.enabled or err.message in _NOT_COUNTED:
            return
        try:
            wait = await self.store.hit(peer_limit_key("authfail", caller.key), self.failures)
        except Exception as err:  # the call fails anyway: a lost count must not hide why
            log.warning("failed-authentication count for %s not recorded: %r", caller.name, err)
            return
        if wait:
            if len(self._blocked) >= _BLOCKED_MAX:
                with contextlib.suppress(StopIteration, KeyError):
                    del self._blocked[next(iter(self._blocked))]
            self._blocked[caller.key] = self.clock() + wait / 1000
            self.audit.record("rate_limited", peer=caller.name, reason="failed authentications")
            log.warning("peer %s over the failed-authentication limit", caller.name)
