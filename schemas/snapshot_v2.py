"""Keyspace 2 read as the planners read keyspace 1 (docs/keyspace-v2.md, section 1):
one key parsed on its own, the current-status rule, and an agent's node view turned into
the `ClusterSnapshot` that `nodeagent.plan.plan()` takes unchanged.

Same rules as `ClusterSnapshot.from_kvs`: no data makes these functions raise; a key
that does not parse (a bad name, a bad value, a value that names another VM or node than
its key) is an `InvalidKey`, and its VM or node is left alone by the planners.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from schemas.errors import SchemaError
from schemas.events import Event
from schemas.keys import decode_key, valid_name
from schemas.keys_v2 import KeyKind, KeyRefV2, KeyspaceV2, UnknownKey
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
from schemas.models_v2 import Assignment, ConfirmOff, KeyspaceVersion
from schemas.snapshot import ClusterSnapshot, Entry, InvalidKey, RawKV

MODELS: dict[KeyKind, type[Model]] = {
    "version": KeyspaceVersion, "config": ClusterConfig, "leader": LeaderRecord,
    "spec": VmSpec, "move": MoveRequest, "place": Placement,
    "confirm_off": ConfirmOff, "cordon": CordonMarker, "fence": FenceRecord,
    "assignment": Assignment,
    "reg": NodeRegistration, "alive": AliveRecord, "leaving": LeaveMarker, "status": VmStatus,
    "node_event": Event, "leader_event": Event, "event_v1": Event,
}

# The kind an invalid key reports, in keyspace 1's words: `ClusterSnapshot.invalid_vms`
# and `invalid_nodes` pick the VMs and nodes to leave alone by these.
V1_KIND: dict[str, str] = {"spec": "vm_spec", "place": "vm_placement",
                           "assignment": "vm_placement", "status": "vm_status",
                           "move": "vm_move", "reg": "node", "": "unknown"}
_VM_NAMED = frozenset({"spec", "move", "place", "assignment", "status"})


@dataclass(frozen=True)
class ParsedKV:
    ref: KeyRefV2
    entry: Entry[Model]


@dataclass(frozen=True)
class RefusedKV:
    """A key that did not parse: what it would have been (`kind` empty: no kind of
    keyspace 2; the names may be invalid) and the report, in keyspace 1's terms."""

    kind: KeyKind | Literal[""]
    node: str
    vm: str
    invalid: InvalidKey


def _refused(kv: RawKV, key: str, kind: KeyKind | Literal[""], node: str, vm: str,
             error: SchemaError) -> RefusedKV:
    name = vm if kind in _VM_NAMED else node
    return RefusedKV(kind, node, vm, InvalidKey(key, _int(kv.mod_revision),
                                                V1_KIND.get(kind, kind), name, error))


#: parse_kv's last result for each key: (the key-value it parsed, the result).  An agent
#: parses its own keys at every cycle, most of them unchanged since the last (the
#: domain XML in its specs and assignments alone cost about 5 ms a cycle for 10 VMs,
#: most of an idle agent's CPU); a key-value equal in every field (value, revisions,
#: lease) parses the same.  The results are immutable (frozen models and records).
#: One entry per key, replaced when the key changes; emptied when it holds more than
#: _MEMO_MAX keys (deleted keys are not tracked), which only costs parsing again.
_memo: dict[tuple[str, str], tuple[RawKV, ParsedKV | RefusedKV | None]] = {}
_MEMO_MAX = 16384


def parse_kv(ks: KeyspaceV2, kv: RawKV) -> ParsedKV | RefusedKV | None:
    """One key of keyspace 2 and its value; None for a key outside the prefix and its
    history.  Never raises.  Remembers the last result per key (`_memo`); the leader,
    which keeps its own cache of every key, calls `parse_kv_fresh`."""
    slot = (ks.prefix, kv.key)
    hit = _memo.get(slot)
    if hit is not None and hit[0] == kv:
        return hit[1]
    res = parse_kv_fresh(ks, kv)
    if len(_memo) >= _MEMO_MAX:
        _memo.clear()
    _memo[slot] = (kv, res)
    return res


