"""The campaign's I3 checker catches what it claims to (so a clean campaign means something)."""

from __future__ import annotations

import json

import pytest

from bench.campaign import HistoryChecker
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
