"""The orchestrator daemon: elect one leader in etcd; the leader feeds the planner.

Every write the leader makes is one etcd transaction that also compares the
leader key's create_revision with the leader's epoch, so a deposed leader (one
whose lease expired while it was paused, say) can never write a decision that
takes effect.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence

import structlog
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_when_event_set,
    wait_random_exponential,
)

from fencing.agents import ExternalFencer, FenceResult, missing_credentials
from fencing.lease import LeaseKeeper
from fencing.policy import device_for, require_safe_timing
from orchestrator import planner, replan, txn_builder
from orchestrator.actions import frozen_by_invalid_key, lost_history
from schemas.errors import ConfigError
from schemas.models import ClusterConfig, FenceRecord, LeaderRecord
from schemas.models_v2 import RELEASE
from schemas.snapshot import ClusterSnapshot, Entry
from schemas.txn import Cmp, Put, Txn
from store.etcd import EtcdStore, StoreUnavailable
from store.history import HistoryWriter, prune, read_events
from store.watch import PrefixWatch
from telemetry import metrics
from telemetry.invalid_keys import CycleBackoff, InvalidKeyReporter

log = structlog.get_logger("vmha.orchestrator")

# run()'s exit code when the keyspace marker names another keyspace than the one this
# loop runs: `vmha orchestrator` chooses again in the same process (cli.daemons).
EXIT_KEYSPACE_CHANGED = 2

__all__ = ["ConfigError", "Orchestrator"]


class Orchestrator:
    def __init__(self, store: EtcdStore, ident: str | None = None, poll_interval_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.ks = store.keyspace
        self.ident = ident or f"{socket.gethostname()}-{os.getpid()}"
        self.poll = poll_interval_s
        self.clock = clock
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.cfg = ClusterConfig()
        self.epoch: int | None = None
        self.keeper: LeaseKeeper | None = None
        self.lease_id: int | None = None
        self.lost_since: dict[str, float] = {}
        self.lost_told: set[str] = set()  # lost nodes whose loss the history records
        self.last_leases: dict[str, str] = {}
        self.last_uris: dict[str, str] = {}
        self.fencer = ExternalFencer(wake=self.wake)
        # The config error logged last: each new one is logged once, and hostile writes
        # of ever-different configs cannot grow a set of them without bound.
        self._config_error = ""
        self.leader_watch = PrefixWatch(store, self.ks.leader, self.wake)
        self.all_watch = PrefixWatch(store, self.ks.root, self.wake)
        self.history = HistoryWriter(store, f"leader:{self.ident}")
        # VM -> (lost node, lease loss observed, fence recorded): monotonic times.
        self.recovering: dict[str, tuple[str, float, float]] = {}
        self._cycles = 0
        self.log = log.bind(orchestrator=self.ident)
        self.invalid = InvalidKeyReporter(self.log)
        self.backoff = CycleBackoff(first_s=poll_interval_s, max_s=10.0)
        self.last_revision = 0  # of the last snapshot read, for the logs of a failed cycle
        self.exit_code = 0  # run()'s, once stopped
        self.writes: txn_builder.LeaderWrites = txn_builder.Writes(self.ks)
        self.quiet: replan.Quiet | None = None  # the last plan, if it had nothing to do
        self.max_quiet_s = replan.MAX_QUIET_S
        self.recheck_at: float | None = None  # the last plan's (orchestrator.replan)
        self._woke_for: float | None = None
        # Self-fence records written this cycle (node -> the record as etcd holds it).
        self.fenced_now: dict[str, Entry[FenceRecord]] = {}
        self.last_write_revision = 0  # of the last write that succeeded
        self.placed_after_fences = 0  # placements written in their fence's cycle
        self.plans = 0  # cycles that planned (the others found nothing changed)
        self.resumed = False  # chosen again in a running process (see succeed)

    # ---- config ------------------------------------------------------------------------

    def ensure_config(self) -> ClusterConfig:
        """Create the default config if absent; refuse an invalid or unsafe one."""
        key = self.ks.config
        self.store.txn([Cmp(key, "create", "==", 0)], [Put(key, ClusterConfig().to_json())])
        snap = self.store.snapshot()
        self._check_config(snap, starting=not self.resumed)
        return self.cfg

    def succeed(self, prev: Orchestrator) -> None:
        """This loop replaces `prev`, which resigned when the keyspace marker changed, in
        the same process.  It is a running orchestrator, not a fresh start: a stored config
        it refuses is logged (`config_rejected`) and `prev`'s last valid one kept, rather
        than ending the process (a value in etcd must not stop a daemon), and a bad key
        `prev` reported is not reported again at the same revision."""
        self.cfg = prev.cfg
        self.invalid = InvalidKeyReporter(self.log, seen=prev.invalid.seen)
        self.resumed = True

    def _start_config(self) -> None:
        """ensure_config at start, for as long as etcd does not answer: a member down
        while the orchestrator starts must not end it.  A config it refuses ends it."""
        Retrying(retry=retry_if_exception_type(StoreUnavailable),
                 stop=stop_when_event_set(self.stopped),
                 wait=wait_random_exponential(multiplier=0.2, max=5.0),
                 before_sleep=lambda st: self.log.warning(
                     "etcd_unavailable", at="start", attempt=st.attempt_number,
                     error=str(st.outcome.exception() if st.outcome else "")),
                 reraise=True)(self.ensure_config)

    def _check_config(self, snap: ClusterSnapshot, starting: bool = False) -> None:
        bad = [e for e in snap.errors if e.key == self.ks.config]
        try:
            if bad:
                raise ConfigError(str(bad[0]))
            require_safe_timing(snap.config)
        except (ConfigError, ValueError) as exc:
            if starting:
                raise ConfigError(str(exc)) from exc
            if str(exc) != self._config_error:
                self._config_error = str(exc)
                self.log.error("config_rejected", error=str(exc),
                               reason="keeping the last valid config")
            return
        if starting or snap.config != self.cfg:
            for name in missing_credentials(snap.config):
                # Only the name: the device fails (and says so) when it is needed.
                self.log.warning("fence_credential_missing", credential=name,
                                 reason="not readable in $CREDENTIALS_DIRECTORY; a fence "
                                        "device that needs it will fail")
        self.cfg = snap.config
        self._config_error = ""

    # ---- election ----------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.epoch is not None and self.keeper is not None and self.keeper.valid()

    def campaign(self) -> bool:
        cur = self.store.get(self.ks.leader)
        if cur is not None:
            if self.lease_id is not None and cur.lease == self.lease_id:
                # Our own old term (we stepped down at our deadline): let it go.
                self.store.revoke_lease(self.lease_id)
                self.lease_id = None
            return False
        sent = self.clock()
        lease_id = self.store.grant_lease(self.cfg.lease_ttl_s)
        rec = LeaderRecord(id=self.ident, host=socket.gethostname(), pid=os.getpid(),
                           lease_id=f"{lease_id:x}", elected_at=time.time(), version=RELEASE)
        res = self.store.txn([Cmp(self.ks.leader, "create", "==", 0)],
                             [Put(self.ks.leader, rec.to_json(), lease_id)])
        if not res.succeeded:
            self.log.info("election_lost", reason="another orchestrator created the leader "
                                                  "key first")
            self.store.revoke_lease(lease_id)
            return False
        self.lease_id = lease_id
        self.epoch = res.revision  # == the leader key's create_revision
        self.lost_since, self.lost_told = {}, set()
        self.keeper = LeaseKeeper(self.store, self.cfg, lease_id, sent,
                                  on_gone=lambda before: self.step_down("leader lease gone"),
                                  on_deadline=lambda: self.step_down(
                                      "leader lease not renewed before its deadline"),
                                  on_renewed=self._on_renewed,
                                  unavailable=StoreUnavailable, clock=self.clock,
                                  name=f"leader-{self.ident}").start()
        metrics.LEADER_EPOCH.set(self.epoch)
        metrics.IS_LEADER.set(1)
        self.log.info("elected", epoch=self.epoch, lease=f"{lease_id:x}", revision=res.revision)
        self.history.record("leader_elected", epoch=self.epoch,
                            reason=f"won the election with lease {lease_id:x}")
        return True

    def _on_renewed(self) -> None:
        if self.keeper is not None and self.keeper.last_renew_latency_s is not None:
            metrics.LEASE_RENEW_SECONDS.labels(who="leader").observe(
                self.keeper.last_renew_latency_s)

    def step_down(self, reason: str) -> None:
        metrics.LEADER_EPOCH.set(0)
        metrics.IS_LEADER.set(0)
        if self.epoch is not None:
            self.log.warning("deposed", epoch=self.epoch, reason=reason)
        self.epoch = None
        self.recheck_at = None
        if self.keeper is not None:
            self.keeper.stop()
            self.keeper = None
        self.wake.set()

    # ---- loop --------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._start_config()
        except StoreUnavailable:
            return 0  # stopped before etcd ever answered
        metrics.notify("READY=1\nSTATUS=campaigning")
        try:
            while not self.stopped.is_set():
                try:
                    if self.epoch is None:
                        self.campaign()
                    if self.epoch is not None:
                        self.cycle()
                    else:
                        self.leader_watch.ensure(self.store.revision())
                except StoreUnavailable as exc:
                    self.log.warning("etcd_unavailable", error=str(exc))
                except Exception:  # noqa: BLE001 - a bug must never end the orchestrator
                    self.stopped.wait(self._cycle_failed())  # a real backoff: no wake-up
                    continue
                else:
                    self.backoff.succeeded()
                wait, self._woke_for = replan.sleep_s(self.poll, self.recheck_at,
                                                      self.clock(), self._woke_for)
                self.wake.wait(wait)
                self.wake.clear()
        finally:
            self.leader_watch.stop()
            self._stop_watches()
            if self.keeper is not None:
                # The process may go on with another loop (a keyspace change): the
                # lease is revoked below, so nothing may renew it or fire its deadline.
                self.keeper.stop()
            if self.epoch is not None and self.lease_id is not None:
                try:
                    self.store.revoke_lease(self.lease_id)
                except StoreUnavailable as exc:
                    self.log.warning("resign_failed", error=str(exc))
        return self.exit_code

    def _cycle_failed(self) -> float:
        """An unexpected error (a bug, or data no check foresaw) ended the cycle: log it
        with the revision and traceback and try again after a bounded, jittered backoff.
        A leader keeps its lease meanwhile (renewed by the keeper's own thread), so no
        other orchestrator decides while this one is stuck, and nothing is written."""
        delay = self.backoff.failed()
        self.log.exception("cycle_failed", revision=self.last_revision, epoch=self.epoch,
                           failures=self.backoff.failures, retry_in_s=round(delay, 2))
        return delay

    def cycle(self) -> planner.Plan | None:
        epoch = self.epoch
        if epoch is None:
            return None
        snap = self._read()
        self.last_revision = snap.revision
        self.invalid.report(snap)
        if self.keyspace_changed(snap):
            self._stop_for_migration()
            return None
        if snap.leader is None or snap.leader.create_revision != epoch:
            self.step_down("leader key no longer ours")
            return None
        self._check_config(snap)
        # Decide with the last config that validated, never with a rejected one.
        snap = dataclasses.replace(snap, config=self.cfg)
        for name, entry in snap.nodes.items():
            self.last_leases[name] = entry.value.lease_id
            self.last_uris[name] = entry.value.libvirt_uri
        if self._record_external_results(snap, epoch):
            self.wake.set()  # decide on a snapshot that shows the new fence records
            return None
        self._cycles += 1
        if self._cycles % 600 == 1:
            self._prune_history()
        started = self.clock()
        q = self.quiet
        if q is not None and replan.still_quiet(q, epoch=epoch, revision=snap.revision,
                                                now=started, max_quiet_s=self.max_quiet_s):
            return q.plan  # nothing changed: the same empty plan (orchestrator.replan)
        result = self._plan(snap, epoch)
        self.plans += 1
        self.quiet = replan.quiet(result, epoch=epoch, revision=snap.revision, now=started)
        self.recheck_at = result.recheck_at
        metrics.PLACEMENT_CYCLE_SECONDS.observe(self.clock() - started)
        self._observe(snap)
        back, lost, self.lost_told = lost_history(self.lost_told, result.lost_since, snap)
        for node in back:
            self.history.record("node_back", epoch=epoch, node=node,
                                reason="registered again before being fenced")
        for node in lost:
            self.history.record("node_lost", epoch=epoch, node=node,
                                reason="registration (lease) gone; fence window starts")
        self.lost_since = dict(result.lost_since)
        self.fenced_now = {}
        writable = []
        for action in result.actions:
            frozen = frozen_by_invalid_key(action, snap)
            if frozen:
                self.log.debug("not_writing", reason=frozen, revision=snap.revision,
                               epoch=epoch)
            elif isinstance(action, planner.Wait):
                self.log.debug("waiting", vm=action.vm, reason=action.reason,
                               revision=snap.revision, epoch=epoch)
            else:
                writable.append(action)
        written = self._write_all(writable, snap, epoch)
        written += self._upkeep(snap, epoch, result)
        fenced, self.fenced_now = self.fenced_now, {}
        if fenced and not any(isinstance(a, planner.WritePlacement) for a in result.actions):
            written += self._place_after_fences(snap, epoch, fenced)
        if result.writes:
            self.log.info("cycle", summary=result.summary, written=written, epoch=epoch,
                          decide_ms=round((self.clock() - started) * 1000, 2))
        return result

    def _place_after_fences(self, snap: ClusterSnapshot, epoch: int,
                            fenced: dict[str, Entry[FenceRecord]]) -> int:
        """The self-fence records this cycle wrote (`fenced`) are in etcd: plan again at
        once on the cycle's snapshot with them, and write the placements that move VMs
        away from those nodes, rather than a cycle later (at 1,000 nodes that cycle's
        model rebuild and plan took 0.6 s before the lost node's VMs were placed).  The
        rest waits for the next cycle, and so does all of it if this cycle placed any VM
        (the snapshot would not count the capacity those placements took).  Each compares,
        as any placement away from a lost node does, that the node is still unregistered
        and its fence record the one written here, besides the term, the placement and
        the statuses the snapshot showed."""
        snap = dataclasses.replace(snap, fences={**snap.fences, **fenced},
                                   revision=max(e.mod_revision for e in fenced.values()))
        result = self._plan(snap, epoch)
        self.plans += 1
        moves = [a for a in result.actions if isinstance(a, planner.WritePlacement)
                 and not frozen_by_invalid_key(a, snap)
                 and {n for n, _ in a.fenced_holders} & set(fenced)]
        written = self._write_all(moves, snap, epoch)
        self.placed_after_fences += written
        return written

    def _write_all(self, actions: Sequence[planner.Action], snap: ClusterSnapshot,
                   epoch: int) -> int:
        """Write each decision in turn while leadership is certain; how many etcd took."""
        written = 0
        for action in actions:
            if not self.is_leader:
                self.log.warning("not_writing", reason="leadership not certain",
                                 revision=snap.revision)
                break
            if self.apply(action, snap, epoch):
                written += 1
        return written

    def _plan(self, snap: ClusterSnapshot, epoch: int) -> planner.Plan:
        return planner.plan(snap, epoch=epoch, now=self.clock(), wall_time=time.time(),
                            lost_since=self.lost_since)

    def keyspace_changed(self, snap: ClusterSnapshot) -> bool:
        """The marker says this loop's keyspace no longer runs: it must resign (keyspace
        1: the marker exists, valid or not)."""
        return snap.keyspace_marked

    def _stop_for_migration(self) -> None:
        """Keyspace 1 with the marker present: a migration started (docs/keyspace-v2.md,
        section 6).  The leader writes nothing more and resigns; its process then waits
        for the migration to finish (`orchestrator.leader_v2.orchestrator_for`)."""
        self.log.error("keyspace_changed", epoch=self.epoch,
                       reason="the keyspace marker appeared: a migration to keyspace 2 "
                              "started; resigning without a decision")
        self.exit_code = EXIT_KEYSPACE_CHANGED
        self.stopped.set()

    def _observe(self, snap: ClusterSnapshot) -> None:
        """Gauges from the snapshot; the end of each lost node's incident per VM."""
        counts: dict[str, int] = {}
        for se in snap.statuses.values():
            counts[se.value.state] = counts.get(se.value.state, 0) + 1
        for state in ("running", "paused", "stopped", "migrating", "crashed"):
            metrics.VMS_BY_STATE.labels(state=state).set(counts.get(state, 0))
        pending = sum(1 for pe in snap.placements.values() if pe.value.kind == "pending")
        metrics.VMS_BY_STATE.labels(state="pending").set(pending)
        now = self.clock()
        for vm, (node, lost_at, fenced_at) in list(self.recovering.items()):
            st = snap.statuses.get(vm)
            if st is not None and st.value.state == "running" and st.value.node != node:
                metrics.INCIDENT_SECONDS.labels(phase="fence_to_running").observe(now - fenced_at)
                metrics.INCIDENT_SECONDS.labels(phase="detect_to_running").observe(now - lost_at)
                del self.recovering[vm]
            elif vm not in snap.specs:
                del self.recovering[vm]

    def _prune_history(self) -> None:
        try:
            events, _ = read_events(self.store)
            n = prune(self.store, events, self.cfg.history_retention_s,
                      self.cfg.history_max_events)
        except StoreUnavailable as exc:
            self.log.warning("history_prune_failed", error=str(exc))
            return
        if n:
            self.log.info("history_pruned", deleted=n)

    def _record_external_results(self, snap: ClusterSnapshot, epoch: int) -> bool:
        """Write the outcome of every finished external fence run; True if any was written."""
        wrote = False
        for node, result, tag in self.fencer.collect():
            if tag != (epoch, self.lost_since.get(node)):
                # Started by an earlier term, or for an earlier loss of the node (it came
                # back since): what it switched off is not what is lost now.
                self.log.warning("fence_result_dropped", node=node, ok=result.ok,
                                 reason="the run belongs to an earlier term or loss")
                continue
            wrote |= self._record_external(node, result, snap, epoch)
        return wrote

    def _record_external(self, node: str, result: FenceResult, snap: ClusterSnapshot,
                         epoch: int) -> bool:
        prev = snap.fences.get(node)
        if prev is not None and prev.value.outcome == "success":
            return False  # already fenced (self or manual meanwhile)
        attempts = prev.value.attempts + 1 if prev else 1
        key = device_for(self.cfg, node)
        device = " ".join(self.cfg.fence_devices[key].agent) if key else ""
        rec = FenceRecord(node=node, lease_id=self.last_leases.get(node, "unknown"),
                          method="external", outcome="success" if result.ok else "failed",
                          reason=result.detail, epoch=epoch, duration_s=result.duration_s,
                          fenced_at=time.time(), attempts=attempts, device=device)
        ok = self._send(self.writes.fence(rec, prev.mod_revision if prev else 0, epoch))
        metrics.FENCES.labels(method="external",
                              outcome=rec.outcome if ok else "not_written").inc()
        if not ok:
            self.log.info("fence_result_not_written", node=node, method="external",
                          outcome=rec.outcome, attempts=attempts, epoch=epoch,
                          reason="compare failed: the node registered again, its fence "
                                 "record changed, or this term ended")
            return False
        lg = self.log.warning if result.ok else self.log.error
        lg("fenced" if result.ok else "fence_failed", node=node, method="external",
           outcome=rec.outcome, attempts=attempts, detail=result.detail,
           duration_s=result.duration_s, written=True, epoch=epoch)
        self.history.record("fence", epoch=epoch, node=node,
                            reason=f"method=external outcome={rec.outcome} "
                                   f"attempt={attempts}: {result.detail}")
        return True

    # ---- keyspace 1's reads (orchestrator.leader_v2 has keyspace 2's) -------------------

    def _read(self) -> ClusterSnapshot:
        """The whole prefix, read again each cycle; the watch only wakes the loop."""
        snap = self.store.snapshot()
        self.all_watch.ensure(snap.revision)
        return snap

    def _stop_watches(self) -> None:
        self.all_watch.stop()

    def _upkeep(self, snap: ClusterSnapshot, epoch: int, result: planner.Plan) -> int:
        """Writes besides the planner's (keyspace 2's assignments): none here."""
        return 0

    def _send(self, txn: Txn) -> bool:
        """Send one built write; False when a compare failed (someone else wrote first,
        or this term is over): a normal outcome, never an outage."""
        res = self.store.txn(txn.compares, txn.ops)
        if res.succeeded:
            self.last_write_revision = res.revision
        return res.succeeded

    def apply(self, action: planner.Action, snap: ClusterSnapshot, epoch: int) -> bool:
        """Write one decision; False if etcd rejected it (a compare failed)."""
        if isinstance(action, planner.FenceNode):
            return self._apply_fence(action, snap, epoch)
        if isinstance(action, planner.ClearMove):
            return self._apply_clear(self.writes.clear_move(action, epoch),
                                     "move_request_cleared", snap, epoch, vm=action.vm,
                                     reason=action.reason)
        if isinstance(action, planner.ClearFence):
            return self._apply_clear(self.writes.clear_fence(action, epoch),
                                     "fence_cleared", snap, epoch, node=action.node,
                                     reason=action.reason)
        if isinstance(action, planner.WritePlacement):
            return self._apply_placement(action, snap, epoch)
        raise TypeError(f"unknown action {action!r}")

    def _apply_clear(self, txn: Txn, event: str, snap: ClusterSnapshot, epoch: int,
                     **fields: str) -> bool:
        ok = self._send(txn)
        self.log.info(event, **fields, written=ok, epoch=epoch, revision=snap.revision)
        return ok

    def _apply_placement(self, action: planner.WritePlacement, snap: ClusterSnapshot,
                         epoch: int) -> bool:
        p = action.placement
        ok = self._send(self.writes.placement(action, epoch))
        self.log.info("placement", vm=p.vm, node=p.node, kind=p.kind, from_node=p.from_node,
                      placement=p.id, reason=p.reason, written=ok, epoch=epoch,
                      revision=snap.revision)
        metrics.PLACEMENTS.labels(kind=p.kind, written=str(ok).lower()).inc()
        if ok:
            self.history.record("placement", epoch=epoch, vm=p.vm, node=p.node,
                                from_node=p.from_node, reason=f"{p.kind}: {p.reason}")
        return ok

    def _registered_again(self, node: str, snap: ClusterSnapshot) -> bool:
        """A fence device cannot be undone: read the registration once more just before
        it runs.  The decision saw the node unregistered at `snap`; an agent that came
        back since (a restart) must not have its host switched off."""
        if self.store.get(self.writes.reg_key(node)) is None:
            return False
        self.log.warning("fence_skipped", node=node, revision=snap.revision,
                         reason="the node registered again after the snapshot the decision "
                                "came from")
        return True

    def _apply_fence(self, action: planner.FenceNode, snap: ClusterSnapshot,
                     epoch: int) -> bool:
        lease = self.last_leases.get(action.node, "unknown")
        since = self.lost_since.get(action.node, self.clock())
        if action.method == "external":
            device = self.cfg.fence_devices.get(action.device)
            if device is not None and self._registered_again(action.node, snap):
                return False
            if device is not None and self.fencer.start(
                    action.node, device, self.last_uris.get(action.node, ""),
                    tag=(epoch, self.lost_since.get(action.node))):
                self.log.warning("fence_started", node=action.node, device=action.device,
                                 reason=action.reason, epoch=epoch)
            return False
        prev = snap.fences.get(action.node)
        rec = FenceRecord(node=action.node, lease_id=lease, method="self", outcome="success",
                          reason=action.reason, epoch=epoch,
                          duration_s=round(self.clock() - since, 3), fenced_at=time.time(),
                          attempts=prev.value.attempts + 1 if prev else 1)
        ok = self._send(self.writes.self_fence(action, rec, epoch))
        metrics.FENCES.labels(method="self", outcome="success" if ok else "not_written").inc()
        if not ok:
            self.log.info("fence_not_written", node=action.node, method="self", epoch=epoch,
                          revision=snap.revision, reason="compare failed: the node registered "
                          "again, its fence record changed, or this term ended")
            return False
        self.log.warning("fenced", node=action.node, method="self", lease=lease,
                         reason=action.reason, written=True, epoch=epoch,
                         revision=snap.revision)
        self.fenced_now[action.node] = Entry(rec, self.ks.fence(action.node),
                                             self.last_write_revision if prev is None
                                             else prev.create_revision,
                                             self.last_write_revision)
        now = self.clock()
        metrics.FENCE_SECONDS.labels(method="self").observe(now - since)
        metrics.INCIDENT_SECONDS.labels(phase="detect_to_fence").observe(now - since)
        for vm, pe in snap.placements.items():
            if action.node in (pe.value.node, pe.value.from_node) or (
                    vm in snap.statuses and snap.statuses[vm].value.node == action.node):
                self.recovering[vm] = (action.node, since, now)
        self.history.record("fence", epoch=epoch, node=action.node,
                            reason=f"method=self outcome=success: {action.reason}")
        return True
