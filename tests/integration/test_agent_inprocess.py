"""Agent behaviours driven in-process against real etcd and the fake hypervisor.  The
adoption, the clean-up and the self-fence on keyspace 1 and 2; the registration races
on keyspace 1 (keyspace 2's registration is test_agent_v2.py's and
test_liveness_fence_v2.py's)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from hypervisor.fake import FakeHypervisor
from nodeagent.agent import AgentOptions, NodeAgent
from schemas import ClusterConfig, Keyspace, NodeRegistration
from schemas.models import AgentInfo, Capacity
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster, wait_until
from tests.integration.helpers import place_one, spec, start_agent
from tests.integration.keyspaces import KEYSPACES, ClusterView, mark_keyspace, place_boot

pytestmark = pytest.mark.integration
KS = Keyspace()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_agent_start_adopts_running_vm_without_reboot(etcd: EtcdCluster, tmp_path: Path,
                                                      keyspace: int) -> None:
    mark_keyspace(etcd.endpoints, keyspace)
    store = EtcdStore(etcd.endpoints)
    view = ClusterView(etcd.endpoints)
    store.put(KS.config, TEST_CONFIG.to_json())
    hv = FakeHypervisor(tmp_path, "n1")
    hv.boot("web", spec("web").domain_xml)  # already running when the agent starts
    booted_at = (tmp_path / "n1" / "domains" / "web.json").read_text()
    place_boot(store, keyspace, "web", "n1", "p1")
    agent = NodeAgent(store, hv, AgentOptions(name="n1", poll_interval_s=0.2))
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        st = wait_until(lambda: view.status("web"), 10, what="status report")
        assert (st.node, st.state, st.placement_id) == ("n1", "running", "p1")
        time.sleep(0.5)
        # Same domain record: not rebooted.
        assert (tmp_path / "n1" / "domains" / "web.json").read_text() == booted_at
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(5)
        store.close()
        view.close()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_rejoining_node_cleans_up_crashed_domain_never_boots_it(
        etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    mark_keyspace(etcd.endpoints, keyspace)
    store = EtcdStore(etcd.endpoints)
    view = ClusterView(etcd.endpoints)
    store.put(KS.config, TEST_CONFIG.to_json())
    # A domain left defined-but-crashed from before the node died; the VM now lives on n2.
    dead = FakeHypervisor(tmp_path, "n1", host_pid=2 ** 22 + 12345)  # a pid that is not alive
    dead.boot("db", spec("db").domain_xml)
    assert dead.list_domains()["db"].state == "crashed"
    place_boot(store, keyspace, "db", "n2", "p2")  # re-placed after n1's fence
    hv = FakeHypervisor(tmp_path, "n1")
    agent = NodeAgent(store, hv, AgentOptions(name="n1", poll_interval_s=0.2))
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: "db" not in hv.list_domains(), 10, what="left-over undefined")
        assert view.status("db") is None  # never reported as running here
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(5)
        store.close()
        view.close()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_etcd_loss_self_fences_and_is_not_a_drain(etcd: EtcdCluster, tmp_path: Path,
                                                  keyspace: int) -> None:
    """etcd unreachable: the agent destroys its domains before its lease could expire,
    and does not cordon itself (that would be a drain)."""
    mark_keyspace(etcd.endpoints, keyspace)
    store = EtcdStore(etcd.endpoints)
    hv = FakeHypervisor(tmp_path, "n1")
    store.put(KS.config, TEST_CONFIG.to_json())
    place_boot(store, keyspace, "app", "n1", "p3")
    agent, t = start_agent(EtcdStore(etcd.endpoints, retry_budget=0.3, timeout=0.3), hv, "n1")
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
        assert agent.membership.flags.fenced and not agent.membership.flags.revoked
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(5)
    etcd.start_member(etcd.members[0])
    etcd.wait_ready()
    with ClusterView(etcd.endpoints) as view:
        assert not view.cordoned("n1"), "etcd loss must not cordon the node"
    store.close()


class RacingStore(EtcdStore):
    """Real etcd, plus another writer that creates this node's registration right after
    the agent's lease grant (once per `arm()`), and gives it up shortly after: the
    agent's create-if-absent registration then loses a real compare-and-swap race."""

    def __init__(self, endpoints: str | list[str], node: str) -> None:
        super().__init__(endpoints)
        self.node = node
        self.armed = False
        self.raced = threading.Event()

    def arm(self) -> None:
        self.armed = True

    def grant_lease(self, ttl: int) -> int:
        lease = super().grant_lease(ttl)
        if self.armed:
            self.armed = False
            other = super().grant_lease(10)
            reg = NodeRegistration(name=self.node, lease_id=f"{other:x}", libvirt_uri="test://",
                                   migration_address="127.0.0.1",
                                   capacity=Capacity(memory_mib=64, vcpus=1),
                                   agent=AgentInfo(pid=1, hostname="other", version="0"),
                                   registered_at=time.time())
            self.put(KS.node(self.node), reg.to_json(), other)
            threading.Timer(0.1, self.revoke_lease, args=(other,)).start()
            self.raced.set()
        return lease


