"""The writes of keyspace 2 as values (docs/keyspace-v2.md, section 2): each builder
returns who sends the write (its etcd role) and the transaction, compares and ops exactly
as the design's table lists them.

This is the contract the leader and the agent on keyspace 2 build their transactions
against, and what the unit tests hold against `schemas.acl`: every compared key lies in
a read range of the writer's role and every put or delete in a write range, so etcd
never refuses a write of vmha's for want of a permission.  Pure: no client, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from schemas.acl import OPERATOR, ORCHESTRATOR, RoleRef, node_ref
from schemas.events import Event
from schemas.keys_v2 import KeyspaceV2
from schemas.models import (
    ClusterConfig,
    CordonMarker,
    FenceRecord,
    LeaderRecord,
    MoveRequest,
    Placement,
    VmSpec,
    VmStatus,
)
from schemas.models_v2 import Assignment, ConfirmOff
from schemas.txn import Cmp, Delete, Op, Put, Txn

# Ops per transaction of a batched rewrite (etcd's --max-txn-ops default is 128).
MAX_BATCH_OPS = 64


@dataclass(frozen=True)
class Write:
    """One conditional write and the role that sends it."""

    what: str
    writer: RoleRef
    txn: Txn


def _write(what: str, writer: RoleRef, compares: Sequence[Cmp], ops: Sequence[Op]) -> Write:
    return Write(what, writer, Txn(tuple(compares), tuple(ops)))


def epoch_compare(ks: KeyspaceV2, epoch: int) -> Cmp:
    """The leader's fencing token: its term still holds the leader key."""
    return Cmp(ks.leader, "create", "==", epoch)


def token_compare(ks: KeyspaceV2, me: str, token: int) -> Cmp:
    """The agent's fencing token: the registration it wrote is still the one in etcd
    (0: no registration, before a new one)."""
    return Cmp(ks.reg(me), "create", "==", token)


def unchanged(key: str, mod_revision: int) -> Cmp:
    """`key` is the version seen (0: still absent)."""
    return Cmp(key, "mod", "==", mod_revision)


# ---- the leader (role orchestrator) ----------------------------------------------------


def election(ks: KeyspaceV2, record: LeaderRecord, lease: int) -> Write:
    return _write("election", ORCHESTRATOR, [Cmp(ks.leader, "create", "==", 0)],
                  [Put(ks.leader, record.to_json(), lease)])


def _named(p: Placement) -> list[str]:
    """The nodes a placement names: the holders of its assignments."""
    return sorted({n for n in (p.node, p.from_node) if n})


def _fenced(ks: KeyspaceV2, holders: Mapping[str, int]) -> list[Cmp]:
    """Each lost holder is still unregistered and its fence record is the one seen."""
    out: list[Cmp] = []
    for node, fence_mod in sorted(holders.items()):
        out += [Cmp(ks.reg(node), "create", "==", 0), unchanged(ks.fence(node), fence_mod)]
    return out


def placement(ks: KeyspaceV2, p: Placement, *, epoch: int, place_mod: int,
              spec: VmSpec | None, spec_revision: int, assignments_seen: Mapping[str, int],
              fenced_holders: Mapping[str, int] | None = None,
              statuses_seen: Mapping[str, int] | None = None) -> Write:
    """Any leader decision about a VM that keeps a placement.  The assignments follow
    it in the same txn: put for each node it names, deleted for each other node that
    held one (`assignments_seen`: node -> mod_revision).  `statuses_seen`: every status
    key of the VM in the model (node -> mod_revision), the current one among them."""
    named = _named(p)
    if named and spec is None:
        raise ValueError(f"placement of {p.vm} on {named} needs the spec to assign it")
    cmps = [epoch_compare(ks, epoch), unchanged(ks.place(p.vm), place_mod)]
    ops: list[Op] = [Put(ks.place(p.vm), p.to_json())]
    value = (Assignment(vm=p.vm, spec_revision=spec_revision, placement=p, spec=spec).to_json()
             if named and spec is not None else "")
    for node in sorted(set(named) | set(assignments_seen)):
        key = ks.assignment(node, p.vm)
        cmps.append(unchanged(key, assignments_seen.get(node, 0)))
        ops.append(Put(key, value) if node in named else Delete(key))
    cmps += _fenced(ks, fenced_holders or {})
    cmps += [unchanged(ks.status(node, p.vm), mod)
             for node, mod in sorted((statuses_seen or {}).items())]
    return _write("placement", ORCHESTRATOR, cmps, ops)


