"""The agent's keyspace-2 view on real etcd (nodeagent.view_v2): it follows its
assignments and the peers they name, and another node's churn reaches it not at all: no
watch event and no read (etcd's own count of Range requests, from its /metrics).

The leader is played by the test, with the orchestrator's writes of schemas.writes_v2."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from nodeagent.view_v2 import NodeWatch
from schemas import writes_v2 as w
from schemas.keys_v2 import KeyspaceV2
from schemas.models import Placement, VmSpec, VmStatus
from schemas.snapshot_v2 import node_snapshot
from store.etcd import EtcdStore
from store.paging import KeyRange
from tests.harness import EtcdCluster, wait_until
from tests.unit.builders import node_value

pytestmark = pytest.mark.integration

KS = KeyspaceV2()


def send(store: EtcdStore, write: w.Write) -> int:
    res = store.txn(write.txn.compares, write.txn.ops)
    assert res.succeeded, f"{write.what}: a compare failed"
    return res.revision


def spec(vm: str) -> VmSpec:
    return VmSpec(name=vm, domain_xml=f"<domain type='qemu'><name>{vm}</name></domain>",
                  memory_mib=64, vcpus=1)


class Leader:
    """Places VMs as the leader on keyspace 2 does: placement and assignments in one
    epoch-fenced txn."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.epoch = store.put(KS.leader, '{"schema": 1}')
        self.n = 0

    def place(self, vm: str, node: str, from_node: str | None = None) -> int:
        self.n += 1
        spec_kv = self.store.get(KS.spec(vm))
        if spec_kv is None:
            self.store.put(KS.spec(vm), spec(vm).to_json())
            spec_kv = self.store.get(KS.spec(vm))
        assert spec_kv is not None
        p = Placement(id=f"p{self.n}", vm=vm, node=node, from_node=from_node,
                      kind="migrate" if from_node else "boot", epoch=self.epoch,
                      reason="test", decided_at=time.time())
        place = self.store.get(KS.place(vm))
        seen = {KS.parse(kv.key).node: kv.mod_revision
                for kv in self.store.get_prefix(KS.assignment_dir)
                if kv.key.endswith(f"/{vm}")}
        return send(self.store, w.placement(
            KS, p, epoch=self.epoch, place_mod=place.mod_revision if place else 0,
            spec=spec(vm), spec_revision=spec_kv.mod_revision, assignments_seen=seen))

    def place_new(self, vm: str, node: str) -> int:
        """Add and place a VM without a read (the test counts etcd's reads)."""
        spec_rev = self.store.put(KS.spec(vm), spec(vm).to_json())
        p = Placement(id=f"{vm}-p", vm=vm, node=node, kind="boot", epoch=self.epoch,
                      reason="test", decided_at=time.time())
        return send(self.store, w.placement(KS, p, epoch=self.epoch, place_mod=0,
                                            spec=spec(vm), spec_revision=spec_rev,
                                            assignments_seen={}))


def ranges_served(etcd: EtcdCluster) -> int:
    """Range requests etcd has answered (all clients), by its /metrics."""
    total = 0
    for m in etcd.members:
        with urllib.request.urlopen(f"http://{m.endpoint}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total += sum(int(float(n)) for n in re.findall(
            r'^grpc_server_handled_total\{[^}]*grpc_method="Range"[^}]*\} (\S+)$', text, re.M))
    return total


def status(node: str, vm: str, state: str = "running") -> VmStatus:
    return VmStatus(vm=vm, node=node, state=state, since=time.time())  # type: ignore[arg-type]


def test_view_follows_assignments_and_ignores_other_nodes(etcd: EtcdCluster,
                                                          store: EtcdStore) -> None:
    leader = Leader(store)
    store.put(KS.reg("n2"), json.dumps(node_value("n2")))
    watch = NodeWatch(store, KS, "n1", check_interval_s=0.5)
    try:
        watch.start()
        leader.place("web1", "n1")
        leader.place("web2", "n1", from_node="n2")  # web2 migrates in from n2
        n2_status = store.put(KS.status("n2", "web2"), status("n2", "web2", "migrating").to_json())
        wait_until(lambda: len(watch.wait(0.1)) >= 0 and KS.assignment("n1", "web2") in
                   {kv.key for kv in watch.own_kvs()}, 5)
        snap = node_snapshot(KS, watch.view([]))
        assert set(snap.placements) == {"web1", "web2"}
        assert watch.peers == {KeyRange.key(KS.reg("n2")), KeyRange.key(KS.status("n2", "web2"))}
        assert set(snap.nodes) == {"n2"}  # n1 itself is not registered in this test
        assert snap.invalid == ()
        assert snap.statuses["web2"].mod_revision == n2_status

        # n2's churn: its own VMs, their assignments and statuses.  A sentinel write in
        # n1's range afterwards: the stream delivers in revision order, so once it is
        # here any earlier event for n1 would have been too.
        events, reads = watch.state.stats["events"], ranges_served(etcd)
        assert reads > 0, "etcd counts the listings so far"
        for i in range(20):
            leader.place_new(f"other{i}", "n2")
            store.put(KS.status("n2", f"other{i}"), status("n2", f"other{i}").to_json())
        store.put(KS.status("n3", "web2"), status("n3", "web2").to_json())  # no peer of n1
        sentinel = store.put(KS.leaving("n1"), '{"node": "n1"}')
        wait_until(lambda: watch.state.get(KS.leaving("n1")) is not None, 5)
        for _ in range(5):
            view = watch.view([])
        assert watch.state.stats["events"] == events + 1, "only the sentinel reached n1"
        assert ranges_served(etcd) == reads, "n1 read nothing for n2's churn"
        assert view.revision >= sentinel
        assert all(not kv.key.startswith((KS.assignments("n2"), KS.statuses("n3")))
                   for kv in view.kvs)

        # The migration ends: the peer's keys are dropped.
        leader.place("web2", "n1")
        wait_until(lambda: watch.wait(0.1) is not None and not node_snapshot(
            KS, watch.view([])).nodes, 5)
        assert watch.peers == frozenset()
        # An orphan domain (no assignment): its placement and spec by targeted gets.
        leader.place("web9", "n2")
        gets = watch.targeted_gets
        snap = node_snapshot(KS, watch.view(["web9"]))
        assert watch.targeted_gets == gets + 2
        assert snap.placements["web9"].value.node == "n2"
        assert snap.placements["web9"].key == KS.place("web9")
    finally:
        watch.close()