def test_lost_registration_race_is_not_an_outage(etcd: EtcdCluster, tmp_path: Path) -> None:
    """Another writer creating the registration first is a normal compare-and-swap
    outcome: logged as a lost race (not "etcd unavailable"), then registered again."""
    store = EtcdStore(etcd.endpoints)
    store.put(KS.config, TEST_CONFIG.to_json())
    racing = RacingStore(etcd.endpoints, "n1")
    racing.arm()
    with capture_logs() as logs:
        agent = NodeAgent(racing, FakeHypervisor(tmp_path, "n1"),
                          AgentOptions(name="n1", poll_interval_s=0.2))
        t = threading.Thread(target=agent.run, daemon=True)
        t.start()
        try:
            assert racing.raced.wait(10)
            reg = wait_until(lambda: agent.reg, 10, what="registered after the race")
            kv = store.get(KS.node("n1"))
            assert kv is not None and kv.lease == reg.lease_id
        finally:
            agent.stopped.set()
            agent.wake.set()
            t.join(5)
    events = [e["event"] for e in logs]
    assert "registration_race_lost" in events
    lost = next(e for e in logs if e["event"] == "registration_race_lost")
    assert lost["log_level"] == "info"
    assert "etcd_unavailable" not in events, "a lost race is not an outage"
    racing.close()
    store.close()


def test_old_lease_stops_watching_once_registered_after_a_lost_race(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    """Revoke (drain), and the first re-registration loses a race: the next one must
    retire the old lease's deadline, or it self-fences a node that holds a valid lease."""
    cfg = ClusterConfig(lease_ttl_s=5, keepalive_interval_s=0.5, self_fence_safety_s=0.5,
                        fence_margin_s=1.0, stop_timeout_s=2.0)
    store = EtcdStore(etcd.endpoints)
    place_one(store, cfg, "app", "n1", "p4")
    hv = FakeHypervisor(tmp_path, "n1")
    racing = RacingStore(etcd.endpoints, "n1")
    agent, t = start_agent(racing, hv, "n1")
    try:
        wait_until(lambda: hv.list_domains().get("app") and hv.list_domains()["app"].active, 10,
                   what="app booted")
        first = agent.reg
        assert first is not None
        record = tmp_path / "n1" / "domains" / "app.json"
        booted = record.read_text()
        racing.arm()
        store.revoke_lease(first.lease_id)
        assert racing.raced.wait(10)
        wait_until(lambda: agent.reg is not None and agent.reg.lease_id != first.lease_id, 10,
                   what="registered again")
        # Past the old lease's self-fencing deadline: nothing may have been fenced.
        wait_until(lambda: time.monotonic() > first.keeper.deadline + 1.0, 15,
                   what="old deadline passed")
        # Same domain record: never destroyed (and booted again) by the old deadline.
        assert record.read_text() == booted, "self-fenced on a lease already replaced"
        assert hv.list_domains()["app"].active
        assert agent.reg is not None and agent.reg.keeper.valid()
        assert store.get(KS.cordon("n1")) is not None  # the revoke still drained (cordon)
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(5)
        racing.close()
        store.close()
