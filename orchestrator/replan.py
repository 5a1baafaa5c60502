"""When a leader's cycle may skip planning: nothing a plan could see has changed.

A plan is a pure function of the snapshot and of time (orchestrator.planner).  Time
enters its rules only through lost nodes (the fence and liveness windows, revoke_grace_s,
the retry backoff of a failed external fence) and through the rebalance budget (moves
counted per `rebalance.interval_s` of wall time).  The planner says when the first of
the lost nodes' times falls (`Plan.recheck_at`).  So a plan that wrote nothing is
*quiet* until then: the same snapshot revision gives the same plan (its waits included),
except that a rebalance budget used up may free itself as time passes.

The leader therefore plans again when the revision moves (every write under the prefix:
a status, a spec, a registration that vanished), when its term changes, at `recheck_at`
(it sleeps no longer than that, so a fence window that ends is acted on at once rather
than at the next poll), or after `MAX_QUIET_S` at the latest, which bounds how late a
freed rebalance budget is used and is the safety net for any time rule added later.  A
skipped cycle writes nothing, so skipping can only delay a decision, never make one.

Why: an idle cluster of 10,000 VMs would otherwise spend a full plan (about a second on
one core) on every poll, for nothing; and while a lost node's fence window runs, such
plans (each the same waits) kept the leader busy when the window ended, so the fence
was decided up to a cycle and a poll late.
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

    @property
    def until(self) -> float | None:
        """When time alone may change the plan (None: only a change in etcd can)."""
        return self.plan.recheck_at


def quiet(plan: Plan, *, epoch: int, revision: int, now: float) -> Quiet | None:
    """The plan as a Quiet, or None if it writes anything."""
    if plan.writes:
        return None
    return Quiet(epoch, revision, now, plan)


def still_quiet(q: Quiet, *, epoch: int, revision: int, now: float,
                max_quiet_s: float = MAX_QUIET_S) -> bool:
    """True if a plan now would be `q`'s again (same term, same revision, not too old,
    before its recheck time).  A clock that went backwards counts as too old."""
    return (q.epoch == epoch and q.revision == revision and 0.0 <= now - q.at < max_quiet_s
            and (q.until is None or now < q.until))


def sleep_s(poll_s: float, recheck_at: float | None, now: float,
            woke_for: float | None) -> tuple[float, float | None]:
    """How long the leader waits for a wake-up before its next cycle, and the recheck
    time it woke at once for: the poll interval, or less if a lost node's time falls
    sooner (a millisecond after it, so the plan made then sees it passed).  A time that
    passed during the cycle (a plan that began before it ended after it) wakes the
    leader at once, a single time per recheck time (`woke_for`): a next cycle that did
    not plan (skipped for another reason) then waits a poll rather than spin."""
    if recheck_at is None or recheck_at == woke_for:
        return poll_s, woke_for
    wait = recheck_at - now + 0.001
    if wait <= 0.0:
        return 0.0, recheck_at
    return min(poll_s, wait), woke_for
