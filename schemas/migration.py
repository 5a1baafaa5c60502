"""`vmha keyspace migrate` as values (docs/keyspace-v2.md, section 6): what keyspace 1
holds, what keyspace 2 must hold for it, the difference and the transactions that close
it, the clean-up of keyspace 1, the rollback, and the refusals of the check.

Pure: no client, no clock.  The command (`cli.keyspace`) reads etcd, calls these and
sends the transactions; every step is derived from what etcd holds, so a run killed at
any point is resumed by running the command again.

The keys of keyspace 2 that the migration writes (`owned`: `spec/`, `move/`, `place/`,
`a/`, `n/NODE/vm/`, `n/NODE/leaving`) are the copy's alone while the marker exists:
nothing else writes them until the marker says `done` (keyspace 1's daemons are frozen,
keyspace 2's do not run).  `config`, `cordon/`, `fence/` and `leader` keep their paths.
The registrations (`nodes/N`, `alive/N`) are moved by the agents themselves, with their
leases (`switch_txn`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from schemas.errors import SchemaError
from schemas.keys import Keyspace, valid_name
from schemas.keys_v2 import KeyspaceV2
from schemas.models import ClusterConfig, LeaderRecord, NodeRegistration, Placement, VmSpec
from schemas.models_v2 import Assignment, KeyspaceVersion, release_at_least
from schemas.snapshot import ClusterSnapshot, RawKV
from schemas.txn import Cmp, Delete, Op, Put, Txn
from schemas.writes_v2 import MAX_BATCH_OPS

STEPS = ("check", "freeze", "copy", "switch", "clean", "done")
# The steps still to run, by the marker's state (None: absent).
_LEFT: dict[str | None, tuple[str, ...]] = {
    None: STEPS, "migrating": STEPS[1:], "switching": STEPS[3:], "cleaning": STEPS[4:],
    "done": ()}
# Keyspace 1's VM keys and the kind of keyspace 2 each is copied to.
_VM_KINDS = {"spec": "spec", "move": "move", "placement": "place", "status": "status"}


def steps_left(state: str | None) -> tuple[str, ...]:
    return _LEFT[state]


@dataclass(frozen=True)
class Source:
    """A key of keyspace 1 copied to `dest` (value verbatim), and deleted at the clean."""

    key: str
    mod_revision: int
    dest: str
    value: bytes
    kind: str  # keyspace 2's kind of `dest`


@dataclass(frozen=True)
class Left:
    """A key under the prefix that is neither copied nor shared: it stays as it is."""

    key: str
    reason: str


@dataclass(frozen=True)
class V1State:
    """What keyspace 1 holds, read for the migration."""

    sources: tuple[Source, ...]
    left: tuple[Left, ...]
    invalid: tuple[str, ...]  # copied keys whose value does not parse (still invalid in v2)
    registrations: Mapping[str, RawKV]  # `nodes/N`: agents that have not switched yet
    snapshot: ClusterSnapshot  # keyspace 1's keys parsed (specs and placements)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sources:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out


def owned(ks: KeyspaceV2, key: str) -> bool:
    """A key of keyspace 2 that the copy writes (and a rollback deletes)."""
    if key.startswith((ks.spec_dir, ks.move_dir, ks.place_dir, ks.assignment_dir)):
        return True
    if not key.startswith(ks.node_dir):
        return False
    parts = key[len(ks.node_dir):].split("/")
    return (len(parts) == 2 and parts[1] == "leaving") or (len(parts) >= 2 and parts[1] == "vm")


def read_v1(ks1: Keyspace, revision: int, kvs: Iterable[RawKV]) -> V1State:
    """Keyspace 1's keys among `kvs` (everything under the prefix): each copied key with
    its destination, the keys left where they are, and the registrations."""
    ks2 = KeyspaceV2(ks1.prefix)
    mine: list[RawKV] = []
    regs: dict[str, RawKV] = {}
    candidates: list[tuple[RawKV, list[str]]] = []
    left: list[Left] = []
    for kv in kvs:
        key = kv.key
        if not key.startswith(ks1.root) or owned(ks2, key) or _v2_only(ks2, key):
            continue
        parts = key[len(ks1.root):].split("/")
        head = parts[0]
        if parts in (["config"], ["leader"], ["version"]) or (
                len(parts) == 2 and head in ("cordon", "fence", "alive")):
            mine.append(kv)
            continue  # the same path on keyspace 2 (alive/N: moved by its agent)
        if len(parts) == 2 and head == "nodes":
            mine.append(kv)
            regs[parts[1]] = kv
            continue
        if "\\" in key:
            left.append(Left(key, "a key that is not UTF-8 cannot be copied as it is"))
        elif (len(parts) == 2 and head == "leaving") or (
                len(parts) == 3 and head == "vms" and parts[2] in _VM_KINDS):
            mine.append(kv)
            candidates.append((kv, parts))
        else:
            left.append(Left(key, "not a key of keyspace 1"))
    snap = ClusterSnapshot.from_kvs(ks1, revision, mine)
    bad = {i.key for i in snap.invalid}
    sources: list[Source] = []
    for kv, parts in candidates:
        try:
            kv.value.decode("utf-8")
        except UnicodeDecodeError:
            left.append(Left(kv.key, "a value that is not UTF-8 cannot be copied as it is"))
            continue
        if parts[0] == "leaving":
            sources.append(Source(kv.key, kv.mod_revision, ks2.leaving(parts[1]), kv.value,
                                  "leaving"))
            continue
        vm, kind = parts[1], _VM_KINDS[parts[2]]
        if kind != "status":
            dest = {"spec": ks2.spec, "move": ks2.move, "place": ks2.place}[kind](vm)
            sources.append(Source(kv.key, kv.mod_revision, dest, kv.value, kind))
            continue
        node = _status_node(snap, vm, kv)
        if node is None:
            left.append(Left(kv.key, "a status that names no valid node has no key of "
                                     "keyspace 2 (n/NODE/vm/VM)"))
            continue
        sources.append(Source(kv.key, kv.mod_revision, ks2.status(node, vm), kv.value,
                              "status"))
    invalid = tuple(sorted(s.key for s in sources if s.key in bad))
    return V1State(tuple(sources), tuple(sorted(left, key=lambda x: x.key)), invalid, regs,
                   snap)


def _v2_only(ks2: KeyspaceV2, key: str) -> bool:
    """Keyspace 2's own keys that are not copies: registrations, confirm-offs."""
    return key.startswith((ks2.node_dir, ks2.confirm_off_dir))


