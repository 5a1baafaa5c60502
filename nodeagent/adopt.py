"""A restarted agent takes over its predecessor's registration (the guard service kept
the node's leases and its guard armed meanwhile: docs/fencing.md, "The guard service")."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from fencing.policy import guard_timeout, self_fence_deadline
from hypervisor.fake import pid_alive
from nodeagent import reregister
from schemas.errors import SchemaError
from schemas.models import NodeRegistration
from schemas.txn import Cmp, Delete, Put

if TYPE_CHECKING:
    from nodeagent.membership import Membership


def adopt(m: Membership, key: str) -> bool:
    """Take over the registration, and its lease, that an earlier agent process of this
    host left behind: a crash followed by systemd's `Restart=`, or a restart in place.
    The node never leaves the cluster, so the leader neither fences it nor moves its VMs,
    and the guard service, still armed with that lease's deadline, is petted again.  Only
    a registration written from this host by an agent process that is gone is taken
    over; otherwise the old lease must expire first."""
    ctx, store = m.ctx, m.ctx.store
    old = store.get(key)
    if old is None or not old.lease:
        return False
    try:
        prev = NodeRegistration.from_json(old.value, key)
    except SchemaError as exc:
        m.log.warning("registration_not_adoptable", error=str(exc))
        return False
    if (prev.agent.hostname != socket.gethostname() or prev.agent.pid == os.getpid()
            or pid_alive(prev.agent.pid)):
        return False
    sent = ctx.clock()
    if store.keepalive(old.lease) <= 0:
        return False  # expired meanwhile: register anew once the key is gone
    # Pet first: the guard fires at its timeout after the previous process's last pet,
    # and everything below (libvirt, two reads, a write) can take seconds on a loaded
    # host.  Keyspace 2: once both leases are renewed (D = the minimum).
    if ctx.keyspace == 1 or m.alive.adoptable():
        _pet_renewed(m, sent)
    facts = m.facts = reregister.host_facts(ctx)
    sent = ctx.clock()  # the held lease counts from a renewal after the facts
    if store.keepalive(old.lease) <= 0:
        return False
    cordoned = store.get(ctx.keys.cordon) is not None
    reg = reregister.registration(ctx, old.lease, cordoned, facts)
    # The liveness lease the old process left, or a new one if it is gone.
    alive_id = m.alive.adoptable() or m.alive.grant(m.cfg)
    res = store.txn([Cmp(key, "create", "==", old.create_revision)],
                    [Put(key, reg.to_json(), old.lease), m.alive.put(alive_id),
                     Delete(ctx.keys.leaving)])
    if not res.succeeded:
        return False
    m.hold_new(old.lease, alive_id, old.create_revision, sent, cordoned)
    m.log.warning("registration_adopted", lease=f"{old.lease:x}",
                  liveness_lease=f"{alive_id:x}", revision=old.create_revision,
                  previous_pid=prev.agent.pid, cordoned=cordoned,
                  reason="agent restarted: the node keeps its lease and its VMs")
    return True


def _pet_renewed(m: Membership, sent: float) -> None:
    """Pet the guard for a renewal etcd acknowledged for `sent`, before the registration
    is held again."""
    if m.guard is None or not m.cfg.guard_enabled:
        return
    if not m.guard.pet(self_fence_deadline(sent, m.cfg), guard_timeout(m.cfg)):
        m.log.error("guard_lost", reason="cannot reach the guard process")
