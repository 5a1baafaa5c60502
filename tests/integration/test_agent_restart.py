"""The guard outlives the agent (issue 11, item 3), on the fake hypervisor and real etcd,
with the default cluster config: each node's guard runs as its own process, the way
vmha-guard.service runs it.

* an agent SIGKILLed and started again within the TTL (systemd's `Restart=`) adopts its
  registration: its VMs stay on the node (no reboot, no migration), no fence record;
* the documented restart paths (`systemctl restart`, seen by the agent as SIGTERM with
  a restart job on its unit; SIGUSR2) likewise;
* an agent not started again: the guard destroys its VMs before the fence window ends;
* `systemctl stop` (SIGTERM with a stop job) still drains; a drain that cannot finish
  ends with destroy -> revoke -> exit.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest

from fencing.policy import guard_timeout
from hypervisor.fake import fake_ground_truth
from lab.invariants import DoubleRunChecker, FakeTruth
from schemas import ClusterConfig
from tests.conftest import make_fake_cluster, vmha
from tests.harness import EtcdCluster, FakeCluster, wait_until
from tests.integration.helpers import domain_record, log_events
from tests.integration.keyspaces import KEYSPACES, ClusterView

pytestmark = pytest.mark.integration
CFG = ClusterConfig()  # the defaults: what `systemctl restart` meets in production


def cluster(etcd: EtcdCluster, tmp_path: Path, nodes: int = 3, vms: int = 6,
            extra: tuple[str, ...] = (), guard_extra: tuple[str, ...] = (),
            keyspace: int = 1) -> FakeCluster:
    fc = make_fake_cluster(etcd, tmp_path, CFG, keyspace)
    fc.guard_service = True
    fc.guard_extra = guard_extra
    for i in range(1, nodes + 1):
        fc.start_agent(f"n{i}", extra=extra)
    fc.start_orchestrator("o1")
    fc.start_orchestrator("o2")
    for i in range(vms):
        r = vmha(etcd, "vm", "add", f"vm{i}", "--memory-mib", "512")
        assert r.returncode == 0, r.stderr
    wait_until(lambda: len(fake_ground_truth(fc.fake_root)) == vms, 30, what="all VMs running")
    return fc


def on(fc: FakeCluster, node: str) -> dict[str, float]:
    """The VMs running on `node`, with the time each was booted there."""
    return {vm: domain_record(fc.fake_root, node, vm)["booted_at"]  # type: ignore[index]
            for vm, ns in fake_ground_truth(fc.fake_root).items() if node in ns}


def stays_in_place(fc: FakeCluster, store: ClusterView, node: str, before: dict[str, float],
                   checker: DoubleRunChecker) -> None:
    # Past the old lease's TTL, the guard's timeout and the leader's fence window.
    time.sleep(CFG.lease_ttl_s + CFG.fence_margin_s + 2.0)
    assert on(fc, node) == before  # same VMs, same boots: nothing moved, nothing rebooted
    assert len(fake_ground_truth(fc.fake_root)) == 6
    assert store.fence(node) is None  # the leader never fenced the node
    assert checker.violations == []
    assert fc.guards[node].alive()
    assert '"guard_fired"' not in fc.guards[node].log_text()
    assert log_events(fc.agents[node], "registration_adopted")
    for other in fc.agents:
        for e in log_events(fc.agents[other], "boot"):
            assert e["vm"] not in before or other == node, e


def alive_lease(store: ClusterView, node: str) -> int:
    """The lease of the node's liveness key (nodeagent.liveness); 0: none."""
    return store.alive_lease(node)


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_agent_sigkilled_and_restarted_within_the_ttl_keeps_its_vms(
        etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    fc = cluster(etcd, tmp_path, keyspace=keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        before = on(fc, "n2")
        assert before
        lease = store.reg("n2").lease_id  # type: ignore[union-attr]
        alive = alive_lease(store, "n2")
        assert alive
        with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
            fc.agents["n2"].kill()  # a crash, or the OOM killer
            fc.start_agent("n2")  # systemd's Restart=
            stays_in_place(fc, store, "n2", before, checker)
        reg = store.reg("n2")
        assert reg is not None and reg.lease_id == lease and reg.agent.pid == fc.agents["n2"].pid
        assert alive_lease(store, "n2") == alive  # both leases adopted
    finally:
        fc.stop()
        store.close()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_a_restart_slower_than_the_guard_timeout_keeps_its_vms(
        etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    """A loaded host: the new agent process comes up after the guard's timeout (4.5 s)
    has run out since the old one's last pet.  The guard service holds the lease
    meanwhile (fencing.lease_hold), so it does not fire and nothing moves."""
    fc = cluster(etcd, tmp_path, keyspace=keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        before = on(fc, "n2")
        assert before
        alive = alive_lease(store, "n2")
        with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
            fc.agents["n2"].kill()
            time.sleep(guard_timeout(CFG) + 1.5)  # the restart is slow
            assert on(fc, "n2") == before
            fc.start_agent("n2")
            stays_in_place(fc, store, "n2", before, checker)
        assert '"lease_hold_ended"' in fc.guards["n2"].log_text()
        assert f'"liveness_lease": "{alive:x}"' in fc.guards["n2"].log_text()  # held too
        assert alive_lease(store, "n2") == alive
    finally:
        fc.stop()
        store.close()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_sigusr2_restarts_in_place(etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    """Also: the liveness lease gone while the agent restarts (revoked here): the new
    process adopts the registration with a new liveness lease, no drain."""
    fc = cluster(etcd, tmp_path, keyspace=keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        before = on(fc, "n1")
        lease = store.reg("n1").lease_id  # type: ignore[union-attr]
        alive = alive_lease(store, "n1")
        with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
            old = fc.agents["n1"]
            old.signal(signal.SIGUSR2)
            assert old.proc is not None and old.proc.wait(20) == 75  # RestartForceExitStatus
            store.store.revoke_lease(alive)
            fc.start_agent("n1")
            stays_in_place(fc, store, "n1", before, checker)
        assert not store.cordoned("n1")  # not drained
        reg = store.reg("n1")
        assert reg is not None and reg.lease_id == lease
        assert alive_lease(store, "n1") not in (0, alive)
    finally:
        fc.stop()
        store.close()


def fake_systemctl(tmp_path: Path, job: str) -> tuple[str, ...]:
    """A `systemctl` that reports `job` running on vmha-agent.service (no systemd here)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "systemctl"
    exe.write_text(f"#!/bin/sh\necho '42 vmha-agent.service {job} running'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    os.environ["PATH"] = f"{bindir}:{os.environ['PATH']}"
    return ("--systemd-unit", "vmha-agent.service")


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_systemctl_restart_restarts_in_place(etcd: EtcdCluster, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             keyspace: int) -> None:
    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored after the test
    fc = cluster(etcd, tmp_path, extra=fake_systemctl(tmp_path, "restart"), keyspace=keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        before = on(fc, "n3")
        with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
            old = fc.agents["n3"]
            old.signal(signal.SIGTERM)
            assert old.proc is not None and old.proc.wait(20) == 0
            fc.start_agent("n3", extra=("--systemd-unit", "vmha-agent.service"))
            stays_in_place(fc, store, "n3", before, checker)
        assert not store.cordoned("n3")
    finally:
        fc.stop()
        store.close()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_systemctl_stop_still_drains_and_disarms(etcd: EtcdCluster, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                             keyspace: int) -> None:
    monkeypatch.setenv("PATH", os.environ["PATH"])
    fc = cluster(etcd, tmp_path, extra=fake_systemctl(tmp_path, "stop"), keyspace=keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        victims = on(fc, "n3")
        assert victims
        fc.agents["n3"].signal(signal.SIGTERM)
        assert fc.agents["n3"].proc is not None and fc.agents["n3"].proc.wait(30) == 0
        truth = fake_ground_truth(fc.fake_root)
        assert len(truth) == 6
        for vm in victims:
            (node,) = truth[vm]
            assert domain_record(fc.fake_root, node, vm)["migrated_from"] == "n3"  # type: ignore[index]
        assert store.cordoned("n3") and store.reg("n3") is None
        time.sleep(CFG.lease_ttl_s)
        assert fc.guards["n3"].alive()  # disarmed: it keeps waiting for an agent
        assert '"guard_disarmed"' in fc.guards["n3"].log_text()
        assert '"guard_fired"' not in fc.guards["n3"].log_text()
    finally:
        fc.stop()
        store.close()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_not_restarted_the_guard_destroys_the_vms_before_the_fence_window_ends(
        etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    # The guard holds the lease for a restarting agent up to its restart grace (20 s by
    # default); 5 s here takes the same path sooner.
    fc = cluster(etcd, tmp_path, guard_extra=("--restart-grace-s", "5"), keyspace=keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        victims = on(fc, "n2")
        with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
            fc.agents["n2"].kill()
            guard = fc.guards["n2"]
            # After the restart grace and the guard's timeout.
            wait_until(lambda: '"guard_fired"' in guard.log_text(), 60, what="guard fired")
            # It stays, destroying again, until n2's agent registers again.
            assert guard.alive() and (fc.fake_root / "n2" / "fenced").exists()
            wait_until(lambda: all(fake_ground_truth(fc.fake_root).get(v) for v in victims),
                       30, what="victims running elsewhere")
        assert checker.violations == [], checker.violations
        fence = store.fence("n2")
        assert fence is not None
        truth = fake_ground_truth(fc.fake_root)
        for vm in victims:
            (node,) = truth[vm]
            assert node != "n2"
            assert domain_record(fc.fake_root, node, vm)["booted_at"] >= fence.fenced_at  # type: ignore[index]
            # The guard's destroy came first: the domain on n2 is recorded as destroyed.
            old = domain_record(fc.fake_root, "n2", vm)
            assert old is None or old["state"] != "running", old
    finally:
        fc.stop()
        store.close()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_a_drain_that_cannot_finish_destroys_revokes_and_exits(
        etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    """One node: its VMs have nowhere to go, so the drain on stop cannot finish."""
    fc = cluster(etcd, tmp_path, nodes=1, vms=6, extra=("--drain-timeout-s", "3"),
                 keyspace=keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        agent = fc.agents["n1"]
        agent.signal(signal.SIGINT)  # a stop that is not a restart (no systemd here)
        assert agent.proc is not None and agent.proc.wait(30) == 1
        assert fake_ground_truth(fc.fake_root) == {}
        assert store.reg("n1") is None  # revoked, not left to expire
        assert log_events(agent, "drain_given_up")
        assert fc.guards["n1"].alive() and '"guard_fired"' not in fc.guards["n1"].log_text()
    finally:
        fc.stop()
        store.close()
