"""The integration tests on both keyspaces (docs/keyspace-v2.md, section 7, part 4: "every
test that held on keyspace 1 holds on keyspace 2").

`keyspace` is a parameter of the cluster a test starts: 2 writes the marker
`/vmha/version` (keyspace 2, done) before any daemon starts, so agents, orchestrators and
`vmha` commands all run on keyspace 2.  The tests read the cluster's state through
`ClusterView`: the `ClusterSnapshot` of `cli.cluster` (`Cluster` or `ClusterV2`, chosen by
the marker as every `vmha` command chooses), so no test spells a key of either keyspace.
The keyspace-2 variants carry the `keyspace2` marker (`-m keyspace2` runs only them,
`-m "not keyspace2"` the suite as before)."""

from __future__ import annotations

import time
import weakref
from typing import Any

import pytest

from cli.cluster import Cluster, keyspace_of
from schemas.keys_v2 import KeyspaceV2
from schemas.models import (
    FenceRecord,
    LeaderRecord,
    NodeRegistration,
    Placement,
    VmSpec,
    VmStatus,
)
from schemas.snapshot import ClusterSnapshot, Entry
from store.etcd import EtcdStore
from tests.integration.helpers_v2 import Leader, mark_keyspace_2

#: `pytest.mark.parametrize("keyspace", KEYSPACES)`: a test on keyspace 1 and 2.
KEYSPACES = [pytest.param(1, id="ks1"), pytest.param(2, id="ks2", marks=pytest.mark.keyspace2)]


def keyspaces_failing_on_2(defect: str) -> list[Any]:
    """KEYSPACES for a test that finds a defect of keyspace 2 (`defect` says which): its
    keyspace-2 variant must fail (strict xfail) until the defect is fixed.  Such a test
    makes the defect's assertion last, so everything before it holds on keyspace 2."""
    return [KEYSPACES[0], pytest.param(2, id="ks2", marks=[
        pytest.mark.keyspace2, pytest.mark.xfail(strict=True, reason=defect)])]


def mark_keyspace(endpoints: str, keyspace: int) -> None:
    """Keyspace 2's marker (as `vmha keyspace migrate` leaves it) when `keyspace` is 2:
    call before any daemon starts.  Keyspace 1 is the absence of the marker."""
    if keyspace == 1:
        return
    store = EtcdStore(endpoints)
    try:
        mark_keyspace_2(store)
    finally:
        store.close()


_LEADERS: weakref.WeakKeyDictionary[EtcdStore, Leader] = weakref.WeakKeyDictionary()


def place_boot(store: EtcdStore, keyspace: int, vm: str, node: str, pid: str,
               vm_spec: VmSpec | None = None) -> None:
    """`vm`'s spec (`vm_spec`; default 64 MiB, 1 vCPU) and a boot placement `pid` of it
    on `node`, written as the leader of `keyspace` writes them: for the in-process agent
    tests, where the test plays the leader (no orchestrator runs)."""
    if keyspace == 2:
        # One term per store: a second Leader's put of the leader key would end the
        # first one's (the epoch is the key's create revision).
        leader = _LEADERS.get(store)
        if leader is None:
            leader = _LEADERS[store] = Leader(store)
        leader.place(vm, node, pid=pid, vm_spec=vm_spec)
        return
    from tests.integration.helpers import KS, spec

    store.put(KS.vm_spec(vm), (vm_spec or spec(vm)).to_json())
    store.put(KS.vm_placement(vm), Placement(id=pid, vm=vm, node=node, kind="boot", epoch=1,
                                             reason="test", decided_at=time.time()).to_json())


class ClusterView:
    """The cluster's state as the `vmha` commands read it, on either keyspace."""

    def __init__(self, endpoints: str) -> None:
        self.store = EtcdStore(endpoints)
        self._cluster: Cluster | None = None

    def __enter__(self) -> ClusterView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    @property
    def cluster(self) -> Cluster:
        """The keyspace the marker names, read once (tests never migrate mid-way)."""
        if self._cluster is None:
            key = KeyspaceV2(self.store.keyspace.prefix).version
            if keyspace_of(self.store.get(key), key) == 1:
                self._cluster = Cluster(self.store)
            else:
                from cli.cluster_v2 import ClusterV2

                self._cluster = ClusterV2(self.store)
        return self._cluster

    @property
    def keyspace(self) -> int:
        return self.cluster.version

    def snapshot(self) -> ClusterSnapshot:
        return self.cluster.snapshot()

    def reg_entry(self, node: str) -> Entry[NodeRegistration] | None:
        return self.snapshot().nodes.get(node)

    def reg(self, node: str) -> NodeRegistration | None:
        e = self.reg_entry(node)
        return e.value if e else None

    def registered(self, node: str) -> bool:
        """One get of the node's registration key (named by the CLI's keyspace), for
        polls whose timing matters: a snapshot reads the whole keyspace."""
        return self.store.get(self.cluster.reg_key(node)) is not None

    def cordoned(self, node: str) -> bool:
        """The cordon marker exists (the registration's flag is `reg(node).cordoned`)."""
        return node in self.snapshot().cordons

    def fence(self, node: str) -> FenceRecord | None:
        e = self.snapshot().fences.get(node)
        return e.value if e else None

    def fences(self) -> dict[str, FenceRecord]:
        return {n: e.value for n, e in self.snapshot().fences.items()}

    def leaving(self, node: str) -> bool:
        return node in self.snapshot().leaving

    def alive_lease(self, node: str) -> int:
        """The lease of the node's liveness key (0: no key)."""
        e = self.snapshot().alive.get(node)
        return e.lease if e else 0

    def placement(self, vm: str) -> Placement | None:
        e = self.snapshot().placements.get(vm)
        return e.value if e else None

    def status(self, vm: str) -> VmStatus | None:
        """The VM's current status (keyspace 2: the newest of its status keys)."""
        e = self.snapshot().statuses.get(vm)
        return e.value if e else None

    def leader(self) -> Entry[LeaderRecord] | None:
        return self.snapshot().leader

    def leader_id(self) -> str | None:
        """One get: the leader key is the same on both keyspaces (`PrefixKeys.leader`)."""
        kv = self.store.get(self.store.keyspace.leader)
        return LeaderRecord.from_json(kv.value).id if kv else None

    def events(self) -> list[Any]:
        return self.cluster.events()[0]
