"""The leader's decisions: a pure function from one cluster snapshot to actions.

No I/O and no clock reads: the leader passes `now` (monotonic) and the times at
which it first saw each node's lease missing.  Every action carries the compares
that make it safe to apply later (the leader adds its epoch compare on top).

Rules, per VM whose spec says running (see docs/design.md for the reasoning):

* A VM may be running on any of its *holders*: the node its status reports it
  running on, its placement's node, and a migration's source.
* A VM is booted fresh (kind=boot) only when no live node may hold it and every
  lost holder has a fence record.  While a lost holder is unfenced, it waits.
* A VM that a live node may hold moves only by hand-off (kind=migrate, from=that
  node): the source live-migrates it, or, if it does not run there, acknowledges
  in its status, and only then does the target boot it.
* A migration in flight (its target alive, no failure reported) is never
  re-targeted; a failed one is re-targeted from the node it still runs on.
* The target is chosen by orchestrator.placement (hard rules, then soft score, then
  lowest memory utilisation after placing, then name); live migrations stay within the
  source's migration group and within the migration limits (drains go in waves).
* VMs are decided by priority (higher first), then name; an optional rebalancer
  (orchestrator.rebalance) moves a few VMs when the cluster is otherwise quiet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from fencing.policy import fence_decision
from orchestrator import rebalance
from orchestrator.placement import Choice, Placer, place_batch
from schemas.models import RUNNING_STATES, Placement, VmSpec, VmStatus
from schemas.snapshot import ClusterSnapshot


@dataclass(frozen=True)
class FenceNode:
    node: str
    lease_id: str
    reason: str
    method: str = "self"  # "self": write the record; "external": run the fence device
    expect_mod_revision: int = 0  # the node's (failed) fence record, 0: none
    device: str = ""


@dataclass(frozen=True)
class ClearFence:
    node: str
    fence_mod_revision: int
    reason: str


@dataclass(frozen=True)
class WritePlacement:
    placement: Placement
    expect_mod_revision: int  # 0: the placement key must not exist
    # Lost holders: their registration must still be absent and their fence record unchanged.
    fenced_holders: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Wait:
    vm: str
    reason: str


@dataclass(frozen=True)
class ClearMove:
    """An operator's move request is done (or moot): delete it."""

    vm: str
    mod_revision: int
    reason: str


Action = FenceNode | ClearFence | WritePlacement | Wait | ClearMove


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    lost_since: Mapping[str, float]
    summary: str

    @property
    def writes(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if not isinstance(a, Wait))


def referenced_nodes(snap: ClusterSnapshot) -> set[str]:
    """Nodes that may hold a VM according to placements and statuses."""
    out: set[str] = set()
    for pe in snap.placements.values():
        for n in (pe.value.node, pe.value.from_node):
            if n:
                out.add(n)
    for se in snap.statuses.values():
        if se.value.state in RUNNING_STATES:
            out.add(se.value.node)
    return out


def is_fenced(snap: ClusterSnapshot, node: str) -> bool:
    """A fence record counts only if it records a success (a failed one is a retry note)."""
    fe = snap.fences.get(node)
    return fe is not None and fe.value.outcome == "success"


def track_lost(snap: ClusterSnapshot, prev: Mapping[str, float], now: float) -> dict[str, float]:
    """When the leader first saw each referenced, unregistered, unfenced node missing."""
    lost: dict[str, float] = {}
    for node in sorted(referenced_nodes(snap)):
        if node in snap.nodes or is_fenced(snap, node):
            continue
        lost[node] = prev.get(node, now)
    return lost


def holders(spec: VmSpec, p: Placement | None, s: VmStatus | None) -> list[str]:
    out: list[str] = []
    cands = [s.node if s and s.state in RUNNING_STATES else None,
             p.node if p else None,
             p.from_node if p and p.kind == "migrate" else None]
    for c in cands:
        if c and c not in out:
            out.append(c)
    return out


def migration_failed(p: Placement, s: VmStatus | None) -> bool:
    return (s is not None and p.kind == "migrate" and s.placement_id == p.id
            and s.failed_target == p.node and s.node == p.from_node)


def _ps(snap: ClusterSnapshot, vm: str) -> tuple[Placement | None, VmStatus | None]:
    pe, se = snap.placements.get(vm), snap.statuses.get(vm)
    return (pe.value if pe else None), (se.value if se else None)