def _status_node(snap: ClusterSnapshot, vm: str, kv: RawKV) -> str | None:
    """The node whose prefix a status goes under: its `node` field, also when the rest
    of the value is invalid (copied as it is, still reported)."""
    entry = snap.statuses.get(vm)
    if entry is not None and entry.key == kv.key:
        return entry.value.node
    try:
        node = json.loads(kv.value).get("node")
    except (ValueError, AttributeError, RecursionError):
        return None
    return node if isinstance(node, str) and valid_name(node) else None


def want_v2(ks2: KeyspaceV2, v1: V1State, v2_specs: Mapping[str, RawKV]
            ) -> tuple[dict[str, bytes], int]:
    """What keyspace 2's owned keys must hold for `v1`: every copy, and the assignment
    of each placement on each node it names, made with the spec as copied to keyspace 2
    (`v2_specs`, for its mod_revision).  Also how many assignment keys wait for their
    spec to be copied first (a second pass writes them)."""
    want = {s.dest: s.value for s in v1.sources}
    raw = {s.key: s.value for s in v1.sources}
    pending = 0
    for vm, pe in sorted(v1.snapshot.placements.items()):
        p = pe.value
        nodes = sorted({n for n in (p.node, p.from_node) if n})
        spec = v1.snapshot.specs.get(vm)
        if not nodes or spec is None or vm in v1.snapshot.invalid_vms:
            continue  # no assignment: pending/failed, spec removed, or frozen by a bad key
        copied = v2_specs.get(vm)
        if copied is None or copied.value != raw.get(spec.key):
            pending += len(nodes)
            continue
        value = _assignment(vm, copied.mod_revision, p, spec.value)
        if value is not None:
            for node in nodes:
                want[ks2.assignment(node, vm)] = value
    return want, pending


