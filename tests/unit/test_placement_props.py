"""Property-based tests of placement on random small clusters (hypothesis).

Independent of the planner's code, `best_count` searches every assignment of the VMs
that need a node (slow, exact, tiny instances only) to say how many can be placed.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import simulate
from orchestrator.placement import Placer, node_group
from orchestrator.planner import plan
from orchestrator.rebalance import objective
from schemas.models import VmSpec
from schemas.snapshot import ClusterSnapshot
from tests.unit.builders import KS, cluster, node_value, raw, snapshot, spec_value

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

node_st = st.tuples(st.sampled_from([2048, 3072, 4096]), st.sampled_from([2, 4]),
                    st.sampled_from([None, "g2"]))
vm_st = st.tuples(st.sampled_from([512, 1024, 1536, 2048]), st.sampled_from([1, 2]),
                  st.sampled_from([None, "a", "b"]), st.integers(0, 4), st.integers(0, 1))


@st.composite
def clusters(draw: Any) -> ClusterSnapshot:
    nodes = draw(st.lists(node_st, min_size=1, max_size=4))
    vms = draw(st.lists(vm_st, min_size=1, max_size=6))
    names = [f"n{i}" for i in range(len(nodes))]
    extra = []
    for name, (mem, cpu, group) in zip(names, nodes, strict=True):
        extra.append(raw(KS.node(name), {**node_value(name, mem, cpu),
                                         "migration_group": group}, 11, lease=0x1A2B))
    for i, (mem, cpu, anti, allowed, prio) in enumerate(vms):
        c: dict[str, Any] = {"priority": prio}
        if anti:
            c["anti_affinity"] = [anti]
        if allowed < len(names) and allowed < 2:  # sometimes restricted to one node
            c["allowed_nodes"] = [names[allowed]]
        extra.append(raw(KS.vm_spec(f"v{i}"), {**spec_value(f"v{i}", mem, cpu), **c}, 15))
    return cluster(extra=extra)


def fits(spec: VmSpec, node: str, cap: Mapping[str, list[int]],
         anti: Mapping[str, Mapping[str, int]]) -> bool:
    return (cap[node][0] >= spec.memory_mib and cap[node][1] >= spec.vcpus
            and (not spec.allowed_nodes or node in spec.allowed_nodes)
            and not any(anti.get(g, {}).get(node, 0) for g in spec.anti_affinity))


def best_count(snap: ClusterSnapshot, fixed: Mapping[str, str], todo: list[str]) -> int:
    """Most VMs of `todo` that can be placed with `fixed` staying where it is (brute force)."""
    sched = sorted(n for n in snap.nodes if snap.schedulable(n))
    specs = {v: e.value for v, e in snap.specs.items()}
    best = 0
    for combo in itertools.product([None, *sched], repeat=len(todo)):
        cap = {n: [snap.nodes[n].value.capacity.memory_mib,
                   snap.nodes[n].value.capacity.vcpus] for n in sched}
        anti: dict[str, dict[str, int]] = {}
        ok = True
        for vm, node in [*fixed.items(), *zip(todo, combo, strict=True)]:
            if node is None or node not in cap:
                continue
            spec = specs[vm]
            if vm in todo and not fits(spec, node, cap, anti):
                ok = False
                break
            cap[node][0] -= spec.memory_mib
            cap[node][1] -= spec.vcpus
            for g in spec.anti_affinity:
                anti.setdefault(g, {})[node] = anti.setdefault(g, {}).get(node, 0) + 1
        if ok:
            best = max(best, sum(1 for n in combo if n is not None))
    return best


def placed(snap: ClusterSnapshot) -> dict[str, str]:
    return {vm: pe.value.node for vm, pe in snap.placements.items()
            if pe.value.node is not None}


def check_hard_rules(snap: ClusterSnapshot) -> None:
    placer = Placer.from_snapshot(snap)
    specs = {v: e.value for v, e in snap.specs.items()}
    from orchestrator.placement import violations

    assert violations(placer, specs) == []


@SETTINGS
@given(clusters())
def test_initial_placement_safe_and_complete_when_feasible(snap: ClusterSnapshot) -> None:
    res = simulate.simulate(snap)
    assert res.converged
    check_hard_rules(res.snapshot)
    n_placed = len(placed(res.snapshot))
    assert n_placed == best_count(snap, {}, sorted(snap.specs))


@SETTINGS
@given(clusters(), st.integers(0, 3))
def test_node_failure_replaces_every_displaced_vm_when_feasible(snap: ClusterSnapshot,
                                                                pick: int) -> None:
    start = simulate.simulate(snap).snapshot
    victim = sorted(start.nodes)[pick % len(start.nodes)]
    where = placed(start)
    res = simulate.simulate(start, fail=[victim])
    check_hard_rules(res.snapshot)
    after = placed(res.snapshot)
    fixed = {vm: n for vm, n in where.items() if n != victim}
    for vm, n in fixed.items():
        assert after[vm] == n  # nobody else moves
    todo = sorted(vm for vm in snap.specs if vm not in fixed)
    want = best_count(res.snapshot, fixed, todo)
    got = sum(1 for vm in todo if vm in after and after[vm] != victim)
    if want == len(todo):
        assert got == len(todo)
    assert all(m["kind"] == "boot" for m in res.moves + res.boots)


@SETTINGS
@given(clusters(), st.integers(0, 3))
def test_drain_never_reboots_and_respects_groups(snap: ClusterSnapshot, pick: int) -> None:
    start = simulate.simulate(snap).snapshot
    victim = sorted(start.nodes)[pick % len(start.nodes)]
    res = simulate.simulate(start, drain=[victim])
    check_hard_rules(res.snapshot)
    assert res.boots == [] or all(b["vm"] not in placed(start) for b in res.boots)
    group = node_group(start.nodes[victim].value)
    for m in res.moves:
        assert m["from_node"] == victim
        assert node_group(start.nodes[m["node"]].value) == group
    waiting = {w["vm"] for w in res.waiting}
    for vm, n in placed(res.snapshot).items():
        if n == victim:
            assert vm in waiting  # stays with a visible reason


@SETTINGS
@given(clusters())
def test_plan_is_deterministic_and_order_independent(snap: ClusterSnapshot) -> None:
    start = simulate.simulate(snap, max_cycles=1).snapshot
    a = plan(start, epoch=1, now=5.0, wall_time=9.0, lost_since={})
    b = plan(start, epoch=1, now=5.0, wall_time=9.0, lost_since={})
    kvs = [raw(e.key, e.value.to_json(), e.mod_revision)
           for m in (start.nodes, start.specs, start.placements, start.statuses)
           for e in m.values()]
    c = plan(snapshot(reversed(kvs), start.revision), epoch=1, now=5.0, wall_time=9.0,
             lost_since={})
    assert a == b
    assert a.actions == c.actions


@SETTINGS
@given(clusters())
def test_rebalance_after_rebalance_moves_nothing(snap: ClusterSnapshot) -> None:
    start = simulate.simulate(snap).snapshot
    g0 = objective(Placer.from_snapshot(start))
    first = simulate.simulate(start, rebalance=True)
    assert first.converged
    check_hard_rules(first.snapshot)
    assert objective(Placer.from_snapshot(first.snapshot)) <= g0 + 1e-9
    second = simulate.simulate(first.snapshot, rebalance=True)
    assert second.moves == []
    for m in first.moves:  # live migrations within the migration group only
        assert (node_group(start.nodes[m["from_node"]].value)
                == node_group(start.nodes[m["node"]].value))
