"""The orchestrator on keyspace 2 (docs/keyspace-v2.md, section 7, part 3).

Same election, lease, config, fencing and planner as `orchestrator.leader` (keyspace
1); what differs is where the snapshot comes from and what a decision writes:

* **A model kept from a watch.**  `store.watchmodel.WatchedState` holds every key under
  the prefix: listed in pages once (at the first cycle as leader, and again only after
  a compaction, a canceled watch or a model that cannot catch up), then kept by the
  watch.  A cycle reads the model, never etcd.  Before deciding, the model must hold the
  leader's own last write (and its election): a model behind it would decide again
  what is already written.
* **Writes from `schemas.writes_v2`** (`orchestrator.txn_v2`): a placement with its
  assignments in one transaction, fence records and clears as on keyspace 1, and the
  leader's upkeep: spec refresh, repair of assignments, `vm remove`, confirm-offs.
  Each is written only when the model differs from it, so an idle cluster costs no
  transaction.
* **History** under `P-history/o/`; the prune reads the history's keys in pages.

Which keyspace runs is chosen at start by `/vmha/version` (`orchestrator_for`): absent,
keyspace 1 as before; `keyspace 2, done`, this one.  A marker that changes while it runs
ends its loop (run() returns EXIT_KEYSPACE_CHANGED, the lease revoked), and `vmha
orchestrator` chooses again in the same process: no etcd value stops the daemon.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_when_event_set,
    wait_random_exponential,
)

from orchestrator import planner, txn_v2
from orchestrator.gone_v2 import GoneKeys
from orchestrator.leader import EXIT_KEYSPACE_CHANGED, Orchestrator
from orchestrator.liveness_v2 import LivenessProbe
from orchestrator.model_v2 import ParseCache, leader_model
from schemas import marker
from schemas.errors import ConfigError
from schemas.keys_v2 import KeyRefV2, KeyspaceV2
from schemas.models import ClusterConfig
from schemas.snapshot import ClusterSnapshot
from schemas.txn import Txn
from store.errors import StoreCompacted, StoreError, StoreUnavailable
from store.etcd import EtcdStore
from store.history import HistoryWriter
from store.paging import KeyRange
from store.watchmodel import Change, WatchedState

log = structlog.get_logger("vmha.orchestrator")


class MigrationUnderWay(ConfigError):
    """The marker says a keyspace migration runs: no orchestrator decides until done."""


def settle_heap() -> None:
    """After a full listing: collect, then move every object alive to the garbage
    collector's permanent generation.  The parsed keys of a whole cluster (at 10,000
    VMs, over 40,000 entries of models, dicts and lists) live until their keys change,
    and each full collection traversed all of them again: it tripled the median model
    build (0.12 s to 0.36 s) and lengthened the cycles that decide a fence.  Frozen
    objects are still freed when their last reference goes; only garbage in a reference
    cycle among them would stay, so each listing (election, compaction) first unfreezes
    and collects everything: such garbage lives at most until the next listing."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class OrchestratorV2(Orchestrator):
    def __init__(self, store: EtcdStore, ident: str | None = None, poll_interval_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, catch_up_s: float = 2.0,
                 watch_options: Mapping[str, Any] | None = None) -> None:
        """`watch_options`: more arguments of the model's `WatchedState` (tests inject
        its clock and intervals)."""
        super().__init__(store, ident, poll_interval_s, clock)
        self.ks2 = KeyspaceV2(self.ks.prefix)
        self.watch_options = dict(watch_options or {})
        self.history = HistoryWriter(store, f"leader:{self.ident}", key=self.ks2.leader_event)
        self.state = self._new_state()
        self.model = leader_model(self.ks2, 0, [])
        self.parse_cache = ParseCache()
        self.models = 0  # models built (a cycle on an unchanged revision builds none)
        self.writes = txn_v2.Writes(self.ks2, lambda: self.model)
        self.catch_up_s = catch_up_s
        self._listed = False
        self._wrote_at = 0  # revision of the last write of ours the model must hold
        # The VMs whose assignment invariant is to be checked: None after a list (all of
        # them), then those whose keys the watch changed since (an idle cycle checks none).
        self._upkeep_due: set[str] | None = None
        # Transactions sent and paged lists of the model, for tests and benchmarks.
        self.stats = {"txns": 0, "lists": 0}
        self.log = self.log.bind(keyspace=2)
        # Liveness fencing (fencing.liveness_fence): the mode, and when this term first
        # saw each lost node's liveness key gone too (kept like `lost_since`).
        self.liveness = LivenessProbe(store, self.log, clock)
        self.both_gone_since: dict[str, float] = {}
        self.gone = GoneKeys(self.ks2)  # when the watch showed node keys gone

    # ---- config: read only (the orchestrator's role does not write it) --------------

    def ensure_config(self) -> ClusterConfig:
        """Refuse an invalid or unsafe config; absent, the defaults (`vmha auth setup`
        creates it on keyspace 2: the orchestrator's role may not write it)."""
        kv = self.store.get(self.ks2.config)
        self._check_config(leader_model(self.ks2, 0, [kv] if kv else []).snapshot,
                           starting=not self.resumed)
        return self.cfg

    # ---- the model --------------------------------------------------------------------

    def _new_state(self) -> WatchedState:
        return WatchedState(self.store, [KeyRange.prefix(self.ks2.root)], notify=self.wake,
                            **self.watch_options)

    def campaign(self) -> bool:
        if self._listed:
            # Stepped down: a follower keeps no model (nothing would take its changes,
            # and a term of its own starts from a fresh list).
            self.state.close()
            self.state, self._listed = self._new_state(), False
        elected = super().campaign()
        if elected:
            # A new term counts from its own observations (from its first list: later
            # than the real deletions, so the windows can only grow).
            self.both_gone_since = {}
            self.gone.forget()
            self.liveness.elected()
        return elected

    def _plan(self, snap: ClusterSnapshot, epoch: int) -> planner.Plan:
        """The planner with the liveness mode of this cycle (section 4)."""
        lost_since, both_gone_since = self.lost_since, self.both_gone_since
        if not self.state.pending():  # the model holds no change newer than the times
            lost_since, both_gone_since = self.gone.seed(lost_since, both_gone_since)
        result = planner.plan(snap, epoch=epoch, now=self.clock(), wall_time=time.time(),
                              lost_since=lost_since,
                              liveness=self.liveness.current(self.cfg),
                              both_gone_since=both_gone_since)
        for node in sorted(set(result.both_gone_since) - set(self.both_gone_since)):
            self.log.info("node_liveness_gone", node=node, epoch=epoch,
                          reason="registration and liveness keys both gone: the liveness "
                                 "fence window starts")
        self.both_gone_since = dict(result.both_gone_since)
        return result

    def _read(self) -> ClusterSnapshot:
        self._wrote_at = max(self._wrote_at, self.epoch or 0)
        if self._listed:
            try:
                self._changed(self.state.wait(0))
            except StoreError as exc:  # compacted or canceled: list again
                self._listed = False
                self.log.warning("model_lost", error=str(exc), revision=self.state.revision,
                                 reason="listing the keyspace again")
        listed = not self._listed
        if listed:
            self.state.start()
            self._listed = True
            self._upkeep_due = None
            self.gone.forget()
            self.stats["lists"] += 1
        self._catch_up()
        if self.state.revision != self.model.snapshot.revision:
            # A revision the model holds is the same data: at 10,000 VMs building the
            # model again costs most of a second of an idle leader's cycle.
            rev, kvs = self.state.items()
            self.model = leader_model(self.ks2, rev, kvs, self.parse_cache)
            self.models += 1
        if listed:
            settle_heap()
        if not self._keyspace_still_2():
            # The cycle resigns (`keyspace_changed`) and writes nothing; a marker that
            # does not parse is reported first, as every invalid key is.
            bad = tuple(i for i in self.model.snapshot.invalid if i.key == self.ks2.version)
            return ClusterSnapshot(revision=self.model.snapshot.revision,
                                   errors=tuple(i.error for i in bad),
                                   invalid=bad)
        return self.model.snapshot

    def _catch_up(self) -> None:
        deadline = self.clock() + self.catch_up_s
        try:
            while self.state.revision < self._wrote_at:
                left = deadline - self.clock()
                if left <= 0:
                    raise StoreUnavailable(f"the watch is at revision {self.state.revision}, "
                                           f"behind this leader's write at {self._wrote_at}")
                self._changed(self.state.wait(min(left, 0.1)))
        except StoreError:
            self._listed = False  # the next cycle lists again
            raise

    def _changed(self, changes: list[Change]) -> None:
        """Note when node keys went, and the VMs whose keys changed, for the next
        upkeep."""
        self.gone.note(changes, self.clock())
        if self._upkeep_due is None:
            return
        for c in changes:
            ref = self.ks2.parse(c.key)
            if isinstance(ref, KeyRefV2) and ref.vm:
                self._upkeep_due.add(ref.vm)

    def _keyspace_still_2(self) -> bool:
        """This loop runs keyspace 2 only while the marker says `done`."""
        v = self.model.version
        return v is not None and v.value.state == "done"

    def keyspace_changed(self, snap: ClusterSnapshot) -> bool:
        return not self._keyspace_still_2()

    def _stop_for_migration(self) -> None:
        """The marker no longer says keyspace 2 done: resign (the loop ends, the lease is
        revoked) without a decision; `vmha orchestrator` chooses again, and waits while the
        marker names no keyspace."""
        v = self.model.version
        invalid = any(i.key == self.ks2.version for i in self.model.snapshot.invalid)
        self.log.error("keyspace_changed", epoch=self.epoch,
                       state=v.value.state if v else "invalid" if invalid else "absent",
                       reason="the keyspace marker no longer says keyspace 2 done: resigning "
                              "to choose again the keyspace it names")
        self.exit_code = EXIT_KEYSPACE_CHANGED
        self.stopped.set()

    def _stop_watches(self) -> None:
        self.all_watch.stop()
        self.state.close()
        self.liveness.stop()

    # ---- writes -----------------------------------------------------------------------

    def _send(self, txn: Txn) -> bool:
        ok = super()._send(txn)
        self.stats["txns"] += 1
        if ok:
            self._wrote_at = max(self._wrote_at, self.last_write_revision)
        return ok

    def _upkeep(self, snap: ClusterSnapshot, epoch: int, result: planner.Plan) -> int:
        """Confirm-offs, then the assignment invariant of the VMs the planner left alone
        this cycle; each written only if the model differs from it."""
        placed = frozenset(a.placement.vm for a in result.actions
                           if isinstance(a, planner.WritePlacement))
        due, self._upkeep_due = self._upkeep_due, set()
        ups = [*txn_v2.confirm_offs(self.ks2, self.model, epoch, time.time()),
               *txn_v2.assignment_upkeep(self.ks2, self.model, epoch, skip=placed, only=due)]
        # Checked again next cycle: the planner's VMs (their write may fail) and any
        # upkeep not written below; a write that applies comes back by the watch.
        self._upkeep_due |= placed if due is None else placed & due
        self._upkeep_due |= {up.vm for up in ups if up.vm}
        written = 0
        for up in ups:
            if not self.is_leader:
                self.log.warning("not_writing", reason="leadership not certain",
                                 revision=snap.revision)
                break
            ok = self._send(up.write.txn)
            if ok:
                self._upkeep_due.discard(up.vm)
            fields = {k: v for k, v in (("vm", up.vm), ("node", up.node)) if v}
            self.log.info(up.event, **fields, reason=up.reason, written=ok, epoch=epoch,
                          revision=snap.revision)
            if ok:
                written += 1
                if up.history:
                    self.history.record(up.history, epoch=epoch, reason=up.reason, **fields)
        return written

    def _prune_history(self) -> None:
        try:
            keys = [k for page in self.store.list_pages(self.ks2.history, keys_only=True)
                    for k in page.raw_keys]
            writes = txn_v2.history_prune(self.ks2, keys, time.time(),
                                          self.cfg.history_retention_s,
                                          self.cfg.history_max_events)
            for w in writes:
                self.store.txn(w.txn.compares, w.txn.ops)
                self.stats["txns"] += 1
        except (StoreUnavailable, StoreCompacted) as exc:
            self.log.warning("history_prune_failed", error=str(exc))
            return
        n = sum(len(w.txn.ops) for w in writes)
        if n:
            self.log.info("history_pruned", deleted=n)


