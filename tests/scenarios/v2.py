"""A scenario's store seen as keyspace 2: every key copied as `vmha keyspace migrate`
copies it (docs/keyspace-v2.md, section 6), with the same values and revisions, and read
by the leader's adapter (`orchestrator.model_v2.leader_model`).

The world itself stays in keyspace 1 (the agents and the simulated transactions use it);
only the leader's snapshot goes through keyspace 2.  So a scenario run with
`keyspace: 2` shows that the leader decides the same on keyspace 2 as on keyspace 1,
line for line of the log.  Each node's last status of a VM is kept as its own status key
(`Store.status_writes`), as the agents on keyspace 2 write them: a VM that moved has its
old node's key too, superseded, and the current-status rule must pick the same status as
keyspace 1's single key.
"""

from __future__ import annotations

import json

from orchestrator import planner, txn_v2
from orchestrator.model_v2 import LeaderModel, leader_model
from schemas.acl import ORCHESTRATOR, role
from schemas.keys_v2 import KeyspaceV2
from schemas.models import FenceRecord, Placement, VmSpec
from schemas.models_v2 import Assignment
from schemas.snapshot import ClusterSnapshot, RawKV
from schemas.writes_v2 import Write
from tests.scenarios.model import KS, Rec, ScenarioError, Store

KS2 = KeyspaceV2(KS.prefix)

_BY_NAME = {"node": KS2.reg, "cordon": KS2.cordon, "fence": KS2.fence,
            "leaving": KS2.leaving, "alive": KS2.alive}
_BY_VM = {"vm_spec": KS2.spec, "vm_placement": KS2.place, "vm_move": KS2.move}


def _raw(key: str, rec: Rec) -> RawKV:
    return RawKV(key, json.dumps(rec.value).encode(), rec.create_revision, rec.mod_revision,
                 rec.lease)


def v2_kvs(store: Store) -> list[RawKV]:
    """The scenario's keys in keyspace 2, in key order."""
    out: list[RawKV] = []
    for key, rec in store.kv.items():
        ref = KS.parse(key)
        if ref is None:
            raise ScenarioError(f"{key}: not a keyspace-1 key")
        if ref.kind in ("config", "leader"):
            out.append(_raw(key, rec))
        elif ref.kind in _BY_NAME:
            out.append(_raw(_BY_NAME[ref.kind](ref.name), rec))
        elif ref.kind in _BY_VM:
            out.append(_raw(_BY_VM[ref.kind](ref.name), rec))
        if ref.kind == "vm_placement":
            out += _assignments(store, ref.name, rec)
        elif ref.kind == "vm_status":
            out += _statuses(store, ref.name, rec)
    return sorted(out, key=lambda kv: kv.key)


def _assignments(store: Store, vm: str, rec: Rec) -> list[RawKV]:
    """One assignment per node the placement names, written in its transaction (same
    revisions), with the spec as it is now (the leader's refresh keeps them equal)."""
    p = Placement.model_validate(rec.value)
    spec = store.get(KS.vm_spec(vm))
    if spec is None or p.kind not in ("boot", "migrate"):
        return []  # pending and failed placements name no node: no assignment
    a = Assignment(vm=vm, spec_revision=spec.mod_revision, placement=p,
                   spec=VmSpec.model_validate(spec.value))
    return [RawKV(KS2.assignment(node, vm), a.to_json().encode(), rec.create_revision,
                  rec.mod_revision) for node in a.nodes]


def _statuses(store: Store, vm: str, current: Rec) -> list[RawKV]:
    """Each node's last status of `vm`; the current one is keyspace 1's key."""
    node = str(current.value.get("node"))
    recs = {n: r for (n, v), r in store.status_writes.items()
            if v == vm and r.mod_revision < current.mod_revision}
    recs[node] = current
    return [_raw(KS2.status(n, vm), r) for n, r in recs.items()]


def v2_model(store: Store) -> LeaderModel:
    return leader_model(KS2, store.revision, v2_kvs(store))


def v2_snapshot(model: LeaderModel) -> ClusterSnapshot:
    """What the leader on keyspace 2 decides on."""
    snap = model.snapshot
    if snap.errors:
        raise ScenarioError(f"invalid values in keyspace 2: {[str(e) for e in snap.errors]}")
    return snap


ORCHESTRATOR_ROLE = role(KS2, ORCHESTRATOR)


def v2_write(model: LeaderModel, action: planner.Action, epoch: int) -> Write | None:
    """The write the leader on keyspace 2 sends for `action` (None: it writes nothing,
    an external fence runs a device).  A fence record's value does not change its
    compares: a stand-in is built."""
    if isinstance(action, planner.WritePlacement):
        return txn_v2.placement(KS2, model, action, epoch)
    if isinstance(action, planner.ClearMove):
        return txn_v2.clear_move(KS2, action, epoch)
    if isinstance(action, planner.ClearFence):
        return txn_v2.clear_fence(KS2, action, epoch)
    if isinstance(action, planner.FenceNode) and action.method == "self":
        rec = FenceRecord(node=action.node, lease_id=action.lease_id, method="self",
                          outcome="success", reason=action.reason, epoch=epoch,
                          duration_s=0.0, fenced_at=0.0)
        return txn_v2.self_fence(KS2, action, rec, epoch)
    return None


def v2_verdict(store: Store, model: LeaderModel, action: planner.Action,
               epoch: int) -> bool | None:
    """Would keyspace 2's transaction for `action` succeed on the store as it is now?
    (None: no transaction.)  Its ops must lie in the orchestrator's role."""
    write = v2_write(model, action, epoch)
    if write is None:
        return None
    denied = ORCHESTRATOR_ROLE.denials(write.txn)
    if denied:
        raise ScenarioError(f"keyspace 2's {write.what} is outside the orchestrator role: "
                            f"{denied}")
    kvs = {str(kv.key): kv for kv in v2_kvs(store)}
    for c in write.txn.compares:
        kv = kvs.get(c.key)
        actual = 0 if kv is None else (kv.create_revision if c.target == "create"
                                       else kv.mod_revision)
        if c.op != "==":
            raise ScenarioError(f"unexpected compare {c}")
        if actual != c.value:
            return False
    return True
