"""The node agent daemon: lease, registration, reconcile loop, drain, self-fencing.

All decisions come from `nodeagent.plan.plan()`; this module only wires etcd,
the hypervisor and the clock to it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from fencing.guard import GuardClient
from fencing.lease import LeaseKeeper
from fencing.policy import guard_timeout, require_safe_timing
from hypervisor.base import Hypervisor, HypervisorError
from nodeagent import plan as agent_plan
from schemas.models import (
    AgentInfo,
    Capacity,
    ClusterConfig,
    CordonMarker,
    CpuInfo,
    MigrationStats,
    NodeRegistration,
    VmStatus,
)
from schemas.snapshot import ClusterSnapshot
from store.etcd import Cmp, EtcdStore, PrefixWatch, Put, StoreUnavailable
from store.history import HistoryWriter
from telemetry import metrics

log = structlog.get_logger("vmha.agent")

VERSION = "0.1.0"


@dataclass
class AgentOptions:
    name: str
    migration_address: str = "127.0.0.1"
    poll_interval_s: float = 1.0
    migration_retry_backoff_s: float = 3.0
    # Start the guard process (fencing.guard) in run(); armed only if the cluster config
    # says guard_enabled.  On the fake hypervisor the guard process is the host.  None:
    # only when run() is called on the main thread, i.e. the agent owns its process (the
    # guard SIGKILLs that process; an agent run in a test's thread must not have one).
    guard: bool | None = None
    watchdog: str | None = None  # e.g. /dev/watchdog, armed by the guard


@dataclass
class _Registration:
    lease_id: int
    create_revision: int
    keeper: LeaseKeeper
    cordoned: bool


@dataclass
class _Flags:
    revoked: bool = False          # lease revoked while we were alive: drain
    expired: bool = False          # lease expired: we self-fenced, register again
    exiting: bool = False          # SIGTERM: drain, then exit
    fenced: bool = False
    stop_requested_at: dict[str, float] = field(default_factory=dict)
    migration_backoff: dict[tuple[str, str], float] = field(default_factory=dict)


class NodeAgent:
    def __init__(self, store: EtcdStore, hv: Hypervisor, opts: AgentOptions,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.hv = hv
        self.opts = opts
        self.me = opts.name
        self.ks = store.keyspace
        self.clock = clock
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.flags = _Flags()
        self.reg: _Registration | None = None
        self.cfg = ClusterConfig()
        self.busy: set[str] = set()
        self.guard: GuardClient | None = None
        self._old_keepers: list[LeaseKeeper] = []
        self._busy_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.watch = PrefixWatch(store, self.ks.root, self.wake)
        self.history = HistoryWriter(store, f"agent:{opts.name}")
        self.log = log.bind(node=self.me)

    # ---- set-up ------------------------------------------------------------------------

    def load_config(self) -> ClusterConfig:
        snap = self.store.snapshot()
        bad = [e for e in snap.errors if e.key == self.ks.config]
        if bad:
            raise ValueError(f"refusing to start: {bad[0]}")
        cfg = snap.config
        require_safe_timing(cfg)
        self.cfg = cfg
        return cfg

    def register(self) -> None:
        """Grant a lease and write the leased registration (after any old one is gone)."""
        key = self.ks.node(self.me)
        waited = False
        while not self.stopped.is_set():
            old = self.store.get(key)
            if old is None:
                break
            if not waited:
                self.log.info("waiting_for_old_registration", lease=f"{old.lease:x}",
                              reason="a registration for this node is still leased; it must "
                                     "expire before this agent can take over")
                waited = True
            self.stopped.wait(0.2)
        sent = self.clock()
        lease_id = self.store.grant_lease(self.cfg.lease_ttl_s)
        cordoned = self.store.get(self.ks.cordon(self.me)) is not None
        reg = self._registration(lease_id, cordoned)
        res = self.store.txn([Cmp(key, "create", "==", 0)], [Put(key, reg.to_json(), lease_id)])
        if not res.succeeded:
            self.store.revoke_lease(lease_id)
            raise StoreUnavailable("registration raced with another writer; retrying")
        keeper = LeaseKeeper(self.store, self.cfg, lease_id, sent,
                             on_gone=lambda before: self._on_lease_gone(lease_id, before),
                             on_deadline=self._self_fence, on_renewed=self._on_renewed,
                             unavailable=StoreUnavailable,
                             clock=self.clock, name=f"agent-{self.me}")
        self.reg = _Registration(lease_id, res.revision, keeper, cordoned)
        keeper.start()
        self.flags.revoked = self.flags.expired = self.flags.fenced = False
        self._pet_guard()
        metrics.notify("READY=1\nSTATUS=registered, reconciling")
        self.log.info("registered", lease=f"{lease_id:x}", revision=res.revision,
                      cordoned=cordoned, ttl=self.cfg.lease_ttl_s)

    def _registration(self, lease_id: int, cordoned: bool) -> NodeRegistration:
        mem, vcpus = self.hv.capacity()
        return NodeRegistration(
            name=self.me, lease_id=f"{lease_id:x}", libvirt_uri=self.hv.uri,
            migration_address=self.opts.migration_address,
            capacity=Capacity(memory_mib=mem, vcpus=vcpus), cpu=CpuInfo(model=self.hv.cpu_model()),
            cordoned=cordoned, agent=AgentInfo(pid=os.getpid(), hostname=socket.gethostname(),
                                               version=VERSION),
            registered_at=time.time())

    # ---- lease callbacks (keeper threads) ----------------------------------------------

    def _on_lease_gone(self, lease_id: int, before_deadline: bool) -> None:
        if self.reg is None or self.reg.lease_id != lease_id:
            return  # an old lease's keeper reporting late: already handled
        if before_deadline:
            # etcd answered, so we are alive: keep the guard on the old deadline, which
            # the leader's fence window covers, until we hold a new registration.
            self._pet_guard(self.reg.keeper.deadline)
            self.flags.revoked = True
            self.log.warning("lease_revoked", reason="lease gone while etcd answers: drain")
        else:
            self.flags.expired = True
        self.wake.set()

    def _pet_guard(self, deadline: float | None = None) -> None:
        """Tell the guard the agent is alive and holds its lease until `deadline`."""
        if self.guard is None or not self.cfg.guard_enabled or self.reg is None:
            return
        if not self.guard.pet(deadline if deadline is not None else self.reg.keeper.deadline,
                              guard_timeout(self.cfg)):
            self.log.error("guard_lost", reason="cannot reach the guard process")
            self.wake.set()

    def _on_renewed(self) -> None:
        self._pet_guard()
        if self.reg is not None and self.reg.keeper.last_renew_latency_s is not None:
            metrics.LEASE_RENEW_SECONDS.labels(who="agent").observe(
                self.reg.keeper.last_renew_latency_s)
        # etcd answered and the lease still exists after we self-fenced (an etcd
        # leader change reset its TTL): nobody can have fenced this node, resume.
        if self.flags.fenced:
            self.flags.fenced = False
            self.log.warning("resumed_after_self_fence", reason="lease still valid in etcd")
            self.wake.set()

    def _self_fence(self) -> None:
        """Destroy every managed domain: the lease may be about to expire on the server."""
        self.flags.fenced = True
        try:
            domains = self.hv.list_domains()
        except HypervisorError as exc:
            self.log.error("self_fence_list_failed", error=str(exc))
            return
        for name, dom in domains.items():
            if dom.managed and dom.active:
                try:
                    self.hv.destroy(name)
                    metrics.SELF_FENCES.inc()
                    self.history.record("self_fence", vm=name, node=self.me,
                                        reason="lease not renewed before the deadline")
                    self.log.error("self_fenced_domain", vm=name,
                                   reason="lease not renewed before the self-fencing deadline")
                except HypervisorError as exc:
                    self.log.error("self_fence_destroy_failed", vm=name, error=str(exc))
        self.wake.set()

    def acting_allowed(self) -> bool:
        return self.reg is not None and self.reg.keeper.valid() and not self.flags.fenced

    # ---- main loop ---------------------------------------------------------------------

    def request_exit(self) -> None:
        """SIGTERM: drain this node, then exit once it runs no VM."""
        self.flags.exiting = True
        metrics.notify("STOPPING=1\nSTATUS=draining before exit")
        self.wake.set()

    def run(self) -> int:
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.max_migrations_per_node),
                                        thread_name_prefix=f"migrate-{self.me}")
        own_process = threading.current_thread() is threading.main_thread()
        if (self.opts.guard or (self.opts.guard is None and own_process)) and self.guard is None:
            self._start_guard()
        try:
            while not self.stopped.is_set():
                if self.guard is not None and not self.guard.alive():
                    self.log.error("guard_lost", reason="guard process gone: fencing this "
                                                        "node and exiting")
                    self._self_fence()
                    return 1
                try:
                    if self.cycle():
                        if self.guard is not None:
                            self.guard.disarm()
                        return 0
                except StoreUnavailable as exc:
                    self.log.warning("etcd_unavailable", error=str(exc))
                except HypervisorError as exc:
                    self.log.warning("hypervisor_error", error=str(exc))
                self.wake.wait(self.opts.poll_interval_s)
                self.wake.clear()
            return 0
        finally:
            self.watch.stop()
            if self.reg is not None:
                self.reg.keeper.stop()
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _start_guard(self) -> None:
        fake = self.hv.uri.startswith("fake://")
        # A never-armed fake guard is the host of guests that outlive the agent (the
        # negative control of the fault campaign): let it linger a while.
        self.guard = GuardClient(self.hv.uri, linger_s=300.0 if fake else 0.0,
                                 watchdog=self.opts.watchdog)
        adopt = getattr(self.hv, "adopt_host", None)
        if adopt is not None:
            adopt(self.guard.pid)
        self.log.info("guard_started", pid=self.guard.pid, watchdog=self.opts.watchdog)

    def cycle(self) -> bool:
        """One reconcile pass.  Returns True when the agent should exit."""
        if self.reg is None:
            self.load_config()
            self.register()
        assert self.reg is not None
        # Read the keeper thread's flags once: a revoke flagged between two reads
        # would re-register the node without its cordon (a drain that drains nothing).
        revoked, expired = self.flags.revoked, self.flags.expired
        if revoked or (self.flags.exiting and not self.reg.cordoned):
            self._cordon("lease revoked (drain)" if revoked else
                         "agent stopping (SIGTERM): drain")
        if revoked or expired:
            # The old keeper keeps watching the old deadline until we hold a new lease.
            self._old_keepers.append(self.reg.keeper)
            self.reg = None
            self.register()
            assert self.reg is not None
            for k in self._old_keepers:
                k.stop()
            self._old_keepers.clear()
        if self.flags.fenced and not self.reg.keeper.valid():
            return False
        snap = self.store.snapshot()
        self.watch.ensure(snap.revision)
        mine = snap.nodes.get(self.me)
        if mine is None or mine.create_revision != self.reg.create_revision:
            # Our key vanished (the watch woke us): ask etcd about the lease now rather
            # than at the next keepalive, so a drain starts at once.
            if self.reg.keeper.valid() and self.store.keepalive(self.reg.lease_id) <= 0:
                self._on_lease_gone(self.reg.lease_id, self.reg.keeper.valid())
                self.wake.set()
            self.log.info("registration_not_visible", revision=snap.revision)
            return False
        self._sync_cordon(snap)
        # Busy first: a migration that ends between the two reads must not look idle
        # while the domain list still shows it here.
        with self._busy_lock:
            busy = frozenset(self.busy)
        domains = self.hv.list_domains()
        for state in ("running", "paused", "shutoff", "crashed", "other"):
            metrics.NODE_VMS.labels(state=state).set(
                sum(1 for d in domains.values() if d.managed and d.state == state))
        actions = agent_plan.plan(self.me, snap, domains, busy)
        for action in actions:
            if not self.acting_allowed():
                self.log.warning("not_acting", reason="lease not certainly held",
                                 revision=snap.revision)
                break
            self._execute(action, snap)
        if self.flags.exiting:
            active = [n for n, d in self.hv.list_domains().items() if d.managed and d.active]
            with self._busy_lock:
                inflight = bool(self.busy)
            if not active and not inflight:
                self.log.info("drained_exiting", revision=snap.revision)
                self.store.revoke_lease(self.reg.lease_id)
                self.reg.keeper.stop()
                return True
            self.log.info("draining", remaining=sorted(active), revision=snap.revision)
        return False

    def _cordon(self, reason: str) -> None:
        marker = CordonMarker(node=self.me, reason=reason, by=f"agent:{self.me}", at=time.time())
        key = self.ks.cordon(self.me)
        if self.store.get(key) is None:
            self.store.put(key, marker.to_json())
            self.log.warning("cordoned", reason=reason)
            self.history.record("drain", node=self.me, reason=reason)
        if self.reg is not None:
            self.reg.cordoned = True

    def _sync_cordon(self, snap: ClusterSnapshot) -> None:
        assert self.reg is not None
        want = snap.is_cordoned(self.me)
        entry = snap.nodes[self.me]
        if entry.value.cordoned == want:
            self.reg.cordoned = want
            return
        reg = entry.value.model_copy(update={"cordoned": want})
        key = self.ks.node(self.me)
        self.store.txn([Cmp(key, "create", "==", self.reg.create_revision)],
                       [Put(key, reg.to_json(), self.reg.lease_id)])
        self.reg.cordoned = want
        self.log.info("cordon_state", cordoned=want, revision=snap.revision)

    # ---- actions -----------------------------------------------------------------------

    def _execute(self, action: agent_plan.AgentAction, snap: ClusterSnapshot) -> None:
        lg = self.log.bind(vm=action.vm, revision=snap.revision)
        if isinstance(action, agent_plan.Report):
            self._report(action, snap)
        elif isinstance(action, agent_plan.Boot):
            lg.info("boot", placement=action.placement_id, reason=action.reason)
            metrics.BOOTS.inc()
            self.history.record("boot", vm=action.vm, node=self.me, reason=action.reason)
            self.hv.boot(action.vm, snap.specs[action.vm].value.domain_xml)
            if not self.acting_allowed():
                # The lease may have expired while we booted: undo at once.
                self.hv.destroy(action.vm)
                lg.error("boot_undone", reason="lease lost during boot")
            self.wake.set()
        elif isinstance(action, agent_plan.Shutdown):
            first = self.flags.stop_requested_at.setdefault(action.vm, self.clock())
            if self.clock() - first >= self.cfg.stop_timeout_s:
                lg.warning("destroy", reason=f"did not shut down within "
                                             f"{self.cfg.stop_timeout_s} s")
                self.hv.destroy(action.vm)
                self.flags.stop_requested_at.pop(action.vm, None)
            else:
                lg.info("shutdown", reason=action.reason)
                self.hv.shutdown(action.vm)
        elif isinstance(action, agent_plan.Destroy):
            lg.warning("destroy", reason=action.reason)
            self.history.record("destroy", vm=action.vm, node=self.me, reason=action.reason)
            self.hv.destroy(action.vm)
            self.wake.set()
        elif isinstance(action, agent_plan.Undefine):
            lg.info("undefine", reason=action.reason)
            self.hv.undefine(action.vm)
        elif isinstance(action, agent_plan.MigrateOut):
            key = (action.vm, action.target)
            until = self.flags.migration_backoff.get(key, 0.0)
            if self.clock() < until:
                return
            with self._busy_lock:
                if action.vm in self.busy:
                    return
                self.busy.add(action.vm)
            assert self._pool is not None
            self._pool.submit(self._migrate, action, snap)

    def _status_txn(self, vm: str, status: VmStatus, expect_mod: int) -> bool:
        assert self.reg is not None
        key = self.ks.vm_status(vm)
        res = self.store.txn([Cmp(key, "mod", "==", expect_mod),
                              Cmp(self.ks.node(self.me), "create", "==",
                                  self.reg.create_revision)],
                             [Put(key, status.to_json())])
        return res.succeeded

    def _report(self, a: agent_plan.Report, snap: ClusterSnapshot) -> None:
        prev = snap.statuses.get(a.vm)
        since = time.time()
        if prev and prev.value.node == self.me and prev.value.state == a.state:
            since = prev.value.since
        migration = None
        if a.with_migration_stats:
            stats = self.hv.incoming_stats(a.vm)
            src = snap.placements[a.vm].value.from_node if a.vm in snap.placements else None
            # No completed incoming job: it was booted here (e.g. started again after a
            # stop), not migrated in, whatever the placement's kind says.
            if stats is not None:
                migration = MigrationStats(total_ms=stats.total_ms,
                                           downtime_ms=stats.downtime_ms,
                                           source=src or "", target=self.me)
        status = VmStatus(vm=a.vm, node=self.me, state=a.state,  # type: ignore[arg-type]
                          placement_id=a.placement_id, since=since, migration=migration)
        ok = self._status_txn(a.vm, status, a.expect_mod_revision)
        self.log.info("report", vm=a.vm, state=a.state, placement=a.placement_id,
                      reason=a.reason, written=ok, revision=snap.revision,
                      downtime_ms=migration.downtime_ms if migration else None)
        if ok and migration is not None:
            if migration.total_ms is not None:
                metrics.MIGRATION_TOTAL_SECONDS.observe(migration.total_ms / 1000.0)
            if migration.downtime_ms is not None:
                metrics.MIGRATION_DOWNTIME_SECONDS.observe(migration.downtime_ms / 1000.0)
            self.history.record("migration", vm=a.vm, node=self.me,
                                from_node=migration.source or None, total_ms=migration.total_ms,
                                downtime_ms=migration.downtime_ms,
                                reason="live migration arrived")

    def _migrate(self, a: agent_plan.MigrateOut, snap: ClusterSnapshot) -> None:
        lg = self.log.bind(vm=a.vm, target=a.target, placement=a.placement_id,
                           revision=snap.revision)
        try:
            cur = self.store.get(self.ks.vm_status(a.vm))
            self._status_txn(a.vm, VmStatus(vm=a.vm, node=self.me, state="migrating",
                                            placement_id=a.placement_id, since=time.time()),
                             cur.mod_revision if cur else 0)
            if not self.acting_allowed():
                lg.warning("migration_skipped", reason="lease not certainly held")
                return
            lg.info("migrate_start", reason="placement moves the VM away (live migration)")
            started = self.clock()
            try:
                self.hv.migrate(a.vm, a.target_uri, a.target_address)
            except HypervisorError as exc:
                self.flags.migration_backoff[(a.vm, a.target)] = (
                    self.clock() + self.opts.migration_retry_backoff_s)
                lg.error("migrate_failed", error=str(exc))
                metrics.MIGRATIONS.labels(outcome="failed").inc()
                self.history.record("migration_failed", vm=a.vm, node=a.target, from_node=self.me,
                                    reason=str(exc)[:300])
                cur = self.store.get(self.ks.vm_status(a.vm))
                still = self.hv.list_domains().get(a.vm)
                if still is None or not still.active:
                    return  # not here (it may already run on the target): nothing to report
                self._status_txn(a.vm, VmStatus(
                    vm=a.vm, node=self.me, state=still.state if still and still.active
                    else "stopped",  # type: ignore[arg-type]
                    placement_id=a.placement_id, since=time.time(), error=str(exc)[:500],
                    failed_target=a.target), cur.mod_revision if cur else 0)
                return
            lg.info("migrate_done", wall_s=round(self.clock() - started, 3))
            metrics.MIGRATIONS.labels(outcome="success").inc()
        except StoreUnavailable as exc:
            lg.warning("etcd_unavailable", error=str(exc))
        except HypervisorError as exc:
            lg.error("hypervisor_error", error=str(exc))
        finally:
            with self._busy_lock:
                self.busy.discard(a.vm)
            self.wake.set()
