"""Agent behaviours driven in-process against real etcd and the fake hypervisor."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cli.common import default_domain_xml
from hypervisor.fake import FakeHypervisor
from nodeagent.agent import AgentOptions, NodeAgent
from schemas import Keyspace, Placement, VmSpec, VmStatus
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster, wait_until

pytestmark = pytest.mark.integration
KS = Keyspace()


def spec(name: str) -> VmSpec:
    return VmSpec(name=name, domain_xml=default_domain_xml(name, 64, 1), memory_mib=64, vcpus=1)


def test_agent_start_adopts_running_vm_without_reboot(etcd: EtcdCluster, tmp_path: Path) -> None:
    store = EtcdStore(etcd.endpoints)
    store.put(KS.config, TEST_CONFIG.to_json())
    hv = FakeHypervisor(tmp_path, "n1")
    hv.boot("web", spec("web").domain_xml)  # already running when the agent starts
    booted_at = (tmp_path / "n1" / "domains" / "web.json").read_text()
    store.put(KS.vm_spec("web"), spec("web").to_json())
    store.put(KS.vm_placement("web"), Placement(id="p1", vm="web", node="n1", kind="boot",
                                                 epoch=1, reason="test",
                                                 decided_at=time.time()).to_json())
    agent = NodeAgent(store, hv, AgentOptions(name="n1", poll_interval_s=0.2))
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: store.get(KS.vm_status("web")), 10, what="status report")
        st = VmStatus.from_json(store.get(KS.vm_status("web")).value)  # type: ignore[union-attr]
        assert (st.node, st.state, st.placement_id) == ("n1", "running", "p1")
        time.sleep(0.5)
        # Same domain record: not rebooted.
        assert (tmp_path / "n1" / "domains" / "web.json").read_text() == booted_at
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(5)
        store.close()


def test_rejoining_node_cleans_up_crashed_domain_never_boots_it(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    store = EtcdStore(etcd.endpoints)
    store.put(KS.config, TEST_CONFIG.to_json())
    # A domain left defined-but-crashed from before the node died; the VM now lives on n2.
    dead = FakeHypervisor(tmp_path, "n1", host_pid=2 ** 22 + 12345)  # a pid that is not alive
    dead.boot("db", spec("db").domain_xml)
    assert dead.list_domains()["db"].state == "crashed"
    store.put(KS.vm_spec("db"), spec("db").to_json())
    store.put(KS.vm_placement("db"), Placement(id="p2", vm="db", node="n2", kind="boot",
                                                epoch=1, reason="re-placed after fence",
                                                decided_at=time.time()).to_json())
    hv = FakeHypervisor(tmp_path, "n1")
    agent = NodeAgent(store, hv, AgentOptions(name="n1", poll_interval_s=0.2))
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: "db" not in hv.list_domains(), 10, what="left-over undefined")
        assert store.get(KS.vm_status("db")) is None  # never reported as running here
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(5)
        store.close()


def test_etcd_loss_self_fences_and_is_not_a_drain(etcd: EtcdCluster, tmp_path: Path) -> None:
    """etcd unreachable: the agent destroys its domains before its lease could expire,
    and does not cordon itself (that would be a drain)."""
    store = EtcdStore(etcd.endpoints)
    store.put(KS.config, TEST_CONFIG.to_json())
    hv = FakeHypervisor(tmp_path, "n1")
    store.put(KS.vm_spec("app"), spec("app").to_json())
    store.put(KS.vm_placement("app"), Placement(id="p3", vm="app", node="n1", kind="boot",
                                                 epoch=1, reason="test",
                                                 decided_at=time.time()).to_json())
    agent = NodeAgent(EtcdStore(etcd.endpoints, retry_budget=0.3, timeout=0.3), hv,
                      AgentOptions(name="n1", poll_interval_s=0.2))
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: hv.list_domains().get("app") and hv.list_domains()["app"].active, 10,
                   what="app booted")
        assert agent.reg is not None
        last_ok = agent.reg.keeper.deadline - TEST_CONFIG.lease_ttl_s + \
            TEST_CONFIG.self_fence_safety_s
        etcd.kill_member(etcd.members[0])
        stopped_at = time.monotonic()
        wait_until(lambda: not hv.list_domains()["app"].active, 5, interval=0.01,
                   what="self-fence")
        fenced_at = time.monotonic()
        # Before the earliest server-side expiry (last acknowledged send + TTL).
        assert fenced_at < last_ok + TEST_CONFIG.lease_ttl_s + 0.4  # keepalive may land later
        assert fenced_at - stopped_at < TEST_CONFIG.lease_ttl_s
        assert agent.flags.fenced and not agent.flags.revoked
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(5)
    etcd.start_member(etcd.members[0])
    etcd.wait_ready()
    assert store.get(KS.cordon("n1")) is None, "etcd loss must not cordon the node"
    store.close()
