"""Facts the planner's rules read from one snapshot (pure, no state of their own).

A VM's *holders* are the nodes it may be running on: the node its status reports it
running on, its placement's node, and a migration's source.  A node is *lost* when a
placement or a running status names it but it is not registered, and *fenced* when it
has a fence record that records a success.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from schemas.models import RUNNING_STATES, Placement, VmSpec, VmStatus
from schemas.snapshot import ClusterSnapshot, Entry


def migration_arrived(p: Placement, s: VmStatus | None) -> bool:
    """The target reports the VM of this migrate placement running: the source holds
    nothing of it any more (libvirt undefines it there on success)."""
    return (p.kind == "migrate" and s is not None and s.placement_id == p.id
            and s.node == p.node and s.state in ("running", "paused"))


def referenced_nodes(snap: ClusterSnapshot) -> set[str]:
    """Nodes that may hold a VM according to placements and statuses (the source of a
    migration that arrived holds nothing: a drained node that left is not lost)."""
    out: set[str] = set()
    for vm, pe in snap.placements.items():
        se = snap.statuses.get(vm)
        arrived = migration_arrived(pe.value, se.value if se else None)
        for n in (pe.value.node, None if arrived else pe.value.from_node):
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
             p.from_node if p and p.kind == "migrate" and not migration_arrived(p, s) else None]
    for c in cands:
        if c and c not in out:
            out.append(c)
    return out


def migration_failed(p: Placement, s: VmStatus | None) -> bool:
    return (s is not None and p.kind == "migrate" and s.placement_id == p.id
            and s.failed_target == p.node and s.node == p.from_node)


def placement_and_status(snap: ClusterSnapshot,
                         vm: str) -> tuple[Placement | None, VmStatus | None]:
    pe, se = snap.placements.get(vm), snap.statuses.get(vm)
    return (pe.value if pe else None), (se.value if se else None)


def migration_job_running(p: Placement, s: VmStatus | None) -> bool:
    """The source's status says the live migration of this placement runs: its job has
    not ended (the source reports the end as `running` with `failed_target`, or its
    hand-off `stopped`, or the target reports the VM arrived)."""
    return (s is not None and p.kind == "migrate" and s.placement_id == p.id
            and s.node == p.from_node and s.state == "migrating")


def migration_in_flight(snap: ClusterSnapshot, p: Placement, s: VmStatus | None) -> bool:
    """A migrate placement whose VM has not arrived, not failed, both ends registered;
    or whose job still runs on a registered source although the target is lost (it holds
    its slot until the source aborts it or its time limit ends it)."""
    if p.kind != "migrate" or migration_failed(p, s):
        return False
    if s is not None and s.node == p.node and s.state in RUNNING_STATES:
        return False
    if p.from_node in snap.nodes and migration_job_running(p, s):
        return True
    return p.node in snap.nodes and p.from_node in snap.nodes


def needs_cold_boot(snap: ClusterSnapshot, vm: str) -> bool:
    """No node may hold the VM: every holder has a fence record (any outcome), or none."""
    return all(h not in snap.nodes and h in snap.fences
               for h in holders(snap.specs[vm].value, *placement_and_status(snap, vm)))


@dataclass(frozen=True)
class VmFacts:
    """What the snapshot says about one VM whose spec says running."""

    vm: str
    spec: VmSpec
    entry: Entry[Placement] | None  # the placement key (its mod_revision is the compare)
    p: Placement | None
    s: VmStatus | None
    holders: tuple[str, ...]
    live: tuple[str, ...]  # registered holders
    unfenced: tuple[str, ...]  # lost holders without a successful fence record
    source: str | None  # where it runs now, if a live node may hold it
    failed: bool  # the last migration failed (the VM still runs on its source)

    @property
    def arrived(self) -> bool:
        """The status reports the VM running on its placement's node."""
        return (self.s is not None and self.p is not None and self.s.node == self.p.node
                and self.s.state in RUNNING_STATES)

    def fenced_holders(self, snap: ClusterSnapshot) -> tuple[tuple[str, int], ...]:
        """The unregistered holders with their fence records' mod_revisions."""
        return tuple((h, snap.fences[h].mod_revision) for h in self.holders
                     if h not in snap.nodes)


def vm_facts(snap: ClusterSnapshot, vm: str) -> VmFacts:
    pe = snap.placements.get(vm)
    p = pe.value if pe else None
    s = snap.statuses[vm].value if vm in snap.statuses else None
    spec = snap.specs[vm].value
    hs = tuple(holders(spec, p, s))
    live = tuple(h for h in hs if h in snap.nodes)
    unfenced = tuple(h for h in hs if h not in snap.nodes and not is_fenced(snap, h))
    source = None
    if live:
        source = (s.node if s and s.state in RUNNING_STATES and s.node in snap.nodes
                  else live[0])
    return VmFacts(vm, spec, pe, p, s, hs, live, unfenced, source,
                   p is not None and migration_failed(p, s))
