"""The leader's writes on keyspace 2 as values: one decision -> one `schemas.writes_v2`
write, with the compares the decision was taken on (docs/keyspace-v2.md, section 2).

Pure: no client, no clock (the callers pass the wall time).  Three kinds of writes:

* the planner's actions, as `orchestrator.txn_builder` builds them on keyspace 1, plus the
  assignments in the placement's transaction;
* the leader's upkeep of the assignment invariant ("the assignment keys of a VM are its
  placement's nodes, each holding (placement, spec)"): a spec refresh after `vm edit`, a
  rewrite of assignments that differ from the placement, the removal of a removed VM's
  placement and assignments;
* confirm-offs: an operator's "node X is off" becomes a `manual` fence record in the
  transaction that deletes it.

Each is built only when the model differs from what it would write, so an idle cluster
gets no write at all.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from orchestrator import planner
from orchestrator.model_v2 import LeaderModel
from schemas import writes_v2 as w2
from schemas.keys_v2 import KeyRefV2, KeyspaceV2
from schemas.models import FenceRecord, Placement
from schemas.models_v2 import Assignment
from schemas.txn import Txn


def placement(ks: KeyspaceV2, model: LeaderModel, action: planner.WritePlacement,
              epoch: int) -> w2.Write:
    """The planner's placement with the assignments of the nodes it names, the other
    assignments of the VM deleted.  A decision taken on the VM's status (a node gave up
    on it) compares every status key of the VM the model holds, the current one at the
    revision the decision saw."""
    p = action.placement
    spec = model.snapshot.specs.get(p.vm)
    statuses: dict[str, int] | None = None
    if action.status_mod_revision is not None:
        statuses = dict(model.status_keys.get(p.vm, {}))
        current = model.snapshot.statuses.get(p.vm)
        if current is not None:
            statuses[current.value.node] = action.status_mod_revision
    return w2.placement(ks, p, epoch=epoch, place_mod=action.expect_mod_revision,
                        spec=spec.value if spec else None,
                        spec_revision=spec.mod_revision if spec else 0,
                        assignments_seen=model.assignments_seen(p.vm),
                        fenced_holders=dict(action.fenced_holders), statuses_seen=statuses)


def fence(ks: KeyspaceV2, record: FenceRecord, prev_mod: int, epoch: int) -> w2.Write:
    """A self or external fence record: only while the node stays unregistered and its
    record is the one seen."""
    return w2.fence_record(ks, record, epoch=epoch, fence_mod=prev_mod)


def self_fence(ks: KeyspaceV2, action: planner.FenceNode, record: FenceRecord,
               epoch: int) -> w2.Write:
    if action.method != "self" or record.node != action.node:
        raise ValueError(f"not a self-fence record for {action.node}: {record!r}")
    return fence(ks, record, action.expect_mod_revision, epoch)


def clear_move(ks: KeyspaceV2, action: planner.ClearMove, epoch: int) -> w2.Write:
    return w2.clear_move(ks, action.vm, action.mod_revision, epoch=epoch)


def clear_fence(ks: KeyspaceV2, action: planner.ClearFence, epoch: int) -> w2.Write:
    return w2.clear_fence(ks, action.node, action.fence_mod_revision, epoch=epoch)


class Writes:
    """Keyspace 2's writes as `orchestrator.txn_builder.LeaderWrites`, built against the
    model the decisions were taken on (`model()`: the leader's current one)."""

    def __init__(self, ks: KeyspaceV2, model: Callable[[], LeaderModel]) -> None:
        self.ks = ks
        self.model = model

    def reg_key(self, node: str) -> str:
        return self.ks.reg(node)

    def placement(self, action: planner.WritePlacement, epoch: int) -> Txn:
        return placement(self.ks, self.model(), action, epoch).txn

    def fence(self, record: FenceRecord, prev_mod: int, epoch: int) -> Txn:
        return fence(self.ks, record, prev_mod, epoch).txn

    def self_fence(self, action: planner.FenceNode, record: FenceRecord, epoch: int) -> Txn:
        return self_fence(self.ks, action, record, epoch).txn

    def clear_move(self, action: planner.ClearMove, epoch: int) -> Txn:
        return clear_move(self.ks, action, epoch).txn

    def clear_fence(self, action: planner.ClearFence, epoch: int) -> Txn:
        return clear_fence(self.ks, action, epoch).txn


@dataclass(frozen=True)
class Upkeep:
    """A write the leader makes on its own (not the planner's): for `vm` or `node`."""

    event: str  # the log event
    reason: str
    write: w2.Write
    vm: str = ""
    node: str = ""
    history: str = ""  # the history event's kind once written ("": none)


def assignment_upkeep(ks: KeyspaceV2, model: LeaderModel, epoch: int,
                      skip: frozenset[str] = frozenset(),
                      only: Collection[str] | None = None) -> list[Upkeep]:
    """The writes that restore the assignment invariant, one per VM that breaks it, in
    VM order.  `skip`: VMs the planner writes a placement for in this cycle (that write
    puts their assignments).  `only`: the VMs to check (None: every VM).  A VM with an
    invalid key is left as it is."""
    snap = model.snapshot
    out: list[Upkeep] = []
    frozen = snap.invalid_vms
    vms = set(snap.placements) | set(model.assignments)
    for vm in sorted(vms if only is None else vms.intersection(only)):
        if vm in skip or vm in frozen:
            continue
        up = _upkeep_of(ks, model, vm, epoch)
        if up is not None:
            out.append(up)
    return out


def _upkeep_of(ks: KeyspaceV2, model: LeaderModel, vm: str, epoch: int) -> Upkeep | None:
    snap = model.snapshot
    pe, se = snap.placements.get(vm), snap.specs.get(vm)
    held = model.assignments.get(vm, {})
    seen = model.assignments_seen(vm)
    if se is None:
        if pe is None and not held:
            return None
        # `vm remove`: the placement and its assignments go (keyspace 1 left them).
        return Upkeep("placement_removed", "the VM's spec was removed",
                      w2.remove_placement(ks, vm, epoch=epoch,
                                          place_mod=pe.mod_revision if pe else 0,
                                          assignments_seen=seen), vm=vm,
                      history="placement")
    if pe is None:
        return None  # assignments without a placement: the planner places the VM
    p = pe.value
    named = _named(p)
    if set(held) != set(named) or any(a.value.placement != p for a in held.values()):
        # Left over by hand or by an older release: written again from the placement.
        return Upkeep("assignments_repaired",
                      f"assignments {sorted(held)} do not match the {p.kind} placement "
                      f"naming {named}",
                      w2.placement(ks, p, epoch=epoch, place_mod=pe.mod_revision,
                                   spec=se.value, spec_revision=se.mod_revision,
                                   assignments_seen=seen), vm=vm, history="placement")
    if not named:
        return None  # pending or failed, and no assignment: as it should be
    want = Assignment(vm=vm, spec_revision=se.mod_revision, placement=p, spec=se.value)
    if any(a.value != want for a in held.values()):
        return Upkeep("spec_refreshed", f"the spec changed (revision {se.mod_revision})",
                      w2.spec_refresh(ks, p, se.value, epoch=epoch,
                                      spec_revision=se.mod_revision,
                                      assignments_seen=seen), vm=vm, history="placement")
    return None


def _named(p: Placement) -> list[str]:
    """The nodes that hold an assignment of `p` (as `schemas.writes_v2` writes them)."""
    return sorted({n for n in (p.node, p.from_node) if n})


def confirm_offs(ks: KeyspaceV2, model: LeaderModel, epoch: int,
                 wall_time: float) -> list[Upkeep]:
    """Each operator confirm-off, in node order: a `manual` fence record written in the
    transaction that deletes it.  One for a node that is registered is deleted unused (a
    stale confirm-off must not fence the node when it is lost later, without its fence
    window); one for a node already fenced is deleted too.  A node with an invalid key
    is left as it is."""
    snap = model.snapshot
    out: list[Upkeep] = []
    for node, ce in sorted(model.confirm_offs.items()):
        if node in snap.invalid_nodes:
            continue
        c, mod = ce.value, ce.mod_revision
        prev = snap.fences.get(node)
        if node in snap.nodes or (prev is not None and prev.value.fenced):
            why = ("the node is registered (its agent holds a lease): not off"
                   if node in snap.nodes else f"already fenced ({prev.value.method})"
                   if prev is not None else "")
            out.append(Upkeep("confirm_off_refused", why, w2.delete_unchanged(
                ks, ks.confirm_off(node), mod, epoch=epoch, what="confirm-off dropped"),
                node=node))
            continue
        rec = FenceRecord(node=node, lease_id="manual", method="manual", outcome="success",
                          reason=c.reason, epoch=epoch, duration_s=0.0, fenced_at=wall_time,
                          attempts=prev.value.attempts + 1 if prev else 1, device=c.by)
        out.append(Upkeep("fence", f"method=manual outcome=success by {c.by}: {c.reason}",
                          w2.fence_record(ks, rec, epoch=epoch,
                                          fence_mod=prev.mod_revision if prev else 0,
                                          confirm_off_mod=mod), node=node, history="fence"))
    return out


def history_prune(ks: KeyspaceV2, keys: Iterable[str | bytes], now: float,
                  retention_s: float, max_events: int) -> list[w2.Write]:
    """The history keys (nodes', the leader's and keyspace 1's) older than the retention
    or beyond the newest `max_events`, deleted in batches.  An event's time is the one
    its id starts with (microseconds), so the values need not be read; a key that is not
    an event's is left alone."""
    events: list[tuple[str, str]] = []
    for key in keys:
        ref = ks.parse(key)
        if isinstance(ref, KeyRefV2) and ref.event_id:
            events.append((ref.event_id, ks.key(ref)))
    events.sort()
    excess = max(0, len(events) - max_events)
    doomed = [key for i, (eid, key) in enumerate(events)
              if i < excess or now - int(eid.split("-", 1)[0]) / 1e6 > retention_s]
    return [w2.prune_events(ks, doomed[i:i + w2.MAX_BATCH_OPS])
            for i in range(0, len(doomed), w2.MAX_BATCH_OPS)]