# ---- which keyspace -------------------------------------------------------------------


def keyspace_of(store: EtcdStore) -> int:
    """1 if `/vmha/version` is absent, 2 if it says keyspace 2 done; MigrationUnderWay
    (a ConfigError) while a migration is under way or for a marker that does not parse:
    waited out alike, since guessing a keyspace could find no VM in it."""
    key = KeyspaceV2(store.keyspace.prefix).version
    try:
        return marker.keyspace_of(store.get(key), key)
    except marker.KeyspaceUndecided as exc:
        raise MigrationUnderWay(f"{exc}: this release runs keyspace 2 once it is done"
                                ) from exc


def orchestrator_for(store: EtcdStore, ident: str | None, stopped: threading.Event, *,
                     wait: bool = True, poll_interval_s: float = 0.5) -> Orchestrator | None:
    """The orchestrator of the keyspace `/vmha/version` names, asked for as long as etcd
    does not answer and while a migration is under way (None: stopped before either
    ended; `wait` False: asked once, and StoreUnavailable or MigrationUnderWay raised).
    `stopped` becomes its stop event."""
    if not wait:
        ks = keyspace_of(store)
    else:
        try:
            ks = Retrying(retry=retry_if_exception_type((StoreUnavailable, MigrationUnderWay)),
                          stop=stop_when_event_set(stopped),
                          wait=wait_random_exponential(multiplier=0.2, max=2.0),
                          before_sleep=lambda st: log.warning(
                              "waiting_for_keyspace", attempt=st.attempt_number,
                              reason=str(st.outcome.exception() if st.outcome else "")),
                          reraise=True)(keyspace_of, store)
        except (StoreUnavailable, MigrationUnderWay):
            return None
    orch = (OrchestratorV2 if ks == 2 else Orchestrator)(store, ident=ident,
                                                          poll_interval_s=poll_interval_s)
    orch.stopped = stopped
    return orch
