"""The node agent on keyspace 2, in-process on the fake hypervisor and real etcd, chosen
by the marker `/vmha/version` (docs/keyspace-v2.md, part 4).  The leader is played by
the test with the orchestrator's writes of schemas.writes_v2.

Boot on an assignment and stop on its removal (the own status then cleaned up), a stale
claim of an earlier registration rewritten and cleaned up, a drain by lease revoke, a
restarted agent keeping its VMs, and another node's churn costing this agent no read."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from hypervisor.fake import FakeHypervisor
from nodeagent.agent import AgentOptions, NodeAgent
from nodeagent.view_v2 import NodeWatch
from schemas.errors import ConfigError
from schemas.keys import Keyspace
from schemas.models import NodeRegistration, VmStatus
from store.etcd import EtcdStore
from store.paging import KeyRange
from store.watchmodel import Change
from tests.authetcd import TlsEtcd
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster, FakeCluster, wait_until
from tests.integration.helpers import active, domain_record, log_events, start_agent
from tests.integration.helpers_v2 import KS, Leader, mark_keyspace_2, ranges_served, spec
from tests.unit.builders import node_value

pytestmark = pytest.mark.integration


def stop(agent: NodeAgent, t: threading.Thread) -> None:
    agent.stopped.set()
    agent.wake.set()
    t.join(10)


def status(store: EtcdStore, node: str, vm: str) -> VmStatus | None:
    kv = store.get(KS.status(node, vm))
    return VmStatus.from_json(kv.value) if kv is not None else None


def running(store: EtcdStore, node: str, vm: str, pid: str) -> bool:
    s = status(store, node, vm)
    return s is not None and (s.state, s.placement_id) == ("running", pid)


def test_a_migration_under_way_keeps_the_agent_unregistered(etcd: EtcdCluster,
                                                            tmp_path: Path) -> None:
    """The marker says `migrating`: the agent picks no keyspace, registers in none and
    touches no domain; once it says `done` it runs on keyspace 2."""
    store = EtcdStore(etcd.endpoints)
    store.put(KS.config, TEST_CONFIG.to_json())
    mark_keyspace_2(store, state="migrating")
    hv = FakeHypervisor(tmp_path, "n1")
    hv.boot("web", spec("web").domain_xml)
    agent, t = start_agent(store, hv, "n1")
    try:
        time.sleep(1.0)  # five of its cycles (poll 0.2 s)
        assert not agent.keyspace_known and agent.reg is None
        assert store.get(KS.reg("n1")) is None and store.get(Keyspace().node("n1")) is None
        assert active(hv) == ["web"]
        mark_keyspace_2(store)
        wait_until(lambda: store.get(KS.reg("n1")) is not None, 10, what="registered on v2")
        assert agent.ctx.keyspace == 2
    finally:
        stop(agent, t)
        store.close()


@pytest.mark.parametrize("keyspace", [1, 2])
def test_config_read_and_refused_on_either_keyspace(etcd: EtcdCluster, tmp_path: Path,
                                                    keyspace: int) -> None:
    store = EtcdStore(etcd.endpoints)
    try:
        if keyspace == 2:
            mark_keyspace_2(store)
        store.put(KS.config, TEST_CONFIG.to_json())
        agent = NodeAgent(store, FakeHypervisor(tmp_path, "n1"), AgentOptions(name="n1"))
        assert agent.load_config() == TEST_CONFIG and agent.ctx.keyspace == keyspace
        store.put(KS.config, '{"schema": 1, "lease_ttl_s": "soon"}')
        with pytest.raises(ConfigError, match="refusing to start"):
            agent.load_config()
    finally:
        store.close()


def test_boot_on_assignment_stop_on_removal(v2store: EtcdStore, tmp_path: Path) -> None:
    store = v2store
    # What an earlier registration of n1 left: a claim no domain backs.
    store.put(KS.status("n1", "old"), VmStatus(vm="old", node="n1", state="running",
                                               since=1.0).to_json())
    leader = Leader(store)
    hv = FakeHypervisor(tmp_path, "n1")
    agent, t = start_agent(store, hv, "n1")
    try:
        leader.place("web", "n1")
        wait_until(lambda: running(store, "n1", "web", "p1"), 15, what="web reported running")
        assert active(hv) == ["web"] and agent.ctx.keyspace == 2
        reg = store.get(KS.reg("n1"))
        assert reg is not None and status(store, "n1", "web").registration == reg.create_revision  # type: ignore[union-attr]
        # The stale claim: rewritten before registering, then cleaned up (no assignment,
        # no domain).
        wait_until(lambda: store.get(KS.status("n1", "old")) is None, 10, what="clean-up")
        assert any(e.key.startswith(KS.node_history("n1")) for e in store.get_prefix(KS.history))
        v1 = Keyspace()
        assert not store.get_prefix(v1.prefix + "/vms/"), "nothing written in keyspace 1"
        assert not store.get_prefix(v1.prefix + "/nodes/")
        # The leader places web elsewhere: n1's assignment goes, the domain is destroyed
        # and undefined, and n1's own status of it deleted.
        leader.place("web", "n2")
        wait_until(lambda: "web" not in hv.list_domains()
                   and store.get(KS.status("n1", "web")) is None, 15, what="web gone from n1")
    finally:
        stop(agent, t)


def test_live_migration_hand_off(v2store: EtcdStore, tmp_path: Path) -> None:
    """n1 -> n2 with both agents on keyspace 2: each sees the other only through the
    assignment naming it; the target's arrival is compared on the source's status."""
    store = v2store
    leader = Leader(store)
    hv1, hv2 = FakeHypervisor(tmp_path, "n1"), FakeHypervisor(tmp_path, "n2")
    a1, t1 = start_agent(store, hv1, "n1")
    a2, t2 = start_agent(store, hv2, "n2")
    try:
        leader.place("web", "n1")
        wait_until(lambda: running(store, "n1", "web", "p1"), 15, what="web on n1")
        wait_until(lambda: a2.reg is not None, 10, what="n2 registered")
        leader.place("web", "n2", from_node="n1")
        wait_until(lambda: running(store, "n2", "web", "p2"), 20, what="web arrived on n2")
        assert active(hv1) == [] and active(hv2) == ["web"]
        arrived = status(store, "n2", "web")
        assert arrived is not None and arrived.migration is not None
        assert arrived.migration.source == "n1"
        # The leader settles the placement: n1's assignment goes, and n1 deletes its
        # own (superseded) status of web.
        leader.place("web", "n2")
        wait_until(lambda: store.get(KS.status("n1", "web")) is None, 15,
                   what="n1's status cleaned up")
        wait_until(lambda: running(store, "n2", "web", "p3"), 10, what="n2 reports p3")
        assert active(hv2) == ["web"]
        assert a1.v2 is not None and a1.v2.watch.peers == frozenset()
    finally:
        stop(a1, t1)
        stop(a2, t2)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_agent_with_node_credentials(etcd_auth: TlsEtcd, tmp_path: Path) -> None:
    """With etcd auth on, n1's agent runs on n1's certificate alone: every read and
    write it makes is its role's, and nothing of n2's changes."""
    etcd_auth.root.put(KS.config, TEST_CONFIG.to_json())
    n2_reg = etcd_auth.root.put(KS.reg("n2"), json.dumps(node_value("n2")))
    leader = Leader(etcd_auth.store("orchestrator"), operator=etcd_auth.store("operator"))
    hv = FakeHypervisor(tmp_path, "n1")
    agent, t = start_agent(etcd_auth.store("node-n1"), hv, "n1")
    try:
        leader.place("web", "n1")
        wait_until(lambda: running(etcd_auth.root, "n1", "web", "p1"), 15, what="web running")
        leader.place("db", "n1", from_node="n2")  # n1 reads n2's keys as its peer's
        wait_until(lambda: agent.v2 is not None and len(agent.v2.watch.peers) == 2, 10,
                   what="n2 watched as a peer")
        assert agent.ctx.keyspace == 2 and active(hv) == ["web"]
        # A VM relocated here after n2 gave up on it: n1 reads n2's status of it too.
        leader.place("app", "n1", failed_nodes=("n2",))
        wait_until(lambda: running(etcd_auth.root, "n1", "app", f"p{leader.n}"), 15,
                   what="app running")
        assert agent.v2 is not None and KeyRange.key(KS.status("n2", "app")) in agent.v2.watch.peers
        assert etcd_auth.root.get(KS.reg("n2")).mod_revision == n2_reg  # type: ignore[union-attr]
        assert etcd_auth.root.get_prefix(KS.node_history("n1")), "history under its prefix"
    finally:
        stop(agent, t)


def test_the_status_a_node_gave_up_with_stays_while_the_placement_names_it(
        v2store: EtcdStore, tmp_path: Path) -> None:
    """n1 gives up on a VM whose domain XML its hypervisor refuses.  Its status (the
    error, boot_failures) stays while the placement names n1 in failed_nodes, `failed`
    or relocated, as keyspace 1's one status key did (docs/keyspace.md, "Failures on
    keyspace 2"); n1 watches that placement key, and once the VM is removed its status
    is cleaned up and the key no longer watched."""
    store = v2store
    store.put(KS.config, TEST_CONFIG.model_copy(update={
        "max_boot_failures_per_node": 2, "failure_backoff_initial_s": 0.2,
        "failure_backoff_max_s": 0.4}).to_json())
    bad = spec("bad").model_copy(update={"domain_xml": spec("bad").domain_xml.replace(
        "<domain type='qemu'>", "<domain type='bogus'>")})
    leader = Leader(store)
    agent, t = start_agent(store, FakeHypervisor(tmp_path, "n1"), "n1")
    place = KeyRange.key(KS.place("bad"))
    try:
        leader.place("bad", "n1", vm_spec=bad)
        wait_until(lambda: (s := status(store, "n1", "bad")) is not None
                   and s.boot_failures == 2, 15, what="n1 gave up on bad")
        leader.place("bad", None, failed_nodes=("n1",), vm_spec=bad)  # the assignment goes
        time.sleep(1.0)  # five clean-up passes (poll 0.2 s)
        kept = status(store, "n1", "bad")
        assert kept is not None and kept.boot_failures == 2 and "bogus" in (kept.error or "")
        assert agent.v2 is not None and agent.v2.watch.peers == {place}
        leader.place("bad", "n2", failed_nodes=("n1",), vm_spec=bad)  # relocated
        time.sleep(1.0)
        assert status(store, "n1", "bad") == kept
        leader.remove("bad")
        wait_until(lambda: store.get(KS.status("n1", "bad")) is None, 10,
                   what="n1's status cleaned up")
        wait_until(lambda: agent.v2 is not None and agent.v2.watch.peers == frozenset(), 10,
                   what="the placement no longer watched")
    finally:
        stop(agent, t)


def test_drain_by_lease_revoke(v2store: EtcdStore, tmp_path: Path) -> None:
    store = v2store
    leader = Leader(store)
    hv = FakeHypervisor(tmp_path, "n1")
    agent, t = start_agent(store, hv, "n1")
    try:
        leader.place("web", "n1")
        wait_until(lambda: running(store, "n1", "web", "p1"), 15, what="web running")
        reg = agent.reg
        assert reg is not None
        store.revoke_lease(reg.lease_id)  # an operator's drain (etcdctl lease revoke)

        def drained() -> bool:
            kv = store.get(KS.reg("n1"))
            return (kv is not None and kv.create_revision != reg.create_revision
                    and NodeRegistration.from_json(kv.value).cordoned
                    and store.get(KS.cordon("n1")) is not None)
        wait_until(drained, 15, what="cordoned and registered again")
        assert active(hv) == ["web"], "a drain kills nothing: the leader moves the VMs"
        assert running(store, "n1", "web", "p1")
    finally:
        stop(agent, t)


def test_restarted_agent_keeps_its_vms(v2store: EtcdStore, tmp_path: Path) -> None:
    store = v2store
    leader = Leader(store)
    hv = FakeHypervisor(tmp_path, "n1")
    agent, t = start_agent(store, hv, "n1")
    leader.place("web", "n1")
    try:
        wait_until(lambda: running(store, "n1", "web", "p1"), 15, what="web running")
    finally:
        stop(agent, t)
    record = (tmp_path / "n1" / "domains" / "web.json").read_text()
    # A new agent process (here: a new agent) registers once the old lease expired; the
    # running claim is true (the domain is active), so it is kept, not rewritten.
    agent, t = start_agent(store, FakeHypervisor(tmp_path, "n1"), "n1")
    try:
        wait_until(lambda: agent.reg is not None, 30, what="registered again")
        time.sleep(0.5)  # a few cycles on the new registration
        assert running(store, "n1", "web", "p1")
        assert (tmp_path / "n1" / "domains" / "web.json").read_text() == record, "not rebooted"
    finally:
        stop(agent, t)


def test_a_resync_checks_then_lists_again_only_if_the_view_differs(
        v2store: EtcdStore, tmp_path: Path) -> None:
    """Every RESYNC_S the agent checks its watch with a keys-only listing; a view that
    holds what etcd does is not listed again (no domain XML sent again), one that
    differs is, and neither changes anything."""
    store = v2store
    hv = FakeHypervisor(tmp_path, "n1")
    agent, t = start_agent(store, hv, "n1")
    try:
        Leader(store).place("web", "n1")
        wait_until(lambda: running(store, "n1", "web", "p1"), 15, what="web running")
        assert agent.v2 is not None
        state = agent.v2.watch.state
        lists, status_mod = state.stats["lists"], store.get(KS.status("n1", "web")).mod_revision  # type: ignore[union-attr]
        booted = (tmp_path / "n1" / "domains" / "web.json").read_text()
        checks = agent.v2.checks
        agent.v2.next_resync = 0.0  # due now
        agent.wake.set()
        wait_until(lambda: agent.v2.checks == checks + 1, 10, what="checked")  # type: ignore[union-attr]
        time.sleep(0.5)
        assert state.stats["lists"] == lists, "the view held what etcd does: no listing"
        # The view loses a key, as a watch that missed an event would.
        with state._lock:
            del state._kvs[KS.assignment("n1", "web").encode()]
        agent.v2.next_resync = 0.0
        agent.wake.set()
        wait_until(lambda: state.stats["lists"] == lists + 1, 10, what="listed again")
        time.sleep(0.5)  # cycles on the new listing
        assert store.get(KS.status("n1", "web")).mod_revision == status_mod  # type: ignore[union-attr]
        assert (tmp_path / "n1" / "domains" / "web.json").read_text() == booted
        assert agent.v2.next_resync > 0
    finally:
        stop(agent, t)


def test_another_nodes_churn_costs_no_read(etcd: EtcdCluster, v2store: EtcdStore,
                                           tmp_path: Path) -> None:
    store = v2store
    leader = Leader(store)
    hv = FakeHypervisor(tmp_path, "n1")
    agent, t = start_agent(store, hv, "n1")
    try:
        leader.place("web", "n1")
        wait_until(lambda: running(store, "n1", "web", "p1"), 15, what="web running")
        assert agent.v2 is not None
        state = agent.v2.watch.state
        # The agent's own status write comes back on its watch: counted before the churn.
        own = store.get(KS.status("n1", "web"))
        assert own is not None
        wait_until(lambda: state.revision >= own.mod_revision, 10, what="n1's watch caught up")
        stats = state.stats
        events, reads = stats["events"], ranges_served(etcd)
        for i in range(20):
            leader.place_new(f"other{i}", "n2")
            store.put(KS.status("n2", f"other{i}"), VmStatus(
                vm=f"other{i}", node="n2", state="running", since=time.time()).to_json())
        time.sleep(1.0)  # five of the agent's cycles (poll 0.2 s) meanwhile
        assert stats["events"] == events, "no event of n2's reached n1"
        assert ranges_served(etcd) == reads, "n1 read nothing meanwhile"
        assert running(store, "n1", "web", "p1")
    finally:
        stop(agent, t)


def test_agent_process_sigkilled_and_restarted_adopts_its_registration(
        etcd: EtcdCluster, v2store: EtcdStore, tmp_path: Path) -> None:
    """`vmha agent` processes with the guard service, as systemd runs them: killed and
    started again within the TTL, the agent takes over its registration and both leases
    on keyspace 2 (the same code as keyspace 1's on the v2 keys); the VM is not rebooted."""
    store = v2store
    fc = FakeCluster(etcd, tmp_path)
    fc.guard_service = True
    try:
        fc.start_agent("n1")
        Leader(store).place("web", "n1")
        wait_until(lambda: running(store, "n1", "web", "p1"), 30, what="web running")
        reg, alive = store.get(KS.reg("n1")), store.get(KS.alive("n1"))
        assert reg is not None and alive is not None
        booted = domain_record(fc.fake_root, "n1", "web")
        fc.agents["n1"].kill()
        fc.start_agent("n1")
        wait_until(lambda: log_events(fc.agents["n1"], "registration_adopted"), 30,
                   what="registration adopted")
        now_reg, now_alive = store.get(KS.reg("n1")), store.get(KS.alive("n1"))
        assert now_reg is not None and now_alive is not None
        assert (now_reg.create_revision, now_reg.lease) == (reg.create_revision, reg.lease)
        assert now_alive.lease == alive.lease
        assert NodeRegistration.from_json(now_reg.value).agent.pid == fc.agents["n1"].pid
        assert domain_record(fc.fake_root, "n1", "web") == booted, "not rebooted"
        assert running(store, "n1", "web", "p1")
        assert log_events(fc.agents["n1"], "keyspace")[0]["version"] == 2
    finally:
        fc.stop()



def test_the_view_thread_waits_for_a_change_without_a_timeout(v2store: EtcdStore) -> None:
    """The thread waking the agent on its watch's changes sleeps until a change or
    close(): a wait with a timeout would wake it every second for nothing."""
    store = v2store
    watch = NodeWatch(store, KS, "n1")
    calls: list[float | None] = []
    wait = watch.state.wait

    def counted(timeout: float | None) -> list[Change]:
        calls.append(timeout)
        return wait(timeout)

    watch.state.wait = counted  # type: ignore[method-assign]
    wake, stopped = threading.Event(), threading.Event()
    watch.start()
    pump = threading.Thread(target=watch.pump, args=(wake, stopped), daemon=True)
    pump.start()
    try:
        time.sleep(2.5)
        assert len(calls) == 1, f"{len(calls)} waits in 2.5 s while nothing changed"
        store.put(KS.cordon("n1"), "{}")
        assert wake.wait(5), "a change of its keys woke the agent"
    finally:
        watch.close()
    pump.join(5)
    assert not pump.is_alive(), "close() ended the view thread's wait"
