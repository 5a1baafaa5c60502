"""Target choice for the leader's planner: capacity, constraints and scores (pure).

A `Placer` is the planner's working view of one cycle: every node's effective capacity
(overcommit ratios and the per-node reserve applied), what is charged to it, and how many
VMs of each affinity group it holds.  `choose()` filters the schedulable nodes by the
hard rules and ranks the rest:

hard (a node failing one is not a candidate)
    capacity (memory and vCPUs after placing the VM), `allowed_nodes`, hard
    `anti_affinity` (no other VM of the group on the node), hard `affinity` (the node
    that already holds VMs of the group, when one does), the migration group of the
    source for a live migration, and the per-node migration limit.
soft (the score; higher wins)
    `node_preferences[node]` + 1 per `soft_affinity` group present on the node
    - 1 per VM of a `soft_anti_affinity` group already on the node.
balance (ties of the score)
    lowest memory utilisation after placing, then most free MiB after, then the name.

No I/O, no clock: see docs/design.md ("Placement").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.models import NodeRegistration, VmSpec
from schemas.snapshot import ClusterSnapshot

SCORES_KEPT = 8  # a placement records the best few candidates, not thousands
NAMES_SHOWN = 10


def node_group(reg: NodeRegistration) -> str:
    """The node's migration domain: live migration only within one group."""
    if reg.migration_group:
        return reg.migration_group
    return f"cpu:{reg.cpu.model}" if reg.cpu.model else "default"


def groups_of(spec: VmSpec) -> set[str]:
    """Group keys the VM counts in: a VM relates only to VMs naming the group in the same
    field ("anti:db" is not "soft-anti:db")."""
    return ({f"anti:{g}" for g in spec.anti_affinity}
            | {f"soft-anti:{g}" for g in spec.soft_anti_affinity}
            | {f"aff:{g}" for g in spec.affinity}
            | {f"soft-aff:{g}" for g in spec.soft_affinity})


def has_constraints(spec: VmSpec) -> bool:
    return bool(spec.anti_affinity or spec.soft_anti_affinity or spec.affinity
                or spec.soft_affinity or spec.node_preferences or spec.allowed_nodes)


def _names(names: Iterable[str]) -> str:
    ordered = sorted(names)
    shown = ", ".join(ordered[:NAMES_SHOWN])
    return shown + (f" and {len(ordered) - NAMES_SHOWN} more" if len(ordered) > NAMES_SHOWN
                    else "")


@dataclass
class NodeCap:
    name: str
    group: str
    memory_mib: int  # effective: capacity x overcommit - reserve
    vcpus: int
    schedulable: bool
    used_memory_mib: int = 0
    used_vcpus: int = 0

    @property
    def free_memory_mib(self) -> int:
        return self.memory_mib - self.used_memory_mib

    @property
    def free_vcpus(self) -> int:
        return self.vcpus - self.used_vcpus

    @property
    def util(self) -> float:
        return self.used_memory_mib / self.memory_mib if self.memory_mib > 0 else 1.0


@dataclass(frozen=True)
class Choice:
    node: str | None
    scores: dict[str, float]
    reason: str  # why this node, or why none
    soft: float = 0.0
    util_after: float = 0.0
    slot_only: bool = False  # the only obstacle is the migration limit (a wave)


