"""A VM or node with a key that does not parse is left exactly as it is: neither the
agent's plan nor the leader's writes touch it (issue 11: a hostile value written over a
live VM's spec, placement or status, or over a node's registration, must not stop,
move or fence anything)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from hypervisor.base import Domain
from nodeagent import plan as agent_plan
from orchestrator import planner
from orchestrator.actions import frozen_by_invalid_key as _frozen_by_invalid_key
from schemas.models import Placement
from schemas.snapshot import ClusterSnapshot, RawKV
from tests.unit.builders import KS, boot, cluster, running

DEEP = b"[" * 40_000 + b"]" * 40_000
NOW = 1_700_000_100.0


def _agent_plan(me: str, snap: ClusterSnapshot, domains: dict[str, Domain]) -> list[Any]:
    kw: dict[str, Any] = {}
    if "now" in inspect.signature(agent_plan.plan).parameters:
        kw["now"] = NOW
    return list(agent_plan.plan(me, snap, domains, **kw))


def _live(extra_key: str, drop: str) -> ClusterSnapshot:
    """vm1 runs on a as placed; the key `drop` of it is replaced by a hostile value."""
    base: dict[str, Any] = {"nodes": ["a", "b"], "specs": ["vm1"],
                            "placements": {"vm1": boot("a")},
                            "statuses": {"vm1": running("a", "p1")}}
    base[drop] = [] if drop == "specs" else {}
    return cluster(**base, extra=[RawKV(extra_key, DEEP, 50, 50)], strict=False)


@pytest.mark.parametrize(("key", "drop"), [(KS.vm_spec("vm1"), "specs"),
                                           (KS.vm_placement("vm1"), "placements"),
                                           (KS.vm_status("vm1"), "statuses")])
def test_agent_leaves_a_vm_with_an_invalid_key_running(key: str, drop: str) -> None:
    snap = _live(key, drop)
    assert snap.invalid_vms == {"vm1"}
    assert _agent_plan("a", snap, {"vm1": Domain("vm1", "running")}) == []
    assert _agent_plan("b", snap, {}) == []


def test_agent_without_the_freeze_would_destroy_it() -> None:
    # The same data, seen as "spec removed" (what the plan did before issue 11).
    snap = cluster(nodes=["a", "b"], placements={"vm1": boot("a")},
                   statuses={"vm1": running("a", "p1")})
    got = _agent_plan("a", snap, {"vm1": Domain("vm1", "running")})
    assert [type(a).__name__ for a in got] == ["Destroy"]


@pytest.mark.parametrize(("key", "drop"), [(KS.vm_spec("vm1"), "specs"),
                                           (KS.vm_placement("vm1"), "placements"),
                                           (KS.vm_status("vm1"), "statuses")])
def test_leader_writes_nothing_for_a_vm_with_an_invalid_key(key: str, drop: str) -> None:
    snap = _live(key, drop)
    result = planner.plan(snap, epoch=1, now=100.0, wall_time=NOW, lost_since={})
    kept = [a for a in result.actions if not _frozen_by_invalid_key(a, snap)]
    assert [a for a in kept if not isinstance(a, planner.Wait)] == []


def test_leader_does_not_fence_a_node_whose_registration_is_garbage() -> None:
    snap = cluster(nodes=["b"], specs=["vm1"], placements={"vm1": boot("a")},
                   statuses={"vm1": running("a", "p1")},
                   extra=[RawKV(KS.node("a"), b"\xff\xfe", 50, 50)], strict=False)
    assert snap.invalid_nodes == {"a"}
    fence = planner.FenceNode("a", lease_id="1a2b", reason="lost")
    assert "node a has an invalid key" in _frozen_by_invalid_key(fence, snap)
    place = planner.WritePlacement(_placement("vm2"), 0)
    assert _frozen_by_invalid_key(place, snap) == ""
    frozen = planner.WritePlacement(_placement("vm1"), 0)
    assert _frozen_by_invalid_key(frozen, snap) == ""
    hostile_spec = _live(KS.vm_spec("vm1"), "specs")
    assert "VM vm1 has an invalid key" in _frozen_by_invalid_key(frozen, hostile_spec)


def _placement(vm: str) -> Placement:
    return Placement(id="x", vm=vm, node="b", kind="boot", epoch=1, reason="r",
                     decided_at=NOW)


def test_a_registration_that_does_not_parse_is_no_loss_in_the_history() -> None:
    """The planner counts a node whose registration does not parse as lost (its VMs
    wait, its fence is frozen), but the history must not say so: `node_lost` would put a
    false outage of its running VMs in `vmha availability`."""
    from orchestrator.actions import lost_history

    hostile = cluster(nodes=["b"], specs=["vm1"], placements={"vm1": boot("a")},
                      statuses={"vm1": running("a", "p1")},
                      extra=[RawKV(KS.node("a"), b"\xff\xfe", 50, 50)], strict=False)
    assert lost_history(set(), {"a": 1.0}, hostile) == ([], [], set())
    # Fixed: registered again, nothing to say either.
    fixed = cluster(nodes=["a", "b"], specs=["vm1"], placements={"vm1": boot("a")},
                    statuses={"vm1": running("a", "p1")})
    assert lost_history(set(), {}, fixed) == ([], [], set())
    # Really gone: lost; back again: back.
    gone = cluster(nodes=["b"], specs=["vm1"], placements={"vm1": boot("a")},
                   statuses={"vm1": running("a", "p1")})
    assert lost_history(set(), {"a": 1.0}, gone) == ([], ["a"], {"a"})
    assert lost_history({"a"}, {}, fixed) == (["a"], [], set())
    # Lost, then its registration back but unreadable: still lost as recorded, no event.
    assert lost_history({"a"}, {"a": 1.0}, hostile) == ([], [], {"a"})
