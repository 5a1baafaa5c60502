"""The leader's decisions: a pure function from one cluster snapshot to actions.

No I/O and no clock reads: the leader passes `now` (monotonic) and the times at
which it first saw each node's lease missing.  Every action carries the compares
that make it safe to apply later (the leader adds its epoch compare on top).

Rules, per VM whose spec says running (see docs/design.md for the reasoning):

* A VM may be running on any of its *holders*: the node its status reports it
  running on, its placement's node, and a migration's source.
* A VM is booted fresh (kind=boot) only when no live node may hold it and every
  lost holder has a fence record.  While a lost holder is unfenced, it waits.
* A VM that a live node may hold moves only by hand-off (kind=migrate, from=that
  node): the source live-migrates it, or, if it does not run there, acknowledges
  in its status, and only then does the target boot it.
* A migration in flight (its target alive, no failure reported) is never
  re-targeted; a failed one is re-targeted from the node it still runs on.
* The target is chosen by orchestrator.placement (hard rules, then soft score, then
  lowest memory utilisation after placing, then name); live migrations stay within the
  source's migration group and within the migration limits (drains go in waves).
* VMs are decided by priority (higher first), then name; an optional rebalancer
  (orchestrator.rebalance) moves a few VMs when the cluster is otherwise quiet.

The rules themselves are small functions in orchestrator.rules, applied in a documented
order to an explicit per-cycle state; tests/scenarios replays stories through them.
"""

from __future__ import annotations

from collections.abc import Mapping

from fencing.liveness_fence import Mode
from orchestrator.actions import (
    Action,
    ClearFence,
    ClearMove,
    FenceNode,
    Plan,
    Wait,
    WritePlacement,
)
from orchestrator.rules import CycleInput, run_cycle
from orchestrator.rules.facts import (
    holders,
    is_fenced,
    migration_failed,
    migration_in_flight,
    referenced_nodes,
    track_lost,
)
from schemas.snapshot import ClusterSnapshot

# The leader, the CLI and the tools import the actions and the snapshot facts from here.
__all__ = [
    "Action", "ClearFence", "ClearMove", "FenceNode", "Plan", "Wait", "WritePlacement",
    "holders", "is_fenced", "migration_failed", "migration_in_flight", "plan",
    "referenced_nodes", "track_lost",
]


def plan(snap: ClusterSnapshot, *, epoch: int, now: float, wall_time: float,
         lost_since: Mapping[str, float], liveness: Mode = "off",
         both_gone_since: Mapping[str, float] | None = None) -> Plan:
    """One cycle's decisions; the rules and their order are in orchestrator.rules.
    `liveness`, `both_gone_since`: keyspace 2's liveness fencing (fencing.liveness_fence;
    the previous plan's `both_gone_since` goes back in, as `lost_since` does)."""
    st = run_cycle(CycleInput.of(snap, epoch=epoch, now=now, wall_time=wall_time,
                                 lost_since=lost_since, liveness=liveness,
                                 both_gone_since=both_gone_since))
    return Plan(tuple(st.actions), st.lost, st.summary(), st.both_gone, st.recheck_at)
