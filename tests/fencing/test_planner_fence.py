"""The leader's planner and fence records: only a successful fence lets VMs boot elsewhere."""

from __future__ import annotations

import dataclasses

from orchestrator.planner import FenceNode, Wait, WritePlacement, plan
from schemas import Keyspace
from schemas.models import ClusterConfig, FenceDevice, FenceRecord, Placement
from schemas.snapshot import ClusterSnapshot, Entry
from tests.unit.builders import cluster

KS = Keyspace()
NOW, WALL = 1000.0, 5000.0


def boot_on(node: str) -> Placement:
    return Placement(id="p1", vm="vm1", node=node, kind="boot", epoch=1, reason="x",
                     decided_at=1.0)


def snap_with(cfg: ClusterConfig, outcome: str | None, attempts: int = 1,
              fenced_at: float = WALL) -> ClusterSnapshot:
    s = cluster(nodes=["b"], specs=["vm1"])
    placements = {"vm1": Entry(boot_on("x"), KS.vm_placement("vm1"), 40, 40, 0)}
    fences = {}
    if outcome is not None:
        rec = FenceRecord(node="x", lease_id="1", method="external",
                          outcome=outcome,  # type: ignore[arg-type]
                          reason="fence_ipmilan exited 1: boom", epoch=1, duration_s=0.5,
                          fenced_at=fenced_at, attempts=attempts)
        fences = {"x": Entry(rec, KS.fence("x"), 50, 50, 0)}
    return dataclasses.replace(s, config=cfg, placements=placements, fences=fences)


EXT = ClusterConfig(fence_policy="external", fence_devices={"*": FenceDevice(agent=["x"])})


def test_failed_fence_record_is_not_a_fence() -> None:
    snap = snap_with(ClusterConfig(), "failed")
    # Long after the window: still "self" policy writes its own record over the failed one.
    res = plan(snap, epoch=1, now=NOW, wall_time=WALL, lost_since={"x": 0.0})
    fence = [a for a in res.actions if isinstance(a, FenceNode)]
    assert fence and fence[0].method == "self" and fence[0].expect_mod_revision == 50
    assert not [a for a in res.actions if isinstance(a, WritePlacement)]


def test_external_policy_waits_with_a_visible_reason_and_backs_off() -> None:
    snap = snap_with(EXT, "failed", attempts=3, fenced_at=WALL - 1.0)
    res = plan(snap, epoch=1, now=NOW, wall_time=WALL, lost_since={"x": 0.0})
    assert not [a for a in res.actions if not isinstance(a, Wait)]
    (w,) = res.actions
    assert isinstance(w, Wait)
    assert "external fence failed 3 time(s)" in w.reason and "boom" in w.reason
    # Backoff over (1, 2, 4 s after 3 failures): try again.
    res = plan(snap, epoch=1, now=NOW, wall_time=WALL + 3.5, lost_since={"x": 0.0})
    (f,) = [a for a in res.actions if isinstance(a, FenceNode)]
    assert f.method == "external" and f.device == "*" and f.expect_mod_revision == 50


def test_successful_external_fence_boots_elsewhere_at_once() -> None:
    snap = snap_with(EXT, "success")
    res = plan(snap, epoch=1, now=NOW, wall_time=WALL, lost_since={})
    (w,) = [a for a in res.actions if isinstance(a, WritePlacement)]
    assert w.placement.node == "b" and w.fenced_holders == (("x", 50),)
