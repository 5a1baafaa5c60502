"""The agent's decisions about the live migrations it runs (nodeagent.plan, issue 12):
which to abort, which to switch to post-copy, and a `migrating` status that no
migration of this agent process answers any more."""

from __future__ import annotations

from typing import Any

from hypervisor.base import Domain
from nodeagent.plan import AbortMigration, InFlight, migration_verdicts, plan
from tests.unit.builders import boot, cluster, migrate, status

NOW = 1_700_000_100.0
JOB = InFlight("vm1", "p1", "b", started=100.0)


def snap(**kw: Any) -> Any:
    args: dict[str, Any] = dict(nodes=["a", "b", "c"], specs=["vm1"],
                                placements={"vm1": migrate("a", "b")},
                                statuses={"vm1": status("a", "migrating", "p1")})
    args.update(kw)
    return cluster(**args)


def test_a_wanted_migration_within_its_limit_goes_on() -> None:
    assert migration_verdicts("a", snap(), {"vm1": JOB}, now=100.0 + 299.9) == []


def test_target_lost_aborts() -> None:
    out = migration_verdicts("a", snap(nodes=["a", "c"]), {"vm1": JOB}, now=101.0)
    assert out == [AbortMigration("vm1", "p1", "b", "target b lost (no registration)")]


def test_placement_changed_or_vm_removed_aborts() -> None:
    moved = snap(placements={"vm1": boot("a", id="p2")})
    assert migration_verdicts("a", moved, {"vm1": JOB}, now=101.0) == [
        AbortMigration("vm1", "p1", "b", "placement changed to boot on a (p2)")]
    gone = snap(specs=[])
    assert migration_verdicts("a", gone, {"vm1": JOB}, now=101.0) == [
        AbortMigration("vm1", "p1", "b", "VM spec removed")]


def test_a_stop_lets_the_migration_finish() -> None:
    """The target stops the VM after it arrived, as before; aborting would only make the
    source start the same migration again."""
    stopped = snap(specs={"vm1": (1024, 1, "stopped")})
    assert migration_verdicts("a", stopped, {"vm1": JOB}, now=101.0) == []


def test_time_limit_aborts_or_switches_to_postcopy_once() -> None:
    limit = snap(config={"migration_timeout_s": 30})
    (v,) = migration_verdicts("a", limit, {"vm1": JOB}, now=130.0)
    assert v.postcopy is False
    assert v.reason == "migration to b still running after 30 s (migration_timeout_s=30)"
    post = snap(config={"migration_timeout_s": 30, "migration_postcopy_on_timeout": True})
    (v,) = migration_verdicts("a", post, {"vm1": JOB}, now=130.0)
    assert v.postcopy is True
    switched = InFlight("vm1", "p1", "b", started=100.0, postcopy=True)
    assert migration_verdicts("a", post, {"vm1": switched}, now=500.0) == []


def test_stale_migrating_status_with_target_gone_is_aborted_and_reported() -> None:
    """No migration of this process runs (it restarted), the status still says
    migrating and the target is gone: abort whatever libvirt runs, report the VM here."""
    lost = snap(nodes=["a", "c"])
    doms = {"vm1": Domain("vm1", "running")}
    assert plan("a", lost, doms, now=NOW) == [AbortMigration(
        "vm1", "p1", "b", "target b lost and no migration of this agent runs", stale=True)]
    # While a migration of this process runs, the plan leaves the VM alone.
    assert plan("a", lost, doms, frozenset({"vm1"}), now=NOW) == []
    # A status that is not `migrating` (the job ended and was reported): nothing to do.
    ended = snap(nodes=["a", "c"], statuses={"vm1": status("a", "running", "p1",
                                                            failed_target="b")})
    assert plan("a", ended, doms, now=NOW) == []
