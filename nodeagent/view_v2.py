"""The agent's view of keyspace 2 (docs/keyspace-v2.md, section 3, "Agent"): what it
watches, and the `NodeView` it hands to `schemas.snapshot_v2.node_snapshot`, whose
`ClusterSnapshot` goes to the unchanged `nodeagent.plan.plan()`.

An agent watches only keys of its own, on one stream (`store.watchmodel.WatchedState`):
its assignments (`/vmha/a/ME/`), its own prefix (`/vmha/n/ME/`: registration, liveness,
leave marker, statuses), its cordon, `/vmha/config` and `/vmha/version`.  A migration's
peer is watched by key, only while an assignment names it: the peer's registration and
its status of that VM.  So another node's churn sends this agent nothing, an event costs
O(its VMs) to apply and plan, and the config is read again only when that key changes.
A managed domain without an assignment (rare: an agent restarted, a removed VM) is
looked up by targeted gets of its placement and spec, as keyspace 1's snapshot showed
them.

Failures on keyspace 2 (docs/keyspace.md): the statuses of the nodes a VM was given up
on (the assignment's `failed_nodes`) are watched like a migration peer's status, so the
next node sees the error they report; and an own status that counts failures, of a VM
with neither an assignment nor a domain here, has its VM's placement watched: the agent
keeps that status while the placement names it among the nodes given up on.

The range choice is pure (`own_ranges`, `peer_ranges`, `record_ranges`, `orphans`);
`NodeWatch` is the I/O around it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

import structlog

from schemas.errors import TemporaryError
from schemas.keys_v2 import KeyspaceV2
from schemas.models import VmStatus
from schemas.models_v2 import Assignment
from schemas.snapshot import RawKV
from schemas.snapshot_v2 import NodeView, ParsedKV, parse_kv
from store.errors import StoreError
from store.etcd import EtcdStore
from store.paging import KeyRange
from store.watchmodel import Change, WatchedState

__all__ = ["NodeWatch", "ViewNotReady", "assignments_of", "failure_records", "orphans",
           "own_ranges", "peer_ranges", "record_ranges"]

log = structlog.get_logger("vmha.agent")


class ViewNotReady(TemporaryError):
    """No listing holds yet, or the watch failed and must list again: the agent acts on
    no view until it does (an empty view would show no assignment at all)."""


def own_ranges(ks: KeyspaceV2, me: str) -> tuple[KeyRange, ...]:
    """What `me` always watches; disjoint from each other and from any peer's keys
    (section 1: no node range covers another node)."""
    return (KeyRange.prefix(ks.assignments(me)), KeyRange.prefix(ks.node_root(me)),
            KeyRange.key(ks.cordon(me)), KeyRange.key(ks.config), KeyRange.key(ks.version))


def assignments_of(ks: KeyspaceV2, me: str, kvs: Iterable[RawKV]) -> dict[str, Assignment]:
    """`me`'s valid assignments by VM (an invalid one is the snapshot's to report)."""
    out: dict[str, Assignment] = {}
    prefix = ks.assignments(me)
    for kv in kvs:
        if not kv.key.startswith(prefix):
            continue
        res = parse_kv(ks, kv)
        if isinstance(res, ParsedKV) and isinstance(res.entry.value, Assignment):
            out[res.ref.vm] = res.entry.value
    return out


def peer_ranges(ks: KeyspaceV2, me: str, kvs: Iterable[RawKV]) -> frozenset[KeyRange]:
    """The peers' keys `me` needs: for each assignment naming another node (a
    migration), that node's registration and its status of the VM; and the status of
    the VM of each node its placement gave up on (`failed_nodes`)."""
    out: set[KeyRange] = set()
    for vm, a in assignments_of(ks, me, kvs).items():
        for peer in a.peers(me):
            out.add(KeyRange.key(ks.reg(peer)))
        for peer in a.status_peers(me):
            out.add(KeyRange.key(ks.status(peer, vm)))
    return frozenset(out)


def _assigned_vms(ks: KeyspaceV2, me: str, kvs: Iterable[RawKV]) -> set[str]:
    """The VMs with an assignment key of `me`'s, valid or not."""
    assigned: set[str] = set()
    prefix = ks.assignments(me)
    for kv in kvs:
        if kv.key.startswith(prefix):
            ref = ks.parse(kv.key)
            assigned.add(ref.vm or kv.key[len(prefix):])
    return assigned


def orphans(ks: KeyspaceV2, me: str, kvs: Iterable[RawKV], managed: Iterable[str]) -> list[str]:
    """The managed domains with no assignment key at all (valid or not: an invalid
    one leaves its VM alone, so nothing else is read for it)."""
    return sorted(set(managed) - _assigned_vms(ks, me, kvs))


