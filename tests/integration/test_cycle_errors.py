"""A programming error in a daemon's cycle is logged with the revision and traceback and
the cycle is retried with backoff; the daemon never exits for it, and its lease keeps
being renewed meanwhile (issue 11).  On keyspace 1 and 2."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cli.common import default_domain_xml
from hypervisor.fake import FakeHypervisor
from nodeagent.agent import AgentOptions, NodeAgent
from orchestrator.leader import Orchestrator
from orchestrator.leader_v2 import OrchestratorV2
from schemas import Keyspace, Placement, VmSpec
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster, wait_until
from tests.integration.helpers_v2 import Leader
from tests.integration.keyspaces import KEYSPACES, ClusterView, mark_keyspace

pytestmark = pytest.mark.integration
KS = Keyspace()
FAILURES = 3


class Flaky:
    """Raises a bug-like exception on the first FAILURES calls, then calls `real`."""

    def __init__(self, real: Any, exc: Exception) -> None:
        self.real, self.exc, self.calls = real, exc, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls <= FAILURES:
            raise self.exc
        return self.real(*args, **kwargs)


def _close(store: EtcdStore) -> None:
    """Close the store once no lease keeper thread can use it any more."""
    wait_until(lambda: not [th for th in threading.enumerate()
                            if th.name.endswith(("-keepalive", "-deadline")) and th.is_alive()],
               10, what="keeper threads ended")
    store.close()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_agent_survives_a_bug_in_its_cycle(etcd: EtcdCluster, tmp_path: Path,
                                           keyspace: int) -> None:
    mark_keyspace(etcd.endpoints, keyspace)
    store = EtcdStore(etcd.endpoints)
    view = ClusterView(etcd.endpoints)
    store.put(KS.config, TEST_CONFIG.to_json())
    if keyspace == 2:  # the leader's placement of web on n1 (its spec added first)
        Leader(store).place("web", "n1", pid="p1")
    else:
        xml = default_domain_xml("web", 64, 1)
        store.put(KS.vm_spec("web"), VmSpec(name="web", domain_xml=xml, memory_mib=64,
                                            vcpus=1).to_json())
        store.put(KS.vm_placement("web"), Placement(id="p1", vm="web", node="n1", kind="boot",
                                                     epoch=1, reason="test",
                                                     decided_at=time.time()).to_json())
    hv = FakeHypervisor(tmp_path, "n1")
    with capture_logs() as logs:
        agent = NodeAgent(store, hv, AgentOptions(name="n1", poll_interval_s=0.2))
        flaky = Flaky(agent.execution.reconcile, TypeError("a bug"))
        agent.execution.reconcile = flaky  # type: ignore[method-assign]
        t = threading.Thread(target=agent.run, daemon=True)
        t.start()
        try:
            wait_until(lambda: flaky.calls > FAILURES, 30, what="the cycle retried")
            wait_until(lambda: "web" in hv.list_domains(), 10, what="web booted after the bug")
            assert t.is_alive()
            reg = agent.reg
            assert reg is not None and reg.keeper.valid()
            assert view.registered("n1")
        finally:
            agent.stopped.set()
            agent.wake.set()
            t.join(10)
            view.close()
            _close(store)
    failed = [e for e in logs if e["event"] == "cycle_failed"]
    assert len(failed) == FAILURES
    assert all(e["revision"] > 0 and e.get("exc_info") for e in failed)
    assert [e["failures"] for e in failed] == [1, 2, 3]
    assert all(0 < e["retry_in_s"] <= 10 for e in failed)


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_orchestrator_survives_a_bug_in_its_cycle(etcd: EtcdCluster, keyspace: int) -> None:
    mark_keyspace(etcd.endpoints, keyspace)
    store = EtcdStore(etcd.endpoints)
    store.put(KS.config, TEST_CONFIG.to_json())
    with capture_logs() as logs:
        orch = (OrchestratorV2 if keyspace == 2 else Orchestrator)(store, ident="a",
                                                                   poll_interval_s=0.2)
        flaky = Flaky(orch.cycle, RuntimeError("a bug"))
        orch.cycle = flaky  # type: ignore[method-assign]
        t = threading.Thread(target=orch.run, daemon=True)
        t.start()
        try:
            wait_until(lambda: flaky.calls > FAILURES + 1, 30, what="the cycle retried")
            assert t.is_alive()
            assert orch.is_leader, "the lease was renewed while the cycle failed"
            kv = store.get(KS.leader)
            assert kv is not None and json.loads(kv.value)["id"] == "a"
        finally:
            orch.stopped.set()
            orch.wake.set()
            t.join(10)
            orch.step_down("test over")  # stops the keeper (run() leaves that to exit)
            _close(store)
    failed = [e for e in logs if e["event"] == "cycle_failed"]
    assert len(failed) == FAILURES
    assert all(e.get("exc_info") and e["epoch"] for e in failed)
