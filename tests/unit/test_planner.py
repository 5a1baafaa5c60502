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
    stopped,
)

EPOCH = 3
NOW = 1000.0
WALL = 1_700_000_123.0


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


# Each row: snapshot arguments, lost_since, now, expected actions (in order).  The other
# rows of this table are scenarios now: tests/scenarios (README.md maps each old id).
SCENARIOS: list[Any] = [
    pytest.param(
        dict(nodes=["a", "c"], fences={"b": 51}, specs=["vm1"],
             placements={"vm1": migrate("a", "b", mod=40)},
             statuses={"vm1": running("a", "p1")}),
        {}, NOW, [("place", "vm1", "boot", "a", None, 40, (("b", 51),))],
        id="target-fenced-vm-kept-on-source"),
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
