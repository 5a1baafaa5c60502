"""etcd member faults with the default timing (issue 11): a cluster that keeps its
quorum never fences a healthy node; one that loses it for longer than the TTL does.

3-member etcd, 3 agents on the fake hypervisor, 2 orchestrators, 6 VMs; the faults
and the counts come from bench.etcd_faults (its ``main`` is the long form).  The cutoff
(every packet of one member dropped) needs each member in a network namespace: that
test runs the bench's ``main`` as root, which makes the namespaces and deletes them.

On both keyspaces (tests/integration/keyspaces.py), but for the keepalive test, which
runs no daemon and writes no key.  The keyspace-2 variant of the faults with quorum runs
one fault of each kind (on a different member each) rather than each kind on each
member: the keepalives those faults test are the same code on both keyspaces, what
keyspace 2 adds is its registration, liveness and status keys under them, and one of
each keeps the suite's time (the keyspace-1 variant takes about 70 s)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.etcd_faults import Rig, events, every_fault, fault_rig, leader_index, outcome
from hypervisor.fake import fake_ground_truth
from lab.etcdnet import netns_usable
from schemas import ClusterConfig
from store.etcd import EtcdStore, StoreUnavailable
from tests.harness import EtcdCluster, wait_until
from tests.integration.keyspaces import KEYSPACES

pytestmark = pytest.mark.integration

# Longer than the lease's TTL (6 s by default): a node whose keepalives waited on the
# stalled or cut member all along would have lost its lease and self-fenced, so the
# test tells failover from luck.  The acceptance's 30 s per member is the long form,
# `make bench-etcd-faults` (results/bench-etcd-faults.json); 8 s keeps the suite short.
STALL_S = 8.0
BLACKHOLE_S = 7.0
# Keyspace 2's faults: each kind once, the per-member kinds each on another member.
ONE_OF_EACH_KIND = ("stall m0", "kill m1", "rolling restart", "blackhole m2", "move-leader")


def faults_for(keyspace: int) -> list[tuple[str, Callable[[Rig], None]]]:
    faults = every_fault(STALL_S, BLACKHOLE_S)
    return faults if keyspace == 1 else [f for f in faults if f[0] in ONE_OF_EACH_KIND]


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


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_member_faults_with_quorum_fence_nothing(tmp_path: Path, keyspace: int) -> None:
    cfg = ClusterConfig()
    faults = faults_for(keyspace)
    assert len(faults) == (len(every_fault(STALL_S)) if keyspace == 1 else 5)
    with fault_rig(cfg, tmp_path, keyspace=keyspace) as rig:
        assert rig.cluster.version == keyspace
        for name, fault in faults:
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
        assert len(rig.log) == len(faults)


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_quorum_lost_longer_than_the_ttl_still_self_fences(tmp_path: Path,
                                                          keyspace: int) -> None:
    cfg = ClusterConfig()
    with fault_rig(cfg, tmp_path, keyspace=keyspace) as rig:
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


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_member_cut_off_by_a_namespace_fences_nothing(tmp_path: Path, keyspace: int) -> None:
    """Issue 11: the raft leader's every packet (to its clients and to its peers) dropped
    for STALL_S (30 s in the bench) by nftables, no RST and no ICMP; the others elect a
    leader, the cut member answers nobody, and no node notices beyond a few failed
    keepalives."""
    why = netns_usable()
    if why is not None:
        pytest.skip(f"the cutoff needs network namespaces: {why}")
    assert shutil.which("nft"), "nft not found: scripts/setup.sh installs nftables"
    out, log = tmp_path / "cutoff.json", tmp_path / "bench.log"
    with open(log, "wb") as sink:
        bench = subprocess.Popen([sys.executable, "-m", "bench.etcd_faults", "--rounds", "1",
                                  "--stall", str(STALL_S), "--faults", "cutoff-leader",
                                  "--keyspace", str(keyspace), "--out", str(out)],
                                 stdout=sink, stderr=subprocess.STDOUT)
        try:
            rc = bench.wait(600)
        except subprocess.TimeoutExpired:
            bench.send_signal(signal.SIGINT)  # it stops its rig and deletes its namespaces
            rc = bench.wait(120)
    text = log.read_text(errors="replace")
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                              check=True).stdout
    assert f"vmha-ef-{bench.pid}-" not in leftover, leftover
    assert rc == 0, text[-4000:]
    got = json.loads(out.read_text())
    assert got["members_in_netns"] is True and got["keyspace"] == keyspace
    [cut] = got["faults"]
    # The cut really cuts: a client of the member gets no answer at all (no refused
    # connection, no EPERM), and the members left elected a leader among themselves.
    assert cut["fault"] == "cutoff" and cut["member"] == cut["leader_before"], cut
    assert cut["probe"] == {"tcp": "timeout", "read": "timeout"}, cut
    assert cut["leader_during"] not in (None, cut["member"]), cut
    assert (got["guard_fires"], got["self_fences"], got["vms_moved"], got["fence_records"],
            got["daemons_exited"]) == (0, 0, [], [], []), got
