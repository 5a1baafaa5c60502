"""The leader's model of keyspace 2 (docs/keyspace-v2.md, sections 1 and 3): the
key-values its watch holds, read into the `ClusterSnapshot` the planner takes unchanged,
plus what only keyspace 2 has (assignments, every status key of a VM, confirm-offs).

Pure: no client, no clock.  Same rules as `ClusterSnapshot.from_kvs`: no data makes
`leader_model` raise; a key that does not parse is an `InvalidKey` (in keyspace 1's
kinds, so `invalid_vms`/`invalid_nodes` freeze the same VMs and nodes), and an invalid
assignment or status key freezes its VM as an invalid placement or status would.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from schemas.keys_v2 import KeyspaceV2
from schemas.models import ClusterConfig, Model, VmStatus
from schemas.models_v2 import Assignment, ConfirmOff, KeyspaceVersion
from schemas.snapshot import ClusterSnapshot, Entry, InvalidKey, RawKV
from schemas.snapshot_v2 import (
    ParsedKV,
    RefusedKV,
    current_statuses,
    parse_kv,
    parse_kv_fresh,
)

Parsed = ParsedKV | RefusedKV | None

# ClusterSnapshot field <- keyspace-2 kind, for the maps keyed by one name.
_BY_NAME = {"reg": "nodes", "cordon": "cordons", "fence": "fences", "leaving": "leaving",
            "alive": "alive", "spec": "specs", "place": "placements", "move": "moves"}


@dataclass(frozen=True)
class LeaderModel:
    """One consistent view of the leader's keys at `snapshot.revision`."""

    snapshot: ClusterSnapshot
    # VM -> node -> the assignment /vmha/a/NODE/VM.
    assignments: Mapping[str, Mapping[str, Entry[Assignment]]] = field(default_factory=dict)
    # VM -> node -> mod_revision of /vmha/n/NODE/vm/VM: every status key of the VM.
    status_keys: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # VM -> its status keys that the current-status rule passed over, newest first.
    superseded: Mapping[str, tuple[Entry[VmStatus], ...]] = field(default_factory=dict)
    confirm_offs: Mapping[str, Entry[ConfirmOff]] = field(default_factory=dict)
    version: Entry[KeyspaceVersion] | None = None

    def assignments_seen(self, vm: str) -> dict[str, int]:
        """node -> mod_revision of each assignment of `vm` (the compares of a write)."""
        return {n: e.mod_revision for n, e in self.assignments.get(vm, {}).items()}


class ParseCache:
    """Each key parsed once per version: a cycle re-parses only the keys that changed
    since the last one (a key's mod_revision changes with its value)."""

    def __init__(self) -> None:
        self._by_key: dict[str | bytes, tuple[RawKV, Parsed]] = {}
        self.parsed = 0  # keys parsed so far (the others came from the cache)

    def parse_all(self, ks: KeyspaceV2, kvs: Iterable[RawKV]) -> list[Parsed]:
        fresh: dict[str | bytes, tuple[RawKV, Parsed]] = {}
        out: list[Parsed] = []
        for kv in kvs:
            hit = self._by_key.get(kv.key)
            # The watch model hands the same RawKV for a key until it changes.
            if hit is not None and (hit[0] is kv or hit[0] == kv):
                fresh[kv.key] = hit
                res = hit[1]
            else:
                res = parse_kv_fresh(ks, kv)
                self.parsed += 1
                fresh[kv.key] = (kv, res)
            out.append(res)
        self._by_key = fresh  # keys deleted since are forgotten
        return out


def leader_model(ks: KeyspaceV2, revision: int, kvs: Iterable[RawKV],
                 cache: ParseCache | None = None) -> LeaderModel:
    """Everything under the prefix (the leader watches all of it: it reads every key
    kind of section 1), read as the planner reads keyspace 1.  Placements come from
    `/vmha/place/` (never the assignments), the current status of each VM is its newest
    status key, and keys outside the prefix are ignored.  With `cache`, only keys changed
    since its last use are parsed."""
    maps: dict[str, dict[str, Entry[Model]]] = {f: {} for f in _BY_NAME.values()}
    singles: dict[str, Entry[Model]] = {}
    assignments: dict[str, dict[str, Entry[Assignment]]] = {}
    statuses: list[Entry[VmStatus]] = []
    confirm_offs: dict[str, Entry[ConfirmOff]] = {}
    invalid: list[InvalidKey] = []
    results = cache.parse_all(ks, kvs) if cache is not None else [parse_kv(ks, kv) for kv in kvs]
    for res in results:
        if res is None:
            continue
        if not isinstance(res, ParsedKV):
            invalid.append(res.invalid)
            continue
        ref, entry = res.ref, res.entry
        if ref.kind in _BY_NAME:
            maps[_BY_NAME[ref.kind]][ref.vm or ref.node] = entry
        elif ref.kind == "assignment":
            assignments.setdefault(ref.vm, {})[ref.node] = entry  # type: ignore[assignment]
        elif ref.kind == "status":
            statuses.append(entry)  # type: ignore[arg-type]
        elif ref.kind == "confirm_off":
            confirm_offs[ref.node] = entry  # type: ignore[assignment]
        elif ref.kind in ("config", "leader", "version"):
            singles[ref.kind] = entry
        # History is not under the prefix; nothing else parses.
    current = current_statuses(statuses)
    status_keys: dict[str, dict[str, int]] = {}
    for e in statuses:
        status_keys.setdefault(e.value.vm, {})[e.value.node] = e.mod_revision
    config_entry = singles.get("config")
    snap = ClusterSnapshot(
        revision=revision,
        config=config_entry.value if config_entry else ClusterConfig(),  # type: ignore[arg-type]
        config_entry=config_entry,  # type: ignore[arg-type]
        leader=singles.get("leader"),  # type: ignore[arg-type]
        statuses={vm: c.current for vm, c in current.items() if c.current is not None},
        errors=tuple(i.error for i in invalid),
        invalid=tuple(invalid),
        **maps,  # type: ignore[arg-type]
    )
    return LeaderModel(
        snapshot=snap, assignments=assignments, status_keys=status_keys,
        superseded={vm: c.superseded for vm, c in current.items() if c.superseded},
        confirm_offs=confirm_offs,
        version=singles.get("version"),  # type: ignore[arg-type]
    )
