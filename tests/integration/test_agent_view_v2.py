"""The agent's keyspace-2 view on real etcd (nodeagent.view_v2): it follows its
assignments and the peers they name, and another node's churn reaches it not at all: no
watch event and no read (etcd's own count of Range requests, from its /metrics).

The leader is played by the test, with the orchestrator's writes of schemas.writes_v2."""

from __future__ import annotations

import json
import time

import pytest

from nodeagent.view_v2 import NodeWatch
from schemas.keys_v2 import KeyspaceV2
from schemas.models import VmStatus
from schemas.snapshot_v2 import node_snapshot
from store.etcd import EtcdStore
from store.paging import KeyRange
from tests.harness import EtcdCluster, wait_until
from tests.integration.helpers_v2 import Leader, ranges_served
from tests.unit.builders import node_value

pytestmark = pytest.mark.integration

KS = KeyspaceV2()


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
