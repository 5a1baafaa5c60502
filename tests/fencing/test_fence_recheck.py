"""An external fence is irreversible: the leader starts one only if the node is still
unregistered when the fence agent would run, not merely in the snapshot its decision
came from.  Found by the fault campaign (default timing, fence_policy=both): a node's
agent registered again 30 ms before the leader, working from the snapshot one revision
older, started the fence device, which then switched off the VMs the new agent had
booted.  On keyspace 1 and 2 (tests/integration/keyspaces.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from orchestrator.actions import FenceNode
from orchestrator.leader import Orchestrator
from orchestrator.leader_v2 import OrchestratorV2
from schemas import ClusterConfig, Keyspace, NodeRegistration
from schemas.models import AgentInfo, Capacity, FenceDevice
from store.etcd import EtcdStore
from tests.harness import EtcdCluster
from tests.integration.keyspaces import KEYSPACES, ClusterView, mark_keyspace

pytestmark = pytest.mark.integration
KS = Keyspace()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_no_external_fence_for_a_node_that_registered_since_the_snapshot(
        etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    called = tmp_path / "fence-agent-called"
    agent = [sys.executable, "-c", f"open({str(called)!r}, 'a').write('off')"]
    cfg = ClusterConfig(fence_policy="external",
                        fence_devices={"*": FenceDevice(agent=agent, timeout_s=5.0)})
    mark_keyspace(etcd.endpoints, keyspace)
    store = EtcdStore(etcd.endpoints)
    view = ClusterView(etcd.endpoints)
    try:
        store.put(KS.config, cfg.to_json())
        orch = (OrchestratorV2 if keyspace == 2 else Orchestrator)(store, ident="o1")
        orch.cfg = cfg
        snap = view.snapshot()  # the decision's view: n1 not registered
        assert "n1" not in snap.nodes
        lease = store.grant_lease(6)
        reg = NodeRegistration(name="n1", lease_id=f"{lease:x}", libvirt_uri="test:///default",
                               migration_address="127.0.0.1",
                               capacity=Capacity(memory_mib=4096, vcpus=8),
                               agent=AgentInfo(pid=1, hostname="h1", version="test"),
                               registered_at=time.time())
        store.put(view.cluster.reg_key("n1"), reg.to_json(), lease=lease)  # ... and back since
        action = FenceNode(node="n1", lease_id="1", reason="lease gone", method="external",
                           device="*")
        orch._apply_fence(action, snap, epoch=1)
        time.sleep(2.0)  # a started fence agent would have written its file by now
        assert not called.exists(), "the fence device ran for a node registered again"
    finally:
        store.close()
        view.close()