def _assignment(vm: str, spec_revision: int, p: Placement, spec: VmSpec) -> bytes | None:
    """The assignment as the leader of keyspace 2 writes it (`schemas.writes_v2`)."""
    try:
        a = Assignment(vm=vm, spec_revision=spec_revision, placement=p, spec=spec)
    except ValueError:
        return None  # a placement the leader could not assign: it stays unassigned
    return a.to_json().encode()


@dataclass(frozen=True)
class Diff:
    """Keyspace 2's owned keys against what they must hold."""

    create: tuple[tuple[str, bytes], ...] = ()
    update: tuple[tuple[str, bytes, int], ...] = ()  # key, value, mod_revision seen
    extra: tuple[tuple[str, int], ...] = ()  # owned keys nothing in keyspace 1 makes
    same: int = 0

    @property
    def conflicts(self) -> list[str]:
        """Keys that hold something else than keyspace 1 says (before the freeze, a
        refusal: the copy would overwrite them)."""
        return sorted([k for k, _, _ in self.update] + [k for k, _ in self.extra])

    @property
    def empty(self) -> bool:
        return not (self.create or self.update or self.extra)


def diff(want: Mapping[str, bytes], have: Mapping[str, RawKV]) -> Diff:
    create = tuple((k, v) for k, v in sorted(want.items()) if k not in have)
    update = tuple((k, v, have[k].mod_revision) for k, v in sorted(want.items())
                   if k in have and have[k].value != v)
    extra = tuple((k, kv.mod_revision) for k, kv in sorted(have.items()) if k not in want)
    same = sum(1 for k, v in want.items() if k in have and have[k].value == v)
    return Diff(create, update, extra, same)


def sync_txns(d: Diff) -> list[Txn]:
    """The copy: each absent key created (create==0), each differing key overwritten
    and each extra key deleted, both compared on the version seen; at most
    MAX_BATCH_OPS ops a transaction."""
    pairs: list[tuple[Cmp, Op]] = [
        *((Cmp(k, "create", "==", 0), Put(k, v.decode())) for k, v in d.create),
        *((Cmp(k, "mod", "==", mod), Put(k, v.decode())) for k, v, mod in d.update),
        *((Cmp(k, "mod", "==", mod), Delete(k)) for k, mod in d.extra)]
    return _batches(pairs)


def clean_txns(v1: V1State) -> list[Txn]:
    """Keyspace 1's copied keys deleted, each compared on the version copied."""
    return _batches([(Cmp(s.key, "mod", "==", s.mod_revision), Delete(s.key))
                     for s in v1.sources])


def rollback_txns(have: Mapping[str, RawKV]) -> list[Txn]:
    """Every owned key of keyspace 2 deleted, each compared on the version seen."""
    return _batches([(Cmp(k, "mod", "==", kv.mod_revision), Delete(k))
                     for k, kv in sorted(have.items())])


def _batches(pairs: Sequence[tuple[Cmp, Op]]) -> list[Txn]:
    return [Txn(tuple(c for c, _ in pairs[i:i + MAX_BATCH_OPS]),
                tuple(o for _, o in pairs[i:i + MAX_BATCH_OPS]))
            for i in range(0, len(pairs), MAX_BATCH_OPS)]


def config_schema_2(raw: bytes | None) -> str:
    """The config as keyspace 2 stores it ("schema": 2), from the stored one (absent:
    the defaults); raises SchemaError for a config that does not parse."""
    cfg = ClusterConfig() if raw is None else ClusterConfig.from_json(raw, "config")
    return cfg.model_copy(update={"schema_": 2}).to_json()


def marker_json(state: str, by: str, tool_version: str, started_at: float) -> str:
    return KeyspaceVersion.model_validate(
        {"keyspace": 2, "state": state, "by": by, "tool_version": tool_version,
         "started_at": started_at}).to_json()


