"""A whole cluster on keyspace 2, as processes (`vmha agent`, `vmha orchestrator`) on the
fake hypervisor: the leader of part 3 and the agents of part 4, both chosen by the marker.
VMs placed and booted through their assignments, a crashed node's VMs booted elsewhere
once after its fence record, and a drain by lease revoke moving the VMs by live
migration, with no VM ever running twice (DoubleRunChecker) and nothing written in
keyspace 1.  The operator's specs are added by `vmha vm add`, which writes them to their
keyspace-2 keys (the marker names the keyspace)."""

from __future__ import annotations

import time

import pytest

from hypervisor.fake import fake_ground_truth
from lab.invariants import DoubleRunChecker, FakeTruth
from schemas.keys import Keyspace
from schemas.models import FenceRecord, NodeRegistration, VmStatus
from store.etcd import EtcdStore
from tests.conftest import vmha
from tests.harness import EtcdCluster, FakeCluster, wait_until
from tests.integration.helpers import domain_record, log_events
from tests.integration.helpers_v2 import KS, mark_keyspace_2, spec

pytestmark = pytest.mark.integration

VMS = [f"vm{i}" for i in range(4)]


def vms_on(fc: FakeCluster, node: str) -> list[str]:
    return sorted(vm for vm, ns in fake_ground_truth(fc.fake_root).items() if node in ns)


def settled(store: EtcdStore, fc: FakeCluster) -> bool:
    """Every VM runs on one node, which holds its assignment and reports it running."""
    truth = fake_ground_truth(fc.fake_root)
    for vm in VMS:
        nodes = truth.get(vm)
        if not nodes or len(nodes) != 1:
            return False
        (node,) = nodes
        kv = store.get(KS.status(node, vm))
        if (kv is None or VmStatus.from_json(kv.value).state != "running"
                or store.get(KS.assignment(node, vm)) is None):
            return False
    return True


def test_cluster_on_keyspace_2(etcd: EtcdCluster, fake_cluster: FakeCluster) -> None:
    fc = fake_cluster
    store = EtcdStore(etcd.endpoints)
    try:
        mark_keyspace_2(store)
        for vm in VMS:
            r = vmha(etcd, "vm", "add", vm, "--memory-mib", "64")
            assert r.returncode == 0 and KS.spec(vm) in r.stdout, r.stdout + r.stderr
            assert store.get(KS.spec(vm)).value == spec(vm).to_json().encode()  # type: ignore[union-attr]
        for n in ("n1", "n2", "n3"):
            fc.start_agent(n)
        # All registered before the leader places anything: the VMs spread over three.
        wait_until(lambda: all(store.get(KS.reg(n)) for n in ("n1", "n2", "n3")), 20,
                   what="agents registered")
        fc.start_orchestrator("o1")
        wait_until(lambda: settled(store, fc), 30, what="every VM running on keyspace 2")
        assert all(log_events(fc.agents[n], "keyspace")[0]["version"] == 2 for n in fc.agents)
        v1 = Keyspace()
        assert not store.get_prefix(v1.prefix + "/vms/") and not store.get_prefix(
            v1.prefix + "/nodes/"), "nothing written in keyspace 1"

        with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
            # A crash of n2 (agent and guests): its VMs booted elsewhere after the fence.
            victims = vms_on(fc, "n2")
            assert victims, "the planner spreads the VMs over the three nodes"
            fc.agents["n2"].kill()
            wait_until(lambda: store.get(KS.fence("n2")) is not None and settled(store, fc)
                       and not vms_on(fc, "n2"), 30, what="n2's VMs running elsewhere")
            fence = FenceRecord.from_json(store.get(KS.fence("n2")).value)  # type: ignore[union-attr]
            assert fence.outcome == "success"
            for vm in victims:
                boots = [e for n in ("n1", "n3") for e in log_events(fc.agents[n], "boot")
                         if e["vm"] == vm]
                assert len(boots) == 1, boots
                (node,) = fake_ground_truth(fc.fake_root)[vm]
                rec = domain_record(fc.fake_root, node, vm)
                assert rec is not None and rec["booted_at"] >= fence.fenced_at

            # A drain of n1 by revoking its lease: cordoned, its VMs live-migrated to n3.
            reg = store.get(KS.reg("n1"))
            assert reg is not None
            on_n1 = vms_on(fc, "n1")
            assert on_n1, "the planner spreads the VMs over n1 and n3"
            store.revoke_lease(reg.lease)
            wait_until(lambda: not vms_on(fc, "n1") and settled(store, fc), 30,
                       what="n1 drained")
            assert {e["vm"] for e in log_events(fc.agents["n1"], "migrate_done")} == set(on_n1)
            now = store.get(KS.reg("n1"))
            assert now is not None and NodeRegistration.from_json(now.value).cordoned
            for vm in on_n1:
                assert not [e for e in log_events(fc.agents["n3"], "boot") if e["vm"] == vm], \
                    f"{vm} moved live, not booted again"
            # The leader releases the source once it has seen the arrival (a cycle after
            # the target's report, which is all `settled` waits for).
            wait_until(lambda: all(store.get(KS.assignment("n1", vm)) is None for vm in on_n1),
                       10, what="n1's assignments deleted by the arrival rewrites")
            time.sleep(0.5)  # the sampler sees the settled state too
        assert checker.violations == [], checker.violations
        assert checker.samples > 20
    finally:
        store.close()
