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
* The target is the schedulable node with the most free memory after placing the
  VM (the thesis's Heartbeat rule), ties broken by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fencing.policy import self_fence_verdict
from schemas.models import RUNNING_STATES, Placement, VmSpec, VmStatus
from schemas.snapshot import ClusterSnapshot


@dataclass(frozen=True)
class FenceNode:
    node: str
    lease_id: str
    reason: str


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


Action = FenceNode | ClearFence | WritePlacement | Wait


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    lost_since: Mapping[str, float]
    summary: str

    @property
    def writes(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if not isinstance(a, Wait))


@dataclass
class _Capacity:
    memory_mib: int
    vcpus: int
    used_memory_mib: int = 0
    used_vcpus: int = 0

    @property
    def free_memory_mib(self) -> int:
        return self.memory_mib - self.used_memory_mib

    @property
    def free_vcpus(self) -> int:
        return self.vcpus - self.used_vcpus


@dataclass
class _State:
    snap: ClusterSnapshot
    capacity: dict[str, _Capacity] = field(default_factory=dict)


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


def track_lost(snap: ClusterSnapshot, prev: Mapping[str, float], now: float) -> dict[str, float]:
    """When the leader first saw each referenced, unregistered, unfenced node missing."""
    lost: dict[str, float] = {}
    for node in sorted(referenced_nodes(snap)):
        if node in snap.nodes or node in snap.fences:
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


def _choose(st: _State, spec: VmSpec, exclude: set[str]) -> tuple[str | None, dict[str, float]]:
    scores: dict[str, float] = {}
    best: tuple[int, str] | None = None
    for name in sorted(st.capacity):
        if name in exclude or not st.snap.schedulable(name):
            continue
        cap = st.capacity[name]
        if cap.free_memory_mib < spec.memory_mib or cap.free_vcpus < spec.vcpus:
            continue
        after = cap.free_memory_mib - spec.memory_mib
        scores[name] = float(after)
        # Most free memory wins; on a tie the name sorting first wins (deterministic).
        if best is None or after > best[0]:
            best = (after, name)
    return (best[1] if best else None), scores


def _no_target_reason(st: _State, spec: VmSpec, exclude: set[str]) -> str:
    sched = [n for n in st.capacity if st.snap.schedulable(n) and n not in exclude]
    if not sched:
        return "no schedulable node (all nodes lost, cordoned or excluded)"
    return (f"no schedulable node has {spec.memory_mib} MiB and {spec.vcpus} vCPUs free "
            f"(candidates: {', '.join(sorted(sched))})")


def plan(snap: ClusterSnapshot, *, epoch: int, now: float, wall_time: float,
         lost_since: Mapping[str, float]) -> Plan:
    cfg = snap.config
    actions: list[Action] = []
    lost = track_lost(snap, lost_since, now)

    # Fencing of lost nodes, and clearing of fence records for nodes that came back.
    for node, since in lost.items():
        verdict = self_fence_verdict(since, now, cfg)
        if verdict.fenced:
            actions.append(FenceNode(node, lease_id="", reason=verdict.reason))
    for node, fe in sorted(snap.fences.items()):
        if node in snap.nodes:
            lease = snap.nodes[node].value.lease_id
            actions.append(ClearFence(node, fe.mod_revision,
                                      f"node re-registered with lease {lease}"))

    st = _State(snap, {n: _Capacity(e.value.capacity.memory_mib, e.value.capacity.vcpus)
                       for n, e in snap.nodes.items()})
    for vm, se in snap.specs.items():
        pe = snap.placements.get(vm)
        if se.value.state == "running" and pe and pe.value.node in st.capacity:
            c = st.capacity[pe.value.node]
            c.used_memory_mib += se.value.memory_mib
            c.used_vcpus += se.value.vcpus

    def place(vm: str, kind: str, node: str | None, reason: str, scores: dict[str, float],
              from_node: str | None = None, fenced: tuple[tuple[str, int], ...] = ()) -> None:
        pe = snap.placements.get(vm)
        spec = snap.specs[vm].value
        if kind == "pending" and pe and pe.value.kind == "pending" and pe.value.reason == reason:
            return  # nothing new to say
        p = Placement(id=f"e{epoch}-r{snap.revision}-{vm}", vm=vm, node=node,
                      kind=kind,  # type: ignore[arg-type]
                      from_node=from_node, epoch=epoch, reason=reason, scores=scores,
                      decided_at=wall_time)
        actions.append(WritePlacement(p, pe.mod_revision if pe else 0, fenced))
        # The VM was released from its old node before deciding (see the loop).
        if node and node in st.capacity:
            st.capacity[node].used_memory_mib += spec.memory_mib
            st.capacity[node].used_vcpus += spec.vcpus

    def _decide_vm(vm: str, spec: VmSpec) -> None:
        pe = snap.placements.get(vm)
        p = pe.value if pe else None
        s = snap.statuses[vm].value if vm in snap.statuses else None
        hs = holders(spec, p, s)
        live = [h for h in hs if h in snap.nodes]
        unfenced = [h for h in hs if h not in snap.nodes and h not in snap.fences]

        # 1. Steady state and migrations in flight need no write.
        if p and p.kind == "boot" and p.node and snap.schedulable(p.node):
            return
        if p and p.kind == "migrate" and p.node in snap.nodes and not migration_failed(p, s):
            arrived = s is not None and s.node == p.node and s.state in RUNNING_STATES
            if not (arrived and snap.is_cordoned(p.node)):  # type: ignore[arg-type]
                if p.from_node in snap.nodes or arrived:
                    return
                if p.from_node not in snap.fences:
                    actions.append(Wait(vm, f"migration source {p.from_node} lost; waiting "
                                            "for its fence"))
                    return
                if snap.schedulable(p.node):  # type: ignore[arg-type]
                    fe = snap.fences[p.from_node]  # type: ignore[index]
                    place(vm, "boot", p.node, f"migration source {p.from_node} was fenced "
                          "before the VM arrived; cold boot on the migration target",
                          {}, fenced=((p.from_node, fe.mod_revision),))  # type: ignore[arg-type]
                    return

        # 2. The VM must move or be (re)booted.
        if unfenced:
            actions.append(Wait(vm, f"node(s) {', '.join(unfenced)} lost and not yet fenced; "
                                    "the VM may still run there"))
            return
        if live:
            source = s.node if s and s.state in RUNNING_STATES and s.node in snap.nodes else live[0]
            if snap.schedulable(source) and not (p and migration_failed(p, s)):
                if p and p.kind == "boot" and p.node == source:
                    return
                place(vm, "boot", source, f"VM reported on {source}; keeping it there",
                      {}, fenced=tuple((h, snap.fences[h].mod_revision) for h in hs
                                       if h not in snap.nodes))
                return
            exclude = {source}
            if p and migration_failed(p, s) and p.node:
                exclude.add(p.node)
            target, scores = _choose(st, spec, exclude)
            if target is None and p and migration_failed(p, s):
                target, scores = _choose(st, spec, {source})  # retry the only target left
            if target is None:
                actions.append(Wait(vm, f"must leave {source} but "
                                        + _no_target_reason(st, spec, exclude)))
                return
            why = ("node cordoned (drain)" if snap.is_cordoned(source)
                   else f"migration to {p.node} failed" if p and migration_failed(p, s)
                   else "hand-off")
            place(vm, "migrate", target, f"{why}: live-migrate from {source} to {target}, "
                  f"the node with the most free memory ({int(scores[target])} MiB after)",
                  scores, from_node=source)
            return
        fenced = tuple((h, snap.fences[h].mod_revision) for h in hs)
        target, scores = _choose(st, spec, set())
        if target is None:
            place(vm, "pending", None, _no_target_reason(st, spec, set()), {}, fenced=fenced)
            return
        why = f"node(s) {', '.join(hs)} fenced; cold boot" if hs else "not placed yet; boot"
        place(vm, "boot", target, f"{why} on {target}, the node with the most free memory "
              f"({int(scores[target])} MiB after)", scores, fenced=fenced)

    def charge(node: str | None, spec: VmSpec, sign: int) -> None:
        if node and node in st.capacity:
            st.capacity[node].used_memory_mib += sign * spec.memory_mib
            st.capacity[node].used_vcpus += sign * spec.vcpus

    for vm in sorted(snap.specs):
        spec = snap.specs[vm].value
        if spec.state != "running":
            continue
        # Decide with this VM's own share released from the node it is placed on, so
        # a retry on the same node, or a rewrite to it, does not count it twice.
        placed_on = snap.placements[vm].value.node if vm in snap.placements else None
        writes_before = sum(isinstance(a, WritePlacement) for a in actions)
        charge(placed_on, spec, -1)
        _decide_vm(vm, spec)
        if sum(isinstance(a, WritePlacement) for a in actions) == writes_before:
            charge(placed_on, spec, +1)

    n_place = sum(isinstance(a, WritePlacement) for a in actions)
    n_fence = sum(isinstance(a, FenceNode) for a in actions)
    n_wait = sum(isinstance(a, Wait) for a in actions)
    summary = (f"rev={snap.revision} nodes={len(snap.nodes)} vms={len(snap.specs)} "
               f"placements={n_place} fences={n_fence} waiting={n_wait} lost={len(lost)}")
    return Plan(tuple(actions), lost, summary)
