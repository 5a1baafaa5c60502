"""Offline planning: cluster snapshots as JSON files, and the real planner run on them.

`export_snapshot` turns a `ClusterSnapshot` into the JSON of docs/snapshot-format.md,
`load_snapshot` parses it back through the same validation the daemons use, and
`simulate` fails or drains nodes, then runs `planner.plan` cycle after cycle, applying
its placements as if every boot and migration succeeded at once, until nothing is left
to write.  Pure: no etcd, no clock (the caller passes the times).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator import planner
from orchestrator.placement import Placer, violations
from schemas.keys import Keyspace
from schemas.models import (
    ClusterConfig,
    CordonMarker,
    FenceRecord,
    Model,
    VmSpec,
    VmStatus,
)
from schemas.secrets import redact_config
from schemas.snapshot import ClusterSnapshot, Entry, RawKV

FORMAT = "vmha-snapshot"
VERSION = 1


# ---- snapshot files ------------------------------------------------------------------------

def _entries(snap: ClusterSnapshot) -> Iterable[Entry[Any]]:
    if snap.config_entry is not None:
        yield snap.config_entry
    if snap.leader is not None:
        yield snap.leader
    for m in (snap.nodes, snap.cordons, snap.fences, snap.specs, snap.placements,
              snap.statuses):
        yield from m.values()


def _dump(e: Entry[Any]) -> dict[str, Any]:
    value: dict[str, Any] = e.value.model_dump(by_alias=True, mode="json")
    # A snapshot file is shared (bug reports, `vmha simulate` elsewhere): no secrets.
    return redact_config(value) if isinstance(e.value, ClusterConfig) else value


def export_snapshot(snap: ClusterSnapshot, prefix: str = "/vmha") -> dict[str, Any]:
    keys = [{"key": e.key, "value": _dump(e),
             "create_revision": e.create_revision, "mod_revision": e.mod_revision,
             "lease": e.lease}
            for e in sorted(_entries(snap), key=lambda e: e.key)]
    return {"format": FORMAT, "version": VERSION, "prefix": prefix, "revision": snap.revision,
            "keys": keys, "invalid_keys": [str(e) for e in snap.errors]}


class SnapshotFileError(ValueError):
    pass


def load_snapshot(data: Any) -> ClusterSnapshot:
    import json

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SnapshotFileError(f"not a {FORMAT} file (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise SnapshotFileError(f"unsupported snapshot version {data.get('version')!r}")
    try:
        ks = Keyspace(str(data.get("prefix", "/vmha")))
        kvs = [RawKV(str(k["key"]), json.dumps(k["value"]).encode(),
                     int(k.get("create_revision", 1)), int(k.get("mod_revision", 1)),
                     int(k.get("lease", 0))) for k in data["keys"]]
        return ClusterSnapshot.from_kvs(ks, int(data["revision"]), kvs)
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotFileError(f"malformed snapshot file: {exc}") from None


# ---- what-if edits ---------------------------------------------------------------------------

def _key(snap: ClusterSnapshot, kind: str, name: str) -> str:
    ks = Keyspace(_prefix(snap))
    return str(getattr(ks, kind)(name))


def _prefix(snap: ClusterSnapshot) -> str:
    for e in _entries(snap):
        for part in ("/nodes/", "/vms/", "/config", "/leader", "/cordon/", "/fence/"):
            if part in e.key:
                return e.key[:e.key.index(part)]
    return "/vmha"


def _entry(value: Model, key: str, rev: int) -> Entry[Any]:
    return Entry(value, key, rev, rev)


def fail_node(snap: ClusterSnapshot, node: str, rev: int, wall: float) -> ClusterSnapshot:
    """The node is gone and its fence record written (the fence window has passed)."""
    if node not in snap.nodes:
        raise KeyError(node)
    reg = snap.nodes[node].value
    nodes = {n: e for n, e in snap.nodes.items() if n != node}
    fences = dict(snap.fences)
    fences[node] = _entry(FenceRecord(node=node, lease_id=reg.lease_id, method="self",
                                      outcome="success", reason="simulated failure", epoch=0,
                                      duration_s=0.0, fenced_at=wall),
                          _key(snap, "fence", node), rev)
    return dataclasses.replace(snap, nodes=nodes, fences=fences, revision=rev)


def drain_node(snap: ClusterSnapshot, node: str, rev: int, wall: float) -> ClusterSnapshot:
    if node not in snap.nodes:
        raise KeyError(node)
    cordons = dict(snap.cordons)
    cordons[node] = _entry(CordonMarker(node=node, reason="simulated drain", by="simulate",
                                        at=wall), _key(snap, "cordon", node), rev)
    return dataclasses.replace(snap, cordons=cordons, revision=rev)


def apply_plan(snap: ClusterSnapshot, result: planner.Plan, rev: int,
               wall: float) -> ClusterSnapshot:
    """Every decision succeeds at once: boots run, migrations arrive, fences are written."""
    placements = dict(snap.placements)
    statuses = dict(snap.statuses)
    fences = dict(snap.fences)
    moves = dict(snap.moves)
    for a in result.writes:
        if isinstance(a, planner.WritePlacement):
            p = a.placement
            if p.kind == "migrate":  # it arrives at once, and the leader releases its source
                p = p.model_copy(update={"kind": "boot", "from_node": None,
                                         "reason": f"{p.reason}; arrived, {p.from_node} "
                                                   "released"})
            placements[p.vm] = _entry(p, _key(snap, "vm_placement", p.vm), rev)
            if p.node is not None:
                statuses[p.vm] = _entry(VmStatus.model_construct(
                    vm=p.vm, node=p.node, state="running", placement_id=p.id, since=wall,
                    error=None, failed_target=None, migration=None),
                    _key(snap, "vm_status", p.vm), rev)
        elif isinstance(a, planner.FenceNode):
            fences[a.node] = _entry(FenceRecord(node=a.node, lease_id="", method="self",
                                                outcome="success", reason=a.reason, epoch=0,
                                                duration_s=0.0, fenced_at=wall),
                                    _key(snap, "fence", a.node), rev)
        elif isinstance(a, planner.ClearFence):
            fences.pop(a.node, None)
        elif isinstance(a, planner.ClearMove):
            moves.pop(a.vm, None)
    return dataclasses.replace(snap, placements=placements, statuses=statuses, fences=fences,
                               moves=moves, revision=rev)


def with_config(snap: ClusterSnapshot, **placement: Any) -> ClusterSnapshot:
    pol = snap.config.placement
    rb = pol.rebalance
    rb_fields = {k[len("rebalance_"):]: v for k, v in placement.items()
                 if k.startswith("rebalance_")}
    other = {k: v for k, v in placement.items() if not k.startswith("rebalance_")}
    cfg = snap.config.model_copy(update={"placement": pol.model_copy(update={
        **other, "rebalance": rb.model_copy(update=rb_fields)})})
    valid = ClusterConfig.model_validate(cfg.model_dump(by_alias=True))
    return dataclasses.replace(snap, config=valid)


# ---- reports -----------------------------------------------------------------------------

def node_usage(snap: ClusterSnapshot) -> list[dict[str, Any]]:
    placer = Placer.from_snapshot(snap)
    counts: dict[str, int] = {}
    for node in placer.where.values():
        counts[node] = counts.get(node, 0) + 1
    rows = []
    for name in sorted(placer.nodes):
        n = placer.nodes[name]
        rows.append({"node": name, "group": n.group, "schedulable": n.schedulable,
                     "vms": counts.get(name, 0), "memory_mib": n.memory_mib,
                     "used_memory_mib": n.used_memory_mib, "vcpus": n.vcpus,
                     "used_vcpus": n.used_vcpus, "memory_util": round(n.util, 4)})
    return rows


def balance(rows: list[dict[str, Any]]) -> dict[str, float]:
    u = [r["memory_util"] for r in rows if r["schedulable"]]
    if not u:
        return {"mean": 0.0, "stddev": 0.0, "max": 0.0, "min": 0.0}
    mean = sum(u) / len(u)
    return {"mean": round(mean, 4),
            "stddev": round(math.sqrt(sum((x - mean) ** 2 for x in u) / len(u)), 4),
            "max": round(max(u), 4), "min": round(min(u), 4)}


@dataclass
class SimResult:
    snapshot: ClusterSnapshot
    cycles: int = 0
    moves: list[dict[str, Any]] = field(default_factory=list)
    boots: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    waiting: list[dict[str, Any]] = field(default_factory=list)
    first_plan_s: float = 0.0
    converged: bool = True

    def report(self, before: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        rows = node_usage(self.snapshot)
        placer = Placer.from_snapshot(self.snapshot)
        specs = {v: e.value for v, e in self.snapshot.specs.items()}
        out: dict[str, Any] = {
            "cycles": self.cycles, "converged": self.converged,
            "migrations": len(self.moves), "boots": len(self.boots),
            "moves": self.moves, "booted": self.boots, "pending": self.pending,
            "waiting": self.waiting, "nodes": rows, "balance": balance(rows),
            "violations": violations(placer, specs),
            "first_plan_ms": round(self.first_plan_s * 1000, 2)}
        if before is not None:
            out["balance_before"] = balance(before)
        return out


def simulate(snap: ClusterSnapshot, *, fail: Iterable[str] = (), drain: Iterable[str] = (),
             rebalance: bool = False, max_cycles: int = 200, wall: float = 1_000_000.0,
             clock: Any = None, overrides: Mapping[str, Any] | None = None) -> SimResult:
    """Run the planner to a fixed point.  `clock` (optional) times the first plan call."""
    rev = snap.revision
    for node in fail:
        rev += 1
        snap = fail_node(snap, node, rev, wall)
    for node in drain:
        rev += 1
        snap = drain_node(snap, node, rev, wall)
    if rebalance or overrides:
        snap = with_config(snap, **({"rebalance_enabled": True} if rebalance else {}),
                           **(overrides or {}))
    snap = dataclasses.replace(snap, revision=rev)
    res = SimResult(snap)
    epoch = 1
    interval = snap.config.placement.rebalance.interval_s
    last: planner.Plan | None = None
    for cycle in range(max_cycles):
        t0 = clock() if clock else 0.0
        result = planner.plan(snap, epoch=epoch, now=wall, wall_time=wall, lost_since={})
        if cycle == 0 and clock:
            res.first_plan_s = clock() - t0
        last = result
        writes = [a for a in result.writes if isinstance(a, planner.WritePlacement)]
        if not result.writes:
            break
        res.cycles += 1
        for a in writes:
            p = a.placement
            row = {"vm": p.vm, "kind": p.kind, "node": p.node, "from_node": p.from_node,
                   "reason": p.reason, "scores": p.scores, "cycle": cycle}
            if p.kind == "migrate":
                res.moves.append(row)
            elif p.kind == "boot":
                res.boots.append(row)
        rev += 1
        # Migrations arrive in the next cycle; the rebalance budget resets each interval.
        snap = apply_plan(snap, result, rev, wall)
        wall += interval if rebalance else 1.0
    else:
        res.converged = False
    res.snapshot = snap
    for vm, pe in sorted(snap.placements.items()):
        if pe.value.kind == "pending" and vm in snap.specs:
            res.pending.append({"vm": vm, "reason": pe.value.reason})
    if last is not None:
        res.waiting = [{"vm": a.vm, "reason": a.reason} for a in last.actions
                       if isinstance(a, planner.Wait)]
    return res



# ---- admission control (N+1) ---------------------------------------------------------------

@dataclass(frozen=True)
class Admission:
    ok: bool
    message: str
    lost_node: str | None = None
    unplaced: tuple[str, ...] = ()


def add_spec(snap: ClusterSnapshot, spec: VmSpec) -> ClusterSnapshot:
    specs = dict(snap.specs)
    rev = snap.revision + 1
    specs[spec.name] = _entry(spec, _key(snap, "vm_spec", spec.name), rev)
    return dataclasses.replace(snap, specs=specs, revision=rev)


def admission_check(snap: ClusterSnapshot, spec: VmSpec) -> Admission:
    """Would the cluster, with `spec` added, re-place every VM after losing its largest
    node (largest effective memory, then name)?  Runs the real planner offline."""
    if spec.state != "running":
        return Admission(True, "declared stopped: takes no capacity")
    snap = add_spec(snap, spec)
    placer = Placer.from_snapshot(snap)
    if not placer.sched:
        return Admission(True, "no schedulable node registered: N+1 not checked")
    now = simulate(snap, max_cycles=50)
    if any(p["vm"] == spec.name for p in now.pending):
        return Admission(False, f"{spec.name} does not fit now: "
                         + next(p["reason"] for p in now.pending if p["vm"] == spec.name))
    largest = max(placer.sched, key=lambda n: (placer.nodes[n].memory_mib, n))
    if len(placer.sched) < 2:
        return Admission(False, f"N+1 broken: only one schedulable node ({largest})",
                         largest)
    after = simulate(now.snapshot, fail=[largest], max_cycles=50)
    unplaced = tuple(sorted(p["vm"] for p in after.pending))
    if unplaced:
        shown = ", ".join(unplaced[:10]) + (f" and {len(unplaced) - 10} more"
                                            if len(unplaced) > 10 else "")
        return Admission(False, f"N+1 broken: after losing the largest node {largest}, "
                         f"{len(unplaced)} VM(s) could not be placed ({shown})",
                         largest, unplaced)
    return Admission(True, f"N+1 ok: every VM can be re-placed after losing {largest}",
                     largest)
