"""End-to-end behaviour on a real etcd with agents on the fake hypervisor (processes)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.fake import fake_ground_truth
from lab.invariants import DoubleRunChecker, FakeTruth
from schemas import Keyspace, Placement
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG, vmha
from tests.harness import EtcdCluster, FakeCluster, wait_until
from tests.integration.helpers import domain_record, log_events
from tests.integration.keyspaces import KEYSPACES, ClusterView

pytestmark = pytest.mark.integration

KS = Keyspace()


@pytest.fixture
def fc(etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> Iterator[FakeCluster]:
    """The fake cluster on `keyspace` (each test below runs on keyspace 1 and 2)."""
    from tests.conftest import make_fake_cluster

    cluster = make_fake_cluster(etcd, tmp_path, keyspace=keyspace)
    try:
        yield cluster
    finally:
        cluster.stop()


def boot_cluster(fc: FakeCluster, etcd: EtcdCluster, vms: int = 6, nodes: int = 3) -> None:
    for i in range(1, nodes + 1):
        fc.start_agent(f"n{i}")
    fc.start_orchestrator("o1")
    fc.start_orchestrator("o2")
    for i in range(vms):
        r = vmha(etcd, "vm", "add", f"vm{i}", "--memory-mib", "512")
        assert r.returncode == 0, r.stderr
    wait_until(lambda: len(fake_ground_truth(fc.fake_root)) == vms, 20, what="all VMs running")


def vms_on(fc: FakeCluster, node: str) -> list[str]:
    return sorted(vm for vm, ns in fake_ground_truth(fc.fake_root).items() if node in ns)


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_agent_crash_reboots_vms_elsewhere_once_after_fence_window(
        etcd: EtcdCluster, fc: FakeCluster) -> None:
    boot_cluster(fc, etcd)
    victims = vms_on(fc, "n2")
    assert victims, "the planner spreads 6 VMs over 3 nodes"
    store = ClusterView(etcd.endpoints)
    with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
        killed_at = time.time()
        fc.agents["n2"].kill()  # host crash: the fake's guests die with their host process
        wait_until(lambda: not store.registered("n2"), 10, interval=0.02,
                   what="n2's lease to expire")
        expired_seen_at = time.time()
        wait_until(lambda: all(fake_ground_truth(fc.fake_root).get(v) for v in victims), 20,
                   what="victims running elsewhere")
    assert checker.violations == [], checker.violations
    assert checker.samples > 50
    truth = fake_ground_truth(fc.fake_root)
    assert len(truth) == 6
    for vm in victims:
        (node,) = truth[vm]
        assert node != "n2"
        rec = domain_record(fc.fake_root, node, vm)
        assert rec is not None
        # Booted only after the lease expired plus the leader's fence margin.  The last
        # keepalive may precede the kill by one interval; the 0.05 s is our polling step.
        assert rec["booted_at"] >= expired_seen_at - 0.05 + TEST_CONFIG.fence_margin_s
        assert rec["booted_at"] >= (killed_at + TEST_CONFIG.lease_ttl_s
                                    - TEST_CONFIG.keepalive_interval_s + TEST_CONFIG.fence_margin_s)
        boots = [e for n in ("n1", "n3") for e in log_events(fc.agents[n], "boot")
                 if e["vm"] == vm]
        assert len(boots) == 1, boots
    fence = store.fence("n2")
    assert fence is not None and fence.method == "self" and fence.outcome == "success"
    for vm in victims:
        (node,) = truth[vm]
        assert domain_record(fc.fake_root, node, vm)["booted_at"] >= fence.fenced_at  # type: ignore[index]
    assert fence.duration_s >= TEST_CONFIG.fence_margin_s
    store.close()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_lease_revoke_drains_by_live_migration_and_cordons(
        etcd: EtcdCluster, fc: FakeCluster) -> None:
    boot_cluster(fc, etcd)
    store = ClusterView(etcd.endpoints)
    victims = vms_on(fc, "n1")
    before = store.reg_entry("n1")
    assert before is not None
    lease = f"{before.lease:x}"
    with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
        subprocess.run(["etcdctl", "--endpoints", etcd.endpoints, "lease", "revoke", lease],
                       check=True, capture_output=True)
        wait_until(lambda: not vms_on(fc, "n1"), 15, what="n1 drained")
    assert checker.violations == []
    truth = fake_ground_truth(fc.fake_root)
    for vm in victims:
        (node,) = truth[vm]
        rec = domain_record(fc.fake_root, node, vm)
        assert rec is not None and rec.get("migrated_from") == "n1", rec  # moved live
        assert not [e for n in fc.agents for e in log_events(fc.agents[n], "boot")
                    if e["vm"] == vm and e.get("placement", "").startswith("e") and
                    e is not None and n != "n1" and "migrat" not in e.get("reason", "")
                    and e["timestamp"] > ""][1:], "no cold boot of a drained VM"
    # Never a cold boot: the only boot event for each victim is its original one.
    for vm in victims:
        boots = [e for n in fc.agents for e in log_events(fc.agents[n], "boot") if e["vm"] == vm]
        assert len(boots) == 1, boots
    # The node stays registered (new lease) but cordoned, and receives nothing new.
    reg = store.reg_entry("n1")
    assert reg is not None and reg.value.cordoned and reg.lease != before.lease
    assert store.cordoned("n1")
    assert vmha(etcd, "vm", "add", "late", "--memory-mib", "256").returncode == 0
    wait_until(lambda: fake_ground_truth(fc.fake_root).get("late"), 10, what="late VM running")
    assert fake_ground_truth(fc.fake_root)["late"] != ["n1"]
    # Uncordon: schedulable again; the emptiest node (n1) gets the next VM.
    r = vmha(etcd, "node", "uncordon", "n1")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: not store.reg("n1").cordoned, 10,  # type: ignore[union-attr]
               what="registration uncordoned")
    assert vmha(etcd, "vm", "add", "after", "--memory-mib", "256").returncode == 0
    wait_until(lambda: fake_ground_truth(fc.fake_root).get("after"), 10, what="after running")
    assert fake_ground_truth(fc.fake_root)["after"] == ["n1"]
    store.close()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_sigterm_drains_then_exits(etcd: EtcdCluster, fc: FakeCluster) -> None:
    boot_cluster(fc, etcd)
    victims = vms_on(fc, "n3")
    assert victims
    fc.agents["n3"].signal(signal.SIGTERM)
    assert fc.agents["n3"].proc is not None
    assert fc.agents["n3"].proc.wait(20) == 0
    truth = fake_ground_truth(fc.fake_root)
    assert len(truth) == 6
    for vm in victims:
        (node,) = truth[vm]
        assert node != "n3"
        assert domain_record(fc.fake_root, node, vm)["migrated_from"] == "n3"  # type: ignore[index]
    with ClusterView(etcd.endpoints) as view:
        assert view.cordoned("n3")


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_leader_kill_failover_within_ttl_plus_1s_and_no_decision_lost(
        etcd3: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    from tests.conftest import make_fake_cluster

    fc = make_fake_cluster(etcd3, tmp_path, keyspace=keyspace)
    try:
        boot_cluster(fc, etcd3, vms=2)
        store = ClusterView(etcd3.endpoints)
        old = store.leader_id()
        assert old in fc.orchestrators
        fc.orchestrators[old].kill()
        killed = time.monotonic()
        # A decision is needed while there is no leader: it must not be lost.
        assert vmha(etcd3, "vm", "add", "during", "--memory-mib", "256").returncode == 0
        new = wait_until(lambda: (lid := store.leader_id()) and lid != old and lid, 10,
                         interval=0.02, what="new leader")
        failover = time.monotonic() - killed
        assert failover <= TEST_CONFIG.lease_ttl_s + 1.0, failover
        wait_until(lambda: fake_ground_truth(fc.fake_root).get("during"), 10,
                   what="VM declared during failover running")
        p = store.placement("during")
        assert p is not None and p.epoch == store.leader().create_revision  # type: ignore[union-attr]
        assert new != old
        store.close()
    finally:
        fc.stop()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_paused_leader_is_deposed_and_its_writes_are_rejected(
        etcd: EtcdCluster, fc: FakeCluster) -> None:
    boot_cluster(fc, etcd, vms=2)
    store = ClusterView(etcd.endpoints)
    old = store.leader_id()
    assert old is not None
    old_epoch = store.leader().create_revision  # type: ignore[union-attr]
    paused = fc.orchestrators[old]
    paused.signal(signal.SIGSTOP)
    wait_until(lambda: (lid := store.leader_id()) and lid != old and lid, 10,
               what="new leader while the old one is paused")
    new_epoch = store.leader().create_revision  # type: ignore[union-attr]
    assert new_epoch > old_epoch
    # Give the paused leader work to do the moment it resumes.
    assert vmha(etcd, "vm", "add", "wake", "--memory-mib", "256").returncode == 0
    paused.signal(signal.SIGCONT)
    wait_until(lambda: log_events(paused, "deposed"), 10, what="old leader notices")
    wait_until(lambda: fake_ground_truth(fc.fake_root).get("wake"), 10, what="wake running")
    time.sleep(1.0)
    # Every placement in etcd comes from an epoch that was leader when written:
    # nothing from the old epoch was written after the new leader took over.
    for vm in ("vm0", "vm1", "wake"):
        p = store.placement(vm)
        assert p is not None and p.epoch in (old_epoch, new_epoch)
    wake = store.placement("wake")
    assert wake is not None and wake.epoch == new_epoch
    accepted_late = [e for e in log_events(paused, "placement")
                     if e.get("written") and e["epoch"] == old_epoch and e["vm"] == "wake"]
    assert accepted_late == []
    store.close()


def test_stale_epoch_write_is_rejected_by_etcd(etcd: EtcdCluster) -> None:
    """The fencing token itself: a leader object holding an old epoch cannot write."""
    from orchestrator import planner
    from orchestrator.leader import Orchestrator

    store = EtcdStore(etcd.endpoints)
    store.put(KS.config, TEST_CONFIG.to_json())
    a = Orchestrator(store, ident="a")
    a.ensure_config()
    assert a.campaign()
    stale_epoch = a.epoch
    assert stale_epoch is not None
    store.revoke_lease(a.lease_id)  # a's term ends (as if its lease expired while paused)
    b = Orchestrator(EtcdStore(etcd.endpoints), ident="b")
    b.ensure_config()
    assert b.campaign()
    snap = store.snapshot()
    p = Placement(id="x", vm="v", node="n1", kind="boot", epoch=stale_epoch, reason="stale",
                  decided_at=0.0)
    assert a.apply(planner.WritePlacement(p, 0), snap, stale_epoch) is False
    assert store.get(KS.vm_placement("v")) is None
    assert b.apply(planner.WritePlacement(p.model_copy(update={"epoch": b.epoch}), 0), snap,
                   b.epoch) is True  # type: ignore[arg-type]
    a.step_down("test")
    b.step_down("test")
    store.close()


def test_malformed_input_is_rejected_and_daemons_survive(
        etcd: EtcdCluster, fake_cluster: FakeCluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fc = fake_cluster
    boot_cluster(fc, etcd, vms=1)
    bad_xml = tmp_path / "bad.xml"
    bad_xml.write_text("<domain><name>other</name></domain>")
    r = vmha(etcd, "vm", "add", "good-name", "--memory-mib", "64", "--xml", str(bad_xml))
    assert r.returncode == 2 and "<name> is 'other'" in r.stderr, r.stderr
    r = vmha(etcd, "vm", "add", "Bad_Name!", "--memory-mib", "64")
    assert r.returncode == 2 and "name" in r.stderr
    r = vmha(etcd, "vm", "add", "zero", "--memory-mib", "0")
    assert r.returncode == 2 and "memory_mib" in r.stderr
    # Hand-edited keys behind vmha's back.
    store = EtcdStore(etcd.endpoints)
    store.put(KS.vm_spec("junk"), "{not json")
    store.put(KS.vm_spec("liar"), json.dumps({
        "schema": 1, "name": "other", "memory_mib": 64, "vcpus": 1,
        "domain_xml": "<domain><name>other</name></domain>"}))
    store.put(KS.vm_spec("huge"), json.dumps({"schema": 1, "name": "huge", "memory_mib": -5,
                                              "vcpus": 1, "domain_xml": "<domain/>"}))
    store.put(KS.vm_placement("vm0"), json.dumps({"schema": 9}))
    assert vmha(etcd, "vm", "add", "fine", "--memory-mib", "64").returncode == 0
    wait_until(lambda: fake_ground_truth(fc.fake_root).get("fine"), 10, what="good VM running")
    time.sleep(1.0)
    for d in [*fc.agents.values(), *fc.orchestrators.values()]:
        assert d.alive(), d.name
    for vm in ("junk", "liar", "huge"):
        assert store.get(KS.vm_placement(vm)) is None
        assert vm not in fake_ground_truth(fc.fake_root)
    r = vmha(etcd, "-o", "json", "status")
    assert r.returncode == 0, r.stderr
    invalid = json.loads(r.stdout)["invalid_keys"]
    assert any("/vmha/vms/junk/spec" in e and "not valid JSON" in e for e in invalid)
    assert any("/vmha/vms/liar/spec" in e and "'name'" in e for e in invalid)
    assert any("/vmha/vms/huge/spec" in e and "memory_mib" in e for e in invalid)
    # vm0 keeps running where it was: a corrupt placement never causes an action.
    assert fake_ground_truth(fc.fake_root)["vm0"]
    errs = [e for d in fc.orchestrators.values() for e in log_events(d, "invalid_key_ignored")]
    assert any(e["key"] == "/vmha/vms/junk/spec" for e in errs)
    store.close()


def test_unsafe_config_is_refused_at_start(etcd: EtcdCluster) -> None:
    store = EtcdStore(etcd.endpoints)
    store.put(KS.config, json.dumps({"schema": 1, "lease_ttl_s": 2, "self_fence_safety_s": 3}))
    r = vmha(etcd, "orchestrator", "--validate-config")
    assert r.returncode != 0
    r = vmha(etcd, "config", "validate")
    assert r.returncode == 2 and "self_fence_safety_s" in r.stderr
    store.close()