def parse_kv_fresh(ks: KeyspaceV2, kv: RawKV) -> ParsedKV | RefusedKV | None:
    """`parse_kv` without its memo."""
    ref = ks.parse(kv.key)
    if isinstance(ref, UnknownKey):
        if not ref.owned:
            return None
        return _refused(kv, ref.key, ref.kind, ref.node, ref.vm,
                        SchemaError(ref.key, "", ref.reason))
    key = decode_key(kv.key)
    try:
        value = MODELS[ref.kind].from_json(kv.value, key=key)
        _check_names(ref, key, value)
    except Exception as exc:  # noqa: BLE001 - any data error is this key's, only
        err = exc if isinstance(exc, SchemaError) else SchemaError(
            key, "", f"refused ({type(exc).__name__}: {str(exc)[:200]})")
        return _refused(kv, key, ref.kind, ref.node, ref.vm, err)
    return ParsedKV(ref, Entry(value, key, kv.create_revision, kv.mod_revision, kv.lease))


def _check_names(ref: KeyRefV2, key: str, value: Model) -> None:
    """The names in the value are the names in the key."""
    checks: list[tuple[str, object, str]] = []
    if ref.kind in ("spec", "reg"):
        checks.append(("name", getattr(value, "name", None), ref.vm or ref.node))
    elif ref.kind in _VM_NAMED:
        checks.append(("vm", getattr(value, "vm", None), ref.vm))
    if ref.kind in ("status", "confirm_off", "cordon", "fence", "alive", "leaving"):
        checks.append(("node", getattr(value, "node", None), ref.node))
    if ref.event_id:
        checks.append(("id", getattr(value, "id", None), ref.event_id))
    for field, got, want in checks:
        if got != want:
            raise SchemaError(key, field, f"is {str(got)[:80]!r} but the key names {want!r}")
    if isinstance(value, Assignment) and ref.node not in value.nodes:
        raise SchemaError(key, "placement", f"names {list(value.nodes)}, not {ref.node!r} "
                                            "whose assignment this is")
    if isinstance(value, Placement):
        # The leader builds assignment keys from these names (and `Assignment` refuses
        # what this refuses): a placement it could not assign freezes its VM instead.
        named = [n for n in (value.node, value.from_node) if n is not None]
        if value.kind not in ("boot", "migrate") and named:
            raise SchemaError(key, "from_node", f"a {value.kind} placement names no node")
        for n in named:
            if not valid_name(n):
                raise SchemaError(key, "node", f"invalid node name {n[:80]!r}")


@dataclass(frozen=True)
class CurrentStatus:
    """A VM's status keys split by the current-status rule."""

    current: Entry[VmStatus] | None
    superseded: tuple[Entry[VmStatus], ...] = ()


def current_status(entries: Iterable[Entry[VmStatus]]) -> CurrentStatus:
    """The current status of one VM among its status keys (`/vmha/n/*/vm/VM`): the one
    with the highest mod_revision, i.e. the last one written, which is what keyspace 1's
    single key held.  The others are superseded, listed newest first, read by no rule.
    Two keys never share a mod_revision (one txn writes one node's keys); if they did,
    the smaller key would win, so the answer never depends on the order given."""
    ordered = list(entries)
    if len(ordered) > 1:  # most VMs have one status key: nothing to sort (10,000 a cycle)
        ordered.sort(key=lambda e: (-e.mod_revision, e.key))
    return CurrentStatus(ordered[0] if ordered else None, tuple(ordered[1:]))


def current_statuses(entries: Iterable[Entry[VmStatus]]) -> dict[str, CurrentStatus]:
    """`current_status` of every VM among `entries` (grouped by the status's VM)."""
    by_vm: dict[str, list[Entry[VmStatus]]] = {}
    for e in entries:
        by_vm.setdefault(e.value.vm, []).append(e)
    return {vm: current_status(es) for vm, es in sorted(by_vm.items())}


@dataclass(frozen=True)
class NodeView:
    """What agent `me` holds of etcd (section 3, "Agent"): its assignments
    (`/vmha/a/ME/`), its own keys (`/vmha/n/ME/`), `/vmha/config`, `/vmha/cordon/ME`,
    `/vmha/version`, the registration and status of VM of each peer an assignment of VM
    names (and the status of each node its placement gave up on), and `/vmha/place/VM`
    and `/vmha/spec/VM` of managed domains without an assignment (`place/VM` also of a
    VM whose failures `me`'s own status records).  Any other key in `kvs` is ignored."""

    me: str
    revision: int
    kvs: tuple[RawKV, ...]


