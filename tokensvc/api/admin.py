"""Administrative RPCs of the token service: subject lock and the signing key ring.

An RPC group of :class:`tokensvc.api.servicer.TokenService`.
The caller policy admits only listed admin identities to these RPCs by default.
"""

from __future__ import annotations

from tokensvc.api import validation
from tokensvc.api.admission import current_caller
from tokensvc.api.ports import AdminStore, Clock
from tokensvc.api.times import ts as _ts
from tokensvc.errors import BadRequest
from tokensvc.families import tokens
from tokensvc.keys.ring import KeyRing
from tokensvc.keys.ring_state import RING_KEY
from tokensvc.keys.rotation import Lifecycle
from tokensvc.observe.audit import AuditTrail
from tokensvc.store import REVOCATIONS
from tokensvc_client.v1 import tokensvc_pb2 as pb


class AdminRpcs:
    """LockSubject, UnlockSubject, ListKeys, RotateKeys, RetireKey."""

    def __init__(
        self,
        store: AdminStore,
        keyring: KeyRing,
        audit: AuditTrail,
        lifecycle: Lifecycle,
        subject_tags: tokens.SubjectTags,
        *,
        subject_ttl_ms: int,
        clock: Clock,
    ) -> None:
        self.store = store
        self.keyring = keyring
        self.audit = audit
        self.lifecycle = lifecycle
        self.subject_tags = subject_tags
        self.subject_ttl_ms = subject_ttl_ms
        self.clock = clock

    async def lock_subject(self, request: pb.LockSubjectRequest) -> pb.LockSubjectResponse:
        subject = validation.text("subject", request.subject, required=True)
        reason = validation.text("reason", request.reason, limit=validation.MAX_REASON) or "locked"
        count = await self.store.revoke_subject(
            self.subject_tags.of(subject),
            tokens.SubjectTags.legacy(subject),
            int(self.clock() * 1000),
            reason,
            self.subject_ttl_ms,
            lock=True,
        )
        self.audit.record(
            "locked", peer=current_caller().name, subject=subject, reason=reason, sessions=count
        )
        return pb.LockSubjectResponse(revoked_sessions=count)

    async def unlock_subject(self, request: pb.UnlockSubjectRequest) -> pb.UnlockSubjectResponse:
        subject = validation.text("subject", request.subject, required=True)
        was_locked = await self.store.unlock_subject(
            self.subject_tags.of(subject), tokens.SubjectTags.legacy(subject), self.subject_ttl_ms
        )
        self.audit.record(
            "unlocked", peer=current_caller().name, subject=subject, was_locked=int(was_locked)
        )
        return pb.UnlockSubjectResponse(was_locked=was_locked)

    # -- key ring administration ------------------------------------------------------------

    def _key_infos(self) -> list[pb.KeyInfo]:
        keep_ms = self.lifecycle.keep_after_retire_ms
        infos = []
        for kid, record in sorted(
            self.keyring.records.items(), key=lambda item: item[1].get("created_ms", 0)
        ):
            info = pb.KeyInfo(kid=kid, state=record["state"])
            for field, name in (
                ("created_ms", "created_at"),
                ("activated_ms", "activated_at"),
                ("retired_ms", "retired_at"),
                ("activate_after_ms", "activate_after"),
            ):
                if record.get(field):
                    getattr(info, name).CopyFrom(_ts(record[field] / 1000))
            if record.get("retired_ms"):
                info.delete_after.CopyFrom(_ts((record["retired_ms"] + keep_ms) / 1000))
            infos.append(info)
        return infos

    async def list_keys(self, request: pb.ListKeysRequest) -> pb.ListKeysResponse:
        await self.keyring.load()
        return pb.ListKeysResponse(keys=self._key_infos())

    async def rotate_keys(self, request: pb.RotateKeysRequest) -> pb.RotateKeysResponse:
        if request.revoke_old and not request.now:
            raise BadRequest("revoke_old needs now: the old key signs until a new one does")
        before = set(self.keyring.records)
        await self.keyring.rotate(self.lifecycle, now=request.now, revoke_old=request.revoke_old)
        await self.store.settle(RING_KEY)  # a compromised key must not come back
        removed = sorted(before - set(self.keyring.records))
        if removed:
            await self.store.revoke_keys(removed, int(self.clock() * 1000))
            await self.store.settle(REVOCATIONS)
        self.audit.record(
            "keys_rotated",
            peer=current_caller().name,
            reason="emergency" if request.revoke_old else ("now" if request.now else "scheduled"),
            kid=self.keyring.signing.kid,
        )
        return pb.RotateKeysResponse(keys=self._key_infos())

    async def retire_key(self, request: pb.RetireKeyRequest) -> pb.RetireKeyResponse:
        kid = validation.text("kid", request.kid, required=True, limit=validation.MAX_SHORT)
        status = await self.keyring.retire(kid)
        await self.store.settle(RING_KEY)
        if status == "unknown":
            raise BadRequest(f"no key {kid}")
        if status == "active":
            raise BadRequest("the active key cannot be retired; rotate instead")
        self.audit.record("key_retired", peer=current_caller().name, kid=kid)
        return pb.RetireKeyResponse(keys=self._key_infos())