def remove_placement(ks: KeyspaceV2, vm: str, *, epoch: int, place_mod: int,
                     assignments_seen: Mapping[str, int]) -> Write:
    """`vm remove` seen by the leader: the placement and its assignments go (keyspace 1
    left them), only while the spec is still absent (a VM added again keeps them)."""
    cmps = [epoch_compare(ks, epoch), Cmp(ks.spec(vm), "create", "==", 0),
            unchanged(ks.place(vm), place_mod)]
    ops: list[Op] = [Delete(ks.place(vm))]
    for node, mod in sorted(assignments_seen.items()):
        cmps.append(unchanged(ks.assignment(node, vm), mod))
        ops.append(Delete(ks.assignment(node, vm)))
    return _write("placement removed", ORCHESTRATOR, cmps, ops)


def spec_refresh(ks: KeyspaceV2, p: Placement, spec: VmSpec, *, epoch: int,
                 spec_revision: int, assignments_seen: Mapping[str, int]) -> Write:
    """The spec changed under a placement (`vm edit`, `state: stopped`): its
    assignments are rewritten with the spec at `spec_revision`."""
    named = _named(p)
    if not named:
        raise ValueError(f"a {p.kind} placement of {p.vm} has no assignment to refresh")
    a = Assignment(vm=p.vm, spec_revision=spec_revision, placement=p, spec=spec).to_json()
    cmps = [epoch_compare(ks, epoch), unchanged(ks.spec(p.vm), spec_revision)]
    ops: list[Op] = []
    for node in named:
        cmps.append(unchanged(ks.assignment(node, p.vm), assignments_seen.get(node, 0)))
        ops.append(Put(ks.assignment(node, p.vm), a))
    return _write("spec refresh", ORCHESTRATOR, cmps, ops)


def fence_record(ks: KeyspaceV2, record: FenceRecord, *, epoch: int, fence_mod: int,
                 confirm_off_mod: int | None = None) -> Write:
    """Self, external or manual; a manual record consumes the operator's confirm-off
    (`confirm_off_mod`: its mod_revision) in the same txn."""
    if (record.method == "manual") != (confirm_off_mod is not None):
        raise ValueError("a manual fence record, and only one, consumes a confirm-off")
    node = record.node
    cmps = [epoch_compare(ks, epoch), *_fenced(ks, {node: fence_mod})]
    ops: list[Op] = [Put(ks.fence(node), record.to_json())]
    if confirm_off_mod is not None:
        cmps.append(unchanged(ks.confirm_off(node), confirm_off_mod))
        ops.append(Delete(ks.confirm_off(node)))
    return _write(f"fence record ({record.method})", ORCHESTRATOR, cmps, ops)


def delete_unchanged(ks: KeyspaceV2, key: str, mod_revision: int, *, epoch: int,
                     what: str) -> Write:
    """Clear a fence record or a move request: only the version the decision saw."""
    return _write(what, ORCHESTRATOR, [epoch_compare(ks, epoch), unchanged(key, mod_revision)],
                  [Delete(key)])


def clear_fence(ks: KeyspaceV2, node: str, mod_revision: int, *, epoch: int) -> Write:
    return delete_unchanged(ks, ks.fence(node), mod_revision, epoch=epoch, what="clear fence")


def clear_move(ks: KeyspaceV2, vm: str, mod_revision: int, *, epoch: int) -> Write:
    return delete_unchanged(ks, ks.move(vm), mod_revision, epoch=epoch, what="clear move")


def leader_event(ks: KeyspaceV2, event: Event) -> Write:
    return _write("history (leader)", ORCHESTRATOR, [], [Put(ks.leader_event(event.id),
                                                             event.to_json())])


def prune_events(ks: KeyspaceV2, keys: Sequence[str]) -> Write:
    """History prune: any key under the history (nodes', the leader's, keyspace 1's)."""
    return _write("history prune", ORCHESTRATOR, [], [Delete(k) for k in keys])


# ---- an agent (role node-ME) -----------------------------------------------------------


def registration(ks: KeyspaceV2, me: str, reg_json: str, reg_lease: int, alive_json: str,
                 alive_lease: int, *, adopt_token: int = 0) -> Write:
    """A new registration (`adopt_token` 0), or the adoption of the registration whose
    create_revision is `adopt_token`, with the liveness key; a leave marker goes."""
    return _write("adoption" if adopt_token else "registration", node_ref(me),
                  [token_compare(ks, me, adopt_token)],
                  [Put(ks.reg(me), reg_json, reg_lease), Put(ks.alive(me), alive_json, alive_lease),
                   Delete(ks.leaving(me))])


def own_put(ks: KeyspaceV2, me: str, token: int, key: str, value: str, lease: int = 0) -> Write:
    """A registration update (the cordon mirror), a liveness replacement or a leave
    marker: one of `me`'s own keys, while its registration holds."""
    if key not in (ks.reg(me), ks.alive(me), ks.leaving(me)):
        raise ValueError(f"{key} is not a registration, liveness or leave key of {me}")
    return _write("own key", node_ref(me), [token_compare(ks, me, token)],
                  [Put(key, value, lease)])