def node_snapshot(ks: KeyspaceV2, view: NodeView) -> ClusterSnapshot:
    """The snapshot `plan()` takes, from the node view alone (section 1, "Where the
    agent's plan gets its data"): placements and specs from the assignments (an
    assignment's placement entry carries the assignment's key and revisions; its spec
    entry the spec's key and `spec_revision`); `nodes` = `me` and each peer an
    assignment names; `statuses` = the current one of `me`'s own and the named peer's
    keys, and the keys of the nodes the placement gave up on (`failed_nodes`);
    `cordons`, `alive`, `leaving` = `me`'s own.  A VM without an assignment takes
    its placement and spec from the targeted reads of `/vmha/place/VM` and
    `/vmha/spec/VM`.  No leader, fence record or move: the agent reads none."""
    me = view.me
    parsed: list[ParsedKV] = []
    refused: list[RefusedKV] = []
    assigned: dict[str, Entry[Assignment]] = {}
    for kv in view.kvs:
        res = parse_kv(ks, kv)
        if isinstance(res, ParsedKV):
            if res.ref.kind == "assignment" and res.ref.node == me:
                assigned[res.ref.vm] = res.entry  # type: ignore[assignment]
            else:
                parsed.append(res)
        elif res is not None:
            refused.append(res)
    peers_of = {vm: set(a.value.peers(me)) for vm, a in assigned.items()}
    peers = set().union(*peers_of.values()) if peers_of else set()
    status_peers = {vm: set(a.value.status_peers(me)) for vm, a in assigned.items()}

    def relevant(kind: KeyKind | Literal[""], node: str, vm: str) -> bool:
        if kind in ("assignment", "cordon", "alive", "leaving"):
            return node == me
        if kind == "reg":
            return node == me or node in peers
        if kind == "status":
            return node == me or node in status_peers.get(vm, ())
        if kind in ("place", "spec"):
            return vm not in assigned
        return kind in ("config", "version", "")  # "": under the prefix, but no kind

    by_kind: dict[str, dict[str, Entry[Model]]] = {
        k: {} for k in ("reg", "cordon", "alive", "leaving", "place", "spec")}
    singles: dict[str, Entry[Model]] = {}
    status_keys: list[Entry[VmStatus]] = []
    for p in parsed:
        ref = p.ref
        if not relevant(ref.kind, ref.node, ref.vm):
            continue
        if ref.kind == "status":
            status_keys.append(p.entry)  # type: ignore[arg-type]
        elif ref.kind in by_kind:
            by_kind[ref.kind][ref.vm or ref.node] = p.entry
        else:
            singles[ref.kind] = p.entry
    specs: dict[str, Entry[Model]] = dict(by_kind["spec"])
    placements: dict[str, Entry[Model]] = dict(by_kind["place"])
    for vm, a in assigned.items():
        placements[vm] = Entry(a.value.placement, a.key, a.create_revision, a.mod_revision,
                               a.lease)
        specs[vm] = Entry(a.value.spec, ks.spec(vm), 0, a.value.spec_revision)
    kept = [r.invalid for r in refused if relevant(r.kind, r.node, r.vm)]
    config_entry = singles.get("config")
    return ClusterSnapshot(
        revision=view.revision,
        config=config_entry.value if config_entry else ClusterConfig(),  # type: ignore[arg-type]
        config_entry=config_entry,  # type: ignore[arg-type]
        nodes=by_kind["reg"],  # type: ignore[arg-type]
        cordons=by_kind["cordon"],  # type: ignore[arg-type]
        leaving=by_kind["leaving"],  # type: ignore[arg-type]
        alive=by_kind["alive"],  # type: ignore[arg-type]
        specs=specs,  # type: ignore[arg-type]
        placements=placements,  # type: ignore[arg-type]
        statuses={vm: c.current for vm, c in current_statuses(status_keys).items()
                  if c.current is not None},
        errors=tuple(i.error for i in kept),
        invalid=tuple(kept),
    )


def _int(value: int) -> int:
    try:
        return int(value)
    except Exception:  # noqa: BLE001 - a revision is etcd's, but never let it raise here
        return 0
