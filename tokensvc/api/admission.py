"""Admission of every call: who is calling, may they call this RPC, are they over a limit.

- **Identity** comes from the verified TLS client certificate (:mod:`tokensvc_client.peer`):
  a SPIFFE ID from exactly one valid URI SAN, or ``cn:NAME`` only with
  ``--allow-cn-identities``. A certificate refused as ambiguous or invalid makes its
  caller anonymous; the refusal is logged and audited (``identity_refused``, once per
  certificate and process) and every denied call of that caller carries the reason.
- **Caller policy** (:mod:`tokensvc.security.policy`) decides per RPC. In plaintext development mode
  (``--insecure``, loopback only) there are no identities and the policy is not enforced;
  the server logs that loudly at start.
- **Rate limits** are GCRA counters in Redis, shared by every replica
  (:mod:`tokensvc.store`): Issue per subject runs inside Issue's own script (no extra round
  trip); Refresh and Introspect per peer, when enabled, cost one round trip each.
- **Failed authentications** (bad or unknown tokens, certificate mismatches, policy
  denials; not expired, revoked or reused ones) cost round trips only when a call fails.
  A credential a peer may be relaying for its end users -- a refresh token, a user's own
  token for ListSessions (see :meth:`Guard.presenting`) -- counts against what it proves
  (its session, or its subject) with ``--rate-auth-failures``, and against the peer only
  with the much higher ``--rate-auth-failures-relay``: one user's garbage refuses that
  user's session, not every user behind the same login service or web backend. A token
  bound to another certificate (:meth:`Guard.mismatched`) counts against that session as
  this peer presents it: the thief is limited, neither the holder nor the relay's other
  users are; it is audited as the security event ``bound_token_misuse`` (with its
  session id; never suppressed, see :mod:`tokensvc.observe.audit`). Over a limit, this
  replica refuses the session's (or, over the relay-wide limit, the peer's
  :data:`GUESSABLE`) calls locally (RESOURCE_EXHAUSTED) until the wait is over. A peer's
  own failures (policy denials) count against the peer with
  ``--rate-auth-failures`` and never refuse its Refresh: over that limit its refused calls
  are still refused as before, but without an audit record or a Redis round trip each
  for at least 10 s (:data:`QUIET_MIN_MS`); the trail gets a periodic ``suppressed``
  count instead. The per-peer Refresh and Introspect limits work the same way: once over,
  refused here until the wait is over, one ``rate_limited`` record per episode.
- **Anonymous callers** are counted per network, not per address: all of 127.0.0.0/8 is
  one caller, and so is each IPv6 /64 (a host has a whole /64 to pick addresses from).

The admitted caller is kept in a context variable for the handler (binding, audit).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import grpc.aio

from tokensvc.config import Rate, Settings
from tokensvc.errors import AuthFailure, Denial, Denied, LimitKind, NotAuthenticated, RateLimited
from tokensvc.observe.audit import AuditTrail
from tokensvc.security.policy import CallerPolicy
from tokensvc.store import FamilyStore, Limit, peer_limit_key
from tokensvc_client.cache import BoundedCache
from tokensvc_client.peer import ANONYMOUS, Peer, peer_of

log = logging.getLogger("tokensvc.guard")
_BLOCKED_MAX = 10_000
SELF_SERVICE = frozenset({"ListSessions"})
#: RPCs whose credential is a token the caller presents: where guessing could happen, and
#: the only ones a peer over the failed-authentication limit is refused (so a login
#: service whose users send bad refresh tokens can still Issue and Revoke).
GUESSABLE = frozenset({"Refresh", "ListSessions"})
#: Distinct refused certificates audited per process (then only logged by the peer module).
_REFUSALS_MAX = 1024
#: Least time a peer over the limit for its own failures is refused without an audit
#: record each (the GCRA wait alone would let one record through every few seconds).
QUIET_MIN_MS = 10_000


class Caller:
    """The admitted caller of one RPC.

    The address is read from the call (``context.peer()``) only when something asks for it
    (a log line or audit record of an anonymous caller, a per-peer limit), not per call.
    """

    __slots__ = ("_address", "_context", "peer", "presented")

    def __init__(
        self,
        peer: Peer,
        address: str | None = None,
        presented: str | None = None,
        *,
        context: grpc.aio.ServicerContext[Any, Any] | None = None,
    ) -> None:
        self.peer = peer
        self._address = address
        self._context = context
        #: limiter key of the end user's credential this call presents on a peer's behalf
        #: ("" when it names none, e.g. a malformed refresh token); None: not a relayed call
        self.presented = presented

    @property
    def address(self) -> str:
        """The caller's network address (``10.0.0.1``, ``::1``)."""
        if self._address is None:
            context, self._context = self._context, None
            self._address = address_of(context.peer() or "") if context is not None else ""
        return self._address

    def presenting(self, presented: str | None) -> Caller:
        """This caller presenting ``presented`` (see :meth:`Guard.presenting`)."""
        return Caller(self.peer, self.address, presented)

    @property
    def name(self) -> str:
        """Identity for logs and the audit trail: the mTLS identity, else the address."""
        return self.peer.identity or self.address

    @property
    def key(self) -> str:
        """What per-peer limits count against: the identity, else the network."""
        return self.peer.identity or f"net:{network_of(self.address)}"


