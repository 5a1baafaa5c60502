"""Both of a node's leases revoked by etcd (its stale raft leader, etcd #12528) while
the agent's cycle and its lease keeper find the registration lease gone at the same
time (keyspace 1; real etcd, an in-process agent on the fake hypervisor).

Seen in a fresh run's etcd fault test: the keeper reported the lease revoked, then the
cycle, whose keepalive had been in flight meanwhile, reported it again, and by then
the keeper's deadline no longer counted as valid, so the second report said "expired".
With both flags set the cycle skipped the look at the liveness lease and cordoned the
node for a drain nobody asked for: its VMs were live-migrated away."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from hypervisor.fake import FakeHypervisor
from nodeagent.agent import AgentOptions, NodeAgent
from schemas import Keyspace
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster, wait_until
from tests.integration.keyspaces import mark_keyspace

pytestmark = pytest.mark.integration
KS = Keyspace()


def test_a_revoke_found_by_the_cycle_and_the_keeper_at_once_is_classified(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    mark_keyspace(etcd.endpoints, 1)
    root = EtcdStore(etcd.endpoints)
    store = EtcdStore(etcd.endpoints)
    root.put(KS.config, TEST_CONFIG.to_json())
    agent = NodeAgent(store, FakeHypervisor(tmp_path, "n1"),
                      AgentOptions(name="n1", poll_interval_s=0.2, guard=False))
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        old = wait_until(lambda: agent.reg, 10, what="n1 registered")
        alive = agent.membership.alive.lease_id
        # The order of the run that failed: the cycle's keepalive is answered "gone"
        # first, the keeper reports the lease gone, then the cycle goes on.
        cycle_asked = threading.Event()
        real = store.keepalive_round

        def keepalive_round(ids: Sequence[int], timeout: float | None = None
                            ) -> dict[int, int]:
            ttls = real(ids, timeout)
            if old.lease_id in ids and ttls[old.lease_id] <= 0:
                if threading.current_thread() is t:
                    cycle_asked.set()
                    wait_until(lambda: old.keeper.gone, 5, 0.001, what="the keeper's report")
                else:
                    cycle_asked.wait(5)
            return ttls

        store.keepalive_round = keepalive_round  # type: ignore[method-assign]
        root.revoke_lease(old.lease_id)
        root.revoke_lease(alive)
        new = wait_until(lambda: (r := agent.reg) is not None and r is not old and r, 10,
                         what="n1 registered again")
        assert cycle_asked.is_set(), "the cycle did not find the lease gone itself"
        assert root.get(KS.cordon("n1")) is None, "cordoned: taken for a drain"
        assert not new.cordoned
        assert not agent.membership.flags.fenced
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(10)
        store.close()
        root.close()
