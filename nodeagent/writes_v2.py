"""The agent's writes on keyspace 2 (docs/keyspace-v2.md, section 2): each one is a
transaction of `schemas.writes_v2`, under the agent's own prefix, so the node role's
credential allows every one of them and nothing of another node's.

What is decided here is pure (`status_guard`, `stale_claims`, `cleanups`); `AgentWrites`
sends the transactions.  A failed compare is a normal outcome (someone wrote first, or
the registration is not ours any more): the caller re-reads and plans again.

* **The status compare** is on the agent's own status key, whose mod_revision the plan
  does not carry: `plan()` takes a report's expected revision from the VM's current
  status, which on keyspace 2 may be the peer's key (a hand-off).  `status_guard`
  turns it into the section 2 compares: the own key as the view saw it, the assignment
  as the view saw it, and, when the current status is the peer's, the peer's key at the
  revision the plan saw.
* **Stale claims** are rewritten before a new registration (not an adoption): every
  status of the agent's own claiming `running`/`paused`/`migrating` for a domain not
  active here becomes `stopped`, in batches compared on the registration still absent,
  so a returning node never shows a stale claim while registered.
* **Clean-up**: the agent deletes its own status of a VM once it has neither an
  assignment nor a domain (active or defined) for it, unless the status is the record
  of why vmha gave up on the VM here (`keeps_record`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from schemas import writes_v2 as w
from schemas.errors import InvariantError
from schemas.keys_v2 import KeyRefV2, KeyspaceV2
from schemas.models import RUNNING_STATES, CordonMarker, LeaveMarker, Placement, VmStatus
from schemas.snapshot import ClusterSnapshot, RawKV
from schemas.snapshot_v2 import ParsedKV, parse_kv
from schemas.txn import TxnResult
from store.etcd import EtcdStore

__all__ = ["AgentWrites", "CycleStatuses", "StatusGuard", "cleanups", "keeps_record",
           "own_status_mods", "stale_claims", "status_guard"]


@dataclass(frozen=True)
class StatusGuard:
    """The revisions a status report of one VM is compared on (section 2)."""

    own_mod: int                       # /vmha/n/ME/vm/VM (0: absent)
    assignment_mod: int                # /vmha/a/ME/VM (0: a domain without an assignment)
    peer: tuple[str, int] | None = None  # (node, mod_revision) of the peer's status


def status_guard(ks: KeyspaceV2, me: str, snap: ClusterSnapshot, own_mods: Mapping[str, int],
                 vm: str, expect_mod: int) -> StatusGuard:
    """The compares of a report the plan made on `snap` with `expect_mod` (the current
    status's mod_revision, 0 if none).  `own_mods`: `me`'s own status keys in the view,
    by VM.  The own key is compared as the view saw it; if the current status is a peer's,
    that key too, at the revision the plan saw: together they say what keyspace 1's one
    compare said, that no status of the VM changed since the plan read it."""
    p = snap.placements.get(vm)
    assignment_mod = (p.mod_revision if p is not None and p.key == ks.assignment(me, vm)
                      else 0)
    cur = snap.statuses.get(vm)
    if cur is None or cur.key == ks.status(me, vm):
        return StatusGuard(expect_mod if cur is not None else own_mods.get(vm, 0),
                           assignment_mod)
    return StatusGuard(own_mods.get(vm, 0), assignment_mod, (cur.value.node, expect_mod))


def own_status_mods(ks: KeyspaceV2, me: str, kvs: Iterable[RawKV]) -> dict[str, int]:
    """The mod_revision of each of `me`'s own status keys among `kvs` (a node view), by
    VM; whatever the value (a bad one is compared as it is, and reported elsewhere)."""
    prefix = ks.statuses(me)
    out: dict[str, int] = {}
    for kv in kvs:
        if kv.key.startswith(prefix):
            ref = ks.parse(kv.key)
            if isinstance(ref, KeyRefV2) and ref.kind == "status":
                out[ref.vm] = kv.mod_revision
    return out


def stale_claims(me: str, own: Iterable[VmStatus], active: Iterable[str], *,
                 now: float) -> list[VmStatus]:
    """`me`'s statuses that claim a VM runs here (running, paused, migrating) while no
    domain of it is active here, rewritten as `stopped` (in VM order).  The counters of
    failures stay: they are the VM's history on this node."""
    here = set(active)
    return [s.model_copy(update={"state": "stopped", "since": now, "migration": None,
                                 "registration": None,
                                 "error": "claim of an earlier registration: no domain "
                                          "active here"})
            for s in sorted(own, key=lambda s: s.vm)
            if s.node == me and s.state in RUNNING_STATES and s.vm not in here]


def cleanups(own: Mapping[str, int], assigned: Iterable[str], domains: Iterable[str]
             ) -> list[tuple[str, int]]:
    """(VM, own status mod_revision) of each own status whose VM has neither an
    assignment nor a domain (active or defined) here."""
    keep = set(assigned) | set(domains)
    return [(vm, mod) for vm, mod in sorted(own.items()) if vm not in keep]


def keeps_record(me: str, status: VmStatus, placement: Placement | None) -> bool:
    """An own status that counts failures stays, without assignment or domain, while
    the VM's placement names `me` among the nodes it gave up on: it is why vmha gave up
    here (`vmha vm show` of a `failed` VM shows it, as keyspace 1's single key did; the
    next node reads it, `nodeagent.view_v2`).  `placement` None: none any more."""
    return (bool(status.boot_failures or status.crashes) and placement is not None
            and me in placement.failed_nodes)


class AgentWrites:
    """Agent `me`'s transactions on keyspace 2, as `schemas.writes_v2` builds them."""

    def __init__(self, store: EtcdStore, ks: KeyspaceV2, me: str) -> None:
        self.store, self.ks, self.me = store, ks, me
        # The revision of the last write applied: every one is under a watched range,
        # so a view at this revision or later shows it.
        self.last_revision = 0

    def send(self, write: w.Write) -> TxnResult:
        res = self.store.txn(write.txn.compares, write.txn.ops)
        if res.succeeded:
            self.last_revision = max(self.last_revision, res.revision)
        return res

    def read_own_statuses(self) -> list[VmStatus]:
        """`me`'s status keys read now (paged); a key that does not parse is left as it
        is (no rule of ours reads it, and the operator sees it reported)."""
        out: list[VmStatus] = []
        for page in self.store.list_pages(self.ks.statuses(self.me)):
            for kv in page.kvs:
                res = parse_kv(self.ks, kv)
                if isinstance(res, ParsedKV) and isinstance(res.entry.value, VmStatus):
                    out.append(res.entry.value)
        return out

    def rewrite_stale_claims(self, active: Iterable[str], *, now: float) -> int | None:
        """Before a new registration: rewrite `me`'s stale claims.  Returns how many were
        rewritten, or None if a registration of this node appeared meanwhile (then the
        rest is not written: a registered node's statuses are its agent's)."""
        stale = stale_claims(self.me, self.read_own_statuses(), active, now=now)
        for write in w.stale_claims(self.ks, self.me, stale):
            if not self.send(write).succeeded:
                return None
        return len(stale)

    def register(self, reg_json: str, reg_lease: int, alive_json: str, alive_lease: int, *,
                 adopt_token: int = 0) -> TxnResult:
        """The registration (or adoption of `adopt_token`) with the liveness key; the
        token is the result's revision on a new registration."""
        return self.send(w.registration(self.ks, self.me, reg_json, reg_lease, alive_json,
                                        alive_lease, adopt_token=adopt_token))

    def report(self, token: int, status: VmStatus, guard: StatusGuard) -> bool:
        status = status.model_copy(update={"registration": token})
        return self.send(w.status_report(self.ks, self.me, token, status,
                                         own_mod=guard.own_mod,
                                         assignment_mod=guard.assignment_mod,
                                         peer=guard.peer)).succeeded

    def cleanup(self, token: int, vm: str, own_mod: int) -> bool:
        return self.send(w.status_cleanup(self.ks, self.me, token, vm,
                                          own_mod=own_mod)).succeeded

    def update_registration(self, token: int, reg_json: str, lease: int) -> bool:
        """The cordon mirror: the registration rewritten on its own lease."""
        return self.send(w.own_put(self.ks, self.me, token, self.ks.reg(self.me), reg_json,
                                   lease)).succeeded

    def replace_alive(self, token: int, alive_json: str, lease: int) -> bool:
        return self.send(w.own_put(self.ks, self.me, token, self.ks.alive(self.me),
                                   alive_json, lease)).succeeded

    def leave(self, token: int, marker: LeaveMarker) -> bool:
        return self.send(w.own_put(self.ks, self.me, token, self.ks.leaving(self.me),
                                   marker.to_json())).succeeded

    def cordon(self, marker: CordonMarker) -> bool:
        """The agent's own cordon (a drain); False if a marker is there already."""
        return self.send(w.agent_cordon(self.ks, self.me, marker)).succeeded



class CycleStatuses:
    """The agent's status writes on keyspace 2, guarded against the node view of its
    latest cycle (set by `seen` before the plan is carried out)."""

    def __init__(self, writes: AgentWrites) -> None:
        self.writes = writes
        self._seen: tuple[ClusterSnapshot, dict[str, int]] | None = None

    def seen(self, snap: ClusterSnapshot, own_mods: dict[str, int]) -> None:
        self._seen = (snap, own_mods)

    def _view(self) -> tuple[ClusterSnapshot, dict[str, int]]:
        if self._seen is None:
            raise InvariantError("a status write before the first node view")
        return self._seen

    def planned(self, token: int, vm: str, status: VmStatus, expect_mod: int) -> bool:
        """A write the plan decided, `expect_mod` being the current status's revision."""
        snap, own = self._view()
        return self.writes.report(token, status, status_guard(self.writes.ks, self.writes.me,
                                                              snap, own, vm, expect_mod))

    def own(self, token: int, vm: str, status: VmStatus, own_mod: int) -> bool:
        """A write after a fresh read of our own status key (a migration's start or end)."""
        snap, _ = self._view()
        ks, me = self.writes.ks, self.writes.me
        p = snap.placements.get(vm)
        assignment_mod = (p.mod_revision if p is not None and p.key == ks.assignment(me, vm)
                          else 0)
        return self.writes.report(token, status, StatusGuard(own_mod, assignment_mod))
