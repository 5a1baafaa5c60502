"""Which keyspace a `vmha` command works on, and its reads and writes on keyspace 1.

Every command that reads or writes the cluster's keys opens a `Cluster`
(`open_cluster`), which reads the keyspace marker `/vmha/version` once, as the daemons
do at start (nodeagent.keyspace, orchestrator.leader_v2): absent, keyspace 1
(docs/keyspace.md) exactly as before; `keyspace 2, done`, keyspace 2
(docs/keyspace-v2.md, `cli.cluster_v2`); anything else (a migration under way, or a
marker that does not parse) and the command stops with exit code 1 before it reads or
writes anything else: a guess could write an operator's intent where no daemon reads it.

The commands take the cluster's state as the `ClusterSnapshot` the planners take, on
either keyspace, so that every listing prints the same JSON on both.
"""

from __future__ import annotations

import argparse
from typing import ClassVar, Literal

from cli.common import EXIT_FAIL, EXIT_INPUT, CliError, _store
from schemas import marker
from schemas.events import Event
from schemas.keys_v2 import KeyspaceV2
from schemas.models import ClusterConfig, CordonMarker, MoveRequest, VmSpec, VmStatus
from schemas.snapshot import ClusterSnapshot, Entry, RawKV
from store.etcd import Cmp, EtcdStore, Put, TxnResult
from store.history import EventFilter, read_events


def keyspace_of(value: RawKV | None, key: str) -> Literal[1, 2]:
    """The keyspace a value of the marker selects; CliError (exit 1) for none."""
    try:
        return marker.keyspace_of(value, key)
    except marker.KeyspaceUndecided as exc:
        if exc.state is None:
            raise CliError(f"{exc}: refusing to guess which keyspace this cluster runs; "
                           "nothing written", EXIT_FAIL) from None
        raise CliError(f"keyspace migration in progress ({key} says {exc.state}, by "
                       f"{exc.by}): nothing read or written; run the command again once "
                       "`vmha keyspace migrate` is done", EXIT_FAIL) from None


class Cluster:
    """Keyspace 1 (docs/keyspace.md): one range read for the snapshot, the operator's
    writes as they always were."""

    version: ClassVar[int] = 1

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.ks = store.keyspace

    # ---- reads -------------------------------------------------------------------------

    def snapshot(self) -> ClusterSnapshot:
        return self.store.snapshot()

    def snapshot_to_export(self) -> ClusterSnapshot:
        """The snapshot with keyspace 1's keys, as `vmha snapshot` files hold them
        (docs/snapshot-format.md), whichever keyspace the cluster runs."""
        return self.snapshot()

    def superseded(self) -> dict[str, tuple[Entry[VmStatus], ...]]:
        """Per VM, the status keys the current-status rule passed over in the last
        snapshot: keyspace 1 has one status key per VM, so none."""
        return {}

    def events(self, flt: EventFilter | None = None) -> tuple[list[Event], list[str]]:
        """The history in time order, and the records that did not parse."""
        return read_events(self.store, flt)

    # ---- keys the commands name ----------------------------------------------------------

    def spec_key(self, vm: str) -> str:
        return self.ks.vm_spec(vm)

    def move_key(self, vm: str) -> str:
        return self.ks.vm_move(vm)

    def reg_key(self, node: str) -> str:
        return self.ks.node(node)

    def cordon_key(self, node: str) -> str:
        return self.ks.cordon(node)

    @property
    def config_key(self) -> str:
        return self.ks.config

    # ---- the operator's writes -----------------------------------------------------------

    def add_spec(self, spec: VmSpec) -> TxnResult:
        """The spec, only if the VM does not exist."""
        key = self.spec_key(spec.name)
        return self.store.txn([Cmp(key, "create", "==", 0)], [Put(key, spec.to_json())])

    def edit_spec(self, spec: VmSpec, mod_revision: int) -> TxnResult:
        """The spec, only if it is still the version read (`mod_revision`)."""
        key = self.spec_key(spec.name)
        return self.store.txn([Cmp(key, "mod", "==", mod_revision)], [Put(key, spec.to_json())])

    def remove_spec(self, vm: str, mod_revision: int) -> bool:
        """Delete the spec (keyspace 1: whatever its version, as always)."""
        self.store.delete(self.spec_key(vm))
        return True

    def request_move(self, req: MoveRequest) -> None:
        self.store.put(self.move_key(req.vm), req.to_json())

    def cordon(self, marker: CordonMarker) -> None:
        self.store.put(self.cordon_key(marker.node), marker.to_json())

    def uncordon(self, node: str) -> None:
        self.store.delete(self.cordon_key(node))

    def set_config(self, config: ClusterConfig) -> int:
        """Keyspace 1's config says "schema": 1: a 2 would stop every daemon of keyspace 1
        (they refuse it at start), so one is refused here, nothing written."""
        if config.schema_ != 1:
            raise CliError('"schema": 2 is the config of a cluster migrated to keyspace 2 '
                           "(`vmha keyspace migrate`); this one is not: nothing written",
                           EXIT_INPUT)
        return self.store.put(self.config_key, config.to_json())


def open_cluster(args: argparse.Namespace) -> Cluster:
    """The cluster the global flags name, on the keyspace its marker says: one get per
    command (a command that runs others, `vmha status`, passes them its `args`, and the
    cluster opened first is kept in them)."""
    opened = getattr(args, "opened_cluster", None)
    if isinstance(opened, Cluster):
        return opened
    store = _store(args)
    key = KeyspaceV2(store.keyspace.prefix).version
    if keyspace_of(store.get(key), key) == 1:
        cluster = Cluster(store)
    else:
        from cli.cluster_v2 import ClusterV2  # it builds on this module's Cluster

        cluster = ClusterV2(store)
    args.opened_cluster = cluster
    return cluster
