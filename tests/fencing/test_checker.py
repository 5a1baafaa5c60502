"""The invariant checkers catch what they claim to (so a clean campaign means something)."""

from __future__ import annotations

import json
import time

import pytest

from bench.campaign_core import fence_events, needless
from lab.invariants import DoubleRunChecker, HistoryChecker, Truth
from schemas import Keyspace
from schemas.models import FenceRecord, Placement, VmStatus
from store.etcd import EtcdStore
from tests.harness import EtcdCluster

pytestmark = pytest.mark.integration
KS = Keyspace()


def placement(epoch: int) -> str:
    return Placement(id="p", vm="v", node="n1", kind="boot", epoch=epoch, reason="t",
                     decided_at=0.0).to_json()


def status(node: str) -> str:
    return VmStatus(vm="v", node=node, state="running", since=0.0).to_json()


def fence(epoch: int, method: str) -> str:
    return json.dumps(json.loads(FenceRecord(
        node="n9", lease_id="1", method="self", outcome="success", reason="t", epoch=epoch,
        duration_s=0.0, fenced_at=0.0).to_json()) | {"method": method})


def test_stale_epoch_and_unregistered_status_writes_are_flagged(etcd: EtcdCluster) -> None:
    store = EtcdStore(etcd.endpoints)
    hc = HistoryChecker(EtcdStore(etcd.endpoints))
    hc.ensure()
    epoch = store.put(KS.leader, json.dumps({"id": "a"}))
    store.put(KS.vm_placement("v"), placement(epoch))                       # fine
    reg = store.put(KS.node("n1"), json.dumps({"name": "n1"}))
    store.put(KS.vm_status("v"), status("n1"))                              # fine
    assert hc.caught_up() and hc.violations == [], hc.violations
    store.delete(KS.leader)
    store.put(KS.vm_placement("v"), placement(epoch))                       # stale epoch
    store.put(KS.fence("n9"), fence(epoch, "self"))                         # stale too
    store.delete(KS.node("n1"))
    store.put(KS.vm_status("v"), status("n1"))                              # stale agent
    store.put(KS.fence("n8"), fence(0, "manual"))                           # operator: ok
    # Hostile values no model accepts are skipped, as the daemons skip them.
    store.put(KS.vm_placement("w"), json.dumps({"epoch": epoch}))
    store.put(KS.vm_placement("x"), json.dumps({"schema": 99, "name": "fz"}))
    store.put(KS.vm_status("w"), json.dumps({"node": "n1"}))
    store.client.put(KS.vm_placement("y"), b"[" * 5000 + b"]" * 5000)
    assert hc.caught_up()
    whys = sorted(v["why"] for v in hc.violations)
    assert len(whys) == 3, hc.violations
    assert sum(f"epoch {epoch} was not the leader" in w for w in whys) == 2
    assert any("status from n1 while not registered" in w for w in whys)
    assert reg > epoch
    store.close()


@pytest.mark.parametrize(("kind", "target", "node", "is_needless"), [
    ("quorum_loss", "n1", "n2", False),          # no quorum anywhere: needed
    ("kill_agent", "n1", "n1", False),           # its agent is gone: needed
    ("partition_agent", "n2", "n2", False),      # cut off: needed
    ("partition_agent", "n2", "n1", True),       # another node was cut off
    ("stall_etcd", "m0", "n1", True),            # one member away: quorum holds
    ("blackhole_etcd", "m1", "n3", True),
    ("rolling_etcd", "all", "n2", True),
    ("agent_restart", "n3", "n3", True),         # back within the TTL: must adopt
    ("hostile", "4 keys", "n1", True),
])
def test_needless_self_fence_is_defined_by_the_fault(kind: str, target: str, node: str,
                                                     is_needless: bool) -> None:
    assert needless(kind, target, node) is is_needless


def test_fence_events_are_counted_from_json_log_lines() -> None:
    lines = [{"event": "guard_fired"}, {"event": "self_fenced_domain"}, {"event": "boot"},
             {"event": "self_fence_deadline"}]
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json guard_fired\n"
    assert fence_events(text) == 3


class Scripted:
    """A ground-truth source that replays reads; ``real`` says which doubles are real."""

    def __init__(self, reads: list[Truth], real: bool) -> None:
        self.reads = reads
        self.real = real

    def read(self) -> Truth:
        return self.reads.pop(0)

    def confirm(self, vm: str, nodes: list[str]) -> bool:
        return self.real


def test_double_run_is_flagged_and_a_refuted_one_is_only_transient() -> None:
    reads: list[Truth] = [{"v": ["n1"]}, {"v": ["n1", "n2"]}, {"v": ["n2"]}]
    real = DoubleRunChecker(Scripted(list(reads), real=True))
    for _ in reads:
        real.sample()
    assert [(v["invariant"], v["vm"], v["nodes"]) for v in real.violations] == [
        ("I1", "v", ["n1", "n2"])]
    switch_over = DoubleRunChecker(Scripted(list(reads), real=False))
    for _ in reads:
        switch_over.sample()
    assert switch_over.violations == [] and switch_over.transient_doubles == 1
    assert switch_over.samples == 3 and switch_over.seen("v") == {"n1", "n2"}


def test_recovery_runs_from_the_fault_to_running_again_after_down() -> None:
    checker = DoubleRunChecker(Scripted([{"v": ["n1"], "w": ["n2"]}, {"w": ["n2"]},
                                         {"v": ["n3"], "w": ["n2"]}], real=True))
    checker.sample()
    t0 = time.monotonic()
    checker.sample()
    checker.sample()
    rec = checker.recovery(["v", "w"], t0)
    assert set(rec) == {"v"} and rec["v"] >= 0, rec  # w never went down
    assert checker.seen("v", t0) == {"n3"} and checker.seen("v") == {"n1", "n3"}


def test_status_under_an_older_registration_of_its_node_is_flagged(etcd: EtcdCluster) -> None:
    """The node is registered when the write lands, but by a newer registration than the
    writer's: a stale agent process (the one its transaction would have refused)."""
    store = EtcdStore(etcd.endpoints)
    hc = HistoryChecker(EtcdStore(etcd.endpoints))
    hc.ensure()
    old = store.put(KS.node("n1"), json.dumps({"name": "n1"}))
    store.put(KS.vm_status("v"), status_under("n1", old))                   # fine
    store.delete(KS.node("n1"))
    new = store.put(KS.node("n1"), json.dumps({"name": "n1"}))
    store.put(KS.vm_status("v"), status_under("n1", new))                   # fine
    store.put(KS.vm_status("v"), status("n1"))                              # names none: fine
    assert hc.caught_up() and hc.violations == [], hc.violations
    store.put(KS.vm_status("v"), status_under("n1", old))                   # stale writer
    assert hc.caught_up()
    assert [v["why"] for v in hc.violations] == [
        f"status from n1 under registration {old} while {new} was current"]
    store.close()


def status_under(node: str, registration: int) -> str:
    return VmStatus(vm="v", node=node, state="running", since=0.0,
                    registration=registration).to_json()
