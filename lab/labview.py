"""A :class:`~lab.cluster.LabCluster`'s state in etcd as lab tests read it, on either keyspace.

A lab with etcd auth on (``LabCluster(auth=True)``, what ``vmha lab up`` starts) runs
keyspace 2, one without runs keyspace 1 (docs/keyspace.md).  What keyspace 1 keeps in one
key each (a VM's status, its placement, a node's registration) is read here from the
keyspace the lab runs, so that a check keeps its meaning on both.  A VM's status on
keyspace 2 is the current one of its nodes' status keys (the one written last,
:func:`schemas.snapshot_v2.current_status`), read in one range of ``/vmha/n/``.

A drain by lease revoke is what an operator does with etcdctl: ``etcdctl lease revoke``
of the registration's lease, with the root certificate on keyspace 2 (the operator's
role may not revoke leases).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from lab.etcdpki import OPERATOR, ROOT
from lab.localcluster import wait_until
from schemas import Keyspace
from schemas.keys_v2 import KeyRefV2, KeyspaceV2

if TYPE_CHECKING:
    from lab.cluster import LabCluster
    from schemas.snapshot import RawKV
    from store.etcd import EtcdStore


def reader(lc: LabCluster) -> EtcdStore:
    """A store for a test's reads: as the operator with auth (the caller closes it)."""
    return lc.store(OPERATOR) if lc.auth else lc.store()


def reg_key(lc: LabCluster, node: str) -> str:
    """Node ``node``'s registration key (its lease is the node's)."""
    return KeyspaceV2(lc.prefix).reg(node) if lc.auth else Keyspace(lc.prefix).node(node)


def wait_registered(lc: LabCluster, store: EtcdStore, timeout: float = 60.0) -> None:
    """Until every lab node's agent has registered.  `LabCluster.start` only starts the
    agents: VMs added before one registers all go to the others (a test that wants
    guests on each node, or drains a node, waits for this first)."""
    wait_until(lambda: all(store.get(reg_key(lc, n)) is not None for n in lc.nodes),
               timeout, 0.1, "every lab node registered")


def place_key(lc: LabCluster, vm: str) -> str:
    """The leader's placement of ``vm``."""
    return KeyspaceV2(lc.prefix).place(vm) if lc.auth else Keyspace(lc.prefix).vm_placement(vm)


def _json(kv: RawKV | None) -> dict[str, Any] | None:
    return dict(json.loads(kv.value)) if kv is not None else None


def vm_statuses(store: EtcdStore, lc: LabCluster) -> dict[str, dict[str, Any]]:
    """VM name -> its current status, one range read (keyspace 2: of every node's keys
    the one written last, as the leader and the CLI take it)."""
    if not lc.auth:
        ks1 = Keyspace(lc.prefix)
        out: dict[str, dict[str, Any]] = {}
        for kv in store.get_prefix(f"{lc.prefix}/vms/"):
            ref = ks1.parse(kv.key)
            if ref is not None and ref.kind == "vm_status":
                out[ref.name] = dict(json.loads(kv.value))
        return out
    ks = KeyspaceV2(lc.prefix)
    newest: dict[str, RawKV] = {}
    for kv in store.get_prefix(ks.node_dir):
        ref2 = ks.parse(kv.key)
        if not isinstance(ref2, KeyRefV2) or ref2.kind != "status":
            continue
        seen = newest.get(ref2.vm)
        if seen is None or kv.mod_revision > seen.mod_revision:
            newest[ref2.vm] = kv
    return {vm: dict(json.loads(kv.value)) for vm, kv in sorted(newest.items())}


def vm_status(store: EtcdStore, lc: LabCluster, vm: str) -> dict[str, Any] | None:
    """``vm``'s current status (None: no node has reported it)."""
    if not lc.auth:
        return _json(store.get(Keyspace(lc.prefix).vm_status(vm)))
    ks = KeyspaceV2(lc.prefix)
    kvs = [kv for n in lc.node_names if (kv := store.get(ks.status(n, vm))) is not None]
    return _json(max(kvs, key=lambda kv: kv.mod_revision)) if kvs else None


def placement(store: EtcdStore, lc: LabCluster, vm: str) -> dict[str, Any] | None:
    return _json(store.get(place_key(lc, vm)))


def cordon_key(lc: LabCluster, node: str) -> str:
    """Node ``node``'s cordon (the operator's `vmha node cordon`, or the agent's own after
    a drain); present: the node takes no VM."""
    return KeyspaceV2(lc.prefix).cordon(node) if lc.auth else Keyspace(lc.prefix).cordon(node)


def fence_key(lc: LabCluster, node: str) -> str:
    """The leader's fence record of ``node``."""
    return KeyspaceV2(lc.prefix).fence(node) if lc.auth else Keyspace(lc.prefix).fence(node)


def schedulable(store: EtcdStore, lc: LabCluster, node: str) -> bool:
    """``node`` registered and not cordoned: the leader may place VMs on it
    (`ClusterSnapshot.schedulable`, on either keyspace)."""
    return store.get(reg_key(lc, node)) is not None and store.get(
        cordon_key(lc, node)) is None


def registration_lease(store: EtcdStore, lc: LabCluster, node: str) -> str:
    """The lease id of ``node``'s registration (what an operator's drain revokes)."""
    reg = _json(store.get(reg_key(lc, node)))
    assert reg is not None, f"{node} is not registered"
    return str(reg["lease_id"])


def keyspace(store: EtcdStore, lc: LabCluster) -> int:
    """The keyspace the lab's daemons run, by its marker: none, 1; `done`, 2 (a lab
    does not stop half-way through `vmha keyspace migrate`: any other state raises)."""
    marker = _json(store.get(KeyspaceV2(lc.prefix).version))
    if marker is None:
        return 1
    if marker.get("state") != "done":
        raise ValueError(f"keyspace migration under way: {marker}")
    return int(marker["keyspace"])


def revoke_lease(lc: LabCluster, lease: str) -> None:
    """`etcdctl lease revoke LEASE`, as root with auth (the operator's role may not)."""
    from lab.labauth import etcdctl

    base = etcdctl(lc.endpoints, lc.pki, ROOT) if lc.pki else ["etcdctl", "--endpoints",
                                                                lc.endpoints]
    subprocess.run([*base, "lease", "revoke", lease], check=True, capture_output=True,
                   timeout=30)


def revoke_registration(lc: LabCluster, node: str) -> str:
    """Drain ``node`` as `etcdctl lease revoke <its registration's lease_id>` does (as
    root with auth); the lease id revoked."""
    store = lc.store()  # root with auth
    try:
        lease = registration_lease(store, lc, node)
    finally:
        store.close()
    revoke_lease(lc, lease)
    return lease


def vmha(lc: LabCluster, *args: str, user: str = OPERATOR,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`vmha ARGS` on the lab's etcd, with auth as ``user`` (what env.sh logs in as)."""
    return subprocess.run([sys.executable, "-m", "vmha", *lc.common(user), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
