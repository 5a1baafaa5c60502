"""vmha's safety invariants, checked from outside vmha: the one checker of the tests, the
fault campaigns (fake and lab) and the lab's end-to-end tests.

I1  at most one running instance per VM: :class:`DoubleRunChecker` samples a
    ground-truth source in a thread (:class:`FakeTruth`: the fake hypervisor's files
    and host processes; :class:`LabTruth`: every lab libvirtd asked directly), never
    vmha's own view;
I3  no write from a stale leader epoch or a stale agent was accepted:
    :class:`HistoryChecker` replays etcd's history (a watch from revision 1);
I4  a VM that cannot run has a visible ``pending`` (waiting for capacity) or ``failed``
    (given up after its restart and relocation limits) placement with a reason
    (:func:`visibly_pending`).

(I2, "everything runs again after a fault", is a property of a whole campaign step:
see bench.campaign_core.)
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hypervisor.fake import fake_ground_truth
from lab.localcluster import poll_until
from schemas import Keyspace
from schemas.keys import decode_key
from schemas.keys_v2 import KeyRefV2, KeyspaceV2
from schemas.models import FenceRecord, Model, Placement, VmStatus
from schemas.models_v2 import Assignment
from store.etcd import EtcdStore, StoreUnavailable

#: VM name -> the nodes it runs on, as a ground-truth source sees it.
Truth = dict[str, list[str]]


class TruthSource(Protocol):
    def read(self) -> Truth:
        """Where every VM runs, read without any vmha code path."""

    def confirm(self, vm: str, nodes: list[str]) -> bool:
        """Whether ``vm``, seen on ``nodes`` by one :meth:`read`, really ran on all of
        them at once (a read that visits the nodes one after the other can straddle a
        live migration's switch-over)."""


class FakeTruth:
    """The fake hypervisor's ground truth (``hypervisor.fake.fake_ground_truth``): one
    read already counts a migration's switch-over once, so every double is real."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self) -> Truth:
        return fake_ground_truth(self.root)

    def confirm(self, vm: str, nodes: list[str]) -> bool:
        return True


class LabNodes(Protocol):
    """What :class:`LabTruth` needs of ``lab.cluster.LabCluster``."""

    node_names: tuple[str, ...]

    def ground_truth(self, include_migrating: bool = False) -> Truth: ...

    def node_domains(self, name: str) -> dict[str, str]: ...


class LabTruth:
    """The lab's ground truth: every lab libvirtd asked in turn, a domain counting only
    while its QEMU runs (``LabCluster.ground_truth``)."""

    def __init__(self, lc: LabNodes) -> None:
        self.lc = lc

    def read(self) -> Truth:
        return self.lc.ground_truth()

    def confirm(self, vm: str, nodes: list[str]) -> bool:
        """The nodes are read one after the other, so a switch-over can fall between two
        reads (the source read running, then the destination), and the source's libvirtd
        may still call its domain running a few milliseconds after the destination
        resumed (it learns of the QEMU's stop from an event; seen on the lab, source read
        after the destination).  A double is real only if a fresh read of every one of
        the nodes, after the sample, still sees the VM running on each: one that really
        runs twice does so until a destroy, for far longer than a read."""
        return all(self.lc.node_domains(n).get(vm) == "running" for n in nodes)


@dataclass
class _Run:
    """Consecutive samples that saw the same truth: the first and the last one."""

    first: float
    last: float
    truth: Truth


class DoubleRunChecker:
    """I1, sampled every ``interval`` s in a thread for as long as it runs.

    It keeps every change of the ground truth (not every sample), so that
    :meth:`seen` and :meth:`recovery` can look back over a whole test or campaign."""

    def __init__(self, source: TruthSource, interval: float = 0.01,
                 keep: int = 50_000) -> None:
        self.source = source
        self.interval = interval
        self.keep = keep
        self.samples = 0
        self.transient_doubles = 0  # seen in one read, refuted by the source
        self.violations: list[dict[str, Any]] = []
        self.read_errors: list[str] = []  # e.g. a node torn down mid-read
        self._runs: list[_Run] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> DoubleRunChecker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    @contextlib.contextmanager
    def running(self) -> Iterator[DoubleRunChecker]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - recorded; the next read may succeed
                self.read_errors = [*self.read_errors[-99:], repr(exc)]
            self._stop.wait(self.interval)

    def sample(self) -> Truth:
        """One read of the source: check it, and remember it if anything changed."""
        started = time.monotonic()
        truth = self.source.read()
        for vm, nodes in truth.items():
            if len(nodes) < 2:
                continue
            if self.source.confirm(vm, nodes):
                self.violations.append({"invariant": "I1", "vm": vm, "nodes": nodes,
                                        "at": time.time()})
            else:
                self.transient_doubles += 1
        with self._lock:
            if self._runs and self._runs[-1].truth == truth:
                self._runs[-1].last = started
            else:
                self._runs.append(_Run(started, started, truth))
                if len(self._runs) > self.keep:
                    del self._runs[:self.keep // 2]
            self.samples += 1
        return truth

    def samples_since(self, since: float) -> list[tuple[float, Truth]]:
        """What the samples begun at or after ``since`` (monotonic) saw, a line per
        change: when it was first seen (``since`` at the earliest) and what."""
        with self._lock:
            runs = [r for r in self._runs if r.last >= since]
        return [(max(r.first, since), r.truth) for r in runs]

    def seen(self, vm: str, since: float = 0.0) -> set[str]:
        """Nodes ``vm`` was seen running on, in samples begun at or after ``since``."""
        return {n for _, truth in self.samples_since(since) for n in truth.get(vm, ())}

    def recovery(self, vms: list[str], t0: float) -> dict[str, float]:
        """Per VM of ``vms``: seconds from ``t0`` to the first sample that saw it running
        once after one (since ``t0``) that did not; VMs that never went down are left
        out."""
        out: dict[str, float] = {}
        history = self.samples_since(t0)
        for vm in vms:
            down_seen = False
            for t, truth in history:
                if len(truth.get(vm, [])) != 1:
                    down_seen = True
                elif down_seen:
                    out[vm] = round(t - t0, 3)
                    break
        return out


def visibly_pending(store: EtcdStore, vm: str, ks: Keyspace | KeyspaceV2 | None = None) -> bool:
    """I4: the VM's placement says ``pending`` or ``failed``, with a reason (on either
    keyspace: ``ks`` is its layout)."""
    ks = ks or Keyspace()
    key = ks.place(vm) if isinstance(ks, KeyspaceV2) else ks.vm_placement(vm)
    try:
        kv = store.get(key)
    except StoreUnavailable:
        return False
    p = json.loads(kv.value) if kv else None
    return bool(p and p.get("kind") in ("pending", "failed") and p.get("reason"))


_MODELS: dict[str, type[Model]] = {"vm_placement": Placement, "fence": FenceRecord,
                                   "vm_status": VmStatus, "assignment": Assignment}
#: Keyspace 2's kinds the checker follows, by the names keyspace 1 gives them.
_V2_KINDS = {"leader": "leader", "reg": "node", "place": "vm_placement", "fence": "fence",
             "status": "vm_status", "assignment": "assignment"}


def classify(ks: Keyspace | KeyspaceV2, key: str) -> tuple[str, str] | None:
    """What :class:`HistoryChecker` makes of ``key``: (kind in keyspace 1's terms, the
    node it names or ``""``), or None for a key it does not follow.  Each layout parses
    its own keys (on keyspace 2 a status or an assignment names its node in the key)."""
    if isinstance(ks, KeyspaceV2):
        ref2 = ks.parse(key)
        if not isinstance(ref2, KeyRefV2) or ref2.kind not in _V2_KINDS:
            return None
        return _V2_KINDS[ref2.kind], ref2.node
    ref = ks.parse(key)
    if ref is None:
        return None
    return ref.kind, ref.name if ref.kind == "node" else ""


class HistoryChecker:
    """I3 over etcd's history, from a watch that starts at revision 1: every placement
    and leader-written fence record carries the epoch of the leader key that existed
    at its revision; every status was written while its node was registered, under the
    registration current at its revision (the one the status names).

    On keyspace 2 (``ks`` a :class:`KeyspaceV2`) every assignment (what an agent acts
    on) holds the VM's placement as etcd held it at the assignment's revision, naming
    the assignment's node (the leader writes both in one transaction, and repairs
    assignments to match: an assignment that differs was written by someone else, a
    stale leader); a status belongs to the node its key names.  A ``stopped`` status
    without a registration may be written while its node is not registered: the
    stale-claim rewrite before a new registration, compared on the registration absent
    (docs/keyspace-v2.md, section 1)."""

    def __init__(self, store: EtcdStore, ks: Keyspace | KeyspaceV2 | None = None) -> None:
        self.store = store
        self.ks: Keyspace | KeyspaceV2 = ks or Keyspace()
        self.last_rev = 0
        self._seen_at_last: set[str] = set()  # the keys of revision last_rev seen
        self._placements: dict[str, Any] = {}  # keyspace 2: VM -> its placement now
        self._assignments: list[tuple[int, str, str, Any]] = []  # of revision last_rev
        self.leader_terms: dict[int, int | None] = {}  # epoch -> revision that ended it
        self.regs: dict[str, list[list[int | None]]] = {}  # node -> [[create, end]]
        self.violations: list[dict[str, Any]] = []
        self.checked = {"placement": 0, "status": 0, "fence": 0}
        if isinstance(self.ks, KeyspaceV2):
            self.checked |= {"assignment": 0, "stale_claim_rewrite": 0}
        self._lock = threading.Lock()
        self._cancel: Any = None
        self._broken = True

    def _cb(self, resp: Any) -> None:
        events = getattr(resp, "events", None)
        if events is None:
            self._broken = True
            return
        with self._lock:
            for ev in events:
                self._event(ev)
            self._judge_assignments()  # a response holds whole revisions

    def _event(self, ev: Any) -> None:
        rev = int(ev.mod_revision)
        key = decode_key(ev.key)  # never raises: a hostile key is just not one of ours
        # One transaction's keys share a revision (keyspace 2's placement and its
        # assignments): a re-established watch may deliver that revision again, so
        # skip only the keys of it already seen.
        if rev < self.last_rev or (rev == self.last_rev and key in self._seen_at_last):
            return
        if rev > self.last_rev:
            self._seen_at_last = set()
            self._judge_assignments()
        self._seen_at_last.add(key)
        deleted = type(ev).__name__ == "DeleteEvent"
        got = classify(self.ks, key)
        self.last_rev = rev
        if got is None:
            return
        kind, node = got
        if kind == "leader":
            self._leader(rev, int(ev.create_revision), deleted)
        elif kind == "node":
            self._registration(node, rev, int(ev.create_revision), deleted)
        elif kind == "vm_placement" and deleted:
            self._placements.pop(self._vm(key), None)
        elif not deleted:
            self._write(kind, key, rev, ev.value, node)

    def _leader(self, rev: int, created: int, deleted: bool) -> None:
        if not deleted:
            self.leader_terms.setdefault(created, None)
            return
        for e, end in self.leader_terms.items():
            if end is None:
                self.leader_terms[e] = rev

    def _registration(self, node: str, rev: int, created: int, deleted: bool) -> None:
        ivs = self.regs.setdefault(node, [])
        if deleted:
            for iv in ivs:
                if iv[1] is None:
                    iv[1] = rev
        elif not ivs or ivs[-1][0] != created:
            ivs.append([created, None])

    def _write(self, kind: str, key: str, rev: int, value: bytes, node: str = "") -> None:
        model = _MODELS.get(kind)
        try:
            # A value its model refuses is data the daemons skip, never a decision.
            if model is not None:
                model.from_json(value, key)
            data = json.loads(value)
            if (not isinstance(data, dict) or not isinstance(data.get("epoch", -1), int)
                    or not isinstance(data.get("node", ""), str)):
                return
        except Exception:  # noqa: BLE001 - deep nesting, not UTF-8: the daemons ignore it too
            return
        if kind == "vm_placement":
            if isinstance(self.ks, KeyspaceV2):
                self._placements[self._vm(key)] = data
            self.checked["placement"] += 1
            self._check_epoch(rev, int(data.get("epoch", -1)), key)
        elif kind == "fence" and data.get("method") in ("self", "external"):
            self.checked["fence"] += 1
            self._check_epoch(rev, int(data.get("epoch", -1)), key)
        elif kind == "assignment":
            self.checked["assignment"] += 1
            # Judged once the whole revision is in (its placement may come after it).
            self._assignments.append((rev, key, node, data.get("placement")))
        elif kind == "vm_status":
            self.checked["status"] += 1
            self._check_status(key, rev, data, node)

    def _vm(self, key: str) -> str:
        ref = self.ks.parse(key)
        return ref.vm if isinstance(ref, KeyRefV2) else ""

    def _judge_assignments(self) -> None:
        """The assignments of revisions before the next one: each holds its VM's
        placement as etcd held it then, naming the assignment's node."""
        for rev, key, node, held in self._assignments:
            place = self._placements.get(self._vm(key))
            if place is None or held != place:
                why = f"assignment to {node} differs from the placement at {rev}"
            elif node not in (place.get("node"), place.get("from_node")):
                why = f"assignment to {node}, which the placement at {rev} does not name"
            else:
                continue
            self.violations.append({"invariant": "I3", "key": key, "revision": rev,
                                    "why": why})
        self._assignments.clear()

    def _check_status(self, key: str, rev: int, data: dict[str, Any], owner: str = "") -> None:
        """A status is written while its node is registered, and under the registration
        current at that revision when it names one (a stale agent's write names an
        older registration of the same node).  ``owner``: the node its key names
        (keyspace 2), else the value's."""
        node = owner or data.get("node", "")
        current = [c for c, end in self.regs.get(node, [])
                   if c is not None and c <= rev and (end is None or rev < end)]
        writer = data.get("registration")
        if (not current and owner and data.get("state") == "stopped"
                and writer is None):
            self.checked["stale_claim_rewrite"] += 1
            return
        if not current:
            why = f"status from {node} while not registered"
        elif isinstance(writer, int) and writer not in current:
            why = (f"status from {node} under registration {writer} while {current[-1]} "
                   "was current")
        else:
            return
        self.violations.append({"invariant": "I3", "key": key, "revision": rev, "why": why})

    def _check_epoch(self, rev: int, epoch: int, key: str) -> None:
        end = self.leader_terms.get(epoch, -1)
        if epoch not in self.leader_terms or not (epoch <= rev and (end is None or rev < end)):
            self.violations.append({"invariant": "I3", "key": key, "revision": rev,
                                    "why": f"epoch {epoch} was not the leader at {rev}"})

    def ensure(self) -> None:
        """(Re-)establish the watch where it stopped (after a member died, say)."""
        if not self._broken:
            return
        try:
            if self._cancel is not None:
                with contextlib.suppress(Exception):  # the old watch is dead anyway
                    self.store.client.cancel_watch(self._cancel)
            self._cancel = self.store.client.add_watch_prefix_callback(
                # From last_rev itself: a revision cut off mid-way is delivered whole.
                self.ks.root, self._cb, start_revision=max(self.last_rev, 1))
            self._broken = False
        except Exception:  # noqa: BLE001 - etcd unavailable: _broken says try again
            self._broken = True

    def caught_up(self, timeout: float = 10.0) -> bool:
        """Whether the watch has seen etcd's current revision within ``timeout`` s."""
        return poll_until(self._caught_up, timeout) is not None

    def _caught_up(self) -> bool:
        self.ensure()
        try:
            cur = self.store.revision()
        except StoreUnavailable:
            return False
        with self._lock:
            return self.last_rev >= cur or self._only_foreign_after(cur)

    def _only_foreign_after(self, cur: int) -> bool:
        # History events live outside the watched prefix; probe the tail once.
        try:
            kvs = self.store.get_prefix(self.ks.root)
        except StoreUnavailable:
            return False
        return max((kv.mod_revision for kv in kvs), default=0) <= self.last_rev


__all__ = ["DoubleRunChecker", "FakeTruth", "HistoryChecker", "LabNodes", "LabTruth", "Truth",
           "TruthSource", "visibly_pending"]
