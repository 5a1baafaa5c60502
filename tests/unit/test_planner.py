"""The leader's placement planner: table-driven scenarios on parsed snapshots."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from orchestrator.planner import (
    Action,
    ClearFence,
    FenceNode,
    Plan,
    Wait,
    WritePlacement,
    holders,
    migration_failed,
    plan,
    referenced_nodes,
    track_lost,
)
from schemas.models import Placement, VmStatus
from schemas.snapshot import ClusterSnapshot
from tests.unit.builders import (
    boot,
    cluster,
    migrate,
    pending,
    raw,
    running,
    snapshot,
    spec_value,
    status,
    stopped,
)

EPOCH = 3
NOW = 1000.0
WALL = 1_700_000_123.0
TEST_TIMING = {"lease_ttl_s": 2, "keepalive_interval_s": 0.4, "self_fence_safety_s": 0.5,
               "fence_margin_s": 1.0}


def run(snap: ClusterSnapshot, lost_since: Mapping[str, float] | None = None,
        now: float = NOW, epoch: int = EPOCH) -> Plan:
    return plan(snap, epoch=epoch, now=now, wall_time=WALL, lost_since=lost_since or {})


def brief(a: Action) -> tuple[Any, ...]:
    """An action reduced to what decides safety and placement."""
    if isinstance(a, WritePlacement):
        p = a.placement
        return ("place", p.vm, p.kind, p.node, p.from_node, a.expect_mod_revision,
                a.fenced_holders)
    if isinstance(a, FenceNode):
        return ("fence", a.node)
    if isinstance(a, ClearFence):
        return ("clear", a.node, a.fence_mod_revision)
    assert isinstance(a, Wait)
    return ("wait", a.vm)


def briefs(p: Plan) -> list[tuple[Any, ...]]:
    return [brief(a) for a in p.actions]


def only_placement(p: Plan) -> Placement:
    writes = [a for a in p.actions if isinstance(a, WritePlacement)]
    assert len(writes) == 1, briefs(p)
    return writes[0].placement


# Each row: snapshot arguments, lost_since, now, expected actions (in order).
SCENARIOS: list[Any] = [
    # ---- new VMs: most free memory after placing, ties by name ---------------------------
    pytest.param(
        dict(nodes={"a": (4096, 8), "b": (8192, 8), "c": (8192, 8)}, specs=["vm1"]),
        {}, NOW, [("place", "vm1", "boot", "b", None, 0, ())],
        id="new-vm-most-free-memory-tie-by-name"),
    pytest.param(
        dict(nodes={"n2": (8192, 8), "n1": (8192, 8)}, specs=["vm1"]),
        {}, NOW, [("place", "vm1", "boot", "n1", None, 0, ())],
        id="tie-broken-by-name-not-insertion-order"),
    pytest.param(
        dict(nodes={"a": (8192, 8), "b": (8192, 8)},
             specs={"vm1": (2048, 1), "vm2": (2048, 1), "vm3": (1024, 1)}),
        {}, NOW, [("place", "vm1", "boot", "a", None, 0, ()),
                  ("place", "vm2", "boot", "b", None, 0, ()),
                  ("place", "vm3", "boot", "a", None, 0, ())],
        id="new-vms-spread-by-free-memory-in-vm-name-order"),
    pytest.param(
        dict(nodes={"a": (8192, 8), "b": (6144, 8)}, specs={"old": (4096, 1), "vm1": (1024, 1)},
             placements={"old": boot("a", mod=20)}, statuses={"old": running("a", "p1")}),
        {}, NOW, [("place", "vm1", "boot", "b", None, 0, ())],
        id="existing-placements-use-capacity"),
    pytest.param(
        dict(nodes={"a": (8192, 8), "b": (6144, 8)},
             specs={"off": (4096, 1, "stopped"), "vm1": (1024, 1)},
             placements={"off": boot("a", mod=20)}),
        {}, NOW, [("place", "vm1", "boot", "a", None, 0, ())],
        id="stopped-vm-uses-no-capacity"),
    # ---- capacity ------------------------------------------------------------------------
    pytest.param(
        dict(nodes={"a": (16384, 1), "b": (4096, 4)}, specs={"vm1": (1024, 2)}),
        {}, NOW, [("place", "vm1", "boot", "b", None, 0, ())],
        id="vcpus-respected"),
    pytest.param(
        dict(nodes={"a": (2048, 2), "b": (1024, 8)}, specs={"vm1": (2048, 2)}),
        {}, NOW, [("place", "vm1", "boot", "a", None, 0, ())],
        id="exact-fit-accepted"),
    pytest.param(
        dict(nodes={"a": (2048, 2), "b": (8192, 8)}, specs={"big": (7168, 2), "vm1": (2048, 1)},
             placements={"big": boot("b", mod=20)}),
        {}, NOW, [("place", "vm1", "boot", "a", None, 0, ())],
        id="memory-respected-after-existing-placement"),
    pytest.param(
        dict(nodes={"a": (2048, 8), "b": (1024, 8)}, specs={"vm1": (4096, 1)}),
        {}, NOW, [("place", "vm1", "pending", None, None, 0, ())],
        id="nothing-fits-pending"),
    pytest.param(
        dict(nodes={"a": (2048, 8), "b": (1024, 8)}, specs={"vm1": (4096, 1)},
             placements={"vm1": pending("no schedulable node has 4096 MiB and 1 vCPUs free "
                                        "(candidates: a, b)", mod=30)}),
        {}, NOW, [],
        id="same-pending-reason-not-rewritten"),
    pytest.param(
        dict(nodes={"a": (2048, 8), "b": (1024, 8)}, specs={"vm1": (4096, 1)},
             placements={"vm1": pending("no schedulable node (all nodes lost, cordoned or "
                                        "excluded)", mod=30)}),
        {}, NOW, [("place", "vm1", "pending", None, None, 30, ())],
        id="changed-pending-reason-rewritten"),
    pytest.param(
        dict(nodes={"a": (8192, 8)}, specs={"vm1": (1024, 1)},
             placements={"vm1": pending("no schedulable node (all nodes lost, cordoned or "
                                        "excluded)", mod=30)}),
        {}, NOW, [("place", "vm1", "boot", "a", None, 30, ())],
        id="pending-placed-when-capacity-appears"),
    pytest.param(
        dict(nodes={"a": (8192, 8)}, cordons=["a"], specs=["vm1"]),
        {}, NOW, [("place", "vm1", "pending", None, None, 0, ())],
        id="only-cordoned-nodes-pending"),
    # ---- cordon / drain ------------------------------------------------------------------
    pytest.param(
        dict(nodes={"a": (16384, 8), "b": (4096, 8), "c": (8192, 8)}, cordons=["a"],
             specs=["vm1"], placements={"vm1": boot("a", mod=40)},
             statuses={"vm1": running("a", "p1")}),
        {}, NOW, [("place", "vm1", "migrate", "c", "a", 40, ())],
        id="cordoned-node-migrates-to-best-other"),
    pytest.param(
        dict(nodes={"a": (16384, 8), "b": (512, 8)}, cordons=["a"],
             specs=["vm1"], placements={"vm1": boot("a", mod=40)},
             statuses={"vm1": running("a", "p1")}),
        {}, NOW, [("wait", "vm1")],
        id="cordoned-node-nowhere-to-go-waits"),
    pytest.param(
        dict(nodes={"a": (8192, 8), "b": (8192, 8)}, cordons=["b"],
             specs=["vm1"], placements={"vm1": boot("a", mod=40)},
             statuses={"vm1": running("a", "p1")}),
        {}, NOW, [],
        id="steady-state-no-write"),
    # ---- lost nodes and fencing ----------------------------------------------------------
    pytest.param(
        dict(nodes=["b"], specs=["vm1"], placements={"vm1": boot("x", mod=40)},
             statuses={"vm1": running("x", "p1")}),
        {"x": 999.0}, NOW, [("wait", "vm1")],
        id="lost-node-inside-fence-window-waits"),
    pytest.param(
        dict(nodes=["b"], specs=["vm1"], placements={"vm1": boot("x", mod=40)}),
        {}, NOW, [("wait", "vm1")],
        id="lost-node-first-seen-now-waits"),
    pytest.param(
        dict(nodes=["b"], specs=["vm1"], placements={"vm1": boot("x", mod=40)},
             statuses={"vm1": running("x", "p1")}),
        {"x": 990.0}, NOW, [("fence", "x"), ("wait", "vm1")],  # window 5 + guard 3 + 2
        id="lost-node-after-fence-window-fenced"),
    pytest.param(
        dict(nodes=["b"], specs=["vm1"], placements={"vm1": boot("x", mod=40)},
             config=TEST_TIMING),
        {"x": 995.8}, NOW, [("fence", "x"), ("wait", "vm1")],  # window 2 + guard 1.1 + 1
        id="fence-margin-from-config"),
    pytest.param(
        dict(nodes=["b"], specs=["vm1"], placements={"vm1": boot("x", mod=40)},
             config=TEST_TIMING),
        {"x": 996.0}, NOW, [("wait", "vm1")],
        id="fence-margin-from-config-not-yet"),
    pytest.param(
        dict(nodes={"a": (4096, 8), "b": (8192, 8)}, fences={"x": 42}, specs=["vm1"],
             placements={"vm1": boot("x", mod=40)}, statuses={"vm1": running("x", "p1")}),
        {"x": 900.0}, NOW, [("place", "vm1", "boot", "b", None, 40, (("x", 42),))],
        id="fenced-node-vm-booted-elsewhere"),
    pytest.param(
        dict(nodes=["b"], fences={"x": 42, "y": 43}, specs=["vm1"],
             placements={"vm1": boot("x", mod=40)}, statuses={"vm1": running("y", "p0")}),
        {}, NOW, [("place", "vm1", "boot", "b", None, 40, (("y", 43), ("x", 42)))],
        id="every-fenced-holder-compared"),
    pytest.param(
        dict(nodes=["b"], fences={"x": 42}, specs=["vm1"],
             placements={"vm1": boot("x", mod=40)}, statuses={"vm1": running("y", "p0")}),
        {}, NOW, [("wait", "vm1")],
        id="one-holder-fenced-other-not-waits"),
    pytest.param(
        dict(nodes={"a": (512, 8)}, fences={"x": 42}, specs=["vm1"],
             placements={"vm1": boot("x", mod=40)}),
        {}, NOW, [("place", "vm1", "pending", None, None, 40, (("x", 42),))],
        id="fenced-node-nothing-fits-pending"),
    pytest.param(
        dict(nodes=["a"], fences={"a": 33}),
        {}, NOW, [("clear", "a", 33)],
        id="re-registered-node-fence-cleared"),
    pytest.param(
        dict(nodes=["a"], fences={"a": 33, "z": 34}, specs=["vm1"],
             placements={"vm1": boot("a", mod=40)}, statuses={"vm1": running("a", "p1")}),
        {}, NOW, [("clear", "a", 33)],
        id="re-registered-node-keeps-its-vm"),
    # ---- migrations ----------------------------------------------------------------------
    pytest.param(
        dict(nodes=["a", "b"], cordons=["a"], specs=["vm1"],
             placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": status("a", "migrating", "p1")}),
        {}, NOW, [],
        id="migration-in-flight-no-write"),
    pytest.param(
        dict(nodes=["a", "b"], cordons=["a"], specs=["vm1"],
             placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": running("b", "p1")}),
        {}, NOW, [],
        id="migration-arrived-no-write"),
    pytest.param(
        dict(nodes=["b"], specs=["vm1"], placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": running("b", "p1")}),
        {}, NOW, [],
        id="migration-arrived-source-lost-no-write"),
    pytest.param(
        dict(nodes={"a": (8192, 8), "b": (8192, 8), "c": (16384, 8)}, cordons=["b"],
             specs=["vm1"], placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": running("b", "p1")}),
        {}, NOW, [("place", "vm1", "migrate", "c", "b", 40, ())],
        id="migration-arrived-on-cordoned-target-moves-on"),
    pytest.param(
        dict(nodes={"a": (8192, 8), "b": (8192, 8), "c": (4096, 8)}, cordons=["a"],
             specs=["vm1"], placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": running("a", "p1", failed_target="b", error="boom")}),
        {}, NOW, [("place", "vm1", "migrate", "c", "a", 40, ())],
        id="failed-migration-retargeted"),
    pytest.param(
        dict(nodes=["a", "b"], cordons=["a"], specs=["vm1"],
             placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": running("a", "p1", failed_target="b")}),
        {}, NOW, [("place", "vm1", "migrate", "b", "a", 40, ())],
        id="failed-migration-only-target-retried"),
    pytest.param(
        dict(nodes=["a", "b", "c"], cordons=["a"], specs=["vm1"],
             placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": running("a", "p0", failed_target="b")}),
        {}, NOW, [],
        id="failure-of-older-placement-ignored"),
    pytest.param(
        dict(nodes=["a", "b", "c"], cordons=["a"], specs=["vm1"],
             placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": running("a", "p1", failed_target="c")}),
        {}, NOW, [],
        id="failure-for-other-target-ignored"),
    pytest.param(
        dict(nodes=["b"], fences={"a": 50}, specs=["vm1"],
             placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": status("a", "migrating", "p1")}),
        {}, NOW, [("place", "vm1", "boot", "b", None, 40, (("a", 50),))],
        id="source-fenced-before-arrival-boot-on-target"),
    pytest.param(
        dict(nodes=["b"], specs=["vm1"], placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": status("a", "migrating", "p1")}),
        {"a": 999.5}, NOW, [("wait", "vm1")],
        id="source-lost-unfenced-waits"),
    pytest.param(
        dict(nodes=["a"], specs=["vm1"], placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": status("a", "migrating", "p1")}),
        {}, NOW, [("wait", "vm1")],
        id="target-lost-unfenced-waits"),
    pytest.param(
        dict(nodes=["a", "c"], fences={"b": 51}, specs=["vm1"],
             placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": running("a", "p1")}),
        {}, NOW, [("place", "vm1", "boot", "a", None, 40, (("b", 51),))],
        id="target-fenced-vm-kept-on-source"),
    # ---- adoption ------------------------------------------------------------------------
    pytest.param(
        dict(nodes={"a": (4096, 8), "b": (8192, 8)}, specs=["vm1"],
             statuses={"vm1": running("a")}),
        {}, NOW, [("place", "vm1", "boot", "a", None, 0, ())],
        id="running-unplaced-vm-adopted-where-it-runs"),
    pytest.param(
        dict(nodes={"a": (4096, 8), "b": (8192, 8)}, specs=["vm1"],
             statuses={"vm1": status("a", "paused")}),
        {}, NOW, [("place", "vm1", "boot", "a", None, 0, ())],
        id="paused-unplaced-vm-adopted"),
    pytest.param(
        dict(nodes=["a", "b"], cordons=["a"], specs=["vm1"], statuses={"vm1": running("a")}),
        {}, NOW, [("place", "vm1", "migrate", "b", "a", 0, ())],
        id="running-unplaced-vm-on-cordoned-node-migrated"),
    pytest.param(
        dict(nodes=["a", "b"], specs=["vm1"], statuses={"vm1": stopped("a")}),
        {}, NOW, [("place", "vm1", "boot", "a", None, 0, ())],
        id="stopped-status-is-not-a-holder"),
    pytest.param(
        dict(nodes=["a", "b"], fences={"x": 42}, specs=["vm1"],
             placements={"vm1": boot("x", mod=40)}, statuses={"vm1": running("b", "p0")}),
        {}, NOW, [("place", "vm1", "boot", "b", None, 40, (("x", 42),))],
        id="placed-on-fenced-node-but-runs-on-live-node-kept"),
    # ---- desired state stopped -----------------------------------------------------------
    pytest.param(
        dict(nodes=["a"], specs={"vm1": (1024, 1, "stopped")}),
        {}, NOW, [],
        id="stopped-vm-not-placed"),
    pytest.param(
        dict(nodes=["a"], cordons=["a"], specs={"vm1": (1024, 1, "stopped")},
             placements={"vm1": boot("a", mod=40)}, statuses={"vm1": running("a", "p1")}),
        {}, NOW, [],
        id="stopped-vm-on-cordoned-node-not-moved"),
    pytest.param(
        dict(nodes=["a"], specs={"vm1": (1024, 1, "stopped")},
             placements={"vm1": boot("x", mod=40)}),
        {"x": 990.0}, NOW, [("fence", "x")],
        id="stopped-vm-on-lost-node-only-fence"),
]


@pytest.mark.parametrize(("snap_args", "lost_since", "now", "expected"), SCENARIOS)
def test_scenarios(snap_args: dict[str, Any], lost_since: dict[str, float], now: float,
                   expected: list[tuple[Any, ...]]) -> None:
    result = run(cluster(**snap_args), lost_since, now)
    assert briefs(result) == expected
    for a in result.actions:
        if isinstance(a, WritePlacement):
            p = a.placement
            assert p.epoch == EPOCH
            assert p.decided_at == WALL
            assert p.id == f"e{EPOCH}-r100-{p.vm}"
    assert result.writes == tuple(a for a in result.actions if not isinstance(a, Wait))


# ---- details of single decisions ---------------------------------------------------------


def test_new_vm_scores_and_reason() -> None:
    snap = cluster(nodes={"a": (4096, 8), "b": (8192, 8), "c": (8192, 2)},
                   specs={"vm1": (1024, 4)})
    p = only_placement(run(snap))
    assert (p.kind, p.node) == ("boot", "b")
    assert p.scores == {"a": 3072.0, "b": 7168.0}  # c has too few vCPUs
    # New rule (docs/design.md, "Placement"): lowest memory utilisation after placing.
    assert p.reason == ("not placed yet; boot on b: lowest memory use after placing of 2 "
                        "candidate(s) (12% used, 7168 MiB free after); ruled out: 1 capacity")


def test_pending_reason_names_request_and_candidates() -> None:
    snap = cluster(nodes={"b": (2048, 8), "a": (1024, 8), "c": (8192, 8)}, cordons=["c"],
                   specs={"vm1": (4096, 2)})
    p = only_placement(run(snap))
    assert p.kind == "pending" and p.node is None
    assert p.reason == ("no schedulable node has 4096 MiB and 2 vCPUs free "
                        "(candidates: a, b)")


def test_cordon_migration_reason() -> None:
    snap = cluster(nodes={"a": (8192, 8), "b": (8192, 8)}, cordons=["a"], specs=["vm1"],
                   placements={"vm1": boot("a")}, statuses={"vm1": running("a", "p1")})
    p = only_placement(run(snap))
    assert p.reason.startswith("node cordoned (drain): live-migrate from a to b")
    assert p.scores == {"b": 7168.0}


def test_failed_migration_reason_names_failed_target() -> None:
    # The source is not cordoned: the failure alone makes the planner re-target.
    snap = cluster(nodes=["a", "b", "c"], specs=["vm1"],
                   placements={"vm1": migrate("a", "b")},
                   statuses={"vm1": running("a", "p1", failed_target="b")})
    p = only_placement(run(snap))
    assert (p.kind, p.from_node, p.node) == ("migrate", "a", "c")
    assert p.reason.startswith("migration to b failed: live-migrate from a to c")
    assert p.scores == {"c": 7168.0}  # neither the source nor the failed target scored


def test_fence_node_action_details() -> None:
    snap = cluster(nodes=["b"], specs=["vm1"], placements={"vm1": boot("x")})
    result = run(snap, {"x": 990.0}, now=1000.0)
    fence = result.actions[0]
    assert isinstance(fence, FenceNode)
    assert fence.node == "x" and fence.method == "self" and fence.expect_mod_revision == 0
    assert fence.reason.startswith("lease gone for 10.00 s >= fence window 10.00 s")
    wait = result.actions[1]
    assert isinstance(wait, Wait)
    assert wait.reason.startswith("node(s) x lost and not yet fenced; the VM may still run there")
    assert result.writes == (fence,)


@pytest.mark.parametrize(
    ("prev", "now", "expected"),
    [
        pytest.param({}, 50.0, {"x": 50.0}, id="first-seen-now"),
        pytest.param({"x": 10.0}, 50.0, {"x": 10.0}, id="earlier-time-kept"),
        pytest.param({"x": 10.0, "gone": 5.0, "b": 1.0}, 50.0, {"x": 10.0},
                     id="unreferenced-or-registered-dropped"),
    ],
)
def test_track_lost(prev: dict[str, float], now: float, expected: dict[str, float]) -> None:
    snap = cluster(nodes=["b"], fences={"f": 60}, specs=["vm1", "vm2", "vm3"],
                   placements={"vm1": boot("x"), "vm2": boot("b"), "vm3": boot("f")})
    assert track_lost(snap, prev, now) == expected
    result = run(snap, prev, now)
    assert dict(result.lost_since) == expected


def test_referenced_nodes() -> None:
    snap = cluster(nodes=["a"], specs=["v1", "v2", "v3"],
                   placements={"v1": migrate("s", "t"), "v2": pending("none")},
                   statuses={"v2": running("r"), "v3": stopped("q")})
    assert referenced_nodes(snap) == {"s", "t", "r"}


def _placement(**kw: Any) -> Placement:
    base: dict[str, Any] = {"id": "p1", "vm": "v", "node": "b", "kind": "migrate",
                            "from_node": "a", "epoch": 1, "reason": "", "decided_at": 0.0}
    return Placement(**{**base, **kw})


def _status(**kw: Any) -> VmStatus:
    base: dict[str, Any] = {"vm": "v", "node": "a", "state": "running", "placement_id": "p1",
                            "since": 0.0, "failed_target": "b"}
    return VmStatus(**{**base, **kw})


@pytest.mark.parametrize(
    ("p", "s", "failed"),
    [
        pytest.param(_placement(), _status(), True, id="all-match"),
        pytest.param(_placement(), None, False, id="no-status"),
        pytest.param(_placement(), _status(failed_target=None), False, id="no-failure"),
        pytest.param(_placement(), _status(failed_target="c"), False, id="other-target"),
        pytest.param(_placement(), _status(placement_id="p0"), False, id="older-placement"),
        pytest.param(_placement(), _status(node="c"), False, id="status-from-other-node"),
        pytest.param(_placement(kind="boot", from_node=None), _status(), False,
                     id="not-a-migration"),
    ],
)
def test_migration_failed(p: Placement, s: VmStatus | None, failed: bool) -> None:
    assert migration_failed(p, s) is failed


def test_holders_order_and_dedup() -> None:
    spec = cluster(specs=["v"]).specs["v"].value
    assert holders(spec, _placement(), _status(node="c")) == ["c", "b", "a"]
    assert holders(spec, _placement(), _status(node="a")) == ["a", "b"]
    assert holders(spec, _placement(), _status(state="stopped")) == ["b", "a"]
    assert holders(spec, None, None) == []
    assert holders(spec, _placement(kind="pending", node=None, from_node="a"), None) == []


# ---- determinism and ids -----------------------------------------------------------------


def _busy_cluster(revision: int = 100, reverse: bool = False) -> ClusterSnapshot:
    snap = cluster(revision=revision,
                   nodes={"a": (8192, 8), "b": (8192, 8), "c": (4096, 4)}, cordons=["c"],
                   fences={"x": 42, "c": 43},
                   specs={"v1": (1024, 1), "v2": (2048, 2), "v3": (512, 1), "v4": (1024, 1),
                          "v5": (4096, 1)},
                   placements={"v2": boot("x", mod=50), "v3": boot("c", mod=51),
                               "v4": migrate("a", "b", mod=52)},
                   statuses={"v3": running("c", "p1"),
                             "v4": running("a", "p1", failed_target="b")})
    if not reverse:
        return snap
    # The same keys, handed over in the opposite order.
    kvs = []
    for entries in (snap.nodes, snap.cordons, snap.fences, snap.specs, snap.placements,
                    snap.statuses):
        for e in entries.values():
            kvs.append(raw(e.key, e.value.to_json(), e.mod_revision))
    return snapshot(reversed(kvs), revision)


def test_plan_is_deterministic() -> None:
    first = run(_busy_cluster(), {"x": 1.0})
    second = run(_busy_cluster(), {"x": 1.0})
    reordered = run(_busy_cluster(reverse=True), {"x": 1.0})
    assert first == second
    assert first.actions == reordered.actions
    assert first.summary == second.summary
    assert briefs(first) == [
        ("clear", "c", 43),
        ("place", "v1", "boot", "a", None, 0, ()),
        ("place", "v2", "boot", "a", None, 50, (("x", 42),)),  # a/b tie at 5120 after
        ("place", "v3", "migrate", "b", "c", 51, ()),
        ("place", "v4", "migrate", "b", "a", 52, ()),
        ("place", "v5", "boot", "b", None, 0, ()),
    ]
    assert first.summary == ("rev=100 nodes=3 vms=5 placements=5 fences=0 waiting=0 lost=0")


def test_placement_ids_unique_per_epoch_revision_vm() -> None:
    ids = set()
    for epoch in (1, 2):
        for revision in (100, 101):
            result = run(_busy_cluster(revision), {"x": 1.0}, epoch=epoch)
            placements = [a.placement for a in result.actions if isinstance(a, WritePlacement)]
            assert len(placements) == 5
            for p in placements:
                assert p.id == f"e{epoch}-r{revision}-{p.vm}"
                assert p.epoch == epoch
                ids.add(p.id)
    assert len(ids) == 20


def test_stopped_vm_ignored_next_to_running_one() -> None:
    snap = cluster(nodes=["a"], specs={"vm1": (1024, 1, "stopped")},
                   extra=[raw("/vmha/vms/vm2/spec", spec_value("vm2"), 60)])
    result = run(snap)
    assert briefs(result) == [("place", "vm2", "boot", "a", None, 0, ())]


# ---- capacity accounting (documented rule: most free memory *after* placing) -------------


def test_failed_migration_retry_on_only_target_with_large_vm() -> None:
    snap = cluster(nodes={"a": (8192, 8), "b": (4096, 8)}, cordons=["a"],
                   specs={"vm1": (3072, 1)}, placements={"vm1": migrate("a", "b", mod=40)},
                   statuses={"vm1": running("a", "p1", failed_target="b")})
    assert briefs(run(snap)) == [("place", "vm1", "migrate", "b", "a", 40, ())]


def test_boot_on_migration_target_counts_vm_once() -> None:
    # b: 8192 - 2048 (vm-a) used; vm-b (1024) makes b 37.5% used, c (2048) 50% used, so
    # b wins; counted twice, vm-a would make b 62.5% used and c would win.  (Updated for the
    # utilisation rule: c was 6000 MiB when the rule was "most free MiB".)
    snap = cluster(nodes={"b": (8192, 8), "c": (2048, 8)}, fences={"x": 50},
                   specs={"vm-a": (2048, 1), "vm-b": (1024, 1)},
                   placements={"vm-a": migrate("x", "b", mod=40)},
                   statuses={"vm-a": status("x", "migrating", "p1")})
    assert briefs(run(snap)) == [
        ("place", "vm-a", "boot", "b", None, 40, (("x", 50),)),
        ("place", "vm-b", "boot", "b", None, 0, ()),
    ]
