"""The agent's cordon: the marker it writes when it drains, and the mirror of the marker
into its registration (what the leader reads)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from nodeagent.context import AgentContext
from schemas import writes_v2 as w
from schemas.models import DRAIN_REASON, CordonMarker
from schemas.snapshot import ClusterSnapshot
from schemas.txn import Cmp, Put

if TYPE_CHECKING:
    from nodeagent.membership import Registration


def agent_name(node: str) -> str:
    """Who an agent's own cordon says wrote it."""
    return f"agent:{node}"


def write_cordon(ctx: AgentContext, reason: str) -> None:
    """The node's cordon marker, unless one is there already (an operator's is kept)."""
    me, store = ctx.me, ctx.store
    marker = CordonMarker(node=me, reason=reason, by=agent_name(me), at=time.time())
    if ctx.keyspace == 2:
        # One txn (schemas.writes_v2.agent_cordon): created only if absent.
        write = w.agent_cordon(ctx.ks2, me, marker)
        wrote = store.txn(write.txn.compares, write.txn.ops).succeeded
    else:
        key = ctx.keys.cordon
        wrote = store.get(key) is None
        if wrote:
            store.put(key, marker.to_json())
    if wrote:
        ctx.log.warning("cordoned", reason=reason)
        ctx.history.record("drain", node=me, reason=reason)


def sync_cordon(ctx: AgentContext, snap: ClusterSnapshot, reg: Registration) -> None:
    """Mirror the cordon marker into our registration (what the leader reads)."""
    want = snap.is_cordoned(ctx.me)
    entry = snap.nodes[ctx.me]
    if entry.value.cordoned == want:
        reg.cordoned = want
        return
    value = entry.value.model_copy(update={"cordoned": want})
    key = ctx.keys.reg
    res = ctx.store.txn([Cmp(key, "create", "==", reg.create_revision)],
                        [Put(key, value.to_json(), reg.lease_id)])
    reg.cordoned = want
    # Not written: our registration was replaced meanwhile; the next cycle sees it.
    ctx.log.info("cordon_state", cordoned=want, written=res.succeeded, revision=snap.revision)
    marker = snap.cordons.get(ctx.me)
    if (res.succeeded and marker is not None and marker.value.reason == DRAIN_REASON
            and marker.value.by != agent_name(ctx.me)):
        # `vmha node drain` on keyspace 2 cordons (only root may revoke a lease there),
        # and the operator's role writes no history: the node records its drain, as it
        # does on keyspace 1 for the revoke.  Once: a registration made while cordoned
        # starts cordoned.
        ctx.history.record("drain", node=ctx.me,
                           reason=f"cordoned for a drain by {marker.value.by}")

