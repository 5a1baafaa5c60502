"""A running agent follows the keyspace marker `/vmha/version` (docs/keyspace-v2.md,
section 6, "Freeze" and "Switch").

While a migration is under way (`migrating`, `switching`, `cleaning`, or a marker that
does not parse) the agent is **frozen**: its leases are renewed and its guard petted as
always (by their own threads), its VMs are left as they are, and it writes no status,
no cordon mirror and no clean-up: the cycle ends after the registration is renewed.

The marker also names the keyspace the agent's registration belongs in: 1 while
`migrating` (also on the way back of a rollback), 2 from `switching` on.  The agent
moves its registration and liveness key there itself, with the leases it holds, in
one transaction compared on its token (`schemas.migration.switch_txn`): the node is
registered all along, in exactly one keyspace, and never lost.  Its token becomes the
new key's create_revision.  `done` unfreezes it on keyspace 2.

An agent on keyspace 2 that finds the marker gone does not go back to keyspace 1 by
itself: on a migrated cluster keyspace 1 holds no VM, and the plan would destroy every
domain.  It stays frozen until it is restarted (and then reads the config, which
keyspace 1 refuses after a migration).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

from schemas.errors import SchemaError
from schemas.migration import switch_txn
from schemas.models import AliveRecord
from schemas.models_v2 import KeyspaceVersion
from schemas.snapshot import ClusterSnapshot, RawKV

if TYPE_CHECKING:
    from nodeagent.agent import NodeAgent
    from nodeagent.membership import Registration

# The keyspace the registration belongs in, by the marker's state (absent: None).
_TARGET: dict[str | None, Literal[1, 2]] = {
    None: 1, "migrating": 1, "switching": 2, "cleaning": 2, "done": 2}


def marker_state(agent: NodeAgent, snap: ClusterSnapshot) -> str | None:
    """The marker's state as this cycle sees it: None absent, "invalid" if it does not
    parse.  Keyspace 1: from the snapshot; keyspace 2: from the node view's watch."""
    ctx = agent.ctx
    if agent.v2 is None:
        if snap.keyspace_marker is not None:
            return snap.keyspace_marker.value.state
        return "invalid" if snap.keyspace_marked else None
    kv = agent.v2.watch.state.get(ctx.ks2.version)
    if kv is None:
        return None
    try:
        return KeyspaceVersion.from_json(kv.value, kv.key).state
    except SchemaError:
        return "invalid"


def frozen(agent: NodeAgent, reg: Registration, snap: ClusterSnapshot) -> bool:
    """Follow the marker: True when this cycle must write nothing (frozen, or just
    switched keyspace: the next cycle reads the new one)."""
    ctx = agent.ctx
    state = marker_state(agent, snap)
    if (state is None and ctx.keyspace == 1) or (state == "done" and ctx.keyspace == 2):
        agent.frozen_state = None
        return False
    target = _TARGET.get(state)
    if state is None and ctx.keyspace == 2:
        target = None  # never back to keyspace 1 without a rollback's `migrating`
    if target is not None and target != ctx.keyspace:
        move(agent, reg, target)
        return True
    if agent.frozen_state != state:
        agent.frozen_state = state
        ctx.log.warning("keyspace_frozen", marker=state or "absent", keyspace=ctx.keyspace,
                        reason="a keyspace migration is under way: leases kept, VMs left "
                               "as they are, nothing written" if state != "invalid" and
                               state is not None else "the keyspace marker does not say "
                               "which keyspace runs: waiting, VMs left as they are")
    return True


def move(agent: NodeAgent, reg: Registration, to: Literal[1, 2]) -> bool:
    """Move the registration to keyspace `to` with its leases; False if it could not
    be moved now (tried again next cycle)."""
    ctx, m = agent.ctx, agent.membership
    ks1, ks2, me = ctx.ks, ctx.ks2, ctx.me
    new_key = ks2.reg(me) if to == 2 else ks1.node(me)
    old_key = ks1.node(me) if to == 2 else ks2.reg(me)
    new = ctx.store.get(new_key)
    if new is not None:
        if new.lease != reg.lease_id:
            ctx.log.warning("keyspace_switch_blocked", key=new_key, lease=f"{new.lease:x}",
                            reason="another lease holds this node's registration there")
            return False
        token = new.create_revision  # our own move, whose answer was lost
    else:
        old = ctx.store.get(old_key)
        if old is None or old.create_revision != reg.create_revision:
            ctx.log.warning("keyspace_switch_blocked", key=old_key,
                            reason="the registration is no longer this agent's")
            return False
        token = _send(agent, reg, to, old)
        if token == 0:
            return False
    reg.create_revision = token
    agent.enter_keyspace(to)
    ctx.log.warning("keyspace_switched", keyspace=to, revision=token,
                    lease=f"{reg.lease_id:x}", liveness_lease=f"{m.alive.lease_id:x}",
                    reason="the keyspace marker moved this node's registration, with its "
                           "leases")
    return True


def _send(agent: NodeAgent, reg: Registration, to: Literal[1, 2], old: RawKV) -> int:
    ctx = agent.ctx
    alive_id = agent.membership.alive.lease_id
    alive = AliveRecord(node=ctx.me, lease_id=f"{alive_id:x}", at=time.time()).to_json()
    txn = switch_txn(ctx.ks, ctx.me, to=to, token=reg.create_revision,
                     reg_value=old.value.decode(), reg_lease=reg.lease_id,
                     alive_value=alive, alive_lease=alive_id)
    res = ctx.store.txn(txn.compares, txn.ops)
    return res.revision if res.succeeded else 0
