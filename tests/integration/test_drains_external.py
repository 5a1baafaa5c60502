"""External fencing never power-cycles a node that is being drained (issue 12, item 3):
real etcd, three agents on the fake hypervisor, two orchestrators, `fence_policy =
external` with a fence agent that logs every call (it wraps the built-in fencer).

Drains by `etcdctl lease revoke` (the agent registers again, cordoned, within
`revoke_grace_s`) and agent restarts (SIGTERM: drain, leave marker, revoke, exit; then
started again) make no fence-agent call and write no fence record.  The control: a
node that is really lost (agent SIGKILLed, its guard destroys its VMs) gets a call,
so the log does see calls."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from bench.lab_drains import fence_calls, logging_fence_agent
from fencing.policy import fence_window
from hypervisor.fake import fake_ground_truth
from lab.invariants import DoubleRunChecker, FakeTruth
from schemas import ClusterConfig, NodeRegistration
from schemas.models import FenceDevice
from tests.conftest import TEST_CONFIG, make_fake_cluster, vmha
from tests.harness import EtcdCluster, FakeCluster, wait_until
from tests.integration.keyspaces import KEYSPACES, ClusterView

pytestmark = pytest.mark.integration
NODES = ("n1", "n2", "n3")
VMS = 4
# Per kind; VMHA_DRAIN_ROUNDS=20 runs the 20 + 20 of issue 12 (as measured there);
# 6 keep the suite short and still cover every node at least twice.
ROUNDS = int(os.environ.get("VMHA_DRAIN_ROUNDS", "6"))


def calls(log: Path) -> list[str]:
    """The nodes each `off` call was for (the built-in fencer's uri names the node)."""
    return [Path(uri).name for uri in fence_calls(log)]


def registration(store: ClusterView, node: str) -> tuple[int, NodeRegistration] | None:
    e = store.reg_entry(node)
    return (e.create_revision, e.value) if e else None


def drained(fc: FakeCluster, node: str) -> bool:
    return all(node not in ns for ns in fake_ground_truth(fc.fake_root).values())


def all_running(fc: FakeCluster) -> bool:
    truth = fake_ground_truth(fc.fake_root)
    return len(truth) == VMS and all(len(ns) == 1 for ns in truth.values())


def uncordon(store: ClusterView, node: str) -> None:
    store.cluster.uncordon(node)
    wait_until(lambda: (r := registration(store, node)) is not None and not r[1].cordoned,
               20, what=f"{node} uncordoned")


def revoke_drain(fc: FakeCluster, store: ClusterView, node: str) -> None:
    before = store.reg_entry(node)
    assert before is not None
    store.store.revoke_lease(before.lease)
    wait_until(lambda: (r := registration(store, node)) is not None
               and r[0] != before.create_revision and r[1].cordoned, 20,
               what=f"{node} registered again, cordoned")
    wait_until(lambda: drained(fc, node) and all_running(fc), 30, what=f"{node} drained")
    uncordon(store, node)


def restart(fc: FakeCluster, store: ClusterView, node: str) -> None:
    fc.agents[node].signal(signal.SIGTERM)
    wait_until(lambda: not fc.agents[node].alive(), 30, what=f"{node}'s agent drained, exited")
    assert drained(fc, node) and all_running(fc)
    assert store.leaving(node)  # written before its revoke
    fc.start_agent(node)
    wait_until(lambda: registration(store, node) is not None, 20, what=f"{node} registered")
    assert not store.leaving(node)  # gone with the new registration
    uncordon(store, node)


def external_config(tmp_path: Path) -> tuple[ClusterConfig, Path]:
    """`fence_policy = external` with the logging fence agent; its call log."""
    agent, log = logging_fence_agent(tmp_path)
    return TEST_CONFIG.model_copy(update={
        "fence_policy": "external",
        "fence_devices": {"*": FenceDevice(agent=agent, params={"uri": "{uri}"},
                                           timeout_s=20)}}), log


def start_cluster(etcd: EtcdCluster, tmp_path: Path, cfg: ClusterConfig,
                  keyspace: int = 1) -> FakeCluster:
    """NODES agents, two orchestrators, VMS VMs running, on `keyspace`."""
    fc = make_fake_cluster(etcd, tmp_path, cfg, keyspace)
    for n in NODES:
        fc.start_agent(n)
    fc.start_orchestrator("o1")
    fc.start_orchestrator("o2")
    for i in range(VMS):
        r = vmha(etcd, "vm", "add", f"vm{i}", "--memory-mib", "512")
        assert r.returncode == 0, r.stderr
    wait_until(lambda: all_running(fc), 30, what="all VMs running")
    return fc


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_drains_and_restarts_make_no_fence_call_a_loss_does(etcd: EtcdCluster,
                                                            tmp_path: Path,
                                                            keyspace: int) -> None:
    cfg, log = external_config(tmp_path)
    fc = start_cluster(etcd, tmp_path, cfg, keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        started = time.monotonic()
        with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
            for i in range(ROUNDS):
                revoke_drain(fc, store, NODES[i % 3])
                assert calls(log) == [], f"revoke drain {i + 1}"
            for i in range(ROUNDS):
                restart(fc, store, NODES[i % 3])
                assert calls(log) == [], f"restart {i + 1}"
            # Past every grace and fence window the last of them started.
            time.sleep(cfg.revoke_grace_s + fence_window(cfg) + 1.0)
            assert calls(log) == []
            assert store.fences() == {}
            assert checker.violations == []
            print(f"\n{ROUNDS} revoke drains + {ROUNDS} restarts: 0 fence calls, "
                  f"{time.monotonic() - started:.0f} s")
            # The control: a node really lost is fenced through the same log.
            victim = max(NODES, key=lambda n: sum(n in ns for ns in
                                                  fake_ground_truth(fc.fake_root).values()))
            fc.agents[victim].kill()
            wait_until(lambda: victim in calls(log), 60, what=f"a fence call for {victim}")
            wait_until(lambda: all_running(fc), 60, what="its VMs running elsewhere")
            assert checker.violations == []
    finally:
        fc.stop()
        store.close()
