"""The leader's cycle-wide rules, applied in the order of `CYCLE_RULES` (docs/design.md).

Each rule is `rule(state) -> None`: it reads the frozen input (`state.inp`) and adds its
decisions to the state.  `decide_vms` runs the per-VM rules (orchestrator.rules.vm) for
every VM whose spec says running, in priority order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from fencing.liveness_fence import liveness_verdict
from fencing.policy import fence_decision
from orchestrator import rebalance
from orchestrator.actions import ClearFence, ClearMove, FenceNode
from orchestrator.placement import place_batch
from orchestrator.rules.facts import needs_cold_boot, vm_facts
from orchestrator.rules.state import CLUSTER, CycleState
from orchestrator.rules.vm import VM_RULES

CycleRule = Callable[[CycleState], None]


def fence_lost_nodes(st: CycleState) -> None:
    """Lost nodes: fence each once its fence policy says so; note why the others wait."""
    snap, inp = st.inp.snap, st.inp
    for node, since in st.lost.items():
        fe = snap.fences.get(node)
        lv = liveness_verdict(st.both_gone.get(node), inp.now, inp.cfg, inp.liveness)
        d = fence_decision(inp.cfg, node, since, inp.now, inp.wall_time,
                           fe.value if fe else None, left=node in snap.leaving, liveness=lv)
        st.fence_why[node] = d.reason
        if d.method is None and d.recheck_s is not None:
            at = inp.now + max(0.0, d.recheck_s)
            st.recheck_at = at if st.recheck_at is None else min(st.recheck_at, at)
        if d.method is not None:
            st.actions.append(FenceNode(node, lease_id="", reason=d.reason, method=d.method,
                                        expect_mod_revision=fe.mod_revision if fe else 0,
                                        device=d.device))


def clear_done_moves(st: CycleState) -> None:
    """Operator move requests that are done, or moot (VM removed or stopped)."""
    snap = st.inp.snap
    for vm, me in sorted(snap.moves.items()):
        se, spec = snap.statuses.get(vm), snap.specs.get(vm)
        if spec is None or spec.value.state != "running":
            st.actions.append(ClearMove(vm, me.mod_revision, "VM removed or stopped"))
        elif se is not None and se.value.node == me.value.to and se.value.state == "running":
            st.actions.append(ClearMove(vm, me.mod_revision,
                                        f"done: the VM runs on {me.value.to}"))


def clear_returned_fences(st: CycleState) -> None:
    """A fenced node that registered again: its fence record goes (it comes back empty)."""
    snap = st.inp.snap
    for node, fe in sorted(snap.fences.items()):
        if node in snap.nodes:
            lease = snap.nodes[node].value.lease_id
            st.actions.append(ClearFence(node, fe.mod_revision,
                                         f"node re-registered with lease {lease}"))


def plan_cold_batch(st: CycleState) -> None:
    """VMs no node may hold need a cold boot; on a small instance an exact search may
    place more of them than one at a time (orchestrator.placement.place_batch)."""
    snap = st.inp.snap
    cold = [vm for vm in st.inp.running if needs_cold_boot(snap, vm)]
    if cold:
        st.batch = place_batch(st.placer, {vm: snap.specs[vm].value for vm in cold}, cold)


def decide_vms(st: CycleState) -> None:
    """Every running VM, in priority order, through the per-VM rules.

    A VM is decided with its own share released from the node it is placed on, so a
    retry on the same node, or a rewrite to it, does not count it twice; its share goes
    back if no placement was written for it."""
    snap = st.inp.snap
    for vm in st.inp.running:
        facts = vm_facts(snap, vm)
        placed_on = facts.p.node if facts.p else None
        before = st.placed
        st.placer.charge(vm, facts.spec, placed_on, -1)
        for rule in VM_RULES:
            if rule(st, facts):
                break
        if st.placed == before:
            st.placer.charge(vm, facts.spec, placed_on, +1)


def _rebalance_movable(st: CycleState, recent: set[str]) -> list[str]:
    """VMs that run where they are placed, on a schedulable node, without hard affinity
    and not moved by the rebalancer within its interval."""
    snap = st.inp.snap
    out = []
    for vm in (v for v, e in snap.specs.items() if e.value.state == "running"):
        pe, se = snap.placements.get(vm), snap.statuses.get(vm)
        if (pe and se and vm not in recent and not snap.specs[vm].value.affinity
                and pe.value.kind in ("boot", "migrate") and se.value.state == "running"
                and se.value.node == pe.value.node and snap.schedulable(se.value.node)):
            out.append(vm)
    return out


def rebalance_quiet_cluster(st: CycleState) -> None:
    """Rebalance only a quiet cluster: nothing placed this cycle, nothing in flight or lost;
    at most `max_moves` per interval, counted from the placements a new leader inherits."""
    snap, pol = st.inp.snap, st.inp.cfg.placement
    rb = pol.rebalance
    if not rb.enabled or st.placed or st.inflight[CLUSTER] or st.lost:
        return
    since = st.inp.wall_time - rb.interval_s
    recent = {vm for vm, pe in snap.placements.items()
              if pe.value.reason.startswith(rebalance.REASON_PREFIX)
              and pe.value.decided_at >= since}
    budget = min(rb.max_moves - len(recent), pol.max_migrations_in_flight)
    if budget <= 0:
        return
    movable = _rebalance_movable(st, recent)
    specs = {vm: snap.specs[vm].value for vm in movable}
    for mv in rebalance.plan_moves(st.placer, specs, movable, budget=budget,
                                   min_gain=rb.min_gain, per_node_limit=st.inp.per_node_limit,
                                   inflight=Counter()):
        st.place(mv.vm, "migrate", mv.target, mv.reason, mv.scores, from_node=mv.source,
                 charge=False)


# The order of the actions in a plan follows this order (the leader applies them so).
CYCLE_RULES: tuple[CycleRule, ...] = (
    fence_lost_nodes,
    clear_done_moves,
    clear_returned_fences,
    plan_cold_batch,
    decide_vms,
    rebalance_quiet_cluster,
)