@dataclass(frozen=True)
class Refusals:
    """Why the migration may not start (or go on); empty: it may."""

    old_agents: tuple[str, ...] = ()
    leader: str = ""
    config: str = ""
    conflicts: tuple[str, ...] = ()
    in_flight: tuple[str, ...] = ()

    @property
    def messages(self) -> list[str]:
        out = []
        if self.old_agents:
            out.append("registered agent(s) of a release that cannot freeze for the "
                       f"migration: {', '.join(self.old_agents)}; upgrade them first")
        if self.leader:
            out.append(self.leader)
        if self.config:
            out.append(self.config)
        if self.conflicts:
            shown = ", ".join(self.conflicts[:10])
            more = f" and {len(self.conflicts) - 10} more" if len(self.conflicts) > 10 else ""
            out.append(f"keyspace 2's keys already hold something else: {shown}{more}; "
                       "delete them (nothing runs on keyspace 2 before the migration)")
        if self.in_flight:
            out.append(f"live migration(s) in flight: {', '.join(self.in_flight)}; wait for "
                       "them to finish (a frozen agent would not report their end)")
        return out


def check(v1: V1State, leader: RawKV | None, config: RawKV | None, d: Diff,
          started: bool) -> Refusals:
    """Step 1: every registered agent and the leader run a release that freezes, the
    config parses, and, before the marker exists, keyspace 2's keys are empty or equal
    and no live migration is in flight."""
    old = []
    for node, kv in sorted(v1.registrations.items()):
        try:
            version = NodeRegistration.from_json(kv.value, kv.key).agent.version
        except SchemaError:
            version = "unreadable registration"
        if not release_at_least(version):
            old.append(f"{node} ({version or 'no version'})")
    why_leader = ""
    if leader is not None and not started:
        try:
            rec = LeaderRecord.from_json(leader.value, leader.key)
            if not release_at_least(rec.version):
                why_leader = (f"the leader {rec.id} on {rec.host} (pid {rec.pid}) runs a "
                              f"release ({rec.version or 'no version'}) that does not stop "
                              "for the migration; upgrade every orchestrator first")
        except SchemaError as exc:
            why_leader = f"the leader record does not parse ({exc}); upgrade the orchestrators"
    why_config = ""
    if config is not None:
        try:
            config_schema_2(config.value)
        except SchemaError as exc:
            why_config = f"the cluster config does not parse ({exc}); fix it first"
    snap = v1.snapshot
    moving = sorted({vm for vm, pe in snap.placements.items() if pe.value.kind == "migrate"}
                    | {vm for vm, se in snap.statuses.items() if se.value.state == "migrating"})
    if started:
        return Refusals(tuple(old), why_leader, why_config)
    return Refusals(tuple(old), why_leader, why_config, tuple(d.conflicts), tuple(moving))


def switch_txn(ks1: Keyspace, me: str, *, to: Literal[1, 2], token: int, reg_value: str,
               reg_lease: int, alive_value: str, alive_lease: int) -> Txn:
    """Agent `me` moves its registration and liveness key to keyspace `to` with the
    leases it holds: the old registration must still be its own (`token`) and the new
    one absent; its token becomes the new key's create_revision.  One transaction, so
    the node is never registered in both keyspaces, nor in neither."""
    ks2 = KeyspaceV2(ks1.prefix)
    old = (ks1.node(me), ks1.alive(me)) if to == 2 else (ks2.reg(me), ks2.alive(me))
    new = (ks2.reg(me), ks2.alive(me)) if to == 2 else (ks1.node(me), ks1.alive(me))
    ops: list[Op] = [Put(new[0], reg_value, reg_lease)]
    if alive_lease:  # none while the liveness lease is being replaced
        ops.append(Put(new[1], alive_value, alive_lease))
    return Txn((Cmp(old[0], "create", "==", token), Cmp(new[0], "create", "==", 0)),
               (*ops, Delete(old[0]), Delete(old[1])))
