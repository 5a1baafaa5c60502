"""The leader's writes against real etcd: what the builder's compares protect, and a
lost compare reported as a lost race (never as an outage or as a fence)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from orchestrator import planner
from orchestrator.leader import Orchestrator
from schemas import Keyspace, Placement
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster

pytestmark = pytest.mark.integration
KS = Keyspace()


@pytest.fixture
def leader(etcd: EtcdCluster) -> Iterator[Orchestrator]:
    store = EtcdStore(etcd.endpoints)
    store.put(KS.config, TEST_CONFIG.to_json())
    orch = Orchestrator(store, ident="a")
    orch.ensure_config()
    assert orch.campaign()
    try:
        yield orch
    finally:
        orch.step_down("test over")
        store.close()


def test_self_fence_of_a_node_that_registered_again_is_a_lost_race(
        leader: Orchestrator) -> None:
    store, epoch = leader.store, leader.epoch
    assert epoch is not None
    store.put(KS.node("n1"), "{}")  # n1 is back before the fence got written
    snap = store.snapshot()
    with capture_logs() as logs:
        ok = leader.apply(planner.FenceNode("n1", "abc", "lease gone"), snap, epoch)
    assert ok is False
    assert store.get(KS.fence("n1")) is None
    events = {e["event"]: e for e in logs}
    assert "fenced" not in events, "nothing was fenced: must not be logged as a fence"
    assert events["fence_not_written"]["log_level"] == "info"


def test_self_fence_written_while_the_node_stays_away(leader: Orchestrator) -> None:
    store, epoch = leader.store, leader.epoch
    assert epoch is not None
    snap = store.snapshot()
    with capture_logs() as logs:
        assert leader.apply(planner.FenceNode("n2", "abc", "lease gone"), snap, epoch)
    kv = store.get(KS.fence("n2"))
    assert kv is not None and b'"method":"self"' in kv.value.replace(b" ", b"")
    assert [e["log_level"] for e in logs if e["event"] == "fenced"] == ["warning"]
    # The same decision again (its fence record changed since): a lost race.
    assert leader.apply(planner.FenceNode("n2", "abc", "lease gone"), snap, epoch) is False


def test_clears_delete_only_the_version_they_saw(leader: Orchestrator) -> None:
    store, epoch = leader.store, leader.epoch
    assert epoch is not None
    rev = store.put(KS.vm_move("web"), "{}")
    assert not leader.apply(planner.ClearMove("web", rev - 1, "done"), store.snapshot(), epoch)
    assert store.get(KS.vm_move("web")) is not None
    assert leader.apply(planner.ClearMove("web", rev, "done"), store.snapshot(), epoch)
    assert store.get(KS.vm_move("web")) is None
    rev = store.put(KS.fence("n3"), "{}")
    assert not leader.apply(planner.ClearFence("n3", rev + 1, "back"), store.snapshot(), epoch)
    assert leader.apply(planner.ClearFence("n3", rev, "back"), store.snapshot(), epoch)
    assert store.get(KS.fence("n3")) is None


def test_placement_needs_its_fenced_holders_still_away(leader: Orchestrator) -> None:
    store, epoch = leader.store, leader.epoch
    assert epoch is not None
    fence_rev = store.put(KS.fence("n1"), "{}")
    p = Placement(id="x", vm="v", node="n2", kind="boot", epoch=epoch, reason="test",
                  decided_at=0.0)
    store.put(KS.node("n1"), "{}")  # the fenced holder registered again
    action = planner.WritePlacement(p, 0, fenced_holders=(("n1", fence_rev),))
    assert leader.apply(action, store.snapshot(), epoch) is False
    store.delete(KS.node("n1"))
    assert leader.apply(action, store.snapshot(), epoch) is True
    assert store.get(KS.vm_placement("v")) is not None


def test_external_fence_result_for_a_node_back_again_is_a_lost_race(
        leader: Orchestrator) -> None:
    from fencing.agents import FenceResult

    store, epoch = leader.store, leader.epoch
    assert epoch is not None
    store.put(KS.node("n1"), "{}")  # registered again while the fence agent ran
    with capture_logs() as logs:
        written = leader._record_external("n1", FenceResult(True, "off", 0.1),
                                          store.snapshot(), epoch)
    assert written is False and store.get(KS.fence("n1")) is None
    events = {e["event"]: e for e in logs}
    assert "fenced" not in events
    assert events["fence_result_not_written"]["log_level"] == "info"
    store.delete(KS.node("n1"))
    with capture_logs() as logs:
        assert leader._record_external("n1", FenceResult(True, "off", 0.1),
                                       store.snapshot(), epoch)
    assert [e["log_level"] for e in logs if e["event"] == "fenced"] == ["warning"]
