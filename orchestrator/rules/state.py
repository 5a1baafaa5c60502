"""The planner's per-cycle state: a frozen input and the mutable state the rules share.

`CycleInput` is what the leader hands in (one snapshot, its epoch, the times) plus what
follows from it alone.  `CycleState` is what the rules change as they decide, passed to
each rule explicitly: the actions so far, the capacity charged to each node (`placer`),
the migration slots in use (`inflight`), and counters for the summary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from fencing.liveness_fence import Mode, track_both_gone
from orchestrator.actions import Action, FenceNode, Wait, WritePlacement
from orchestrator.placement import Placer
from orchestrator.rules.facts import migration_in_flight, track_lost
from schemas.models import ClusterConfig, Placement
from schemas.snapshot import ClusterSnapshot

CLUSTER = ""  # the key of the cluster-wide count in `CycleState.inflight`


@dataclass(frozen=True)
class CycleInput:
    snap: ClusterSnapshot
    epoch: int
    now: float  # monotonic: lost-node timing
    wall_time: float  # wall clock: decided_at, rebalance budget, fence retry backoff
    lost_since: Mapping[str, float]  # the previous cycle's, as the leader kept it
    running: tuple[str, ...]  # VMs whose spec says running, in decision order
    max_priority: int
    # Keyspace 2's liveness fencing (fencing.liveness_fence): the mode the leader
    # resolved, and when it first saw each lost node's liveness key gone too.  "off"
    # (keyspace 1, and every caller that does not say): the fence window alone.
    liveness: Mode = "off"
    both_gone_since: Mapping[str, float] = field(default_factory=dict)

    @staticmethod
    def of(snap: ClusterSnapshot, *, epoch: int, now: float, wall_time: float,
           lost_since: Mapping[str, float], liveness: Mode = "off",
           both_gone_since: Mapping[str, float] | None = None) -> CycleInput:
        running = [vm for vm, e in snap.specs.items() if e.value.state == "running"]
        prio = {vm: snap.specs[vm].value.priority for vm in running}
        # Higher priority first (restart order and first pick of capacity), then by name.
        order = tuple(sorted(running, key=lambda v: (-prio[v], v)))
        return CycleInput(snap, epoch, now, wall_time, lost_since, order,
                          max(prio.values(), default=0), liveness, both_gone_since or {})

    @property
    def cfg(self) -> ClusterConfig:
        return self.snap.config

    @property
    def per_node_limit(self) -> int:
        return self.cfg.max_migrations_per_node


def count_inflight(snap: ClusterSnapshot) -> Counter[str]:
    """Migrations in flight per node (as source and as target) and cluster-wide."""
    inflight: Counter[str] = Counter()
    for vm, pe in snap.placements.items():
        se, spec = snap.statuses.get(vm), snap.specs.get(vm)
        p = pe.value
        if (spec and spec.value.state == "running" and p.from_node and p.node
                and migration_in_flight(snap, p, se.value if se else None)):
            inflight[p.from_node] += 1
            inflight[p.node] += 1
            inflight[CLUSTER] += 1
    return inflight


@dataclass
class CycleState:
    inp: CycleInput
    placer: Placer
    inflight: Counter[str]
    lost: dict[str, float]
    actions: list[Action] = field(default_factory=list)
    placed: int = 0  # placements written this cycle
    waiting: int = 0
    fence_why: dict[str, str] = field(default_factory=dict)  # lost node -> fence verdict
    # Cold boots placed by an exact search (orchestrator.placement.place_batch), if any.
    batch: dict[str, str | None] | None = None
    # Lost nodes whose liveness key is gone too -> first seen so (liveness fencing only).
    both_gone: dict[str, float] = field(default_factory=dict)
    # The earliest time (monotonic, as inp.now) at which time alone may change a wait.
    recheck_at: float | None = None

    @staticmethod
    def start(inp: CycleInput) -> CycleState:
        snap = inp.snap
        lost = track_lost(snap, inp.lost_since, inp.now)
        both = ({} if inp.liveness == "off" else
                track_both_gone(lost, snap.alive, inp.both_gone_since, inp.now))
        return CycleState(inp, Placer.from_snapshot(snap), count_inflight(snap), lost,
                          both_gone=both)

    # ---- writing decisions -------------------------------------------------------------

    def place(self, vm: str, kind: str, node: str | None, reason: str,
              scores: dict[str, float], *, from_node: str | None = None,
              fenced: tuple[tuple[str, int], ...] = (), charge: bool = True,
              failed_nodes: tuple[str, ...] = (), spec_revision: int | None = None,
              status_mod_revision: int | None = None) -> None:
        """Write a placement (unless it is the same pending note again) and charge it."""
        snap = self.inp.snap
        pe = snap.placements.get(vm)
        if kind == "pending" and pe and pe.value.kind == "pending" and pe.value.reason == reason:
            return  # nothing new to say
        p = Placement(id=f"e{self.inp.epoch}-r{snap.revision}-{vm}", vm=vm, node=node,
                      kind=kind,  # type: ignore[arg-type]
                      from_node=from_node, epoch=self.inp.epoch, reason=reason, scores=scores,
                      decided_at=self.inp.wall_time, failed_nodes=list(failed_nodes),
                      spec_revision=spec_revision)
        self.actions.append(WritePlacement(p, pe.mod_revision if pe else 0, fenced,
                                           status_mod_revision))
        self.placed += 1
        # The VM was released from its old node before deciding (rules.cluster.decide_vms).
        if charge:
            self.placer.charge(vm, snap.specs[vm].value, node, +1)

    def release_source(self, vm: str, p: Placement, status_mod_revision: int) -> None:
        """A live migration arrived: the same placement (same id, so the target's status
        stays current) as a boot on its node, without the source, which may then leave
        the cluster without being a lost holder.  Written only while the status that
        reports the arrival is unchanged."""
        snap = self.inp.snap
        pe = snap.placements[vm]
        # The writer's epoch (what the placement's epoch means, and what I3 checks);
        # the id stays, so the status that answers it stays current.
        done = p.model_copy(update={"kind": "boot", "from_node": None, "epoch": self.inp.epoch,
                                    "reason": f"{p.reason}; arrived, {p.from_node} released"})
        self.actions.append(WritePlacement(done, pe.mod_revision, (), status_mod_revision))
        self.placed += 1
        self.placer.charge(vm, snap.specs[vm].value, p.node, +1)

    def wait(self, vm: str, reason: str) -> None:
        self.actions.append(Wait(vm, reason))
        self.waiting += 1

    # ---- migration slots (drains go in waves) --------------------------------------------

    def slot_refusal(self, source: str) -> str | None:
        """Why no new migration may leave `source` now (None: a slot is free)."""
        limit = self.inp.cfg.placement.max_migrations_in_flight
        if self.inflight[CLUSTER] >= limit:
            return f"{self.inflight[CLUSTER]} of {limit} migrations in flight cluster-wide"
        if self.inflight[source] >= self.inp.per_node_limit:
            return (f"{source} has {self.inflight[source]} of {self.inp.per_node_limit} "
                    "migrations in flight")
        return None

    def busy(self) -> set[str]:
        """Nodes whose migration slots are all taken (not targets for a live migration)."""
        return {n for n, c in self.inflight.items()
                if n != CLUSTER and c >= self.inp.per_node_limit}

    def take_slot(self, source: str, target: str) -> None:
        self.inflight[source] += 1
        self.inflight[target] += 1
        self.inflight[CLUSTER] += 1

    def summary(self) -> str:
        snap = self.inp.snap
        n_fence = sum(isinstance(a, FenceNode) for a in self.actions)
        return (f"rev={snap.revision} nodes={len(snap.nodes)} vms={len(snap.specs)} "
                f"placements={self.placed} fences={n_fence} waiting={self.waiting} "
                f"lost={len(self.lost)}")
