"""When a leader's cycle may skip planning: nothing a plan could see has changed.

A plan is a pure function of the snapshot and of time (orchestrator.planner).  Time
enters its rules only through lost nodes (the fence and liveness windows, the retry
backoff of a failed external fence) and through the rebalance budget (moves counted per
`rebalance.interval_s` of wall time).  So a plan that wrote nothing, waited for nothing
and saw no lost node is *quiet*: the same snapshot revision gives the same empty plan,
except that a rebalance budget used up may free itself as time passes.

The leader therefore plans again when the revision moves (every write under the prefix:
a status, a spec, a registration that vanished), when its term changes, or after
`MAX_QUIET_S` at the latest, which bounds how late a freed rebalance budget is used and
is the safety net for any time rule added later.  A skipped cycle writes nothing, so
skipping can only delay a decision, never make one.

Why: an idle cluster of 10,000 VMs would otherwise spend a full plan (about a second on
one core) on every poll, for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.actions import Plan

# The longest a quiet plan stands without planning again (seconds, monotonic).
MAX_QUIET_S = 10.0


@dataclass(frozen=True)
class Quiet:
    """A plan with nothing to do, and what it was decided on."""

    epoch: int
    revision: int
    at: float  # monotonic
    plan: Plan


def quiet(plan: Plan, *, epoch: int, revision: int, now: float) -> Quiet | None:
    """The plan as a Quiet, or None if time alone could change its outcome."""
    if plan.actions or plan.lost_since or plan.both_gone_since:
        return None
    return Quiet(epoch, revision, now, plan)


def still_quiet(q: Quiet, *, epoch: int, revision: int, now: float,
                max_quiet_s: float = MAX_QUIET_S) -> bool:
    """True if a plan now would be `q`'s again (same term, same revision, not too old).
    A clock that went backwards counts as too old."""
    return q.epoch == epoch and q.revision == revision and 0.0 <= now - q.at < max_quiet_s
