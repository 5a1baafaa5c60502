"""The liveness lease (docs/fencing.md, "Leases revoked by etcd itself"): real etcd, three
agents on the fake hypervisor, two orchestrators.

etcd 3.4.23 (Debian 12) revokes, when a raft leader paused longer than the TTL resumes,
every lease that leader saw expire while it was stopped (etcd #12528, #15247): an agent's
registration lease *and* its liveness lease, milliseconds apart.  That must not drain
the node (an operator revokes the registration lease only, and that still drains:
tests/integration/test_cluster.py::test_lease_revoke_drains_by_live_migration_and_cordons,
tests/integration/test_drains_external.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from fencing.policy import fence_window
from hypervisor.fake import fake_ground_truth
from lab.invariants import DoubleRunChecker, FakeTruth
from schemas import ClusterConfig
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster, FakeCluster, wait_until
from tests.integration.helpers import domain_record, log_events
from tests.integration.keyspaces import KEYSPACES, ClusterView
from tests.integration.test_drains_external import (
    NODES,
    calls,
    external_config,
    registration,
    start_cluster,
)

pytestmark = pytest.mark.integration


def alive_lease(store: ClusterView, node: str) -> int:
    return store.alive_lease(node)


def start(etcd: EtcdCluster, tmp_path: Path, policy: str, keyspace: int = 1
          ) -> tuple[FakeCluster, ClusterConfig, Path | None]:
    cfg, log = (TEST_CONFIG, None) if policy != "external" else external_config(tmp_path)
    return start_cluster(etcd, tmp_path, cfg, keyspace), cfg, log


def busiest(fc: FakeCluster) -> str:
    truth = fake_ground_truth(fc.fake_root)
    return max(NODES, key=lambda n: sum(n in ns for ns in truth.values()))


def boots(fc: FakeCluster) -> dict[str, Any]:
    """Each VM's node and domain record: a move or a reboot changes it."""
    truth = fake_ground_truth(fc.fake_root)
    return {vm: (ns, domain_record(fc.fake_root, ns[0], vm)) for vm, ns in truth.items()}


@pytest.mark.parametrize("keyspace", KEYSPACES)
@pytest.mark.parametrize("policy", ["self", "external"])
def test_both_leases_revoked_by_etcd_is_not_a_drain(etcd: EtcdCluster, tmp_path: Path,
                                                    policy: str, keyspace: int) -> None:
    """Both of a node's leases revoked at once, as the resumed stale leader does: the
    agent registers again uncordoned and keeps its VMs; nothing moves, nothing is
    fenced, no fence device is called."""
    fc, cfg, log = start(etcd, tmp_path, policy, keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        node = busiest(fc)
        before = registration(store, node)
        reg_lease = store.reg_entry(node)
        assert before is not None and reg_lease is not None
        leases = [reg_lease.lease]
        if alive_lease(store, node):
            leases.append(alive_lease(store, node))
        was = boots(fc)
        with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
            # etcd's revocations come milliseconds apart; this test's two RPCs may not
            # (a loaded machine can hold this process longer than the agent's
            # CONFIRM_DELAY_S between them, and the agent then rightly sees a drain).
            # The agent is paused across both, so it finds them gone together.
            agent_pid = fc.agents[node].pid
            os.kill(agent_pid, signal.SIGSTOP)
            try:
                for lease in leases:
                    store.store.revoke_lease(lease)
            finally:
                os.kill(agent_pid, signal.SIGCONT)
            wait_until(lambda: (r := registration(store, node)) is not None
                       and r[0] != before[0], 10, what=f"{node} registered again")
            # Past the revoke grace and the fence window the revoke started.
            time.sleep(cfg.revoke_grace_s + fence_window(cfg) + 1.0)
        assert checker.violations == []
        after = registration(store, node)
        assert after is not None and not after[1].cordoned, "revoked by etcd: not a drain"
        assert not store.cordoned(node)
        assert boots(fc) == was, "no VM moved, stopped or rebooted"
        assert store.fences() == {}
        if log is not None:
            assert calls(log) == []
        new_alive = alive_lease(store, node)
        assert new_alive and new_alive not in leases
        assert store.reg_entry(node).lease not in leases  # type: ignore[union-attr]
        (warn,) = log_events(fc.agents[node], "leases_revoked_by_etcd")
        assert warn["level"] == "warning"
        assert {warn["lease"], warn["liveness_lease"]} == {f"{x:x}" for x in leases}
        assert log_events(fc.agents[node], "cordoned") == []
    finally:
        fc.stop()
        store.close()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_liveness_lease_revoked_alone_is_replaced_no_drain(etcd: EtcdCluster,
                                                          tmp_path: Path,
                                                          keyspace: int) -> None:
    fc, cfg, _ = start(etcd, tmp_path, "self", keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        node = busiest(fc)
        before = registration(store, node)
        old = alive_lease(store, node)
        assert before is not None and old
        was = boots(fc)
        store.store.revoke_lease(old)
        wait_until(lambda: alive_lease(store, node) not in (0, old), 10,
                   what="a new liveness lease")
        time.sleep(fence_window(cfg) + 1.0)
        assert registration(store, node) == before, "the registration is untouched"
        assert not store.cordoned(node)
        assert boots(fc) == was
        assert store.fences() == {}
        (ev,) = log_events(fc.agents[node], "liveness_lease_replaced")
        assert ev["old_lease"] == f"{old:x}"
        assert ev["lease"] == f"{alive_lease(store, node):x}"
    finally:
        fc.stop()
        store.close()