@dataclass
class Placer:
    nodes: dict[str, NodeCap]
    sched: list[str]  # schedulable node names, sorted
    groups: dict[str, Counter[str]] = field(default_factory=dict)  # group -> node -> count
    where: dict[str, str] = field(default_factory=dict)  # vm -> node it is charged to

    @staticmethod
    def from_snapshot(snap: ClusterSnapshot) -> Placer:
        pol = snap.config.placement
        nodes: dict[str, NodeCap] = {}
        for name, e in snap.nodes.items():
            cap = e.value.capacity
            nodes[name] = NodeCap(
                name, node_group(e.value),
                max(0, int(cap.memory_mib * pol.memory_overcommit) - pol.reserve_memory_mib),
                max(0, int(cap.vcpus * pol.vcpu_overcommit) - pol.reserve_vcpus),
                snap.schedulable(name))
        placer = Placer(nodes, sorted(n for n, c in nodes.items() if c.schedulable))
        for vm, se in snap.specs.items():
            pe = snap.placements.get(vm)
            if se.value.state == "running" and pe and pe.value.node in nodes:
                placer.charge(vm, se.value, pe.value.node, +1)
        return placer

    def charge(self, vm: str, spec: VmSpec, node: str | None, sign: int) -> None:
        if not node or node not in self.nodes:
            return
        c = self.nodes[node]
        c.used_memory_mib += sign * spec.memory_mib
        c.used_vcpus += sign * spec.vcpus
        if spec.anti_affinity or spec.soft_anti_affinity or spec.affinity or spec.soft_affinity:
            for g in groups_of(spec):
                self.groups.setdefault(g, Counter())[node] += sign
        if sign > 0:
            self.where[vm] = node
        elif self.where.get(vm) == node:
            del self.where[vm]

    # ---- hard rules ----------------------------------------------------------------------

    def _affinity_nodes(self, spec: VmSpec, exclude: set[str]) -> set[str] | None:
        """Nodes a hard-affinity VM must go to (None: no restriction yet)."""
        out: set[str] | None = None
        for g in spec.affinity:
            held = {n for n, c in self.groups.get(f"aff:{g}", Counter()).items()
                    if c > 0 and n not in exclude}
            if held:
                out = held if out is None else out & held
        return out

    def verdict(self, spec: VmSpec, name: str, *, exclude: set[str], live_group: str | None,
                busy: set[str] | frozenset[str] = frozenset(),
                aff: set[str] | None = None) -> str | None:
        """Why node `name` cannot take the VM, or None if it can."""
        n = self.nodes.get(name)
        if n is None or not n.schedulable:
            return "not schedulable"
        if name in exclude:
            return "excluded"
        if spec.allowed_nodes and name not in spec.allowed_nodes:
            return "not in allowed_nodes"
        if live_group is not None and n.group != live_group:
            return "other migration group"
        if aff is not None and name not in aff:
            return "hard affinity elsewhere"
        for g in spec.anti_affinity:
            if self.groups.get(f"anti:{g}", Counter()).get(name, 0) > 0:
                return "hard anti-affinity"
        if n.free_memory_mib < spec.memory_mib or n.free_vcpus < spec.vcpus:
            return "capacity"
        if name in busy:
            return "migration limit"
        return None

    def soft_score(self, spec: VmSpec, name: str) -> float:
        s = spec.node_preferences.get(name, 0.0)
        for g in spec.soft_affinity:
            if self.groups.get(f"soft-aff:{g}", Counter()).get(name, 0) > 0:
                s += 1.0
        for g in spec.soft_anti_affinity:
            s -= self.groups.get(f"soft-anti:{g}", Counter()).get(name, 0)
        return s

    # ---- choice --------------------------------------------------------------------------

    def choose(self, spec: VmSpec, exclude: set[str], *, live_from: str | None = None,
               busy: set[str] | frozenset[str] = frozenset()) -> Choice:
        live_group = self.nodes[live_from].group if live_from in self.nodes else None
        m, v = spec.memory_mib, spec.vcpus
        constrained = has_constraints(spec)
        aff = self._affinity_nodes(spec, exclude) if spec.affinity else None
        ranked: list[tuple[tuple[float, float, int, str], float]] = []
        excluded: Counter[str] = Counter()
        nodes = self.nodes
        for name in self.sched:
            if name in exclude:
                continue
            n = nodes[name]
            if constrained or live_group is not None:
                why = self.verdict(spec, name, exclude=exclude, live_group=live_group,
                                   busy=busy, aff=aff)
                if why is not None:
                    excluded[why] += 1
                    continue
                soft = self.soft_score(spec, name) if constrained else 0.0
            else:
                if n.memory_mib - n.used_memory_mib < m or n.vcpus - n.used_vcpus < v:
                    excluded["capacity"] += 1
                    continue
                if name in busy:
                    excluded["migration limit"] += 1
                    continue
                soft = 0.0
            free_after = n.memory_mib - n.used_memory_mib - m
            util_after = (n.used_memory_mib + m) / n.memory_mib
            ranked.append(((-soft, util_after, -free_after, name), float(free_after)))
        if not ranked:
            return Choice(None, {}, self._none_reason(spec, exclude, excluded),
                          slot_only=bool(excluded) and set(excluded) == {"migration limit"})
        ranked.sort()
        best = ranked[0][0]
        target = best[3]
        scores = {k[3]: free for k, free in ranked[:SCORES_KEPT]}
        reason = (f"lowest memory use after placing of {len(ranked)} candidate(s) "
                  f"({best[1] * 100:.0f}% used, {-best[2]} MiB free after)")
        if constrained:
            reason = f"soft score {-best[0]:+g}, " + reason
        if excluded:
            reason += "; ruled out: " + ", ".join(f"{c} {w}" for w, c in sorted(excluded.items()))
        return Choice(target, scores, reason, -best[0], best[1])

    def _none_reason(self, spec: VmSpec, exclude: set[str], excluded: Counter[str]) -> str:
        sched = [n for n in self.sched if n not in exclude]
        if not sched:
            return "no schedulable node (all nodes lost, cordoned or excluded)"
        if set(excluded) == {"capacity"}:
            return (f"no schedulable node has {spec.memory_mib} MiB and {spec.vcpus} vCPUs "
                    f"free (candidates: {_names(sched)})")
        return (f"no node fits {spec.memory_mib} MiB / {spec.vcpus} vCPUs: "
                + ", ".join(f"{c} {w}" for w, c in sorted(excluded.items())))

    def table(self, spec: VmSpec, exclude: set[str], *, live_from: str | None = None,
              busy: set[str] | frozenset[str] = frozenset()) -> list[dict[str, object]]:
        """Every node's verdict for one VM (for `vmha explain`; not on the hot path)."""
        live_group = self.nodes[live_from].group if live_from in self.nodes else None
        aff = self._affinity_nodes(spec, exclude) if spec.affinity else None
        rows: list[dict[str, object]] = []
        for name in sorted(self.nodes):
            n = self.nodes[name]
            why = self.verdict(spec, name, exclude=exclude, live_group=live_group, busy=busy,
                               aff=aff)
            rows.append({"node": name, "group": n.group, "eligible": why is None,
                         "ruled_out": why, "soft_score": self.soft_score(spec, name),
                         "memory_util_after": round((n.used_memory_mib + spec.memory_mib)
                                                    / n.memory_mib, 4) if n.memory_mib else None,
                         "free_memory_mib_after": n.free_memory_mib - spec.memory_mib})
        return rows


