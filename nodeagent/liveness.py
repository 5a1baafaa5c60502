"""The agent's liveness lease: a second lease, granted with the registration's (same
TTL) and renewed in the same rhythm, that leases `/vmha/alive/NAME`.  Operators never
revoke it.

It tells who revoked the registration lease (docs/fencing.md, "Leases revoked by etcd
itself").  An operator drains a node by revoking its registration lease: the liveness
lease lives on.  etcd 3.4.23 (Debian 12) revokes, when a raft leader whose process was
paused for longer than the TTL resumes, every lease that leader saw expire meanwhile
(etcd #12528, #15247; fixed in 3.4.28 and 3.5.11): both leases of every node, proposed
together.  So: registration lease gone while etcd answers, liveness lease gone too ->
not a drain (register again, keep the VMs); liveness lease alive -> a drain.

The liveness lease fences nothing on keyspace 1: its keeper watches no deadline (the
registration's keeper does), and a liveness lease gone alone is replaced.  On keyspace 2
it has no keeper of its own: the registration's keeper renews it in the same round (its
`partner`), so the self-fence deadline is the minimum over both leases, which the
leader's liveness fencing relies on (fencing.liveness_fence).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fencing.lease import LeaseKeeper
from nodeagent.context import AgentContext
from schemas.errors import SchemaError
from schemas.models import AliveRecord, ClusterConfig
from schemas.txn import Cmp, Put
from store.etcd import LeaseNotFound, StoreUnavailable

# How long after noticing its registration lease gone the agent looks whether the
# liveness lease is gone too.  etcd's stale-leader revocations of both leases are
# proposed in one batch by the resumed leader and committed within milliseconds of each
# other; 0.5 s is far beyond that, and short against the leader's `revoke_grace_s` (3 s)
# within which a revoked node must register again (docs/fencing.md).
CONFIRM_DELAY_S = 0.5


@dataclass(frozen=True)
class Verdict:
    """What etcd says, CONFIRM_DELAY_S after one of the two leases was found gone."""

    registration: bool  # the registration lease still exists
    liveness: bool      # the liveness lease still exists


def drain_or_etcd(log: Any, registration: int, liveness: int, *, alive: bool,
                  renewed_within_ttl: bool) -> Literal["operator", "etcd"]:
    """Who revoked the registration lease `registration`, found gone while etcd answers,
    from the liveness lease `liveness`: still there (`alive`), an operator (a drain); gone
    too and renewed within a TTL, etcd (its stale-leader revocations: no drain)."""
    if alive:
        return "operator"
    if not renewed_within_ttl:
        # Not renewed for a TTL (etcd unreachable meanwhile): it may just have expired,
        # which says nothing about who revoked the registration lease.  The operator's
        # drain is the reading that keeps the VMs running.
        log.info("liveness_lease_expired", lease=f"{liveness:x}",
                 reason="not renewed for a TTL: the registration lease's revoke is taken "
                        "for a drain")
        return "operator"
    log.warning("leases_revoked_by_etcd", lease=f"{registration:x}",
                liveness_lease=f"{liveness:x}",
                reason="both leases gone while etcd answers: etcd revoked them (a raft "
                       "leader paused longer than the TTL resumed, etcd #12528), not an "
                       "operator: no drain, the node registers again uncordoned, the VMs "
                       "stay")
    return "etcd"


class Liveness:
    def __init__(self, ctx: AgentContext, on_gone: Callable[[], None]) -> None:
        self.ctx = ctx
        self.lease_id = 0
        self.keeper: LeaseKeeper | None = None
        # Keyspace 2: the registration's keeper, which renews this lease as its partner.
        self.pair: LeaseKeeper | None = None
        self._on_gone = on_gone

    @property
    def log(self) -> Any:
        return self.ctx.log

    def key(self) -> str:
        return self.ctx.keys.alive

    def put(self, lease_id: int) -> Put:
        """The write of the liveness key, for the registration's transaction."""
        rec = AliveRecord(node=self.ctx.me, lease_id=f"{lease_id:x}", at=time.time())
        return Put(self.key(), rec.to_json(), lease_id)

    def grant(self, cfg: ClusterConfig) -> int:
        return self.ctx.store.grant_lease(cfg.lease_ttl_s)

    def adoptable(self) -> int:
        """The liveness lease an earlier agent process of this host left on the key, if
        it still exists; 0 otherwise (a new one is granted)."""
        kv = self.ctx.store.get(self.key())
        if kv is None or not kv.lease:
            return 0
        try:
            rec = AliveRecord.from_json(kv.value, self.key())
        except SchemaError as exc:
            self.log.warning("liveness_key_not_adoptable", error=str(exc))
            return 0
        if rec.lease_id != f"{kv.lease:x}" or self.ctx.store.keepalive(kv.lease) <= 0:
            return 0
        return kv.lease

    def hold(self, lease_id: int, sent: float, cfg: ClusterConfig,
             pair: LeaseKeeper | None = None) -> None:
        """Renew `lease_id` from now on (last acknowledged for `sent`); the lease held
        before stops being renewed (it is gone, or given back by `give_back`).  `pair`
        (keyspace 2): renewed by that keeper, in its round, instead of a keeper of its
        own."""
        if self.keeper is not None:
            self.keeper.stop()
        self.lease_id = lease_id
        if pair is not None:
            self.keeper, self.pair = None, pair
            pair.set_partner(lease_id)
            return
        self.keeper = LeaseKeeper(self.ctx.store, cfg, lease_id, sent,
                                  on_gone=lambda _before: self._gone(lease_id),
                                  on_deadline=None, unavailable=StoreUnavailable,
                                  clock=self.ctx.clock, name=f"alive-{self.ctx.me}").start()

    def partner_gone(self, lease_id: int) -> None:
        """The registration's keeper found this lease gone (keyspace 2)."""
        self._gone(lease_id)

    def _gone(self, lease_id: int) -> None:
        if lease_id == self.lease_id:
            self._on_gone()

    def who_revoked(self, registration: int, create_revision: int, cfg: ClusterConfig,
                    *, classify: bool = True
                    ) -> Literal["operator", "etcd", "replaced", "none", "gone"]:
        """One of the two leases was found gone while etcd answers.  "replaced": the
        liveness lease alone, now replaced; "none": neither, or the replacement must wait
        for the next cycle.  The registration lease gone: `drain_or_etcd`'s answer, or
        "gone" unless `classify` (keyspace 2 registers again first, nodeagent.reregister)."""
        seen = self.confirm(registration)
        if seen.registration:
            if seen.liveness or not self.replace(self.ctx.keys.reg, create_revision, cfg):
                return "none"
            return "replaced"
        if not classify:
            return "gone"
        return drain_or_etcd(self.log, registration, self.lease_id, alive=seen.liveness,
                             renewed_within_ttl=self._renewed_within_ttl(cfg))

    def _renewed_within_ttl(self, cfg: ClusterConfig) -> bool:
        """The liveness lease was acknowledged less than a TTL ago (its keeper's
        deadline is that acknowledgement's send time + TTL - safety)."""
        keeper = self.keeper or self.pair
        return keeper is not None and (
            self.ctx.clock() < keeper.deadline + cfg.self_fence_safety_s)

    def confirm(self, registration: int) -> Verdict:
        """After CONFIRM_DELAY_S, which of the two leases etcd still has.  Raises
        StoreUnavailable when etcd does not answer: the next cycle asks again."""
        self.ctx.stopped.wait(CONFIRM_DELAY_S)
        store = self.ctx.store
        return Verdict(registration=store.keepalive(registration) > 0,
                       liveness=self.lease_id != 0 and store.keepalive(self.lease_id) > 0)

    def replace(self, node_key: str, create_revision: int, cfg: ClusterConfig) -> bool:
        """The liveness lease alone is gone (the registration holds): a new one, written
        while our registration still holds.  False: the registration changed meanwhile
        (the next cycle sees why)."""
        old = self.lease_id
        sent = self.ctx.clock()
        new = self.grant(cfg)
        try:
            res = self.ctx.store.txn([Cmp(node_key, "create", "==", create_revision)],
                                     [self.put(new)])
        except LeaseNotFound:
            return False  # granting and writing took longer than the TTL: next cycle
        if not res.succeeded:
            self.ctx.store.revoke_lease(new)
            return False
        self.hold(new, sent, cfg, pair=self.pair)
        self.log.warning("liveness_lease_replaced", old_lease=f"{old:x}", lease=f"{new:x}",
                         reason="the liveness lease was gone, the registration lease not: "
                                "nothing to drain")
        return True

    def give_back(self) -> None:
        """The agent leaves: revoke the liveness lease (its key goes with it)."""
        lease, self.lease_id = self.lease_id, 0
        self.stop()
        if lease:
            self.ctx.store.revoke_lease(lease)

    def stop(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
