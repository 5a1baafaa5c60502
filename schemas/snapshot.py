"""One immutable, parsed view of the whole keyspace at one etcd revision.

Daemons read the snapshot once per cycle and decide from it alone.  Values that do
not validate are kept out of the typed maps and listed in `errors` (and, with the VM or
node they belong to, in `invalid`), so a hand-edited key can never cause an action.

No data can make `from_kvs` raise: each key is parsed on its own and *any* exception
while parsing it (deep nesting, bytes that are not UTF-8, a value over
`MAX_VALUE_BYTES`, wrong types, a bug in a validator) makes that one key invalid.  A
key under the prefix that names no known kind, or whose name is not a valid name
(slashes, newlines, unicode, upper case), is invalid too, without reading its value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from schemas.errors import SchemaError
from schemas.keys import KeyRef, Keyspace, decode_key, valid_name
from schemas.models import (
    AliveRecord,
    ClusterConfig,
    CordonMarker,
    FenceRecord,
    LeaderRecord,
    LeaveMarker,
    Model,
    MoveRequest,
    NodeRegistration,
    Placement,
    VmSpec,
    VmStatus,
)
from schemas.models_v2 import KeyspaceVersion

# Why keyspace 1 refuses the config of a migrated cluster ("schema": 2).
CONFIG_SCHEMA_2_REFUSAL = (
    'this config has "schema": 2: the cluster was migrated to keyspace 2 by `vmha keyspace '
    'migrate` (docs/keyspace.md, "Keyspace version 2"), and this daemon reads keyspace 1, '
    "where it would find no VM and destroy its domains. Run a release that reads keyspace 2")

T = TypeVar("T", bound=Model)


@dataclass(frozen=True)
class RawKV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class InvalidKey:
    """A key under the prefix that did not parse: what it would have meant (kind and
    name, empty when the key itself is not one of vmha's), and why it was refused."""

    key: str
    mod_revision: int
    kind: str
    name: str
    error: SchemaError

    @property
    def message(self) -> str:
        return str(self.error)


@dataclass(frozen=True)
class Entry(Generic[T]):
    value: T
    key: str
    create_revision: int
    mod_revision: int
    lease: int = 0


_MODELS: dict[str, type[Model]] = {
    "config": ClusterConfig,
    "leader": LeaderRecord,
    "node": NodeRegistration,
    "cordon": CordonMarker,
    "fence": FenceRecord,
    "leaving": LeaveMarker,
    "alive": AliveRecord,
    "vm_spec": VmSpec,
    "vm_placement": Placement,
    "vm_status": VmStatus,
    "vm_move": MoveRequest,
    "version": KeyspaceVersion,
}

# Which field of each model must equal the name in its key.
_NAME_FIELD = {"node": "name", "cordon": "node", "fence": "node", "leaving": "node",
               "alive": "node",
               "vm_spec": "name",
               "vm_placement": "vm", "vm_status": "vm", "vm_move": "vm"}


# The keys a VM's or a node's fate is decided on (the others are operator requests).
_STATE_OF_VM = frozenset({"vm_spec", "vm_placement", "vm_status"})
_STATE_OF_NODE = frozenset({"node", "fence"})


@dataclass(frozen=True)
class ClusterSnapshot:
    revision: int
    config: ClusterConfig = field(default_factory=ClusterConfig)
    config_entry: Entry[ClusterConfig] | None = None
    leader: Entry[LeaderRecord] | None = None
    nodes: Mapping[str, Entry[NodeRegistration]] = field(default_factory=dict)
    cordons: Mapping[str, Entry[CordonMarker]] = field(default_factory=dict)
    fences: Mapping[str, Entry[FenceRecord]] = field(default_factory=dict)
    # Nodes that left on purpose (a finished drain): never fenced by a device.
    leaving: Mapping[str, Entry[LeaveMarker]] = field(default_factory=dict)
    # Each agent's liveness lease (nodeagent.liveness); read by no decision.
    alive: Mapping[str, Entry[AliveRecord]] = field(default_factory=dict)
    specs: Mapping[str, Entry[VmSpec]] = field(default_factory=dict)
    placements: Mapping[str, Entry[Placement]] = field(default_factory=dict)
    statuses: Mapping[str, Entry[VmStatus]] = field(default_factory=dict)
    moves: Mapping[str, Entry[MoveRequest]] = field(default_factory=dict)
    errors: tuple[SchemaError, ...] = ()
    invalid: tuple[InvalidKey, ...] = ()
    # `/vmha/version` (keyspace 1 only; keyspace 2's models keep it apart).
    keyspace_marker: Entry[KeyspaceVersion] | None = None

    @property
    def keyspace_marked(self) -> bool:
        """`/vmha/version` exists, valid or not: a migration started, and a daemon of
        keyspace 1 must write nothing (docs/keyspace-v2.md, section 6, "Freeze")."""
        return self.keyspace_marker is not None or any(i.kind == "version"
                                                       for i in self.invalid)

    @property
    def invalid_vms(self) -> frozenset[str]:
        """VMs whose spec, placement or status did not parse: nothing is known for sure
        about them, so the daemons leave them as they are (no boot, stop or move) until
        it is fixed.  A bad `move` key is only a move request that is not made."""
        return frozenset(i.name for i in self.invalid if i.name and i.kind in _STATE_OF_VM)

    @property
    def invalid_nodes(self) -> frozenset[str]:
        """Nodes whose registration or fence record did not parse (a bad cordon marker
        is only a cordon that is not set)."""
        return frozenset(i.name for i in self.invalid if i.name and i.kind in _STATE_OF_NODE)

    @staticmethod
    def from_kvs(keyspace: Keyspace, revision: int, kvs: Iterable[RawKV]) -> ClusterSnapshot:
        maps: dict[str, dict[str, Entry[Model]]] = {k: {} for k in _NAME_FIELD}
        singles: dict[str, Entry[Model]] = {}
        invalid: list[InvalidKey] = []
        for kv in kvs:
            key = decode_key(kv.key)
            if not key.startswith(keyspace.root):
                continue
            ref = keyspace.parse(key) or KeyRef("unknown")
            try:
                value = _parse_one(ref, key, kv.value)
            except Exception as exc:  # noqa: BLE001 - any data error is this key's, only
                err = exc if isinstance(exc, SchemaError) else SchemaError(
                    key, "", f"refused ({type(exc).__name__}: {str(exc)[:200]})")
                invalid.append(InvalidKey(key, _int(kv.mod_revision), ref.kind, ref.name, err))
                continue
            entry: Entry[Model] = Entry(value, key, kv.create_revision, kv.mod_revision,
                                        kv.lease)
            if ref.kind in maps:
                maps[ref.kind][ref.name] = entry
            else:
                singles[ref.kind] = entry
        config_entry = singles.get("config")
        return ClusterSnapshot(
            revision=revision,
            config=config_entry.value if config_entry else ClusterConfig(),  # type: ignore[arg-type]
            config_entry=config_entry,  # type: ignore[arg-type]
            leader=singles.get("leader"),  # type: ignore[arg-type]
            nodes=maps["node"],  # type: ignore[arg-type]
            cordons=maps["cordon"],  # type: ignore[arg-type]
            fences=maps["fence"],  # type: ignore[arg-type]
            leaving=maps["leaving"],  # type: ignore[arg-type]
            alive=maps["alive"],  # type: ignore[arg-type]
            specs=maps["vm_spec"],  # type: ignore[arg-type]
            placements=maps["vm_placement"],  # type: ignore[arg-type]
            statuses=maps["vm_status"],  # type: ignore[arg-type]
            moves=maps["vm_move"],  # type: ignore[arg-type]
            errors=tuple(i.error for i in invalid),
            invalid=tuple(invalid),
            keyspace_marker=singles.get("version"),  # type: ignore[arg-type]
        )

    def is_cordoned(self, node: str) -> bool:
        return node in self.cordons

    def schedulable(self, node: str) -> bool:
        return node in self.nodes and node not in self.cordons


def _parse_one(ref: KeyRef, key: str, raw: bytes) -> Model:
    """The model of one key; raises (anything) when the key or its value is refused."""
    if ref.kind == "unknown":
        raise SchemaError(key, "", "not a key vmha knows (unknown kind or a name with '/')")
    if ref.kind in _NAME_FIELD and not valid_name(ref.name):
        raise SchemaError(key, "", f"invalid name {ref.name[:80]!r} in the key (1-63 chars "
                                   "of a-z, 0-9, '.', '_', '-')")
    value = _MODELS[ref.kind].from_json(raw, key=key)
    if isinstance(value, ClusterConfig) and value.schema_ != 1:
        raise SchemaError(key, "schema", CONFIG_SCHEMA_2_REFUSAL)
    name_field = _NAME_FIELD.get(ref.kind)
    if name_field and getattr(value, name_field) != ref.name:
        raise SchemaError(key, name_field, f"is {str(getattr(value, name_field))[:80]!r} but "
                                           f"the key names {ref.name!r}")
    return value


def _int(value: int) -> int:
    try:
        return int(value)
    except Exception:  # noqa: BLE001 - a revision is etcd's, but never let it raise here
        return 0
