"""The source agent ends live migrations it must not finish (issue 12): real etcd, the
fake hypervisor with a copy that never ends by itself, one agent in-process; the target
is a registration this test writes and withdraws."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.common import default_domain_xml
from hypervisor.fake import FakeHypervisor, fake_ground_truth
from nodeagent.agent import AgentOptions, NodeAgent
from schemas import ClusterConfig, Keyspace, NodeRegistration, Placement, VmSpec, VmStatus
from schemas.models import AgentInfo, Capacity
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster, wait_until
from tests.integration.helpers_v2 import KS as KS2
from tests.integration.helpers_v2 import Leader
from tests.integration.keyspaces import KEYSPACES, ClusterView, mark_keyspace

pytestmark = pytest.mark.integration
KS = Keyspace()
STUCK_S = 3600.0  # the fake's copy time: only an abort or post-copy ends it


def _register_target(store: EtcdStore, hv: FakeHypervisor, keyspace: int) -> int:
    """n2's registration (no agent runs there: a migration's target is only read)."""
    lease = store.grant_lease(30)
    reg = NodeRegistration(name="n2", lease_id=f"{lease:x}", libvirt_uri=hv.uri,
                           migration_address="127.0.0.1",
                           capacity=Capacity(memory_mib=4096, vcpus=8),
                           agent=AgentInfo(pid=1, hostname="n2", version="0"),
                           registered_at=time.time())
    store.put(KS.node("n2") if keyspace == 1 else KS2.reg("n2"), reg.to_json(), lease)
    return lease


class Cluster:
    """n1's agent runs `web` with a migrate placement n1 -> n2 (its copy never ends).
    The test plays the leader: on keyspace 1 by its puts of the placement, on keyspace 2
    by the leader's transactions (helpers_v2.Leader: the placement and its
    assignments)."""

    def __init__(self, etcd: EtcdCluster, root: Path, cfg: ClusterConfig,
                 keyspace: int) -> None:
        self.store = EtcdStore(etcd.endpoints)
        self.store.put(KS.config, cfg.to_json())
        mark_keyspace(etcd.endpoints, keyspace)
        self.view = ClusterView(etcd.endpoints)
        self.leader = Leader(self.store) if keyspace == 2 else None
        self.root = root
        self.target = FakeHypervisor(root, "n2")
        self.lease = _register_target(self.store, self.target, keyspace)
        self.hv = FakeHypervisor(root, "n1", migrate_seconds=STUCK_S)
        spec = VmSpec(name="web", domain_xml=default_domain_xml("web", 64, 1), memory_mib=64,
                      vcpus=1)
        self.hv.boot("web", spec.domain_xml)
        if self.leader is None:
            self.store.put(KS.vm_spec("web"), spec.to_json())
        self.place(Placement(id="p2", vm="web", node="n2", kind="migrate", from_node="n1",
                             epoch=1, reason="test: drain", decided_at=time.time()))
        self.agent = NodeAgent(self.store, self.hv, AgentOptions(name="n1", poll_interval_s=0.2))
        self.thread = threading.Thread(target=self.agent.run, daemon=True)

    def place(self, p: Placement) -> None:
        """The leader's decision `p` (on keyspace 2 at the leader's own epoch)."""
        if self.leader is None:
            self.store.put(KS.vm_placement(p.vm), p.to_json())
        else:
            assert p.node is not None
            self.leader.place(p.vm, p.node, p.from_node, pid=p.id)

    def remove(self, vm: str) -> None:
        """`vmha vm remove`, and on keyspace 2 the leader's removal of the placement."""
        if self.leader is None:
            self.store.delete(KS.vm_spec(vm))
        else:
            self.leader.remove(vm)

    def status(self) -> VmStatus | None:
        return self.view.status("web")

    def start_migrating(self) -> None:
        self.thread.start()

        def migrating() -> bool:
            st = self.status()
            return st is not None and (st.node, st.state) == ("n1", "migrating")
        wait_until(migrating, 10, what="the migration started")

    def close(self) -> None:
        self.agent.stopped.set()
        self.agent.wake.set()
        self.thread.join(5)
        self.store.close()
        self.view.close()


@pytest.fixture(params=KEYSPACES)
def make(etcd: EtcdCluster, tmp_path: Path, request: pytest.FixtureRequest
         ) -> Iterator[type[Cluster]]:
    """Every test below runs on keyspace 1 and 2."""
    made: list[Cluster] = []

    class Made(Cluster):
        def __init__(self, cfg: ClusterConfig = TEST_CONFIG) -> None:
            super().__init__(etcd, tmp_path, cfg, request.param)
            made.append(self)

    yield Made
    for c in made:
        c.close()


def _ended_here(c: Cluster) -> VmStatus | None:
    st = c.status()
    return st if st is not None and st.state == "running" and st.failed_target else None


def test_target_registration_gone_aborts_the_job(make: type[Cluster]) -> None:
    """The target loses its registration mid-copy: the source aborts the job at once and
    reports the VM running here with the reason (the leader's signal that it ended)."""
    c = make()
    c.start_migrating()
    c.store.revoke_lease(c.lease)
    wait_until(lambda: _ended_here(c), 10, what="the source reports the job ended")
    st = _ended_here(c)
    assert st is not None and (st.node, st.placement_id, st.failed_target) == ("n1", "p2", "n2")
    assert st.error is not None and st.error.startswith("target n2 lost (no registration): "
                                                        "migration aborted")
    assert fake_ground_truth(c.root) == {"web": ["n1"]}


def test_placement_changed_aborts_the_job(make: type[Cluster]) -> None:
    """The leader no longer wants this move: the job is aborted, the VM stays here."""
    c = make()
    c.start_migrating()
    c.place(Placement(id="p3", vm="web", node="n1", kind="boot", epoch=2,
                      reason="test: stay", decided_at=time.time()))

    def kept() -> bool:
        st = c.status()
        return st is not None and (st.node, st.state, st.placement_id) == ("n1", "running",
                                                                            "p3")
    wait_until(kept, 10, what="the job ended and the VM is reported under the new placement")
    assert fake_ground_truth(c.root) == {"web": ["n1"]}
    assert not (c.root / "n2" / "domains" / "web.json").exists()


def test_removed_vm_aborts_the_job_then_is_destroyed(make: type[Cluster]) -> None:
    c = make()
    c.start_migrating()
    c.remove("web")
    wait_until(lambda: not fake_ground_truth(c.root), 10, what="destroyed here")
    assert not (c.root / "n2" / "domains" / "web.json").exists()


def test_time_limit_aborts_the_job_with_a_clear_status_error(make: type[Cluster]) -> None:
    c = make(TEST_CONFIG.model_copy(update={"migration_timeout_s": 1.0}))
    c.start_migrating()
    wait_until(lambda: _ended_here(c), 10, what="the time limit ends the job")
    st = _ended_here(c)
    assert st is not None and st.failed_target == "n2" and st.error is not None
    assert "(migration_timeout_s=1): migration aborted" in st.error
    assert fake_ground_truth(c.root) == {"web": ["n1"]}


def test_time_limit_switches_to_postcopy_when_allowed(make: type[Cluster]) -> None:
    c = make(TEST_CONFIG.model_copy(update={"migration_timeout_s": 1.0,
                                            "migration_postcopy_on_timeout": True}))
    c.start_migrating()
    wait_until(lambda: fake_ground_truth(c.root).get("web") == ["n2"], 10,
               what="post-copy completes the move")
    assert "web" not in c.hv.list_domains()
