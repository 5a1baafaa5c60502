"""The `vmha` commands' reads and writes on keyspace 2 (docs/keyspace-v2.md, sections 1,
2 and 5), chosen by `cli.cluster.open_cluster` when `/vmha/version` says `keyspace 2,
done`.

* **Reads.** The state is read in pages at one revision (`EtcdStore.list_pages`: the
  prefix may be larger than one gRPC message) into the leader's own model
  (`orchestrator.model_v2.leader_model`): the same `ClusterSnapshot` as keyspace 1's,
  with placements from `place/`, registrations from `n/NAME/reg` and each VM's current
  status by the rule of `schemas.snapshot_v2.current_status` (the newest of its status
  keys); the others are `superseded`.  So the commands print on keyspace 2 exactly what
  they print on keyspace 1.
* **History** is read in pages too, all three layouts (`P-history/n/NODE/ID`, the
  agents'; `P-history/o/ID`, the leader's; `P-history/ID`, keyspace 1's until it is
  pruned), each key checked by `KeyspaceV2.parse` and its event parsed on its own.
* **Writes** are the operator role's transactions of `schemas.writes_v2` (specs, move
  requests, cordons, the config, confirm-offs), so a CLI holding the operator's
  certificate never asks etcd for a write its role lacks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from cli.cluster import Cluster
from orchestrator.model_v2 import LeaderModel, leader_model
from schemas import writes_v2
from schemas.events import Event
from schemas.keys import Keyspace
from schemas.keys_v2 import KeyspaceV2
from schemas.models import (
    CONFIG_SCHEMA_KEYSPACE_2,
    ClusterConfig,
    CordonMarker,
    MoveRequest,
    VmSpec,
    VmStatus,
)
from schemas.models_v2 import ConfirmOff
from schemas.snapshot import ClusterSnapshot, Entry, RawKV
from schemas.snapshot_v2 import ParsedKV, parse_kv
from store.errors import StoreCompacted
from store.etcd import EtcdStore, TxnResult
from store.history import EventFilter

# A paged read that etcd compacted under it is read again from the start, at most this
# many times (a compaction per read is already rare: etcd compacts hourly).
READ_TRIES = 3


class ClusterV2(Cluster):
    version: ClassVar[int] = 2

    def __init__(self, store: EtcdStore) -> None:
        super().__init__(store)
        self.ks2 = KeyspaceV2(store.keyspace.prefix)
        self.last_model: LeaderModel | None = None

    # ---- reads -------------------------------------------------------------------------

    def _list(self, prefix: str) -> tuple[int, list[RawKV]]:
        """Every key under `prefix` at one revision, in pages."""
        for attempt in range(READ_TRIES):
            try:
                rev, kvs = 0, []
                for page in self.store.list_pages(prefix):
                    rev = page.revision
                    kvs.extend(page.kvs)
                return rev, kvs
            except StoreCompacted:
                if attempt == READ_TRIES - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def model(self) -> LeaderModel:
        """The state under the prefix as the leader models it."""
        rev, kvs = self._list(self.ks2.root)
        self.last_model = leader_model(self.ks2, rev, kvs)
        return self.last_model

    def snapshot(self) -> ClusterSnapshot:
        return self.model().snapshot

    def snapshot_to_export(self) -> ClusterSnapshot:
        """Each entry under the key keyspace 1 gives it (the config and the leader keep
        theirs): a snapshot file reads the same, and `vmha simulate` loads it, whichever
        keyspace it was taken on."""
        snap, ks1 = self.snapshot(), Keyspace(self.ks2.prefix)

        def rekeyed(entries: Any, key: Any) -> dict[str, Any]:
            return {n: dataclasses.replace(e, key=key(n)) for n, e in entries.items()}

        return dataclasses.replace(
            snap, nodes=rekeyed(snap.nodes, ks1.node), cordons=rekeyed(snap.cordons, ks1.cordon),
            fences=rekeyed(snap.fences, ks1.fence), leaving=rekeyed(snap.leaving, ks1.leaving),
            alive=rekeyed(snap.alive, ks1.alive), specs=rekeyed(snap.specs, ks1.vm_spec),
            placements=rekeyed(snap.placements, ks1.vm_placement),
            statuses=rekeyed(snap.statuses, ks1.vm_status), moves=rekeyed(snap.moves, ks1.vm_move))

    def superseded(self) -> dict[str, tuple[Entry[VmStatus], ...]]:
        model = self.last_model or self.model()
        return dict(model.superseded)

    def events(self, flt: EventFilter | None = None) -> tuple[list[Event], list[str]]:
        events: list[Event] = []
        errors: list[str] = []
        _, kvs = self._list(self.ks2.history)
        for kv in kvs:
            res = parse_kv(self.ks2, kv)  # never raises: one bad record is one error
            if res is None:
                continue
            if not isinstance(res, ParsedKV):
                errors.append(str(res.invalid.error))
                continue
            ev = res.entry.value
            if isinstance(ev, Event) and (flt is None or flt.match(ev)):
                events.append(ev)
        events.sort(key=lambda e: e.id)
        return events, errors

    # ---- keys the commands name ----------------------------------------------------------

    def spec_key(self, vm: str) -> str:
        return self.ks2.spec(vm)

    def move_key(self, vm: str) -> str:
        return self.ks2.move(vm)

    def reg_key(self, node: str) -> str:
        return self.ks2.reg(node)

    def cordon_key(self, node: str) -> str:
        return self.ks2.cordon(node)

    def confirm_off_key(self, node: str) -> str:
        return self.ks2.confirm_off(node)

    # ---- the operator's writes (schemas.writes_v2) -----------------------------------------

    def _send(self, write: writes_v2.Write) -> TxnResult:
        return self.store.txn(write.txn.compares, write.txn.ops)

    def add_spec(self, spec: VmSpec) -> TxnResult:
        return self._send(writes_v2.vm_add(self.ks2, spec))

    def edit_spec(self, spec: VmSpec, mod_revision: int) -> TxnResult:
        return self._send(writes_v2.vm_edit(self.ks2, spec, mod_revision))

    def remove_spec(self, vm: str, mod_revision: int) -> bool:
        """Delete the spec only if it is the version read: an edit meanwhile wins."""
        return self._send(writes_v2.vm_remove(self.ks2, vm, mod_revision)).succeeded

    def request_move(self, req: MoveRequest) -> None:
        self._send(writes_v2.request_move(self.ks2, req))

    def cordon(self, marker: CordonMarker) -> None:
        self._send(writes_v2.cordon(self.ks2, marker))

    def uncordon(self, node: str) -> None:
        self._send(writes_v2.uncordon(self.ks2, node))

    def set_config(self, config: ClusterConfig) -> int:
        """Written with "schema": 2 whatever the file says, so that a daemon of keyspace 1
        started against this cluster keeps refusing it."""
        config = config.model_copy(update={"schema_": CONFIG_SCHEMA_KEYSPACE_2})
        return self._send(writes_v2.set_config(self.ks2, config)).revision

    def confirm_off(self, request: ConfirmOff) -> int:
        """The operator's statement that a node is off; the leader turns it into the
        `manual` fence record (the operator role cannot write fence records)."""
        return self._send(writes_v2.confirm_off(self.ks2, request)).revision
