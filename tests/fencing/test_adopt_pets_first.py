"""A restarted agent pets the guard service as soon as etcd has renewed its lease, before
the slower parts of adopting the registration (libvirt's host facts, two reads, a
write): on a loaded host those can take longer than what is left of the guard's
timeout, and the guard then destroys every VM of a node whose lease never lapsed.  On
keyspace 1 and 2 (keyspace 2: the previous process left its liveness lease too, and
the new one pets once both are renewed)."""

from __future__ import annotations

import multiprocessing as mp
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fencing.guard_client import SocketGuardClient
from fencing.policy import guard_timeout, self_fence_deadline
from hypervisor.fake import FakeHypervisor, fake_ground_truth
from nodeagent.agent import AgentOptions, NodeAgent
from schemas import Keyspace, NodeRegistration, VmSpec
from schemas.keys_v2 import KeyspaceV2
from schemas.models import AgentInfo, AliveRecord, Capacity
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.fencing.procs import popen
from tests.harness import EtcdCluster, wait_until
from tests.integration.keyspaces import KEYSPACES, ClusterView, mark_keyspace, place_boot

pytestmark = pytest.mark.integration
KS = Keyspace()
XML = "<domain><name>{0}</name></domain>"


class SlowFactsHypervisor(FakeHypervisor):
    """libvirt answering the host-facts calls slowly (a loaded host, a busy libvirtd)."""

    slow_s = 0.0

    def capacity(self) -> tuple[int, int]:
        time.sleep(self.slow_s)
        return super().capacity()


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_adopting_agent_pets_before_the_slow_host_facts(etcd: EtcdCluster, tmp_path: Path,
                                                        keyspace: int) -> None:
    cfg = TEST_CONFIG
    # The new agent runs in a child forked from a clean fork server that has imported
    # this module already: fork() of this process is not safe once it has used gRPC's
    # aio loop (other tests in the worker may have), and a fresh interpreter would spend
    # the timing below on imports.  A first child starts the server before the clock runs.
    procs = mp.get_context("forkserver")
    procs.set_forkserver_preload([__name__])
    warm = procs.Process(target=_nothing)
    warm.start()
    warm.join(60)
    mark_keyspace(etcd.endpoints, keyspace)
    store = EtcdStore(etcd.endpoints)
    view = ClusterView(etcd.endpoints)
    store.put(KS.config, cfg.to_json())
    sock = str(tmp_path / "guard.sock")
    guard = popen([sys.executable, "-m", "fencing.guard", "--socket", sock,
                   "--uri", f"fake://{tmp_path / 'n1'}"], stderr=subprocess.PIPE)
    host_pid = tmp_path / "n1" / "host.pid"
    wait_until(lambda: Path(sock).exists() and host_pid.exists()
               and host_pid.read_text() == str(guard.pid), 10, what="guard up")
    hv = SlowFactsHypervisor(tmp_path, "n1", host_pid=guard.pid)
    hv.boot("vm1", XML.format("vm1"))
    place_boot(store, keyspace, "vm1", "n1", "p1", VmSpec(
        name="vm1", domain_xml=XML.format("vm1"), memory_mib=64, vcpus=1))

    # The previous agent process: its leased registration, and its last pet.
    sent = time.monotonic()
    lease = store.grant_lease(cfg.lease_ttl_s)
    prev = NodeRegistration(name="n1", lease_id=f"{lease:x}", libvirt_uri=hv.uri,
                            migration_address="127.0.0.1",
                            capacity=Capacity(memory_mib=4096, vcpus=8),
                            agent=AgentInfo(hostname=socket.gethostname(), pid=dead_pid(),
                                            version="test"),
                            registered_at=time.time())
    store.put(view.cluster.reg_key("n1"), prev.to_json(), lease=lease)
    if keyspace == 2:  # and its liveness lease (keyspace 1's agent grants a new one)
        alive = store.grant_lease(cfg.lease_ttl_s)
        store.put(KeyspaceV2().alive("n1"), AliveRecord(
            node="n1", lease_id=f"{alive:x}", at=time.time()).to_json(), lease=alive)
    old = SocketGuardClient(sock, "n1")
    old.pet(self_fence_deadline(sent, cfg), guard_timeout(cfg))
    old.close()  # SIGKILLed: the guard stays armed

    # The new process starts 0.4 timeouts after the last pet, and its host facts take
    # 0.7 timeouts: together longer than the guard waits, each alone shorter.  It runs
    # in a child process: a guard that fires SIGKILLs the agents attached to it.
    g = guard_timeout(cfg)
    time.sleep(0.4 * g)
    child = procs.Process(
        target=run_agent, args=(etcd.endpoints, tmp_path, guard.pid, sock, 0.7 * g), daemon=True)
    child.start()
    try:
        def adopted() -> bool:
            kv = store.get(view.cluster.reg_key("n1"))
            return kv is not None and NodeRegistration.from_json(kv.value).agent.pid == child.pid

        wait_until(lambda: adopted() or not child.is_alive(), 15, what="registration adopted")
        time.sleep(g)  # the old pet's timeout is long past
        assert guard.poll() is None, "the guard fired while the lease was renewed"
        assert child.is_alive() and adopted()
        assert fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
    finally:
        child.kill()
        child.join(5)
        if guard.poll() is None:
            guard.kill()
            guard.wait(5)
        store.close()
        view.close()


def _nothing() -> None:
    pass


def run_agent(endpoints: str, root: Path, host_pid: int, sock: str, slow_s: float) -> None:
    hv = SlowFactsHypervisor(root, "n1", host_pid=host_pid)
    hv.slow_s = slow_s
    agent = NodeAgent(EtcdStore(endpoints), hv, AgentOptions(name="n1", poll_interval_s=0.2,
                                                             guard=True, guard_socket=sock))
    agent.run()
