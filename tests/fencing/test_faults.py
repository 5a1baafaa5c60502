"""One deterministic regression test per fault kind of the campaign (bench/campaign.py),
plus a short random campaign and the negative control.

Real etcd (3 members), agents on the fake hypervisor with their guards, two
orchestrators.  After every fault: I1 (never two running copies, sampled from ground
truth), I2 (everything runs again), I3 (no stale-epoch/stale-agent write in etcd's
history), I4 (an unplaceable VM is visibly pending); and no needless self-fence (a
node that self-fenced while etcd quorum was reachable from it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.campaign import (
    Campaign,
    StepResult,
    lost_destroy_control,
    needless_control,
    negative_control,
)
from tests.integration.helpers import log_events

pytestmark = pytest.mark.integration


def _campaign(tmp: Path, policy: str) -> Iterator[Campaign]:
    c = Campaign(7, tmp, fence_policy=policy, verbose=False, converge_s=30.0)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def selfc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    yield from _campaign(tmp_path_factory.mktemp("self"), "self")


@pytest.fixture(scope="module")
def bothc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    yield from _campaign(tmp_path_factory.mktemp("both"), "both")


def run(c: Campaign, kind: str) -> StepResult:
    r = c.step(len(c.results), kind)
    c.results.append(r)
    assert r.converged, r.notes
    assert c.violations() == [], c.violations()
    assert c.needless_fences() == [], c.needless_fences()
    return r


def agent_log(c: Campaign, node: str, event: str) -> list[dict[str, Any]]:
    return log_events(c.agents[node], event)


def test_kill_agent(selfc: Campaign) -> None:
    r = run(selfc, "kill_agent")
    assert r.recovery_s, "the killed node's VMs went down and came back"
    assert agent_log(selfc, r.target, "guard_fired")


def test_stop_agent_past_ttl_is_killed_by_its_guard(selfc: Campaign) -> None:
    r = run(selfc, "stop_agent")
    assert "agent killed by its guard while stopped" in r.notes
    fired = agent_log(selfc, r.target, "guard_fired")
    assert fired and fired[-1]["agent_killed"] is True and fired[-1]["destroyed"]


def test_partitioned_agent_fences_while_cut_off(selfc: Campaign) -> None:
    r = run(selfc, "partition_agent")
    assert r.recovery_s
    assert agent_log(selfc, r.target, "guard_fired")


def test_kill_leader(selfc: Campaign) -> None:
    run(selfc, "kill_leader")


def test_stop_leader_past_ttl(selfc: Campaign) -> None:
    before = dict(selfc.history.checked)  # type: ignore[union-attr]
    run(selfc, "stop_leader")
    assert selfc.history is not None and selfc.history.checked["placement"] >= \
        before["placement"]


def test_kill_etcd_member(selfc: Campaign) -> None:
    run(selfc, "kill_etcd")


def test_quorum_loss_and_return(selfc: Campaign) -> None:
    r = run(selfc, "quorum_loss")
    assert r.recovery_s, "every node self-fenced while etcd had no quorum"


def test_watch_compaction(selfc: Campaign) -> None:
    r = run(selfc, "compact")
    assert r.target.startswith("rev"), r.notes


def test_capacity_exhaustion_is_visibly_pending(selfc: Campaign) -> None:
    run(selfc, "capacity")


def test_etcd_member_stall_fences_nothing(selfc: Campaign) -> None:
    r = run(selfc, "stall_etcd")
    assert r.self_fenced == [] and r.recovery_s == {}, r


def test_etcd_member_blackhole_fences_nothing(selfc: Campaign) -> None:
    r = run(selfc, "blackhole_etcd")
    assert r.self_fenced == [] and r.recovery_s == {}, r


def test_rolling_etcd_restart_fences_nothing(selfc: Campaign) -> None:
    r = run(selfc, "rolling_etcd")
    assert r.self_fenced == [] and r.recovery_s == {}, r


def test_agent_restart_within_the_ttl_adopts_and_keeps_its_vms(selfc: Campaign) -> None:
    r = run(selfc, "agent_restart")
    assert r.target == selfc.svc_node and r.self_fenced == [], r
    assert r.recovery_s == {}, "no VM went down"
    assert agent_log(selfc, r.target, "registration_adopted")


def test_hostile_values_change_nothing(selfc: Campaign) -> None:
    r = run(selfc, "hostile")
    assert r.self_fenced == [] and r.recovery_s == {}, r


def test_drain_by_lease_revoke_migrates_everything_away_without_a_fence(
        selfc: Campaign) -> None:
    r = run(selfc, "drain")
    assert r.self_fenced == [] and r.recovery_s == {}, r


def test_move_fences_nothing_and_keeps_the_vm_up(selfc: Campaign) -> None:
    r = run(selfc, "move")
    assert any(n.startswith("move ") for n in r.notes), r
    assert r.self_fenced == [] and r.recovery_s == {}, r


def test_rebalance_fills_an_emptied_node_again(selfc: Campaign) -> None:
    r = run(selfc, "rebalance")
    assert r.self_fenced == [] and r.recovery_s == {}, r


def test_kill_of_the_source_mid_migration(selfc: Campaign) -> None:
    before = selfc.mid_migration_kills
    r = run(selfc, "move_kill_source")
    assert selfc.mid_migration_kills == before + 1, r.notes
    assert agent_log(selfc, r.target, "guard_fired")


def test_kill_of_the_target_mid_migration(selfc: Campaign) -> None:
    before = selfc.mid_migration_kills
    r = run(selfc, "move_kill_target")
    assert selfc.mid_migration_kills == before + 1, r.notes
    assert agent_log(selfc, r.target, "guard_fired")


def test_kill_of_a_target_mid_drain(selfc: Campaign) -> None:
    before = selfc.mid_migration_kills
    r = run(selfc, "drain_kill_target")
    assert selfc.mid_migration_kills == before + 1, r.notes


def test_short_random_campaign(selfc: Campaign) -> None:
    for _ in range(4):  # the long form is `make campaign`
        run(selfc, selfc.rng.choice(selfc.faults))
    assert selfc.sampler is not None and selfc.sampler.samples > 100


def leader_events(c: Campaign, event: str) -> list[dict[str, Any]]:
    return [e for d in c.orchs.values() for e in log_events(d, event)]


def test_fence_agent_hang_times_out_then_falls_back(bothc: Campaign) -> None:
    run(bothc, "fence_hang")
    failed = leader_events(bothc, "fence_failed")
    assert any("timed out" in str(e["detail"]) for e in failed), failed


def test_fence_agent_failure_is_recorded_and_retried(bothc: Campaign) -> None:
    run(bothc, "fence_fail")
    failed = leader_events(bothc, "fence_failed")
    assert any("injected failure" in str(e["detail"]) for e in failed), failed
    assert max(int(e["attempts"]) for e in failed) >= 2


def test_external_fence_success_recovers_without_waiting_for_the_window(
        bothc: Campaign) -> None:
    r = run(bothc, "kill_agent")
    fenced = [e for e in leader_events(bothc, "fenced") if e.get("method") == "external"]
    assert fenced or r.recovery_s


def test_negative_control_guard_disabled_reports_a_double_run(tmp_path: Path) -> None:
    res = negative_control(3, tmp_path)
    assert res["double_runs_seen"] > 0, res
    # Even then etcd accepted no write from the stale agent: the damage is in the hypervisor.
    assert res["stale_writes_accepted"] == 0, res


def test_negative_control_a_lost_destroy_is_reported_as_a_double_run(tmp_path: Path) -> None:
    """Guard on, destroys lost on one node: its guard fires and misses, and I1 sees each
    of its VMs running twice once the leader boots them elsewhere."""
    res = lost_destroy_control(5, tmp_path)
    assert res["victims"] and res["vms_seen_twice"] == res["victims"], res


def test_needless_control_an_agent_frozen_during_a_member_stall_is_counted(
        tmp_path: Path) -> None:
    res = needless_control(4, tmp_path)
    assert res["needless_self_fences"] == 1, res
    assert res["violations"] == 0, res
