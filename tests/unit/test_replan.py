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


def test_time_can_change_a_plan_with_actions_or_lost_nodes() -> None:
    waiting = Plan((planner.Wait("vm1", "no capacity"),), {}, "")
    lost = Plan((), {"n2": 90.0}, "")
    gone = Plan((), {}, "", both_gone_since={"n2": 91.0})
    for plan in (waiting, lost, gone):
        assert replan.quiet(plan, epoch=5, revision=40, now=100.0) is None