def agent_cordon(ks: KeyspaceV2, me: str, marker: CordonMarker) -> Write:
    """The agent's own cordon (a drain); an operator's marker is kept."""
    _is_me(me, marker.node)
    return _write("own cordon", node_ref(me), [Cmp(ks.cordon(me), "create", "==", 0)],
                  [Put(ks.cordon(me), marker.to_json())])


def status_report(ks: KeyspaceV2, me: str, token: int, status: VmStatus, *, own_mod: int,
                  assignment_mod: int, peer: tuple[str, int] | None = None) -> Write:
    """`me`'s status of a VM.  `assignment_mod`: 0 for a domain without an assignment;
    `peer`: (node, mod_revision) of the peer's status the report depends on (a hand-off
    acknowledgement, an arrival)."""
    _is_me(me, status.node)
    cmps = [token_compare(ks, me, token), unchanged(ks.status(me, status.vm), own_mod),
            unchanged(ks.assignment(me, status.vm), assignment_mod)]
    if peer is not None:
        cmps.append(unchanged(ks.status(peer[0], status.vm), peer[1]))
    return _write("status report", node_ref(me), cmps,
                  [Put(ks.status(me, status.vm), status.to_json())])


def status_cleanup(ks: KeyspaceV2, me: str, token: int, vm: str, *, own_mod: int) -> Write:
    """`me` drops its status of a VM it neither runs nor is assigned."""
    return _write("status clean-up", node_ref(me),
                  [token_compare(ks, me, token), unchanged(ks.status(me, vm), own_mod),
                   Cmp(ks.assignment(me, vm), "create", "==", 0)],
                  [Delete(ks.status(me, vm))])


def stale_claims(ks: KeyspaceV2, me: str, statuses: Sequence[VmStatus]) -> list[Write]:
    """Before a new registration: `me`'s statuses that claim a domain not active here,
    rewritten (as `stopped`) in batches, each while `me` is still unregistered."""
    for s in statuses:
        _is_me(me, s.node)
    return [_write("stale claims", node_ref(me), [token_compare(ks, me, 0)],
                   [Put(ks.status(me, s.vm), s.to_json())
                    for s in statuses[i:i + MAX_BATCH_OPS]])
            for i in range(0, len(statuses), MAX_BATCH_OPS)]


def node_event(ks: KeyspaceV2, me: str, event: Event) -> Write:
    return _write("history (agent)", node_ref(me), [],
                  [Put(ks.node_event(me, event.id), event.to_json())])


def _is_me(me: str, node: str) -> None:
    if node != me:
        raise ValueError(f"a value of node {node!r} is not {me!r}'s to write")


# ---- the operator (role operator) ------------------------------------------------------


def vm_add(ks: KeyspaceV2, spec: VmSpec) -> Write:
    return _write("vm add", OPERATOR, [Cmp(ks.spec(spec.name), "create", "==", 0)],
                  [Put(ks.spec(spec.name), spec.to_json())])


def vm_edit(ks: KeyspaceV2, spec: VmSpec, mod_revision: int) -> Write:
    return _write("vm edit", OPERATOR, [unchanged(ks.spec(spec.name), mod_revision)],
                  [Put(ks.spec(spec.name), spec.to_json())])


def vm_remove(ks: KeyspaceV2, vm: str, mod_revision: int) -> Write:
    """`vm remove`: the spec as read goes (an edit meanwhile keeps it); the leader then
    deletes the placement and its assignments (`remove_placement`)."""
    return _write("vm remove", OPERATOR, [unchanged(ks.spec(vm), mod_revision)],
                  [Delete(ks.spec(vm))])


def request_move(ks: KeyspaceV2, move: MoveRequest) -> Write:
    return _write("move request", OPERATOR, [], [Put(ks.move(move.vm), move.to_json())])


def cordon(ks: KeyspaceV2, marker: CordonMarker) -> Write:
    return _write("cordon", OPERATOR, [], [Put(ks.cordon(marker.node), marker.to_json())])


def uncordon(ks: KeyspaceV2, node: str) -> Write:
    return _write("uncordon", OPERATOR, [], [Delete(ks.cordon(node))])


def confirm_off(ks: KeyspaceV2, request: ConfirmOff) -> Write:
    return _write("confirm off", OPERATOR, [],
                  [Put(ks.confirm_off(request.node), request.to_json())])


def set_config(ks: KeyspaceV2, config: ClusterConfig) -> Write:
    return _write("config", OPERATOR, [], [Put(ks.config, config.to_json())])
