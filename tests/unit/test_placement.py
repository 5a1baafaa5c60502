"""Placement constraints, migration limits, priorities and the rebalancer (issue #5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator import simulate
from orchestrator.placement import SCORES_KEPT, Placer, node_group
from orchestrator.planner import Plan, Wait, WritePlacement, plan
from orchestrator.rebalance import REASON_PREFIX
from schemas.models import NodeRegistration, VmSpec
from schemas.snapshot import ClusterSnapshot
from tests.unit.builders import (
    KS,
    boot,
    cluster,
    migrate,
    node_value,
    raw,
    running,
    spec_value,
    status,
)

WALL = 1_700_000_123.0


def run(snap: ClusterSnapshot, wall: float = WALL) -> Plan:
    return plan(snap, epoch=3, now=1000.0, wall_time=wall, lost_since={})


def writes(p: Plan) -> list[tuple[Any, ...]]:
    return [(a.placement.vm, a.placement.kind, a.placement.node, a.placement.from_node)
            for a in p.actions if isinstance(a, WritePlacement)]


def waits(p: Plan) -> dict[str, str]:
    return {a.vm: a.reason for a in p.actions if isinstance(a, Wait)}


def vm(name: str, memory_mib: int = 1024, vcpus: int = 1, **constraints: Any) -> Any:
    return raw(KS.vm_spec(name), {**spec_value(name, memory_mib, vcpus), **constraints}, 15)


def node(name: str, memory_mib: int = 8192, vcpus: int = 8, **kw: Any) -> Any:
    return raw(KS.node(name), {**node_value(name, memory_mib, vcpus), **kw}, 11, lease=0x1A2B)


# ---- hard and soft constraints ---------------------------------------------------------------


def test_hard_anti_affinity_spreads_and_pends_when_impossible() -> None:
    snap = cluster(nodes=["a", "b"], extra=[vm("db1", anti_affinity=["db"]),
                                           vm("db2", anti_affinity=["db"]),
                                           vm("db3", anti_affinity=["db"])])
    p = run(snap)
    placed = {w[0]: w[2] for w in writes(p) if w[1] == "boot"}
    assert placed == {"db1": "a", "db2": "b"}
    pend = [a.placement for a in p.actions if isinstance(a, WritePlacement)
            and a.placement.kind == "pending"]
    assert [x.vm for x in pend] == ["db3"]
    assert "2 hard anti-affinity" in pend[0].reason


def test_anti_affinity_groups_are_per_field() -> None:
    # A soft member of "db" does not block a hard member (and vice versa).
    snap = cluster(nodes=["a"], extra=[vm("x1", anti_affinity=["db"]),
                                      vm("x2", soft_anti_affinity=["db"])])
    assert sorted(w[2] for w in writes(run(snap))) == ["a", "a"]


def test_soft_anti_affinity_prefers_apart_but_allows_together() -> None:
    snap = cluster(nodes={"a": (16384, 8), "b": (4096, 8)},
                   extra=[vm("w1", soft_anti_affinity=["web"]),
                          vm("w2", soft_anti_affinity=["web"]),
                          vm("w3", soft_anti_affinity=["web"])])
    placed = {w[0]: w[2] for w in writes(run(snap))}
    assert placed["w1"] == "a" and placed["w2"] == "b"  # apart although b is smaller
    assert placed["w3"] in ("a", "b")


def test_allowed_nodes_is_hard() -> None:
    snap = cluster(nodes={"a": (16384, 8), "b": (4096, 8)},
                   extra=[vm("v", allowed_nodes=["b"]), vm("w", allowed_nodes=["zz"])])
    p = run(snap)
    assert ("v", "boot", "b", None) in writes(p)
    pend = {a.placement.vm: a.placement.reason for a in p.actions
            if isinstance(a, WritePlacement) and a.placement.kind == "pending"}
    assert "2 not in allowed_nodes" in pend["w"]


def test_node_preferences_outweigh_balance() -> None:
    snap = cluster(nodes={"a": (16384, 8), "b": (4096, 8)},
                   extra=[vm("v", node_preferences={"b": 5.0})])
    p = run(snap)
    assert writes(p) == [("v", "boot", "b", None)]
    wp = [a for a in p.actions if isinstance(a, WritePlacement)][0]
    assert "soft score +5" in wp.placement.reason


def test_hard_affinity_follows_the_group() -> None:
    snap = cluster(nodes=["a", "b", "c"], extra=[vm("app", affinity=["stack"]),
                                                 vm("db", affinity=["stack"])],
                   placements={"app": boot("c", mod=40)}, statuses={"app": running("c", "p1")},
                   strict=False)
    assert writes(run(snap)) == [("db", "boot", "c", None)]


# ---- capacity policy ---------------------------------------------------------------------


def test_memory_overcommit_and_reserve() -> None:
    base = dict(nodes={"a": (4096, 8)}, extra=[vm("big", 6144)])
    assert writes(run(cluster(**base)))[0][1] == "pending"
    over = cluster(**base, config={"placement": {"memory_overcommit": 1.5}})
    assert writes(run(over)) == [("big", "boot", "a", None)]
    reserved = cluster(**base, config={"placement": {"memory_overcommit": 1.5,
                                                     "reserve_memory_mib": 512}})
    assert writes(run(reserved))[0][1] == "pending"


def test_vcpu_overcommit() -> None:
    snap = cluster(nodes={"a": (8192, 2)}, extra=[vm("v", 1024, 4)],
                   config={"placement": {"vcpu_overcommit": 2.0}})
    assert writes(run(snap)) == [("v", "boot", "a", None)]


def test_scores_capped() -> None:
    snap = cluster(nodes=[f"n{i}" for i in range(20)], specs=["v"])
    p = [a for a in run(snap).actions if isinstance(a, WritePlacement)][0].placement
    assert len(p.scores) == SCORES_KEPT and p.node in p.scores


# ---- migration domains ---------------------------------------------------------------------


def test_node_group_default_and_override() -> None:
    reg = NodeRegistration.model_validate(node_value("a"))
    assert node_group(reg) == "cpu:qemu64"
    reg2 = NodeRegistration.model_validate({**node_value("a"), "migration_group": "g1"})
    assert node_group(reg2) == "g1"


def test_drain_only_within_migration_group_else_stays_with_reason() -> None:
    snap = cluster(nodes={"a": (8192, 8)}, cordons=["a"], specs=["v1"],
                   placements={"v1": boot("a", mod=40)}, statuses={"v1": running("a", "p1")},
                   extra=[node("b", 16384, migration_group="other"),
                          node("c", 4096, migration_group="cpu:qemu64")])
    assert writes(run(snap)) == [("v1", "migrate", "c", "a")]
    stuck = cluster(nodes={"a": (8192, 8)}, cordons=["a"], specs=["v1"],
                    placements={"v1": boot("a", mod=40)}, statuses={"v1": running("a", "p1")},
                    extra=[node("b", 16384, migration_group="other")])
    p = run(stuck)
    assert writes(p) == []  # never a cold boot elsewhere while a is up
    assert "1 other migration group" in waits(p)["v1"]
    assert "never cold-booted elsewhere" in waits(p)["v1"]


def test_cold_boot_after_fence_may_cross_groups() -> None:
    snap = cluster(fences={"x": 42}, specs=["v1"], placements={"v1": boot("x", mod=40)},
                   statuses={"v1": running("x", "p1")},
                   extra=[node("b", migration_group="other")])
    assert writes(run(snap)) == [("v1", "boot", "b", None)]


# ---- restart priority -----------------------------------------------------------------------


def test_priority_first_others_pending_with_reason() -> None:
    snap = cluster(nodes={"b": (3072, 8)}, fences={"x": 42},
                   placements={"low": boot("x", mod=40), "high": boot("x", mod=41)},
                   extra=[vm("low", 2048), vm("high", 2048, priority=10)], strict=False)
    p = run(snap)
    got = {a.placement.vm: a.placement for a in p.actions if isinstance(a, WritePlacement)}
    assert got["high"].kind == "boot" and got["low"].kind == "pending"
    assert "higher-priority VMs are placed first" in got["low"].reason
    assert [a.placement.vm for a in p.actions if isinstance(a, WritePlacement)] == [
        "high", "low"]


# ---- migration limits: drains in waves ------------------------------------------------------


def _drain(n_vms: int, config: Mapping[str, Any] | None = None) -> ClusterSnapshot:
    vms = [f"v{i}" for i in range(n_vms)]
    return cluster(nodes={"a": (65536, 64), "b": (65536, 64), "c": (65536, 64)},
                   cordons=["a"], specs=vms, config=config,
                   placements={v: boot("a", mod=40) for v in vms},
                   statuses={v: running("a", "p1") for v in vms})


def test_drain_in_waves_per_node_limit() -> None:
    p = run(_drain(5))  # max_migrations_per_node = 2 (default)
    assert len(writes(p)) == 2
    assert len(waits(p)) == 3
    assert all("waiting for a migration slot" in r for r in waits(p).values())


def test_cluster_wide_limit() -> None:
    p = run(_drain(5, {"max_migrations_per_node": 10,
                       "placement": {"max_migrations_in_flight": 3}}))
    assert len(writes(p)) == 3
    assert "cluster-wide" in next(iter(waits(p).values()))


def test_migrations_in_flight_count_against_limits() -> None:
    snap = cluster(nodes={"a": (65536, 64), "b": (65536, 64), "c": (65536, 64)},
                   cordons=["a"], specs=["v0", "v1", "v2"],
                   placements={"v0": migrate("a", "b", mod=40), "v1": boot("a", mod=41),
                               "v2": boot("a", mod=42)},
                   statuses={"v0": status("a", "migrating", "p1"), "v1": running("a", "p1"),
                             "v2": running("a", "p1")})
    p = run(snap)
    assert len(writes(p)) == 1  # a has one in flight, one slot left
    assert writes(p)[0][3] == "a"


def test_drain_completes_in_waves_by_priority() -> None:
    snap = cluster(nodes={"a": (65536, 64), "b": (65536, 64), "c": (65536, 64)},
                   cordons=["a"], placements={f"v{i}": boot("a", mod=40) for i in range(5)},
                   statuses={f"v{i}": running("a", "p1") for i in range(5)},
                   extra=[vm(f"v{i}", priority=i) for i in range(5)], strict=False)
    res = simulate.simulate(snap)
    assert res.cycles == 3
    assert [m["vm"] for m in res.moves] == ["v4", "v3", "v2", "v1", "v0"]
    assert all(m["from_node"] == "a" for m in res.moves)


# ---- rebalancer ---------------------------------------------------------------------------


def _skewed(config: Mapping[str, Any] | None = None,
            extra_placements: Mapping[str, Any] | None = None) -> ClusterSnapshot:
    vms = [f"v{i}" for i in range(6)]
    return cluster(nodes={"a": (8192, 8), "b": (8192, 8)}, specs=vms, config=config,
                   placements={**{v: boot("a", mod=40) for v in vms},
                               **(extra_placements or {})},
                   statuses={v: running("a", "p1") for v in vms})


def test_rebalance_off_by_default() -> None:
    assert writes(run(_skewed())) == []


def test_rebalance_moves_within_budget_with_reason() -> None:
    snap = _skewed({"placement": {"rebalance": {"enabled": True, "max_moves": 2}}})
    p = run(snap)
    assert writes(p) == [("v0", "migrate", "b", "a"), ("v1", "migrate", "b", "a")]
    for a in p.actions:
        assert isinstance(a, WritePlacement) and a.placement.reason.startswith(REASON_PREFIX)


def test_rebalance_budget_counts_recent_moves() -> None:
    cfg = {"placement": {"rebalance": {"enabled": True, "max_moves": 2, "interval_s": 300}}}
    recent = {"v5": {**boot("a", mod=50), "reason": "rebalance: earlier", "decided_at": WALL - 10}}
    assert len(writes(run(_skewed(cfg, recent)))) == 1
    old = {"v5": {**boot("a", mod=50), "reason": "rebalance: earlier", "decided_at": WALL - 999}}
    assert len(writes(run(_skewed(cfg, old)))) == 2


def test_rebalance_converges_and_never_undoes() -> None:
    snap = _skewed({"placement": {"rebalance": {"enabled": True}}})
    res = simulate.simulate(snap, rebalance=True)
    assert res.converged and len(res.moves) == 3
    again = simulate.simulate(res.snapshot, rebalance=True)
    assert again.moves == []


def test_rebalance_waits_for_a_quiet_cluster() -> None:
    snap = cluster(nodes={"a": (8192, 8), "b": (8192, 8)}, cordons=[],
                   specs=["v0", "v1", "v2", "new"],
                   config={"placement": {"rebalance": {"enabled": True}}},
                   placements={v: boot("a", mod=40) for v in ("v0", "v1", "v2")},
                   statuses={v: running("a", "p1") for v in ("v0", "v1", "v2")})
    assert writes(run(snap)) == [("new", "boot", "b", None)]  # no rebalance this cycle


# ---- snapshot files and simulation --------------------------------------------------------


def test_snapshot_roundtrip_and_simulate_fail() -> None:
    snap = cluster(nodes=["a", "b", "c"], specs=["v1", "v2"],
                   placements={"v1": boot("a", mod=40), "v2": boot("b", mod=41)},
                   statuses={"v1": running("a", "p1"), "v2": running("b", "p1")})
    data = simulate.export_snapshot(snap)
    back = simulate.load_snapshot(data)
    assert back.specs.keys() == snap.specs.keys() and not back.errors
    assert run(back).actions == run(snap).actions
    res = simulate.simulate(back, fail=["a"])
    report = res.report()
    assert report["boots"] == 1 and report["booted"][0]["node"] == "c"
    assert report["violations"] == [] and report["pending"] == []


def test_admission_n_plus_one() -> None:
    snap = cluster(nodes={"a": (8192, 8), "b": (8192, 8)}, specs={"v1": (4096, 1)},
                   placements={"v1": boot("a", mod=40)}, statuses={"v1": running("a", "p1")})
    ok = simulate.admission_check(snap, VmSpec.model_validate(spec_value("v2", 2048)))
    assert ok.ok, ok.message
    bad = simulate.admission_check(snap, VmSpec.model_validate(spec_value("v2", 6144)))
    assert not bad.ok and "N+1 broken" in bad.message and bad.lost_node == "b"


def test_placer_charges_match_planner_state() -> None:
    snap = _skewed()
    placer = Placer.from_snapshot(snap)
    assert placer.nodes["a"].used_memory_mib == 6 * 1024
    assert placer.where["v0"] == "a"


def test_node_failure_at_1000_nodes_10000_vms_places_every_displaced_vm() -> None:
    """Correctness at scale; its speed is measured by `make bench-placement`, not here."""
    from bench.placement_gen import generate

    g = generate(1000, 10000, seed=3)
    lost = g.vms[0].node
    snap = simulate.fail_node(g.snapshot(), lost, 101, 1.0)
    p = run(snap)
    boots = [a for a in p.actions if isinstance(a, WritePlacement)]
    displaced = {v.name for v in g.vms if v.node == lost}
    assert boots and all(a.placement.kind == "boot" for a in boots)
    assert {a.placement.vm for a in boots} == displaced
    assert all(a.placement.node != lost for a in boots)


def test_exact_search_when_one_at_a_time_fails() -> None:
    # One at a time: v1 (2048) goes to a (67% used after, b would be 100%), then v2 (3072)
    # fits nowhere.  The batch search boots both.
    snap = cluster(nodes={"a": (3072, 8), "b": (2048, 8)}, specs={"v1": (2048, 1),
                                                                   "v2": (3072, 1)})
    assert sorted(writes(run(snap))) == [("v1", "boot", "b", None), ("v2", "boot", "a", None)]


def test_explain_shows_why_a_drained_vm_stays() -> None:
    from cli.sim import explain_data

    snap = cluster(nodes={"a": (8192, 8)}, cordons=["a"], specs=["v1"],
                   placements={"v1": boot("a", mod=40)}, statuses={"v1": running("a", "p1")},
                   extra=[node("b", 16384, migration_group="other")])
    data = explain_data(snap, "v1")
    assert data["planner_now"]["action"] == "wait"
    assert "other migration group" in data["planner_now"]["reason"]
    rows = {r["node"]: r for r in data["candidates"]}
    assert rows["b"]["ruled_out"] == "other migration group"
    assert data["live_migration_group"] == "cpu:qemu64"
