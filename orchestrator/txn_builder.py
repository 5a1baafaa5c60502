"""The leader's writes as values: one planner decision -> one conditional write.

Pure: no etcd client, no clock.  Every write carries the *epoch compare* (the leader
key's create_revision equals the writer's epoch), so a deposed leader's write never
takes effect, plus the compares the planner attached to the decision.
`orchestrator.leader` sends what this module builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from orchestrator import planner
from schemas.keys import Keyspace
from schemas.models import FenceRecord
from schemas.txn import Cmp, Delete, Put, Txn


def epoch_compare(ks: Keyspace, epoch: int) -> Cmp:
    """The leader's fencing token: its term still holds the leader key."""
    return Cmp(ks.leader, "create", "==", epoch)


def absent_and_fence_unchanged(ks: Keyspace, node: str, fence_mod_revision: int) -> list[Cmp]:
    """`node` is still unregistered and its fence record is the one the decision saw
    (mod_revision 0: no record)."""
    return [Cmp(ks.node(node), "create", "==", 0),
            Cmp(ks.fence(node), "mod", "==", fence_mod_revision)]


def placement(ks: Keyspace, action: planner.WritePlacement, epoch: int) -> Txn:
    """Write a placement if it is unchanged since the snapshot and every lost holder
    it moves the VM away from is still lost and fenced as seen."""
    p = action.placement
    cmps = [epoch_compare(ks, epoch),
            Cmp(ks.vm_placement(p.vm), "mod", "==", action.expect_mod_revision)]
    for node, fence_rev in action.fenced_holders:
        cmps += absent_and_fence_unchanged(ks, node, fence_rev)
    if action.status_mod_revision is not None:
        cmps.append(Cmp(ks.vm_status(p.vm), "mod", "==", action.status_mod_revision))
    return Txn(tuple(cmps), (Put(ks.vm_placement(p.vm), p.to_json()),))


def fence_record(ks: Keyspace, record: FenceRecord, expect_mod_revision: int,
                 epoch: int) -> Txn:
    """Record a fence (self-fence window passed, or an external run's outcome) only
    while the node stays unregistered and nobody else wrote its record meanwhile."""
    cmps = [epoch_compare(ks, epoch),
            *absent_and_fence_unchanged(ks, record.node, expect_mod_revision)]
    return Txn(tuple(cmps), (Put(ks.fence(record.node), record.to_json()),))


def self_fence(ks: Keyspace, action: planner.FenceNode, record: FenceRecord,
               epoch: int) -> Txn:
    if action.method != "self" or record.node != action.node:
        raise ValueError(f"not a self-fence record for {action.node}: {record!r}")
    return fence_record(ks, record, action.expect_mod_revision, epoch)


def delete_unchanged(ks: Keyspace, key: str, mod_revision: int, epoch: int) -> Txn:
    """Delete `key` only if it is the version the decision saw: a newer one (an
    operator wrote it again) is someone else's intent and stays."""
    return Txn((epoch_compare(ks, epoch), Cmp(key, "mod", "==", mod_revision)),
               (Delete(key),))


def clear_move(ks: Keyspace, action: planner.ClearMove, epoch: int) -> Txn:
    return delete_unchanged(ks, ks.vm_move(action.vm), action.mod_revision, epoch)


def clear_fence(ks: Keyspace, action: planner.ClearFence, epoch: int) -> Txn:
    return delete_unchanged(ks, ks.fence(action.node), action.fence_mod_revision, epoch)


class LeaderWrites(Protocol):
    """The leader's writes in one keyspace (orchestrator.txn_v2.Writes: keyspace 2)."""

    def reg_key(self, node: str) -> str: ...
    def placement(self, action: planner.WritePlacement, epoch: int) -> Txn: ...
    def fence(self, record: FenceRecord, prev_mod: int, epoch: int) -> Txn: ...
    def self_fence(self, action: planner.FenceNode, record: FenceRecord,
                   epoch: int) -> Txn: ...
    def clear_move(self, action: planner.ClearMove, epoch: int) -> Txn: ...
    def clear_fence(self, action: planner.ClearFence, epoch: int) -> Txn: ...


@dataclass(frozen=True)
class Writes:
    """Keyspace 1's writes, as `LeaderWrites`."""

    ks: Keyspace

    def reg_key(self, node: str) -> str:
        return self.ks.node(node)

    def placement(self, action: planner.WritePlacement, epoch: int) -> Txn:
        return placement(self.ks, action, epoch)

    def fence(self, record: FenceRecord, prev_mod: int, epoch: int) -> Txn:
        return fence_record(self.ks, record, prev_mod, epoch)

    def self_fence(self, action: planner.FenceNode, record: FenceRecord, epoch: int) -> Txn:
        return self_fence(self.ks, action, record, epoch)

    def clear_move(self, action: planner.ClearMove, epoch: int) -> Txn:
        return clear_move(self.ks, action, epoch)

    def clear_fence(self, action: planner.ClearFence, epoch: int) -> Txn:
        return clear_fence(self.ks, action, epoch)
