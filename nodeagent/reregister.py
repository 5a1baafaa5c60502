"""The registration record, and keyspace 2's answer to a registration lease found gone
while etcd answers: register again first, tell who revoked it after
(docs/keyspace-v2.md, section 4, "The safe variant `bounded`").

While its registration is gone the agent pets its guard no more (the leader's bounded
window relies on that), so the guard fires `guard_timeout` after the last pet unless a
new registration's first pet comes first.  So on keyspace 2 the agent registers again
at once, with the host facts cached from its last registration (no libvirt call) and
without keyspace 1's look at the liveness lease before it; that look comes after:

* the old liveness lease still there: an operator revoked the registration lease (a
  drain): write the cordon (the registration mirrors it in the next cycle; a VM the
  leader placed here meanwhile is drained with the rest);
* gone too, renewed within a TTL: etcd revoked both (a raft leader paused past the
  TTL, etcd #12528): nothing to drain;
* gone, not renewed for a TTL: it may have expired; taken for a drain, as on keyspace 1.

Keyspace 1 keeps its order (look, then register) and its longer deadline meanwhile.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nodeagent.liveness import CONFIRM_DELAY_S
from schemas.models import AgentInfo, Capacity, CpuInfo, NodeRegistration
from schemas.models_v2 import RELEASE
from schemas.txn import Cmp, Delete, Put
from store.etcd import LeaseNotFound, StoreUnavailable

if TYPE_CHECKING:
    from nodeagent.context import AgentContext
    from nodeagent.membership import Membership, Registration

VERSION = RELEASE  # recorded in each registration; `vmha keyspace migrate` checks it

HostFacts = tuple[Capacity, CpuInfo]


def host_facts(ctx: AgentContext) -> HostFacts:
    hv = ctx.hv
    mem, vcpus = hv.capacity()
    return Capacity(memory_mib=mem, vcpus=vcpus), CpuInfo(model=hv.cpu_model())


def registration(ctx: AgentContext, lease_id: int, cordoned: bool,
                 facts: HostFacts) -> NodeRegistration:
    return NodeRegistration(
        name=ctx.me, lease_id=f"{lease_id:x}", libvirt_uri=ctx.hv.uri,
        migration_address=ctx.opts.migration_address,
        capacity=facts[0], cpu=facts[1],
        cordoned=cordoned, agent=AgentInfo(pid=os.getpid(), hostname=socket.gethostname(),
                                           version=VERSION),
        registered_at=time.time())


@dataclass(frozen=True)
class Revoked:
    """The registration whose lease was found gone, to be classified once registered
    again: its two leases and its self-fence deadline (the minimum over both)."""

    lease_id: int
    alive_id: int
    deadline: float
    noticed_at: float


def register_first(m: Membership, reg: Registration, exiting: bool) -> Registration | None:
    """Keyspace 2, `reg`'s lease revoked: register again, then tell a drain from etcd's
    revocations.  None: not registered yet (the next cycle tries again, and classifies
    the revoke once registered)."""
    m.revoked = Revoked(reg.lease_id, m.alive.lease_id, reg.keeper.deadline, m.ctx.clock())
    m.keep_old_deadline(reg.keeper)  # until a new registration holds
    m.reg = None
    if (m.facts is None or not register_again(m, m.facts)) and not m.register():
        return None
    classify(m)
    if exiting and m.reg is not None and not m.reg.cordoned:
        m.cordon("agent stopping (SIGTERM): drain")
    return m.reg


def register_again(m: Membership, facts: HostFacts) -> bool:
    """A new registration with two new leases, the cached host facts and no libvirt
    call (the old registration is gone: its lease was revoked).  False: not now (the
    next cycle tries again, by the normal path)."""
    ctx, store, keys = m.ctx, m.ctx.store, m.ctx.keys
    sent = ctx.clock()
    lease_id = store.grant_lease(m.cfg.lease_ttl_s)
    alive_id = m.alive.grant(m.cfg)
    cordoned = store.get(keys.cordon) is not None
    reg = registration(ctx, lease_id, cordoned, facts)
    try:
        res = store.txn([Cmp(keys.reg, "create", "==", 0)],
                        [Put(keys.reg, reg.to_json(), lease_id), m.alive.put(alive_id),
                         Delete(keys.leaving)])
    except LeaseNotFound:
        return False
    if not res.succeeded:
        store.revoke_lease(lease_id)
        store.revoke_lease(alive_id)
        return False
    m.hold_new(lease_id, alive_id, res.revision, sent, cordoned)
    ctx.log.info("registered_again", lease=f"{lease_id:x}", liveness_lease=f"{alive_id:x}",
                 revision=res.revision, cordoned=cordoned,
                 took_s=round(ctx.clock() - sent, 3),
                 reason="registration lease gone while etcd answers: registered again at "
                        "once; who revoked it is looked at next")
    return True


def who_revoked(m: Membership, old: Revoked) -> str:
    """"operator" (a drain) or "etcd" (both leases revoked by etcd: no drain), from the
    old liveness lease, CONFIRM_DELAY_S after the revoke was noticed.  Raises
    StoreUnavailable when etcd does not answer: the next cycle asks again."""
    ctx = m.ctx
    wait = old.noticed_at + CONFIRM_DELAY_S - ctx.clock()
    if wait > 0:
        ctx.stopped.wait(wait)
    if old.alive_id and ctx.store.keepalive(old.alive_id) > 0:
        # Nothing leases it any more (the new registration has its own): let it go.
        ctx.store.revoke_lease(old.alive_id)
        return "operator"
    if ctx.clock() >= old.deadline + m.cfg.self_fence_safety_s:
        ctx.log.info("liveness_lease_expired", lease=f"{old.alive_id:x}",
                     reason="not renewed for a TTL: the registration lease's revoke is "
                            "taken for a drain")
        return "operator"
    ctx.log.warning("leases_revoked_by_etcd", lease=f"{old.lease_id:x}",
                    liveness_lease=f"{old.alive_id:x}",
                    reason="both leases gone while etcd answers: etcd revoked them (a raft "
                           "leader paused longer than the TTL resumed, etcd #12528), not an "
                           "operator: registered again, no drain, the VMs stay")
    return "etcd"


def classify(m: Membership) -> None:
    """Once registered again: cordon the node if an operator revoked the old lease."""
    old = m.revoked
    if old is None:
        return
    try:
        who = who_revoked(m, old)
    except StoreUnavailable as exc:
        m.log.warning("revoke_not_classified", error=str(exc), reason="asking again next cycle")
        return
    m.revoked = None
    if who == "operator":
        m.cordon("lease revoked (drain)")
