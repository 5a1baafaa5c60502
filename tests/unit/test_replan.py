"""orchestrator.replan: which plans stand while nothing changes."""

from __future__ import annotations

from orchestrator import planner, replan
from orchestrator.actions import Plan

EMPTY = Plan((), {}, "nothing")


def test_an_empty_plan_without_lost_nodes_is_quiet() -> None:
    q = replan.quiet(EMPTY, epoch=5, revision=40, now=100.0)
    assert q is not None and q.plan is EMPTY
    assert replan.still_quiet(q, epoch=5, revision=40, now=100.0 + replan.MAX_QUIET_S - 0.01)


def test_a_new_revision_a_new_term_or_max_quiet_plans_again() -> None:
    q = replan.quiet(EMPTY, epoch=5, revision=40, now=100.0)
    assert q is not None
    assert not replan.still_quiet(q, epoch=5, revision=41, now=100.1)
    assert not replan.still_quiet(q, epoch=6, revision=40, now=100.1)
    assert not replan.still_quiet(q, epoch=5, revision=40, now=100.0 + replan.MAX_QUIET_S)
    assert not replan.still_quiet(q, epoch=5, revision=40, now=99.0)  # clock went back
    assert not replan.still_quiet(q, epoch=5, revision=40, now=101.0, max_quiet_s=1.0)


def test_a_plan_that_writes_is_never_quiet() -> None:
    fence = Plan((planner.FenceNode("n2", "", "window over", "self"),), {"n2": 90.0}, "")
    assert replan.quiet(fence, epoch=5, revision=40, now=100.0) is None


def test_waits_and_lost_nodes_stand_until_their_recheck_time() -> None:
    waiting = Plan((planner.Wait("vm1", "no capacity"),), {}, "")
    lost = Plan((planner.Wait("vm1", "n2 not yet fenced"),), {"n2": 90.0}, "",
                recheck_at=104.0)
    gone = Plan((), {"n2": 90.0}, "", both_gone_since={"n2": 91.0}, recheck_at=103.0)
    for plan in (waiting, lost, gone):
        q = replan.quiet(plan, epoch=5, revision=40, now=100.0)
        assert q is not None and q.plan is plan
        assert replan.still_quiet(q, epoch=5, revision=40, now=102.9)
        assert not replan.still_quiet(q, epoch=5, revision=41, now=100.1)
    for plan, at in ((lost, 104.0), (gone, 103.0)):
        q = replan.quiet(plan, epoch=5, revision=40, now=100.0)
        assert q is not None
        assert replan.still_quiet(q, epoch=5, revision=40, now=at - 0.001)
        assert not replan.still_quiet(q, epoch=5, revision=40, now=at)


def test_the_leader_sleeps_until_the_recheck_time_at_most_a_poll() -> None:
    assert replan.sleep_s(0.5, None, 100.0, None) == (0.5, None)
    assert replan.sleep_s(0.5, 103.0, 100.0, None) == (0.5, None)
    wait, woke = replan.sleep_s(0.5, 100.2, 100.0, None)
    assert abs(wait - 0.201) < 1e-9 and woke is None


def test_a_recheck_time_passed_during_the_cycle_wakes_at_once_a_single_time() -> None:
    """The plan before it began earlier and ended later (a slow plan at 1,000 nodes):
    the next cycle runs at once, not a poll later; if that one does not plan, the next
    waits a poll rather than spin."""
    assert replan.sleep_s(0.5, 99.0, 100.0, None) == (0.0, 99.0)
    assert replan.sleep_s(0.5, 99.0, 100.0, 99.0) == (0.5, 99.0)
    # A new plan's later recheck time counts again.
    wait, woke = replan.sleep_s(0.5, 100.3, 100.0, 99.0)
    assert abs(wait - 0.301) < 1e-9 and woke == 99.0
