"""Keyspace 2 for the agent's integration tests: the marker, and the leader played by
the test with the orchestrator's writes of schemas.writes_v2 (until the leader runs on
keyspace 2, part 3)."""

from __future__ import annotations

import re
import time
import urllib.request

from cli.common import default_domain_xml
from schemas import writes_v2 as w
from schemas.keys_v2 import KeyspaceV2
from schemas.models import Placement, VmSpec
from schemas.models_v2 import KeyspaceState, KeyspaceVersion
from store.etcd import EtcdStore
from tests.harness import EtcdCluster

KS = KeyspaceV2()


def send(store: EtcdStore, write: w.Write) -> int:
    """Send `write` as its transaction; it must apply."""
    res = store.txn(write.txn.compares, write.txn.ops)
    assert res.succeeded, f"{write.what}: a compare failed"
    return res.revision


def spec(vm: str) -> VmSpec:
    return VmSpec(name=vm, domain_xml=default_domain_xml(vm, 64, 1), memory_mib=64, vcpus=1)


def mark_keyspace_2(store: EtcdStore, state: KeyspaceState = "done") -> None:
    """What `vmha keyspace migrate` leaves (section 6): the marker, state `done`."""
    store.put(KS.version, KeyspaceVersion(keyspace=2, state=state, started_at=time.time(),
                                          by="operator:test", tool_version="test").to_json())


class Leader:
    """Places VMs as the leader on keyspace 2 does: the placement and its assignments in
    one epoch-fenced txn."""

    def __init__(self, store: EtcdStore, operator: EtcdStore | None = None) -> None:
        self.store = store
        self.operator = operator or store  # who adds the specs (with auth on: not us)
        self.epoch = store.put(KS.leader, '{"schema": 1}')
        self.n = 0

    def place(self, vm: str, node: str, from_node: str | None = None,
              pid: str | None = None, vm_spec: VmSpec | None = None) -> int:
        """Place `vm` (its spec added first if absent: `vm_spec`, default `spec(vm)`),
        reading what it replaces; `pid` names the placement (default `pN`, N counting
        this leader's placements)."""
        self.n += 1
        vm_spec = vm_spec or spec(vm)
        spec_kv = self.store.get(KS.spec(vm))
        spec_rev = (spec_kv.mod_revision if spec_kv is not None
                    else self.operator.put(KS.spec(vm), vm_spec.to_json()))
        p = Placement(id=pid or f"p{self.n}", vm=vm, node=node, from_node=from_node,
                      kind="migrate" if from_node else "boot", epoch=self.epoch,
                      reason="test", decided_at=time.time())
        place = self.store.get(KS.place(vm))
        seen = {KS.parse(kv.key).node: kv.mod_revision
                for kv in self.store.get_prefix(KS.assignment_dir)
                if kv.key.endswith(f"/{vm}")}
        return send(self.store, w.placement(
            KS, p, epoch=self.epoch, place_mod=place.mod_revision if place else 0,
            spec=vm_spec, spec_revision=spec_rev, assignments_seen=seen))

    def remove(self, vm: str) -> int:
        """`vm remove` as the leader follows it: the spec deleted (the operator's write),
        then the placement and its assignments."""
        kv = self.operator.get(KS.spec(vm))
        assert kv is not None
        send(self.operator, w.vm_remove(KS, vm, kv.mod_revision))
        place = self.store.get(KS.place(vm))
        seen = {KS.parse(kv.key).node: kv.mod_revision
                for kv in self.store.get_prefix(KS.assignment_dir)
                if kv.key.endswith(f"/{vm}")}
        return send(self.store, w.remove_placement(
            KS, vm, epoch=self.epoch, place_mod=place.mod_revision if place else 0,
            assignments_seen=seen))

    def place_new(self, vm: str, node: str) -> int:
        """Add and place a VM without a read (for tests that count etcd's reads)."""
        spec_rev = self.operator.put(KS.spec(vm), spec(vm).to_json())
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
