"""The node agent's execution: reconcile libvirt to the plan, report what runs here.

Decisions come from `nodeagent.plan.plan()`; this module carries them out on the
hypervisor and writes statuses, each a compare-and-swap that also compares the
agent's registration (its fencing token).  Live migrations run on a small pool so
a long one does not hold up the reconcile loop.

An operation the hypervisor refuses (`HypervisorRefused`) is reported, never allowed to
end the cycle for the other VMs: a refused boot or a crash is counted in the VM's status
with its retry time (the plan waits for it), other operations back off here; the history
gets one event per distinct error (nodeagent/failures.py).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from hypervisor.base import HypervisorError, HypervisorRefused
from nodeagent import plan as agent_plan
from nodeagent.context import AgentContext
from nodeagent.failures import Failures, carried
from nodeagent.membership import Membership
from nodeagent.policy import refuse_by_policy
from nodeagent.writes_v2 import CycleStatuses
from schemas.errors import InvariantError, SchemaError, TemporaryError
from schemas.models import MigrationStats, VmStatus
from schemas.snapshot import ClusterSnapshot
from schemas.txn import Cmp, Put
from store.etcd import StoreUnavailable
from telemetry import metrics


@dataclass
class ExecutionState:
    stop_requested_at: dict[str, float] = field(default_factory=dict)
    migration_backoff: dict[tuple[str, str], float] = field(default_factory=dict)
    migration_failures: dict[tuple[str, str], int] = field(default_factory=dict)


class Execution:
    def __init__(self, ctx: AgentContext, membership: Membership) -> None:
        self.ctx = ctx
        self.m = membership
        self.state = ExecutionState()
        self.busy: set[str] = set()  # VMs with a migration in flight
        # The migrations running (set once libvirt's job starts), and why we stopped one.
        self.inflight: dict[str, agent_plan.InFlight] = {}
        self._stopping: dict[str, str] = {}
        self._busy_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.failures = Failures(ctx, membership, self._status_txn)
        # Keyspace 2: status writes guarded against the cycle's node view (set by the
        # agent once it knows its keyspace).
        self.v2: CycleStatuses | None = None

    @property
    def log(self) -> Any:
        return self.ctx.log

    def start(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers),
                                        thread_name_prefix=f"migrate-{self.ctx.me}")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- one pass ----------------------------------------------------------------------

    def reconcile(self, snap: ClusterSnapshot) -> None:
        """Plan against the domains here and carry the plan out while the lease holds."""
        # Busy first: a migration that ends between the two reads must not look idle
        # while the domain list still shows it here.
        with self._busy_lock:
            busy = frozenset(self.busy)
            inflight = dict(self.inflight)
        # Aborting a migration only ever takes work back: done even without the lease.
        for verdict in agent_plan.migration_verdicts(self.ctx.me, snap, inflight,
                                                     now=self.ctx.clock()):
            self._stop_migration(verdict, snap)
        domains = self.ctx.hv.list_domains()
        for state in ("running", "paused", "shutoff", "crashed", "other"):
            metrics.NODE_VMS.labels(state=state).set(
                sum(1 for d in domains.values() if d.managed and d.state == state))
        for action in agent_plan.plan(self.ctx.me, snap, domains, busy, now=time.time()):
            if not self.m.acting_allowed():
                self.log.warning("not_acting", reason="lease not certainly held",
                                 revision=snap.revision)
                break
            if self.failures.backing_off(action):
                continue
            try:
                self.execute(action, snap)
            except HypervisorRefused as exc:
                self.failures.refused(action, exc, snap)
            else:
                self.failures.succeeded(action)

    def drain_state(self) -> tuple[list[str], bool]:
        """(managed domains still active here, whether a migration is in flight)."""
        active = [n for n, d in self.ctx.hv.list_domains().items() if d.managed and d.active]
        with self._busy_lock:
            inflight = bool(self.busy)
        return sorted(active), inflight

    # ---- actions -----------------------------------------------------------------------

    def execute(self, action: agent_plan.AgentAction, snap: ClusterSnapshot) -> None:
        lg = self.log.bind(vm=action.vm, revision=snap.revision)
        hv = self.ctx.hv
        if isinstance(action, agent_plan.Report):
            self._report(action, snap)
        elif isinstance(action, agent_plan.Boot):
            lg.info("boot", placement=action.placement_id, reason=action.reason)
            try:
                refuse_by_policy(action.vm, snap, lg)
                hv.boot(action.vm, snap.specs[action.vm].value.domain_xml)
            except HypervisorRefused as exc:
                self.failures.boot_refused(action, exc, snap, lg)
                return
            metrics.BOOTS.inc()
            # Recorded once it booted: a refused boot is a `boot_failed`, once per error.
            self.ctx.history.record("boot", vm=action.vm, node=self.ctx.me, reason=action.reason)
            if not self.m.acting_allowed():
                # The lease may have expired while we booted: undo at once.
                hv.destroy(action.vm)
                lg.error("boot_undone", reason="lease lost during boot")
            self.ctx.wake.set()
        elif isinstance(action, agent_plan.Crashed):
            self.failures.crashed(action, snap, lg)
        elif isinstance(action, agent_plan.Shutdown):
            self._shutdown(action, lg)
        elif isinstance(action, agent_plan.Destroy):
            lg.warning("destroy", reason=action.reason)
            hv.destroy(action.vm)
            # After it: a refused destroy is retried with backoff, recorded once as such.
            self.ctx.history.record("destroy", vm=action.vm, node=self.ctx.me,
                                    reason=action.reason)
            self.ctx.wake.set()
        elif isinstance(action, agent_plan.Undefine):
            lg.info("undefine", reason=action.reason)
            hv.undefine(action.vm)
        elif isinstance(action, agent_plan.MigrateOut):
            self._start_migration(action, snap)
        elif isinstance(action, agent_plan.AbortMigration):
            lg.warning("migration_abort", target=action.target, reason=action.reason,
                       stale=True)
            hv.abort_migration(action.vm)
            self._report_still_here(action.vm, action.placement_id, action.target,
                                    f"{action.reason}: migration aborted")

    def _stop_migration(self, v: agent_plan.AbortMigration, snap: ClusterSnapshot) -> None:
        """Abort a running migration (again each cycle until its call returns: abortJob
        is idempotent), or switch it to post-copy once; the reason goes into the VM's
        status when the migrate call returns."""
        lg = self.log.bind(vm=v.vm, target=v.target, placement=v.placement_id,
                           revision=snap.revision)
        with self._busy_lock:
            m = self.inflight.get(v.vm)
            if m is None or m.placement_id != v.placement_id:
                return  # it ended meanwhile
            first = v.vm not in self._stopping
            self._stopping[v.vm] = v.reason
            if v.postcopy:
                self.inflight[v.vm] = agent_plan.InFlight(m.vm, m.placement_id, m.target,
                                                          m.started, postcopy=True)
        try:
            if v.postcopy:
                lg.warning("migration_postcopy", reason=v.reason)
                try:
                    self.ctx.hv.start_postcopy(v.vm)
                    return
                except HypervisorError as exc:
                    lg.error("migration_postcopy_failed", error=str(exc),
                             reason="aborting instead")
            if first:
                lg.warning("migration_abort", reason=v.reason)
            self.ctx.hv.abort_migration(v.vm)
        except HypervisorError as exc:
            lg.error("migration_abort_failed", error=str(exc), reason=v.reason)

    def _shutdown(self, action: agent_plan.Shutdown, lg: Any) -> None:
        first = self.state.stop_requested_at.setdefault(action.vm, self.ctx.clock())
        timeout = self.m.cfg.stop_timeout_s
        if self.ctx.clock() - first >= timeout:
            lg.warning("destroy", reason=f"did not shut down within {timeout} s")
            self.ctx.hv.destroy(action.vm)
            self.state.stop_requested_at.pop(action.vm, None)
        else:
            lg.info("shutdown", reason=action.reason)
            self.ctx.hv.shutdown(action.vm)

    def _start_migration(self, action: agent_plan.MigrateOut, snap: ClusterSnapshot) -> None:
        until = self.state.migration_backoff.get((action.vm, action.target), 0.0)
        if self.ctx.clock() < until:
            return
        pool = self._pool
        if pool is None:
            raise InvariantError("migration pool not started (Execution.start)")
        with self._busy_lock:
            if action.vm in self.busy:
                return
            self.busy.add(action.vm)
        pool.submit(self._migrate, action, snap).add_done_callback(self._check_migration)

    def _check_migration(self, fut: Future[None]) -> None:
        """A pool swallows what its task raises: log a bug in a migration loudly."""
        exc = fut.exception() if not fut.cancelled() else None
        if exc is not None:
            self.log.error("migration_crashed", error=repr(exc), exc_info=exc)

    def _status_txn(self, vm: str, status: VmStatus, expect_mod: int) -> bool:
        """Write a status if unchanged since read and our registration still holds;
        False when a compare failed (a normal race: the next cycle re-reads)."""
        reg = self.m.current()
        if self.v2 is not None:
            return self.v2.planned(reg.create_revision, vm, status, expect_mod)
        ks = self.ctx.ks
        key = ks.vm_status(vm)
        res = self.ctx.store.txn([Cmp(key, "mod", "==", expect_mod),
                                  Cmp(ks.node(self.ctx.me), "create", "==",
                                      reg.create_revision)],
                                 [Put(key, status.model_copy(update={
                                     "registration": reg.create_revision}).to_json())])
        return res.succeeded

    def _fresh_status_txn(self, vm: str, status: VmStatus, cur_mod: int) -> bool:
        """A status write compared on the status key read just before (`cur_mod`): on
        keyspace 1 the VM's one key, on keyspace 2 our own."""
        if self.v2 is None:
            return self._status_txn(vm, status, cur_mod)
        return self.v2.own(self.m.current().create_revision, vm, status, cur_mod)

    def _report(self, a: agent_plan.Report, snap: ClusterSnapshot) -> None:
        me = self.ctx.me
        prev = snap.statuses.get(a.vm)
        since = time.time()
        if prev and prev.value.node == me and prev.value.state == a.state:
            since = prev.value.since
        migration = None
        if a.with_migration_stats:
            stats = self.ctx.hv.incoming_stats(a.vm)
            src = snap.placements[a.vm].value.from_node if a.vm in snap.placements else None
            # No completed incoming job: it was booted here (e.g. started again after a
            # stop), not migrated in, whatever the placement's kind says.
            if stats is not None:
                migration = MigrationStats(total_ms=stats.total_ms,
                                           downtime_ms=stats.downtime_ms,
                                           source=src or "", target=me)
        keep = {} if a.reset_failures or prev is None else carried(prev.value, a.placement_id,
                                                                   a.state)
        status = VmStatus(vm=a.vm, node=me, state=a.state,  # type: ignore[arg-type]
                          placement_id=a.placement_id, since=since, migration=migration,
                          **keep)
        ok = self._status_txn(a.vm, status, a.expect_mod_revision)
        self.log.info("report", vm=a.vm, state=a.state, placement=a.placement_id,
                      reason=a.reason, written=ok, revision=snap.revision,
                      downtime_ms=migration.downtime_ms if migration else None)
        if ok and migration is not None:
            self._observe_migration(a.vm, migration)

    def _observe_migration(self, vm: str, migration: MigrationStats) -> None:
        if migration.total_ms is not None:
            metrics.MIGRATION_TOTAL_SECONDS.observe(migration.total_ms / 1000.0)
        if migration.downtime_ms is not None:
            metrics.MIGRATION_DOWNTIME_SECONDS.observe(migration.downtime_ms / 1000.0)
        self.ctx.history.record("migration", vm=vm, node=self.ctx.me,
                                from_node=migration.source or None,
                                total_ms=migration.total_ms, downtime_ms=migration.downtime_ms,
                                reason="live migration arrived")

    def _migrate(self, a: agent_plan.MigrateOut, snap: ClusterSnapshot) -> None:
        """One live migration, on the pool; every outcome ends with a wake-up."""
        lg = self.log.bind(vm=a.vm, target=a.target, placement=a.placement_id,
                           revision=snap.revision)
        try:
            self._migrate_once(a, lg)
        except StoreUnavailable as exc:
            lg.warning("etcd_unavailable", error=str(exc))
        except HypervisorError as exc:
            lg.error("hypervisor_error", error=str(exc))
        except TemporaryError as exc:
            lg.warning("migration_interrupted", error=str(exc))
        finally:
            with self._busy_lock:
                self.busy.discard(a.vm)
                self.inflight.pop(a.vm, None)
                self._stopping.pop(a.vm, None)
            self.ctx.wake.set()

    def _migrate_once(self, a: agent_plan.MigrateOut, lg: Any) -> None:
        me = self.ctx.me
        cur = self.ctx.store.get(self.ctx.keys.status(a.vm))
        # No job without the status that says it runs: the leader keeps a VM whose job
        # may still deliver it to a lost target out of any new placement only while it
        # can see that (orchestrator/rules/vm.py, migration_to_lost_target).
        if not self._fresh_status_txn(a.vm, VmStatus(vm=a.vm, node=me, state="migrating",
                                                     placement_id=a.placement_id,
                                                     since=time.time()),
                                      cur.mod_revision if cur else 0):
            lg.info("migration_deferred", reason="status changed meanwhile; next cycle")
            return
        if not self.m.acting_allowed():
            lg.warning("migration_skipped", reason="lease not certainly held")
            return
        tls = self.m.cfg.migration_tls
        lg.info("migrate_start", reason="placement moves the VM away (live migration)",
                tls=tls)
        started = self.ctx.clock()
        postcopy = self.m.cfg.migration_postcopy_on_timeout
        with self._busy_lock:
            self.inflight[a.vm] = agent_plan.InFlight(a.vm, a.placement_id, a.target, started)
        try:
            self.ctx.hv.migrate(a.vm, a.target_uri, a.target_address, tls=tls,
                                postcopy=postcopy)
        except HypervisorError as exc:
            self._migration_failed(a, exc, lg)
            return
        lg.info("migrate_done", wall_s=round(self.ctx.clock() - started, 3))
        metrics.MIGRATIONS.labels(outcome="success").inc()
        self.state.migration_failures.pop((a.vm, a.target), None)

    def _migration_failed(self, a: agent_plan.MigrateOut, exc: HypervisorError,
                          lg: Any) -> None:
        """Back off from this target (exponentially, capped), and say in the VM's status
        that it still runs here; the history gets the error once, not once per retry."""
        with self._busy_lock:
            stopped = self._stopping.get(a.vm)
        if stopped is not None:  # we aborted it: say why, with libvirt's words after
            exc = HypervisorError(f"{stopped}: migration aborted ({exc})")
        pair = (a.vm, a.target)
        n = self.state.migration_failures.get(pair, 0) + 1
        self.state.migration_failures[pair] = n
        base = self.ctx.opts.migration_retry_backoff_s
        delay = min(max(base, self.m.cfg.failure_backoff_max_s), base * 2 ** min(n - 1, 16))
        self.state.migration_backoff[pair] = self.ctx.clock() + delay
        lg.error("migrate_failed", error=str(exc), failures=n, retry_in_s=delay)
        metrics.MIGRATIONS.labels(outcome="failed").inc()
        cur = self.ctx.store.get(self.ctx.keys.status(a.vm))
        try:
            old_error = VmStatus.from_json(cur.value).error if cur else None
        except SchemaError:
            old_error = None  # an unreadable status: the event is recorded
        if old_error != str(exc)[:500]:
            self.ctx.history.record("migration_failed", vm=a.vm, node=a.target,
                                    from_node=self.ctx.me, reason=str(exc)[:300])
        self._report_still_here(a.vm, a.placement_id, a.target, str(exc))

    def _report_still_here(self, vm: str, placement_id: str, target: str, error: str) -> None:
        """The migration job ended without the VM leaving: say in its status that it runs
        here (the leader's signal that the job ended) and why the migration did not
        complete.  Nothing to say if it is not here (it may run on the target)."""
        cur = self.ctx.store.get(self.ctx.keys.status(vm))
        still = self.ctx.hv.list_domains().get(vm)
        if still is None or not still.active:
            return
        self._fresh_status_txn(vm, VmStatus(
            vm=vm, node=self.ctx.me, state=still.state,  # type: ignore[arg-type]
            placement_id=placement_id, since=time.time(), error=error[:500],
            failed_target=target), cur.mod_revision if cur else 0)
