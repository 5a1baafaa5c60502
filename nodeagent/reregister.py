"""The registration record, and keyspace 2's answer to a registration lease found gone
while etcd answers: register again first, tell who revoked it after
(docs/keyspace-v2.md, section 4, "The safe variant `bounded`").

While its registration is gone the agent pets its guard no more (the leader's bounded
window relies on that), so the guard fires `guard_timeout` after the last pet unless a
new registration's first pet comes first.  So on keyspace 2 the agent registers again
at once, on the thread that found the lease gone: normally the lease keeper's, whose
renewal ended with the lease (or the cycle's, when its watch showed it first), never
waiting for a cycle that may be busy in libvirt.  It uses the host facts cached from its
last registration (no libvirt call) and short-deadline requests as the keepalives do
(grant, grant, the cordon's read, the txn: each attempt `keepalive_timeout_s`, the next
attempt on the next member), until the old registration's deadline; past it the node
fences itself anyway and the cycle registers by its usual path.  The new deadline counts
from the first grant's send.  Whoever replaces the registration holds `Membership.owner`.

Keyspace 1's look at the liveness lease comes after, 0.5 s after the revoke was noticed:

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

from nodeagent.liveness import CONFIRM_DELAY_S, drain_or_etcd
from schemas.models import AgentInfo, Capacity, CpuInfo, NodeRegistration
from schemas.models_v2 import RELEASE
from schemas.txn import Cmp, Delete, Put
from store.etcd import LeaseNotFound, StoreUnavailable

if TYPE_CHECKING:
    from nodeagent.context import AgentContext
    from nodeagent.membership import Membership

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


def on_revoked(m: Membership, lease_id: int) -> None:
    """Keyspace 2: the registration lease `lease_id` found gone before its deadline, etcd
    answering.  Register again at once on this thread, then tell who revoked it."""
    with m.owner:
        reg = m.reg
        if reg is None or reg.lease_id != lease_id or m.ctx.stopped.is_set():
            return  # an old lease's keeper reporting late (already handled), or exiting
        old = m.revoked = Revoked(reg.lease_id, m.alive.lease_id, reg.keeper.deadline,
                                  m.ctx.clock())
        m.keep_old_deadline(reg.keeper)  # until a new registration holds
        m.reg = None
        m.log.warning("lease_revoked", reason="lease gone while etcd answers: registering "
                      "again at once; no guard pet until registered")
        try:
            done = m.facts is not None and register_again(m, m.facts, old.deadline)
        except Exception:  # noqa: BLE001 - the cycle registers instead: see below
            # An error nobody foresaw must not end the thread silently, nor leave the
            # node unregistered: the cycle registers by its usual path.
            m.log.exception("registration_again_failed", reason="the next cycle registers")
            done = False
    m.ctx.wake.set()
    if done:
        try:
            classify(m)
        except Exception:  # noqa: BLE001 - still to classify: the next cycle does
            m.log.exception("revoke_not_classified", reason="asking again next cycle")


def register_again(m: Membership, facts: HostFacts, until: float) -> bool:
    """A new registration with two new leases, the cached host facts and no libvirt
    call (the old registration is gone: its lease was revoked), each request with a
    short deadline, until `until`.  False: not now (the cycle registers by its usual
    path)."""
    ctx, store, keys, cfg = m.ctx, m.ctx.store, m.ctx.keys, m.cfg
    kto = cfg.keepalive_timeout_s

    def left() -> float:
        remaining = until - ctx.clock()
        if remaining <= 0:
            raise StoreUnavailable("the old registration's deadline passed")
        return remaining

    sent = ctx.clock()  # the new deadline counts from the first grant's send
    try:
        lease_id = store.grant_lease(cfg.lease_ttl_s, timeout=kto, budget=left())
        alive_id = store.grant_lease(cfg.lease_ttl_s, timeout=kto, budget=left())
        cordoned = store.get(keys.cordon, timeout=kto, budget=left()) is not None
        reg = registration(ctx, lease_id, cordoned, facts)
        res = store.txn([Cmp(keys.reg, "create", "==", 0)],
                        [Put(keys.reg, reg.to_json(), lease_id), m.alive.put(alive_id),
                         Delete(keys.leaving)], budget=left(), timeout=kto)
        # A compare found false may be our own txn, applied by an attempt whose answer
        # was lost.
        kv = None if res.succeeded else store.get(keys.reg, timeout=kto, budget=left())
    except LeaseNotFound:
        ctx.log.warning("registration_lease_expired", took_s=round(ctx.clock() - sent, 3))
        return False
    except StoreUnavailable as exc:
        ctx.log.warning("registration_again_failed", error=str(exc),
                        took_s=round(ctx.clock() - sent, 3), reason="the next cycle registers")
        return False
    if not res.succeeded and (kv is None or kv.lease != lease_id):
        ctx.log.info("registration_race_lost", revision=res.revision,
                     reason="another writer created this node's registration first; "
                            "registering again once it is gone")
        try:
            for lease in (lease_id, alive_id):
                store.revoke_lease(lease, timeout=kto, budget=kto)
        except StoreUnavailable as exc:
            ctx.log.warning("new_leases_kept", error=str(exc), reason="they expire after a TTL")
        return False
    revision = res.revision if kv is None else kv.create_revision
    m.hold_new(lease_id, alive_id, revision, sent, cordoned)
    ctx.log.info("registered_again", lease=f"{lease_id:x}", liveness_lease=f"{alive_id:x}",
                 revision=revision, cordoned=cordoned, took_s=round(ctx.clock() - sent, 3),
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
    alive = bool(old.alive_id) and ctx.store.keepalive(old.alive_id) > 0
    return drain_or_etcd(m.log, old.lease_id, old.alive_id, alive=alive,
                         renewed_within_ttl=ctx.clock() < old.deadline + m.cfg.self_fence_safety_s)


def classify(m: Membership) -> None:
    """Once registered again: cordon the node if an operator revoked the old lease.  One
    thread at a time (the one that registered again, or the cycle after a failure)."""
    old = m.revoked
    if old is None or not m.classifying.acquire(blocking=False):
        return
    try:
        who = who_revoked(m, old)
        if who == "operator":
            m.cordon("lease revoked (drain)")
    except StoreUnavailable as exc:
        m.log.warning("revoke_not_classified", error=str(exc), reason="asking again next cycle")
        return
    finally:
        m.classifying.release()
    with m.owner:
        if m.revoked is old:
            m.revoked = None
    if who == "operator" and old.alive_id:
        # Nothing leases it any more (the new registration has its own): let it go.  If
        # etcd does not answer, it expires after a TTL.
        try:
            m.ctx.store.revoke_lease(old.alive_id)
        except StoreUnavailable as exc:
            m.log.warning("old_liveness_lease_kept", lease=f"{old.alive_id:x}",
                          error=str(exc), reason="it expires after a TTL")
