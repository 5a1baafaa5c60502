"""The invariant checkers catch what they claim to (so a clean campaign means something)."""

from __future__ import annotations

import json
import time

import pytest

from lab.invariants import DoubleRunChecker, HistoryChecker, Truth
from schemas import Keyspace
from store.etcd import EtcdStore
from tests.harness import EtcdCluster

pytestmark = pytest.mark.integration
KS = Keyspace()


def test_stale_epoch_and_unregistered_status_writes_are_flagged(etcd: EtcdCluster) -> None:
    store = EtcdStore(etcd.endpoints)
    hc = HistoryChecker(EtcdStore(etcd.endpoints))
    hc.ensure()
    epoch = store.put(KS.leader, json.dumps({"id": "a"}))
    store.put(KS.vm_placement("v"), json.dumps({"epoch": epoch}))          # fine
    reg = store.put(KS.node("n1"), json.dumps({"name": "n1"}))
    store.put(KS.vm_status("v"), json.dumps({"node": "n1"}))                # fine
    assert hc.caught_up() and hc.violations == [], hc.violations
    store.delete(KS.leader)
    store.put(KS.vm_placement("v"), json.dumps({"epoch": epoch}))          # stale epoch
    store.put(KS.fence("n9"), json.dumps({"epoch": epoch, "method": "self"}))  # stale too
    store.delete(KS.node("n1"))
    store.put(KS.vm_status("v"), json.dumps({"node": "n1"}))                # stale agent
    store.put(KS.fence("n8"), json.dumps({"epoch": 0, "method": "manual"}))  # operator: ok
    assert hc.caught_up()
    whys = sorted(v["why"] for v in hc.violations)
    assert len(whys) == 3, hc.violations
    assert sum(f"epoch {epoch} was not the leader" in w for w in whys) == 2
    assert any("status from n1 while not registered" in w for w in whys)
    assert reg > epoch
    store.close()


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