def failure_records(ks: KeyspaceV2, me: str, kvs: Iterable[RawKV],
                    managed: Iterable[str]) -> dict[str, VmStatus]:
    """`me`'s own statuses that count failures (`boot_failures`, `crashes`) of VMs with
    no assignment key and no managed domain here, by VM: each may be the record of why
    vmha gave up on its VM here, kept while the VM's placement says so."""
    kvs = list(kvs)
    skip = _assigned_vms(ks, me, kvs) | set(managed)
    prefix = ks.statuses(me)
    out: dict[str, VmStatus] = {}
    for kv in kvs:
        if not kv.key.startswith(prefix) or ks.parse(kv.key).vm in skip:
            continue  # parsed only when it may count: most statuses have an assignment
        res = parse_kv(ks, kv)
        if (isinstance(res, ParsedKV) and isinstance(res.entry.value, VmStatus)
                and (res.entry.value.boot_failures or res.entry.value.crashes)):
            out[res.ref.vm] = res.entry.value
    return out


def record_ranges(ks: KeyspaceV2, me: str, kvs: Iterable[RawKV],
                  managed: Iterable[str]) -> frozenset[KeyRange]:
    """The placement key of each VM of `failure_records`."""
    return frozenset(KeyRange.key(ks.place(vm)) for vm in failure_records(ks, me, kvs, managed))


class NodeWatch:
    """Agent `me`'s watched keys and the node view built from them.

    The owner calls `start()` (list, then watch), `wait()` for changes (it raises
    `StoreCompacted`/`StoreRejected` when the owner must `start()` again), and `view()`
    at each cycle, which follows the peers named by the assignments and the placements
    of its failure records (watching or dropping those keys) and adds the targeted gets
    of orphan domains."""

    def __init__(self, store: EtcdStore, ks: KeyspaceV2, me: str, **watch_opts: Any) -> None:
        self.store, self.ks, self.me = store, ks, me
        self.state = WatchedState(store, own_ranges(ks, me), **watch_opts)
        self._peers: frozenset[KeyRange] = frozenset()
        self.targeted_gets = 0  # reads outside the watch, for the tests and the logs
        # A listing holds and no failure since: set by start(), cleared by pump().
        self.ready = False
        self._closed = threading.Event()

    def start(self) -> int:
        """List and watch (the peers' keys watched so far included); returns the
        listing's revision."""
        rev = self.state.start()
        self.ready = True
        return rev

    def pump(self, wake: threading.Event, stopped: threading.Event) -> None:
        """The agent's watch thread: wake the agent on each change; on a failure (a
        compaction, a refusal) mark the view not ready, so the next cycle lists again
        before it plans.  It ends on close() (the agent closes its view when it
        stops)."""
        while not stopped.is_set() and not self._closed.is_set():
            if not self.ready:
                stopped.wait(0.1)
                continue
            try:
                # No timeout: a change, a failure or close() ends the wait (a timeout
                # would only wake the thread every so often for nothing).
                if self.state.wait(None):
                    wake.set()
            except StoreError as exc:
                self.ready = False
                log.warning("node_watch_failed", node=self.me, error=str(exc),
                            reason="listing again before the next plan")
                wake.set()

    def wait(self, timeout: float | None) -> list[Change]:
        return self.state.wait(timeout)

    def close(self) -> None:
        self._closed.set()
        self.state.close()

    @property
    def peers(self) -> frozenset[KeyRange]:
        """The keys followed beyond its own: `peer_ranges` and `record_ranges`."""
        return self._peers

    def own_kvs(self) -> list[RawKV]:
        """Everything watched now, in key order (own keys and the peers')."""
        return self.state.items()[1]

    def view(self, managed: Sequence[str]) -> NodeView:
        """The node view now: the watched keys, the peers the assignments name, the
        placements of its failure records, and the placement and spec of each managed
        domain without an assignment."""
        if not self.ready:
            raise ViewNotReady(f"{self.me}: no current listing of its keys")
        rev, kvs = self.state.items()
        want = peer_ranges(self.ks, self.me, kvs) | record_ranges(self.ks, self.me, kvs,
                                                                  managed)
        if want != self._peers:
            self._follow(want)
            rev, kvs = self.state.items()
        extra: list[RawKV] = []
        for vm in orphans(self.ks, self.me, kvs, managed):
            for key in (self.ks.place(vm), self.ks.spec(vm)):
                self.targeted_gets += 1
                kv = self.store.get(key)
                if kv is not None:
                    extra.append(kv)
        return NodeView(self.me, rev, (*kvs, *extra))

    def _follow(self, want: frozenset[KeyRange]) -> None:
        """Watch the keys now followed, drop the others.  Each range is changed on
        its own: a failure leaves `_peers` saying what is watched, and the next view
        carries on from there."""
        for keys in sorted(self._peers - want, key=lambda r: r.start):
            self.state.remove(keys)
            self._peers = self._peers - {keys}
        for keys in sorted(want - self._peers, key=lambda r: r.start):
            self.state.add(keys)
            self._peers = self._peers | {keys}