def migration_in_flight(snap: ClusterSnapshot, p: Placement, s: VmStatus | None) -> bool:
    """A migrate placement whose VM has not arrived, not failed, both ends registered."""
    if p.kind != "migrate" or migration_failed(p, s):
        return False
    if s is not None and s.node == p.node and s.state in RUNNING_STATES:
        return False
    return p.node in snap.nodes and p.from_node in snap.nodes


def plan(snap: ClusterSnapshot, *, epoch: int, now: float, wall_time: float,
         lost_since: Mapping[str, float]) -> Plan:
    cfg = snap.config
    actions: list[Action] = []
    lost = track_lost(snap, lost_since, now)

    # Fencing of lost nodes, and clearing of fence records for nodes that came back.
    fence_why: dict[str, str] = {}
    for node, since in lost.items():
        fe = snap.fences.get(node)
        d = fence_decision(cfg, node, since, now, wall_time, fe.value if fe else None)
        fence_why[node] = d.reason
        if d.method is not None:
            actions.append(FenceNode(node, lease_id="", reason=d.reason, method=d.method,
                                     expect_mod_revision=fe.mod_revision if fe else 0,
                                     device=d.device))
    for vm, me in sorted(snap.moves.items()):
        st = snap.statuses.get(vm)
        if vm not in snap.specs or snap.specs[vm].value.state != "running":
            actions.append(ClearMove(vm, me.mod_revision, "VM removed or stopped"))
        elif st is not None and st.value.node == me.value.to and st.value.state == "running":
            actions.append(ClearMove(vm, me.mod_revision, f"done: the VM runs on {me.value.to}"))
    for node, fe in sorted(snap.fences.items()):
        if node in snap.nodes:
            lease = snap.nodes[node].value.lease_id
            actions.append(ClearFence(node, fe.mod_revision,
                                      f"node re-registered with lease {lease}"))

    pol = cfg.placement
    placer = Placer.from_snapshot(snap)
    per_node_limit = cfg.max_migrations_per_node
    # Migrations in flight, per node (source and target) and cluster-wide: new migrate
    # placements are emitted only while both stay under their limits (drains in waves).
    inflight: Counter[str] = Counter()
    for vm, pl_e in snap.placements.items():
        st_e = snap.statuses.get(vm)
        spec_e = snap.specs.get(vm)
        if spec_e and spec_e.value.state == "running" and migration_in_flight(
                snap, pl_e.value, st_e.value if st_e else None):
            inflight[pl_e.value.from_node] += 1  # type: ignore[index]
            inflight[pl_e.value.node] += 1  # type: ignore[index]
            inflight[""] += 1  # cluster-wide
    counts: Counter[str] = Counter()
    running_specs = [vm for vm, e in snap.specs.items() if e.value.state == "running"]
    max_priority = max((snap.specs[v].value.priority for v in running_specs), default=0)

    def place(vm: str, kind: str, node: str | None, reason: str, scores: dict[str, float],
              from_node: str | None = None, fenced: tuple[tuple[str, int], ...] = (),
              charge: bool = True) -> None:
        pe = snap.placements.get(vm)
        spec = snap.specs[vm].value
        if kind == "pending" and pe and pe.value.kind == "pending" and pe.value.reason == reason:
            return  # nothing new to say
        p = Placement(id=f"e{epoch}-r{snap.revision}-{vm}", vm=vm, node=node,
                      kind=kind,  # type: ignore[arg-type]
                      from_node=from_node, epoch=epoch, reason=reason, scores=scores,
                      decided_at=wall_time)
        actions.append(WritePlacement(p, pe.mod_revision if pe else 0, fenced))
        counts["place"] += 1
        # The VM was released from its old node before deciding (see the loop).
        if charge:
            placer.charge(vm, spec, node, +1)

    def wait(vm: str, reason: str) -> None:
        actions.append(Wait(vm, reason))
        counts["wait"] += 1

    def migrate_away(vm: str, spec: VmSpec, p: Placement | None, source: str,
                     failed: bool) -> None:
        slot = ""
        if inflight[""] >= pol.max_migrations_in_flight:
            slot = (f"{inflight['']} of {pol.max_migrations_in_flight} migrations in flight "
                    "cluster-wide")
        elif inflight[source] >= per_node_limit:
            slot = f"{source} has {inflight[source]} of {per_node_limit} migrations in flight"
        if slot:
            wait(vm, f"must leave {source}: waiting for a migration slot ({slot})")
            return
        busy = {n for n, c in inflight.items() if n and c >= per_node_limit}
        exclude = {source}
        if failed and p and p.node:
            exclude.add(p.node)
        choice = placer.choose(spec, exclude, live_from=source, busy=busy)
        if choice.node is None and failed:
            choice = placer.choose(spec, {source}, live_from=source, busy=busy)  # retry
        if choice.node is None:
            if choice.slot_only:
                wait(vm, f"must leave {source}: waiting for a migration slot on a target")
            else:
                wait(vm, f"must leave {source} but {choice.reason}; it stays on {source} "
                         "(never cold-booted elsewhere while its node is up)")
            return
        target = choice.node
        why = ("node cordoned (drain)" if snap.is_cordoned(source)
               else f"migration to {p.node} failed" if p and failed
               else "hand-off")
        place(vm, "migrate", target, f"{why}: live-migrate from {source} to {target}: "
              f"{choice.reason}", choice.scores, from_node=source)
        inflight[source] += 1
        inflight[target] += 1
        inflight[""] += 1

    def _decide_vm(vm: str, spec: VmSpec) -> None:
        pe = snap.placements.get(vm)
        p = pe.value if pe else None
        s = snap.statuses[vm].value if vm in snap.statuses else None
        hs = holders(spec, p, s)
        live = [h for h in hs if h in snap.nodes]
        unfenced = [h for h in hs if h not in snap.nodes and not is_fenced(snap, h)]

        # 0. An operator asked to move this VM (vmha vm migrate): a live migration from
        #    where it runs now, only once it runs steadily there.
        mv = snap.moves.get(vm)
        if (mv is not None and p is not None and p.node and s is not None
                and s.node == p.node and s.state == "running" and p.node in snap.nodes
                and mv.value.to != p.node and not unfenced):
            to, src = mv.value.to, p.node
            group = placer.nodes[src].group if src in placer.nodes else None
            busy = {n for n, c in inflight.items() if n and c >= per_node_limit}
            refusal = (f"{inflight['']} migrations in flight cluster-wide"
                       if inflight[""] >= pol.max_migrations_in_flight
                       else f"{src} has no free migration slot"
                       if inflight[src] >= per_node_limit
                       else placer.verdict(spec, to, exclude={src}, live_group=group, busy=busy))
            if refusal is None:
                place(vm, "migrate", to, f"operator request by {mv.value.by}: live-migrate "
                      f"from {src} to {to}", {}, from_node=src)
                inflight[src] += 1
                inflight[to] += 1
                inflight[""] += 1
                return
            wait(vm, f"requested move to {to} not possible now: {refusal}")
            # ... and the usual rules still apply (a drain must not wait for it).

        # 1. Steady state and migrations in flight need no write.
        if p and p.kind == "boot" and p.node and snap.schedulable(p.node):
            return
        if p and p.kind == "migrate" and p.node in snap.nodes and not migration_failed(p, s):
            arrived = s is not None and s.node == p.node and s.state in RUNNING_STATES
            if not (arrived and snap.is_cordoned(p.node)):  # type: ignore[arg-type]
                if p.from_node in snap.nodes or arrived:
                    return
                if not is_fenced(snap, p.from_node):  # type: ignore[arg-type]
                    wait(vm, f"migration source {p.from_node} lost; waiting for its fence: "
                             f"{fence_why.get(p.from_node or '', '')}")
                    return
                if snap.schedulable(p.node):  # type: ignore[arg-type]
                    fe = snap.fences[p.from_node]  # type: ignore[index]
                    place(vm, "boot", p.node, f"migration source {p.from_node} was fenced "
                          "before the VM arrived; cold boot on the migration target",
                          {}, fenced=((p.from_node, fe.mod_revision),))  # type: ignore[arg-type]
                    return

        # 2. The VM must move or be (re)booted.
        if unfenced:
            wait(vm, f"node(s) {', '.join(unfenced)} lost and not yet fenced; "
                     "the VM may still run there: "
                     + "; ".join(fence_why.get(h, "") for h in unfenced))
            return
        if live:
            source = s.node if s and s.state in RUNNING_STATES and s.node in snap.nodes else live[0]
            failed = p is not None and migration_failed(p, s)
            if snap.schedulable(source) and not failed:
                if p and p.kind == "boot" and p.node == source:
                    return
                place(vm, "boot", source, f"VM reported on {source}; keeping it there",
                      {}, fenced=tuple((h, snap.fences[h].mod_revision) for h in hs
                                       if h not in snap.nodes))
                return
            # Live migration only, within the source's migration group, in waves.
            migrate_away(vm, spec, p, source, failed)
            return
        # No node may hold it: cold boot anywhere (any migration group).
        fenced = tuple((h, snap.fences[h].mod_revision) for h in hs)
        choice = placer.choose(spec, set())
        if batch is not None and vm in batch:  # an exact search found a better assignment
            target = batch[vm]
            if target is None:
                choice = Choice(None, {}, f"left pending: of the {len(batch)} VMs needing "
                                "a boot, an exact search places more (or more priority) "
                                "without this one")
            elif placer.verdict(spec, target, exclude=set(), live_group=None) is None:
                choice = Choice(target, {target: float(
                    placer.nodes[target].free_memory_mib - spec.memory_mib)},
                    "exact search over the VMs needing a boot (one at a time would "
                    "have placed fewer)")
        if choice.node is None:
            reason = choice.reason
            if spec.priority < max_priority:
                reason += f" (priority {spec.priority}: higher-priority VMs are placed first)"
            place(vm, "pending", None, reason, {}, fenced=fenced)
            return
        why = f"node(s) {', '.join(hs)} fenced; cold boot" if hs else "not placed yet; boot"
        place(vm, "boot", choice.node, f"{why} on {choice.node}: {choice.reason}",
              choice.scores, fenced=fenced)

    # Higher priority first (restart order and first pick of capacity), then by name.
    priority = {vm: snap.specs[vm].value.priority for vm in running_specs}
    order = sorted(running_specs, key=lambda v: (-priority[v], v))
    # VMs no node may hold (every holder fenced, or none): they need a cold boot.
    cold = [vm for vm in order
            if all(h not in snap.nodes and h in snap.fences
                   for h in holders(snap.specs[vm].value, *_ps(snap, vm)))]
    batch = place_batch(placer, {vm: snap.specs[vm].value for vm in cold}, cold) \
        if cold else None
    for vm in order:
        spec = snap.specs[vm].value
        # Decide with this VM's own share released from the node it is placed on, so
        # a retry on the same node, or a rewrite to it, does not count it twice.
        pe = snap.placements.get(vm)
        placed_on = pe.value.node if pe else None
        writes_before = counts["place"]
        placer.charge(vm, spec, placed_on, -1)
        _decide_vm(vm, spec)
        if counts["place"] == writes_before:
            placer.charge(vm, spec, placed_on, +1)

    # Rebalance only a quiet cluster: nothing placed this cycle, nothing in flight or lost.
    rb = pol.rebalance
    if rb.enabled and counts["place"] == 0 and inflight[""] == 0 and not lost:
        since = wall_time - rb.interval_s
        recent = {vm for vm, pe in snap.placements.items()
                  if pe.value.reason.startswith(rebalance.REASON_PREFIX)
                  and pe.value.decided_at >= since}
        budget = min(rb.max_moves - len(recent), pol.max_migrations_in_flight)
        if budget > 0:
            movable = []
            for vm in running_specs:
                pe = snap.placements.get(vm)
                se = snap.statuses.get(vm)
                if (pe and se and vm not in recent and not snap.specs[vm].value.affinity
                        and pe.value.kind in ("boot", "migrate") and se.value.state == "running"
                        and se.value.node == pe.value.node and snap.schedulable(se.value.node)):
                    movable.append(vm)
            specs = {vm: snap.specs[vm].value for vm in movable}
            for mv in rebalance.plan_moves(placer, specs, movable, budget=budget,
                                           min_gain=rb.min_gain, per_node_limit=per_node_limit,
                                           inflight=Counter()):
                place(mv.vm, "migrate", mv.target, mv.reason, mv.scores, from_node=mv.source,
                      charge=False)

    n_fence = sum(isinstance(a, FenceNode) for a in actions)
    summary = (f"rev={snap.revision} nodes={len(snap.nodes)} vms={len(snap.specs)} "
               f"placements={counts['place']} fences={n_fence} waiting={counts['wait']} "
               f"lost={len(lost)}")
    return Plan(tuple(actions), lost, summary)
