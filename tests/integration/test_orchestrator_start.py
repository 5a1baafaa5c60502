"""An orchestrator started while etcd does not answer waits for it; it never exits.
Found by the etcd member-fault bench: its first config write ran outside the loop's
retries, and one stalled member at start-up ended the daemon.  On keyspace 1 and 2 (the
orchestrator of the keyspace the marker names, as `vmha-orchestrator` starts it)."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from orchestrator.leader import Orchestrator
from orchestrator.leader_v2 import OrchestratorV2
from store.etcd import EtcdStore
from tests.harness import EtcdCluster, wait_until
from tests.integration.keyspaces import KEYSPACES, mark_keyspace

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_orchestrator_started_while_etcd_is_stalled_waits_and_leads(etcd: EtcdCluster,
                                                                    keyspace: int) -> None:
    mark_keyspace(etcd.endpoints, keyspace)
    member = etcd.members[0]
    assert member.proc is not None
    member.proc.send_signal(signal.SIGSTOP)
    store = EtcdStore(etcd.endpoints, retry_budget=0.3, timeout=0.3)
    orch = (OrchestratorV2 if keyspace == 2 else Orchestrator)(store, ident="o1",
                                                               poll_interval_s=0.2)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(orch.run()), daemon=True)
    try:
        t.start()
        time.sleep(2.0)  # several failed attempts
        assert t.is_alive(), "the orchestrator exited while etcd did not answer"
        member.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: orch.epoch is not None, 20, what="the orchestrator leads")
    finally:
        member.proc.send_signal(signal.SIGCONT)
        orch.stopped.set()
        orch.wake.set()
        t.join(10)
        store.close()
