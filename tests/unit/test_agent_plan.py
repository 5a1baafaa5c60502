"""The agent's reconcile plan: table-driven scenarios, as seen from node "a" (or "b")."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from hypervisor.base import Domain
from nodeagent.plan import (
    AgentAction,
    Boot,
    Crashed,
    Destroy,
    MigrateOut,
    Report,
    Shutdown,
    Undefine,
    plan,
)
from tests.unit.builders import boot, cluster, migrate, pending, running, status, stopped

B_URI = "qemu+tls://b.example/system"
B_ADDR = "192.0.2.2"
NODES: dict[str, Any] = {"a": (8192, 8), "b": {"uri": B_URI, "address": B_ADDR}, "c": (8192, 8)}
STOPPED_SPEC = {"vm1": (1024, 1, "stopped")}
REASON = "placed by test"
NOW = 1_700_000_100.0  # wall time passed to the plan

# Fixed reasons of nodeagent.plan, as an operator reads them in the agent's log.
R_HERE = "runs here as placed"
R_ARRIVED = "arrived by live migration"
R_FOUND = "found running; awaiting placement"
R_HANDOFF = "hand-off: not running here"
R_NOT_RUNNING = "status said running here, but it does not"
R_STOP = "desired state is stopped"
R_REMOVED = "VM spec removed"


def dom(state: str = "running", name: str = "vm1", **kw: Any) -> Domain:
    return Domain(name, state, **kw)  # type: ignore[arg-type]


def run(me: str, snap_args: dict[str, Any], domains: Iterable[Domain] = (),
        busy: frozenset[str] = frozenset()) -> list[AgentAction]:
    snap = cluster(**{"nodes": NODES, **snap_args})
    return plan(me, snap, {d.name: d for d in domains}, busy, now=NOW)


# More cases are scenarios now: tests/scenarios (README.md maps each old id).
SCENARIOS: list[Any] = [
    # ---- boot --------------------------------------------------------------------------
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": boot("a", reason=REASON)}), [],
        [Boot("vm1", "p1", REASON)],
        id="placed-here-not-running-boots"),
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": boot("a", reason=REASON)}),
        [dom("shutoff")], [Boot("vm1", "p1", REASON)],
        id="placed-here-shut-off-boots"),
    pytest.param(
        "b", dict(specs=["vm1"], placements={"vm1": boot("a")}), [], [],
        id="placed-elsewhere-nothing"),
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": pending("full")}), [], [],
        id="pending-nothing"),
    pytest.param(
        "a", dict(specs=["vm1"]), [], [],
        id="unplaced-nothing"),
    # ---- incoming migration: wait for the source's hand-off ----------------------------
    pytest.param(
        "b", dict(specs=["vm1"], placements={"vm1": migrate("a", "b")}), [], [],
        id="migrate-target-no-status-waits"),
    pytest.param(
        "b", dict(specs=["vm1"], placements={"vm1": migrate("a", "b")},
                  statuses={"vm1": running("a", "p1")}), [], [],
        id="migrate-target-source-running-waits"),
    pytest.param(
        "b", dict(specs=["vm1"], placements={"vm1": migrate("a", "b")},
                  statuses={"vm1": status("a", "migrating", "p1")}), [], [],
        id="migrate-target-source-migrating-waits"),
    pytest.param(
        "b", dict(specs=["vm1"], placements={"vm1": migrate("a", "b")},
                  statuses={"vm1": stopped("a", "p0")}), [], [],
        id="migrate-target-ack-for-older-placement-waits"),
    pytest.param(
        "b", dict(specs=["vm1"], placements={"vm1": migrate("a", "b")},
                  statuses={"vm1": stopped("c", "p1")}), [], [],
        id="migrate-target-ack-from-wrong-node-waits"),
    pytest.param(
        "b", dict(specs={"vm1": (1024, 1, "stopped")}, placements={"vm1": migrate("a", "b")},
                  statuses={"vm1": stopped("a", "p1", mod=70)}), [],
        [Report("vm1", "stopped", "p1", 70, "stopped as desired")],
        id="migrate-target-desired-stopped-no-boot"),
    pytest.param(
        "b", dict(specs=["vm1"], placements={"vm1": migrate("a", "b")},
                  statuses={"vm1": status("a", "migrating", "p1")}),
        [dom("paused", incoming=True)], [],
        id="incoming-domain-left-alone"),
    pytest.param(
        "b", dict(specs=["vm1"], placements={"vm1": boot("c")}),
        [dom("paused", incoming=True)], [],
        id="incoming-domain-left-alone-even-if-placed-elsewhere"),
    # ---- outgoing migration ------------------------------------------------------------
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": migrate("a", "b")},
                  statuses={"vm1": running("a", "p0")}),
        [dom("running")], [MigrateOut("vm1", "p1", "b", B_URI, B_ADDR)],
        id="running-here-migrate-out"),
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": migrate("a", "b")}),
        [dom("paused")], [MigrateOut("vm1", "p1", "b", B_URI, B_ADDR)],
        id="paused-here-migrate-out"),
    pytest.param(
        "a", dict(nodes={"a": (8192, 8)}, specs=["vm1"], placements={"vm1": migrate("a", "b")},
                  statuses={"vm1": running("a", "p0")}),
        [dom("running")], [],
        id="migrate-target-not-registered-nothing"),
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": migrate("a", "b")}),
        [], [Report("vm1", "stopped", "p1", 0, R_HANDOFF)],
        id="migrate-from-me-no-status-acks"),
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": migrate("a", "b")},
                  statuses={"vm1": stopped("a", "p1")}), [], [],
        id="migrate-from-me-already-acked"),
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": migrate("a", "b")},
                  statuses={"vm1": status("b", "paused", "p1", mod=70)}),
        [], [],
        id="migrate-from-me-arrived-paused-no-ack"),
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": migrate("a", "b")},
                  statuses={"vm1": stopped("b", "p1", mod=70)}),
        [], [Report("vm1", "stopped", "p1", 70, R_HANDOFF)],
        id="migrate-from-me-target-stopped-acks"),
    # ---- placed elsewhere --------------------------------------------------------------
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": migrate("b", "c")}),
        [dom("paused")], [Destroy("vm1", "placed on c (migrate); must not run here")],
        id="running-here-other-nodes-migration-destroyed"),
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": boot("b")},
                  statuses={"vm1": running("a", "p0", mod=70)}),
        [dom("shutoff")],
        [Report("vm1", "stopped", "p0", 70, R_NOT_RUNNING),
         Undefine("vm1", "left-over definition (crashed or moved); placed on b")],
        id="shut-off-leftover-with-stale-status"),
    pytest.param(
        "a", dict(specs=["vm1"]), [dom("crashed")],
        [Undefine("vm1", "left-over definition (crashed or moved); placed on no node")],
        id="crashed-leftover-unplaced-undefined-not-booted"),
    # ---- spec removed ------------------------------------------------------------------
    pytest.param(
        "a", dict(), [dom("paused")], [Destroy("vm1", R_REMOVED)],
        id="spec-removed-paused-destroyed"),
    pytest.param(
        "a", dict(statuses={"vm1": running("a", "p1")}), [], [],
        id="spec-removed-not-defined-nothing"),
    # ---- unmanaged domains: tests/scenarios/unmanaged-domains-untouched ----------------
    # ---- desired state stopped ---------------------------------------------------------
    pytest.param(
        "a", dict(specs=STOPPED_SPEC), [dom("paused")], [Shutdown("vm1", R_STOP)],
        id="unplaced-desired-stopped-shut-down"),
    pytest.param(
        "a", dict(specs=STOPPED_SPEC, placements={"vm1": boot("a")},
                  statuses={"vm1": stopped("a", "p1")}), [dom("shutoff")], [],
        id="placed-here-desired-stopped-already-reported"),
    pytest.param(
        "a", dict(specs=STOPPED_SPEC, placements={"vm1": boot("a")}), [],
        [Report("vm1", "stopped", "p1", 0, "stopped as desired")],
        id="placed-here-desired-stopped-not-defined-reports"),
    # ---- reports -----------------------------------------------------------------------
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": pending("full")},
                  statuses={"vm1": stopped("a", None, mod=70)}), [dom("paused")],
        [Report("vm1", "paused", None, 70, R_FOUND)],
        id="paused-pending-reported"),
    pytest.param(
        "a", dict(specs=["vm1"], statuses={"vm1": running("a", None)}), [dom("running")], [],
        id="running-unplaced-already-reported"),
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": boot("a")},
                  statuses={"vm1": running("a", "p1")}), [dom("running")], [],
        id="report-suppressed-when-status-matches"),
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": boot("a")},
                  statuses={"vm1": running("a", "p1", mod=70)}), [dom("paused")],
        [Report("vm1", "paused", "p1", 70, R_HERE)],
        id="report-state-change"),
    pytest.param(
        "a", dict(specs=["vm1"], placements={"vm1": boot("a")},
                  statuses={"vm1": running("c", "p1", mod=70)}), [dom("running")],
        [Report("vm1", "running", "p1", 70, R_HERE)],
        id="report-over-other-nodes-status"),
    pytest.param(
        "a", dict(specs=["vm1"], statuses={"vm1": status("a", "migrating", "p0", mod=70)}),
        [], [Report("vm1", "stopped", "p0", 70, R_NOT_RUNNING)],
        id="status-migrating-here-but-not-reported-stopped"),
    pytest.param(
        "a", dict(specs=["vm1"], statuses={"vm1": running("b", "p0")}), [], [],
        id="status-running-elsewhere-not-ours"),
    pytest.param(
        "a", dict(specs=["vm1"], statuses={"vm1": status("a", "crashed", "p0")}), [], [],
        id="status-crashed-here-left"),
]


@pytest.mark.parametrize(("me", "snap_args", "domains", "expected"), SCENARIOS)
def test_scenarios(me: str, snap_args: dict[str, Any], domains: list[Domain],
                   expected: list[AgentAction]) -> None:
    assert run(me, snap_args, domains) == expected


def test_busy_vms_skipped() -> None:
    args = dict(specs=["vm1", "vm2", "vm3"],
                placements={"vm1": migrate("a", "b"), "vm2": boot("a", reason=REASON)})
    domains = [dom("running", "vm1"), dom("running", "vm4")]
    assert run("a", args, domains, busy=frozenset({"vm1", "vm2", "vm4"})) == []
    assert run("a", args, domains) == [
        MigrateOut("vm1", "p1", "b", B_URI, B_ADDR),
        Boot("vm2", "p1", REASON),
        Destroy("vm4", R_REMOVED),
    ]


def test_actions_in_vm_name_order_and_one_pass_each() -> None:
    args = dict(specs=["z", "m", "b"],
                placements={"z": boot("a", reason=REASON), "m": boot("a", reason=REASON),
                            "b": boot("a", reason=REASON)})
    out = run("a", args, [dom("running", "x")])
    assert out == [Boot("b", "p1", REASON), Boot("m", "p1", REASON),
                   Destroy("x", R_REMOVED), Boot("z", "p1", REASON)]


def test_plan_does_not_mutate_inputs() -> None:
    snap = cluster(nodes=NODES, specs=["vm1"], placements={"vm1": boot("a")})
    domains = {"vm1": dom("shutoff")}
    before = (dict(snap.specs), dict(snap.placements), dict(domains))
    first = plan("a", snap, domains, now=NOW)
    assert plan("a", snap, domains, now=NOW) == first
    assert (dict(snap.specs), dict(snap.placements), dict(domains)) == before


def test_shut_off_leftover_with_pending_placement_undefined() -> None:
    out = run("a", dict(specs=["vm1"], placements={"vm1": pending("full")}), [dom("shutoff")])
    assert [(type(a), a.vm) for a in out] == [(Undefine, "vm1")]
    assert isinstance(out[0], Undefine)
    assert out[0].reason.startswith("left-over definition (crashed or moved); placed on ")


def test_full_hand_off_sequence_settles() -> None:
    """Source acks, target boots, target reports, and then neither writes again."""
    base = dict(specs=["vm1"], placements={"vm1": migrate("a", "b")})
    assert run("a", {**base, "statuses": {"vm1": running("a", "p0", mod=70)}}) == [
        Report("vm1", "stopped", "p1", 70, R_HANDOFF)]
    acked = {**base, "statuses": {"vm1": stopped("a", "p1", mod=71)}}
    assert run("a", acked) == []
    assert run("b", acked) == [Boot("vm1", "p1", "a handed it off without running it")]
    assert run("b", acked, [dom("running")]) == [
        Report("vm1", "running", "p1", 71, R_ARRIVED, with_migration_stats=True)]
    settled = {**base, "statuses": {"vm1": running("b", "p1", mod=72)}}
    assert run("a", settled) == []
    assert run("b", settled, [dom("running")]) == []
    assert run("c", settled) == []


# ---- regressions (bugs found by these tables, fixed) ----


def test_source_undefines_crashed_leftover() -> None:
    args = dict(specs=["vm1"], placements={"vm1": migrate("a", "b")},
                statuses={"vm1": stopped("a", "p1", mod=70)})
    assert run("a", args, [dom("crashed")]) == [
        Undefine("vm1", "left-over definition (crashed or moved); placed on b")]


# The "crashed" case is the scenario tests/scenarios/crash-after-arrival.
@pytest.mark.parametrize("domains", [[dom("shutoff")], []], ids=["shut-off", "gone"])
def test_migration_target_reports_crash_after_arrival(domains: list[Domain]) -> None:
    # Nobody else will notice: the source sees the VM arrived (status running on b) and
    # the leader sees an arrived migration; the VM would stay down for good.
    args = dict(specs=["vm1"], placements={"vm1": migrate("a", "b")},
                statuses={"vm1": running("b", "p1", mod=70)})
    assert run("a", args) == []
    # The target reports it (now as a crash: status crashed, counted; issue 11), which
    # is not running, so the source acknowledges the hand-off again and b boots it.
    (crash,) = run("b", args, domains)
    assert isinstance(crash, Crashed) and (crash.vm, crash.placement_id,
                                           crash.expect_mod_revision) == ("vm1", "p1", 70)
    acked = dict(args, statuses={"vm1": status("b", "crashed", "p1", mod=71)})
    assert run("a", acked) == [Report("vm1", "stopped", "p1", 71, R_HANDOFF)]
