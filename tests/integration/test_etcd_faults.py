"""etcd member faults with the default timing (issue 11): a cluster that keeps its
quorum never fences a healthy node; one that loses it for longer than the TTL does.

3-member etcd, 3 agents on the fake hypervisor, 2 orchestrators, 6 VMs; the faults
and the counts come from bench.etcd_faults (its ``main`` is the long form)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from bench.etcd_faults import events, every_fault, fault_rig, leader_index, outcome
from hypervisor.fake import fake_ground_truth
from schemas import ClusterConfig
from store.etcd import EtcdStore, StoreUnavailable
from tests.harness import EtcdCluster, wait_until

pytestmark = pytest.mark.integration

# The acceptance's 30 s per stalled member; a dropped link is the same hang to a client,
# so 10 s of it per member keeps the test short.
STALL_S = 30.0
BLACKHOLE_S = 10.0


def test_keepalive_leaves_a_stalled_member_at_once(etcd3: EtcdCluster) -> None:
    follower = etcd3.members[(leader_index(etcd3) + 1) % 3]
    assert follower.proc is not None
    granter = EtcdStore(etcd3.endpoints)
    lease = granter.grant_lease(30)
    follower.proc.send_signal(signal.SIGSTOP)
    try:
        # Each store starts its keepalives at a random member: take one that starts at
        # the stalled one (its first keepalive times out).
        for _ in range(30):
            store = EtcdStore(etcd3.endpoints)
            try:
                store.keepalive(lease, timeout=0.3)
            except StoreUnavailable as exc:
                assert "DEADLINE_EXCEEDED" in str(exc) and follower.endpoint in str(exc), exc
                break
            store.close()
        else:
            pytest.fail("no store started its keepalives at the stalled member")
        try:
            # Every later keepalive goes to another member and is answered.
            assert [store.keepalive(lease, timeout=0.3) > 0 for _ in range(5)] == [True] * 5
        finally:
            store.close()
    finally:
        follower.proc.send_signal(signal.SIGCONT)
        granter.close()


def test_member_faults_with_quorum_fence_nothing(tmp_path: Path) -> None:
    cfg = ClusterConfig()
    with fault_rig(cfg, tmp_path) as rig:
        for name, fault in every_fault(STALL_S, BLACKHOLE_S):
            fault(rig)
            got = outcome(rig)
            assert got["guard_fires"] == 0, (name, got)
            assert got["self_fences"] == 0, (name, got)
            assert got["vms_moved"] == [], (name, got)
            assert got["fence_records"] == [], (name, got)
            assert got["daemons_exited"] == [], (name, got)
        time.sleep(cfg.lease_ttl_s)  # a late consequence of the last fault shows by now
        got = outcome(rig)
        assert (got["guard_fires"], got["self_fences"], got["vms_moved"], got["fence_records"],
                got["daemons_exited"]) == (0, 0, [], [], []), got
        assert len(rig.log) == len(every_fault(STALL_S))


def test_quorum_lost_longer_than_the_ttl_still_self_fences(tmp_path: Path) -> None:
    cfg = ClusterConfig()
    with fault_rig(cfg, tmp_path) as rig:
        stopped = rig.etcd.members[1:]
        for m in stopped:
            assert m.proc is not None
            m.proc.send_signal(signal.SIGSTOP)
        try:
            # Every node loses its lease's renewals: each destroys its own VMs (the
            # agent at its deadline, or its guard first) without waiting for etcd.
            wait_until(lambda: not fake_ground_truth(rig.fc.fake_root),
                       cfg.lease_ttl_s + 10, 0.1, "every VM destroyed by its own node")
            wait_until(lambda: all(events(d.log_text(), "self_fence_deadline", "guard_fired")
                                   for d in rig.fc.agents.values()),
                       cfg.lease_ttl_s + 10, 0.1, "every node past its self-fence deadline")
        finally:
            for m in stopped:
                assert m.proc is not None
                m.proc.send_signal(signal.SIGCONT)
