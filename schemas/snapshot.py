"""One immutable, parsed view of the whole keyspace at one etcd revision.

Daemons read the snapshot once per cycle and decide from it alone.  Values that do
not validate are kept out of the typed maps and listed in `errors`, so a
hand-edited key can never cause an action.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from schemas.errors import SchemaError
from schemas.keys import Keyspace
from schemas.models import (
    ClusterConfig,
    CordonMarker,
    FenceRecord,
    LeaderRecord,
    Model,
    MoveRequest,
    NodeRegistration,
    Placement,
    VmSpec,
    VmStatus,
)

T = TypeVar("T", bound=Model)


@dataclass(frozen=True)
class RawKV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


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
    "vm_spec": VmSpec,
    "vm_placement": Placement,
    "vm_status": VmStatus,
    "vm_move": MoveRequest,
}

# Which field of each model must equal the name in its key.
_NAME_FIELD = {"node": "name", "cordon": "node", "fence": "node", "vm_spec": "name",
               "vm_placement": "vm", "vm_status": "vm", "vm_move": "vm"}


@dataclass(frozen=True)
class ClusterSnapshot:
    revision: int
    config: ClusterConfig = field(default_factory=ClusterConfig)
    config_entry: Entry[ClusterConfig] | None = None
    leader: Entry[LeaderRecord] | None = None
    nodes: Mapping[str, Entry[NodeRegistration]] = field(default_factory=dict)
    cordons: Mapping[str, Entry[CordonMarker]] = field(default_factory=dict)
    fences: Mapping[str, Entry[FenceRecord]] = field(default_factory=dict)
    specs: Mapping[str, Entry[VmSpec]] = field(default_factory=dict)
    placements: Mapping[str, Entry[Placement]] = field(default_factory=dict)
    statuses: Mapping[str, Entry[VmStatus]] = field(default_factory=dict)
    moves: Mapping[str, Entry[MoveRequest]] = field(default_factory=dict)
    errors: tuple[SchemaError, ...] = ()

    @staticmethod
    def from_kvs(keyspace: Keyspace, revision: int, kvs: Iterable[RawKV]) -> ClusterSnapshot:
        maps: dict[str, dict[str, Entry[Model]]] = {k: {} for k in _NAME_FIELD}
        singles: dict[str, Entry[Model]] = {}
        errors: list[SchemaError] = []
        for kv in kvs:
            ref = keyspace.parse(kv.key)
            if ref is None:
                continue
            model = _MODELS[ref.kind]
            try:
                value = model.from_json(kv.value, key=kv.key)
                name_field = _NAME_FIELD.get(ref.kind)
                if name_field and getattr(value, name_field) != ref.name:
                    raise SchemaError(kv.key, name_field,
                                      f"is {getattr(value, name_field)!r} but the key names "
                                      f"{ref.name!r}")
            except SchemaError as exc:
                errors.append(exc)
                continue
            entry: Entry[Model] = Entry(value, kv.key, kv.create_revision, kv.mod_revision,
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
            specs=maps["vm_spec"],  # type: ignore[arg-type]
            placements=maps["vm_placement"],  # type: ignore[arg-type]
            statuses=maps["vm_status"],  # type: ignore[arg-type]
            moves=maps["vm_move"],  # type: ignore[arg-type]
            errors=tuple(errors),
        )

    def is_cordoned(self, node: str) -> bool:
        return node in self.cordons

    def schedulable(self, node: str) -> bool:
        return node in self.nodes and node not in self.cordons