_current: ContextVar[Caller] = ContextVar("tokensvc_caller")


def current_caller() -> Caller:
    """The caller of the RPC being served (set by the ``rpc`` decorator's admission)."""
    return _current.get(Caller(ANONYMOUS, ""))


def address_of(peer: str) -> str:
    """``ipv4:10.0.0.1:5000`` -> ``10.0.0.1``; ``ipv6:[::1]:5000`` -> ``::1``."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


@functools.lru_cache(maxsize=4096)
def network_of(address: str) -> str:
    """The network an anonymous caller is counted as: 127.0.0.0/8 for IPv4 loopback, the
    /64 of an IPv6 address, else the IPv4 address itself (IPv4-mapped IPv6 as IPv4)."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    except ValueError:
        return address  # e.g. a unix socket peer
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return "127.0.0.0/8" if ip.is_loopback else str(ip)


def _limit(rate: Rate) -> Limit:
    return Limit.of(rate.count, rate.period)


class Guard:
    """Admits calls for the servicer (see :class:`tokensvc.api.status.Guarded`)."""

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
        self.relay_failures = _limit(settings.rate_auth_failures_relay)
        self.per_peer = {
            name: _limit(rate)
            for name, rate in (
                ("Refresh", settings.rate_refresh),
                ("Introspect", settings.rate_introspect),
            )
            if rate.enabled
        }
        self.common_names = settings.allow_cn_identities
        #: local blocks: key -> until (clock); the oldest dropped first when full
        self._blocked: BoundedCache[str, float] = BoundedCache(_BLOCKED_MAX)
        self._refusals: set[str] = set()

    async def admit(self, rpc: str, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        """Admit a call or raise :class:`Denied` / :class:`RateLimited`."""
        # a plaintext port (--insecure) has no certificates: no auth context to read
        peer = peer_of(context, common_names=self.common_names) if self.enforce else ANONYMOUS
        caller = Caller(peer, context=context)
        _current.set(caller)
        if peer.refused and peer.refused not in self._refusals:
            if len(self._refusals) < _REFUSALS_MAX:
                self._refusals.add(peer.refused)
            self.audit.record("identity_refused", peer=caller.name, reason=peer.refused)
        if rpc in GUESSABLE:
            self._check_blocked(f"relay:{caller.key}")
        # ListSessions also serves the subject itself: its handler decides (tokensvc.api.sessions)
        if self.enforce and rpc not in SELF_SERVICE and not self.policy.admits(rpc, caller.peer):
            raise Denied(Denial.POLICY, f"caller is not allowed to call {rpc}")
        limit = self.per_peer.get(rpc)
        if limit is not None:
            await self._per_peer(rpc, caller, limit)
        return caller

    async def _per_peer(self, rpc: str, caller: Caller, limit: Limit) -> None:
        """The per-peer limit of ``rpc``: over it, the peer's calls are refused here, with
        neither a Redis round trip nor an audit record each, until the wait is over."""
        kind, local = LimitKind.per_peer(rpc), f"{rpc}:{caller.key}"
        left = self._left(local)
        if left:
            self.audit.suppress(caller.name, "rate_limited")
            raise RateLimited(f"too many {rpc} calls; retry later", left, kind)
        wait = await self.store.hit(peer_limit_key(rpc, caller.key), limit)
        if wait:
            self._block(local, wait)
            self.audit.record("rate_limited", peer=caller.name, reason=kind, rpc=rpc)
            raise RateLimited(f"too many {rpc} calls; retry later", wait, kind)

    def presenting(self, credential: str | None) -> None:
        """Mark the current call as presenting an end user's credential on the peer's
        behalf, keyed ``credential`` (e.g. ``session:<sid>``; "" when the credential names
        no session it proves): its failures count against that user first (see the module
        doc). ``None``: not a relayed credential after all.

        Raises:
            RateLimited: that credential is over the failed-authentication limit, or this
                peer is over it for the credential (:meth:`mismatched`).
        """
        caller = current_caller().presenting(credential)
        _current.set(caller)
        if credential:
            self._check_blocked(credential)
            self._check_blocked(_as_presented_by(credential, caller))

    def mismatched(self) -> None:
        """The credential is bound to another certificate than the presenting peer's: its
        failures count against the credential *as presented by this peer* (and the peer's
        relay-wide budget) -- the thief is limited, the holder and the peer's other users
        are not (see the module doc)."""
        caller = current_caller()
        if caller.presented:
            presented = _as_presented_by(caller.presented, caller)
            _current.set(caller.presenting(presented))

    def _left(self, key: str) -> int:
        """Milliseconds ``key`` stays blocked here (0: not blocked)."""
        until = self._blocked.get(key)
        if until is None:
            return 0
        left = until - self.clock()
        if left <= 0:
            self._blocked.pop(key, None)
            return 0
        return max(1, int(left * 1000))

    def _check_blocked(self, key: str) -> None:
        left = self._left(key)
        if left:
            raise RateLimited("too many failed authentications; retry later", left)

    def _block(self, key: str, wait_ms: int) -> None:
        self._blocked.put(key, self.clock() + wait_ms / 1000)

    def _budgets(self, caller: Caller) -> list[tuple[str, str, Limit, str, LimitKind]]:
        """What a failure of ``caller`` counts against: (Redis counter, key, limit, local
        block key, limit kind)."""
        if caller.presented is None:  # the peer's own failure (a policy denial)
            key = caller.key
            return [("authfail", key, self.failures, f"quiet:{key}", LimitKind.FAILURES_PER_PEER)]
        relay = caller.key
        budgets = [
            ("authfail-relay", relay, self.relay_failures, f"relay:{relay}",
             LimitKind.FAILURES_PER_PEER),
        ]  # fmt: skip
        if caller.presented:  # an end user's credential: that user, the relay only in bulk
            user = caller.presented
            budgets.append(
                ("authfail-user", user, self.failures, user, LimitKind.FAILURES_PER_SESSION)
            )
        return budgets

    async def rejected(self, rpc: str, err: NotAuthenticated | Denied) -> None:
        """Audit a denied or unauthenticated call and count it (see the module doc).

        Reads the refusal's reason (never its message): a refusal that is not the caller's
        failure (a locked subject: the handler audits it) is left alone; an expired,
        revoked or reused credential is audited but not counted (normal life). A peer over
        the limit for its own failures is refused without an audit record or a Redis
        round trip each (the trail gets a periodic count of them instead).
        """
        if isinstance(err, Denied) and not err.reason.is_callers:
            return
        caller = current_caller()
        event = "denied" if isinstance(err, Denied) else "auth_failed"
        stolen = err.reason is AuthFailure.CERTIFICATE_MISMATCH
        if stolen:  # a bound token from another workload: a security event, never quieted
            event = "bound_token_misuse"
        elif caller.presented is None and self._left(f"quiet:{caller.key}"):
            self.audit.suppress(caller.name, event)
            return
        reason = f"{rpc}: {err.message}"
        if caller.peer.refused:
            reason += f" (no identity: {caller.peer.refused})"
        self.audit.record(
            event,
            peer=caller.name,
            session_id=_session_of(caller.presented) if stolen else "",
            reason=reason,
            rpc=rpc,
            code=err.reason,
        )
        if isinstance(err, NotAuthenticated) and not err.reason.is_guess:
            return
        budgets = self._budgets(caller)
        try:
            waits = await asyncio.gather(
                *(
                    self.store.hit(peer_limit_key(what, key), limit)
                    for what, key, limit, *_ in budgets
                )
            )
        except Exception as err:  # the call fails anyway: a lost count must not hide why
            log.warning("failed-authentication count for %s not recorded: %r", caller.name, err)
            return
        for (_, key, _, local, kind), wait in zip(budgets, waits, strict=True):
            if not wait:
                continue
            if local.startswith("quiet:"):  # own failures: quiet long enough to matter
                wait = max(wait, QUIET_MIN_MS)
            self._block(local, wait)
            self.audit.record("rate_limited", peer=caller.name, reason=kind, rpc=rpc)
            log.warning("over the failed-authentication limit: %s (peer %s)", key, caller.name)


def _session_of(presented: str | None) -> str:
    """The session id a presented credential's key names ("" for none, e.g. a subject)."""
    if presented is None or not presented.startswith("session:"):
        return ""
    return presented.removeprefix("session:").partition("@")[0]


def _as_presented_by(credential: str, caller: Caller) -> str:
    """The key of ``credential`` presented by ``caller`` (see :meth:`Guard.mismatched`)."""
    return f"{credential}@{caller.key}"