def utilisation(placer: Placer) -> dict[str, float]:
    """Memory utilisation of every schedulable node."""
    return {n: placer.nodes[n].util for n in placer.sched}


def violations(placer: Placer, specs: Mapping[str, VmSpec]) -> list[str]:
    """Hard rules broken by the charged state (should always be empty)."""
    out: list[str] = []
    for name, n in sorted(placer.nodes.items()):
        if n.used_memory_mib > n.memory_mib or n.used_vcpus > n.vcpus:
            out.append(f"{name}: over capacity ({n.used_memory_mib}/{n.memory_mib} MiB, "
                       f"{n.used_vcpus}/{n.vcpus} vCPUs)")
    by_node: dict[str, list[str]] = {}
    for vm, node in placer.where.items():
        by_node.setdefault(node, []).append(vm)
    for node, vms in sorted(by_node.items()):
        for vm in sorted(vms):
            spec = specs[vm]
            if spec.allowed_nodes and node not in spec.allowed_nodes:
                out.append(f"{vm} on {node}: not in allowed_nodes")
            for g in spec.anti_affinity:
                if placer.groups.get(f"anti:{g}", Counter()).get(node, 0) > 1:
                    out.append(f"{vm} on {node}: hard anti-affinity {g}")
    return out


# ---- cold boots as one batch -------------------------------------------------------------

EXACT_MAX_VMS = 7
EXACT_MAX_NODES = 6
EXACT_MAX_STEPS = 50_000


def place_batch(placer: Placer, specs: Mapping[str, VmSpec],
                order: list[str]) -> dict[str, str | None] | None:
    """Better targets for the VMs that need a cold boot this cycle, or None.

    The planner boots such VMs one at a time in `order` (priority, then name).  When that
    would leave one without a node and the instance is small (<= EXACT_MAX_VMS VMs,
    <= EXACT_MAX_NODES schedulable nodes), an exact search (bounded by EXACT_MAX_STEPS)
    looks for an assignment that places more of them (then more priority); the result
    maps every VM of `order` to its node (None: stays pending).  `placer` is left as found.
    """
    if len(order) > EXACT_MAX_VMS or len(placer.sched) > EXACT_MAX_NODES:
        return None
    greedy: dict[str, str] = {}
    for vm in order:
        c = placer.choose(specs[vm], set())
        if c.node is not None:
            placer.charge(vm, specs[vm], c.node, +1)
            greedy[vm] = c.node
    for vm, node in greedy.items():
        placer.charge(vm, specs[vm], node, -1)
    if len(greedy) == len(order):
        return None
    best = _exact(placer, specs, order)
    if best is None or best[0] <= (len(greedy), sum(specs[v].priority for v in greedy)):
        return None
    return {vm: best[1].get(vm) for vm in order}


def _exact(placer: Placer, specs: Mapping[str, VmSpec],
           order: list[str]) -> tuple[tuple[int, int], dict[str, str]] | None:
    best: list[Any] = [None]
    steps = [0]
    assign: dict[str, str] = {}

    def value() -> tuple[int, int]:
        return (len(assign), sum(specs[v].priority for v in assign))

    def dfs(i: int) -> None:
        steps[0] += 1
        if steps[0] > EXACT_MAX_STEPS:
            return
        if best[0] is not None and len(assign) + (len(order) - i) < best[0][0][0]:
            return
        if i == len(order):
            v = value()
            if best[0] is None or v > best[0][0]:
                best[0] = (v, dict(assign))
            return
        vm = order[i]
        spec = specs[vm]
        aff = placer._affinity_nodes(spec, set()) if spec.affinity else None
        for name in placer.sched:
            if placer.verdict(spec, name, exclude=set(), live_group=None, aff=aff) is None:
                placer.charge(vm, spec, name, +1)
                assign[vm] = name
                dfs(i + 1)
                del assign[vm]
                placer.charge(vm, spec, name, -1)
        dfs(i + 1)  # leave it unplaced

    dfs(0)
    result: tuple[tuple[int, int], dict[str, str]] | None = best[0]
    return result
