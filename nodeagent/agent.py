"""The node agent daemon: lease, registration, reconcile loop, drain, self-fencing.

Two parts, composed here: `nodeagent.membership` (the leased registration, the
guard, revoke and expiry) and `nodeagent.execution` (carrying out
`nodeagent.plan.plan()` on the hypervisor and reporting statuses).  This module
runs the loop that drives them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

import structlog

from hypervisor.base import Hypervisor, HypervisorError
from nodeagent.agent_v2 import AgentV2
from nodeagent.context import AgentContext, AgentOptions
from nodeagent.cordon import sync_cordon
from nodeagent.execution import Execution
from nodeagent.keyspace import KeyspaceUndecided, read_keyspace
from nodeagent.membership import VERSION, Membership, Registration
from nodeagent.switch import frozen
from schemas.errors import TemporaryError
from schemas.models import ClusterConfig
from store.etcd import EtcdStore, StoreUnavailable
from store.history import HistoryWriter
from store.watch import PrefixWatch
from telemetry import metrics
from telemetry.invalid_keys import CycleBackoff, InvalidKeyReporter

__all__ = ["VERSION", "AgentOptions", "NodeAgent"]

log = structlog.get_logger("vmha.agent")


class NodeAgent:
    def __init__(self, store: EtcdStore, hv: Hypervisor, opts: AgentOptions,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx = AgentContext(store=store, hv=hv, opts=opts, clock=clock,
                                wake=threading.Event(), stopped=threading.Event(),
                                history=HistoryWriter(store, f"agent:{opts.name}"),
                                log=log.bind(node=opts.name))
        self.membership = Membership(self.ctx)
        self.execution = Execution(self.ctx, self.membership)
        self.exiting = False  # SIGTERM: drain, then exit
        self.watch = PrefixWatch(store, store.keyspace.root, self.ctx.wake)
        self.invalid = InvalidKeyReporter(self.ctx.log)
        self.backoff = CycleBackoff(first_s=opts.poll_interval_s, max_s=10.0)
        self.last_revision = 0  # of the last snapshot read, for the logs of a failed cycle
        # Chosen by /vmha/version before anything else (nodeagent.keyspace); None: on
        # keyspace 1, or not known yet (`keyspace_known`).
        self.v2: AgentV2 | None = None
        self.keyspace_known = False
        # The marker state this agent is frozen by (nodeagent.switch); None: not frozen.
        self.frozen_state: str | None = None
        self._history_v1 = self.ctx.history

    # What the CLI and tests drive the agent with.
    @property
    def wake(self) -> threading.Event:
        return self.ctx.wake

    @property
    def stopped(self) -> threading.Event:
        return self.ctx.stopped

    @property
    def reg(self) -> Registration | None:
        return self.membership.reg

    @property
    def cfg(self) -> ClusterConfig:
        return self.membership.cfg

    def load_config(self) -> ClusterConfig:
        self.select_keyspace()
        return self.membership.load_config()

    def select_keyspace(self) -> None:
        """Before each registration (the first, and any after a lost lease): keyspace 1
        unless /vmha/version says keyspace 2 is done (raises KeyspaceUndecided while a
        migration runs).  A registered agent follows the marker in `nodeagent.switch`."""
        if self.keyspace_known and self.membership.reg is not None:
            return
        keyspace = read_keyspace(self.ctx.store)
        if self.keyspace_known and keyspace == self.ctx.keyspace:
            return
        if keyspace == 1 and self.ctx.keyspace == 2:
            # On a migrated cluster keyspace 1 holds no VM: never guess it back.
            raise KeyspaceUndecided("the keyspace marker is gone but this agent ran "
                                    "keyspace 2: waiting, unregistered; restart it to "
                                    "run keyspace 1")
        self.enter_keyspace(keyspace)
        self.keyspace_known = True
        self.ctx.log.info("keyspace", version=keyspace)

    def enter_keyspace(self, keyspace: Literal[1, 2]) -> None:
        """Read and write `keyspace` from now on (its node view, status guards and
        history on keyspace 2)."""
        ctx = self.ctx
        if keyspace == 2 and self.v2 is None:
            self.watch.stop()
            ctx.keyspace = 2
            self.v2 = AgentV2(ctx)
            self.execution.v2 = self.v2.statuses
        elif keyspace == 1 and self.v2 is not None:
            self.v2.close()
            self.v2 = None
            self.execution.v2 = None
            ctx.history = self._history_v1
        ctx.keyspace = keyspace

    def request_exit(self) -> None:
        """SIGTERM: drain this node, then exit once it runs no VM."""
        self.exiting = True
        metrics.notify("STOPPING=1\nSTATUS=draining before exit")
        self.ctx.wake.set()

    # ---- main loop ---------------------------------------------------------------------

    def run(self) -> int:
        ctx, m = self.ctx, self.membership
        self.execution.start(m.cfg.max_migrations_per_node)
        own_process = threading.current_thread() is threading.main_thread()
        opts = ctx.opts
        if (opts.guard or (opts.guard is None and own_process)) and m.guard is None:
            m.start_guard()
        try:
            while not ctx.stopped.is_set():
                if m.guard_gone():
                    ctx.log.error("guard_lost", reason="guard process gone: fencing this "
                                                       "node and exiting")
                    m.self_fence()
                    return 1
                try:
                    if self._cycle_logged():
                        m.disarm_guard()
                        return 0
                    self.backoff.succeeded()
                    delay = opts.poll_interval_s
                except Exception:  # noqa: BLE001 - a bug must never end the agent: see below
                    delay = self._cycle_failed()
                    ctx.stopped.wait(delay)  # not woken by the watch: back off for real
                    continue
                ctx.wake.wait(delay)
                ctx.wake.clear()
            return 0
        finally:
            self.watch.stop()
            if self.v2 is not None:
                self.v2.close()
            m.stop()
            self.execution.stop()

    def _cycle_logged(self) -> bool:
        """One cycle; a temporary failure is logged and the next cycle tries again."""
        try:
            return self.cycle()
        except StoreUnavailable as exc:
            self.ctx.log.warning("etcd_unavailable", error=str(exc))
        except HypervisorError as exc:
            self.ctx.log.warning("hypervisor_error", error=str(exc))
        except TemporaryError as exc:
            self.ctx.log.warning("cycle_interrupted", error=str(exc))
        return False

    def _cycle_failed(self) -> float:
        """An unexpected error (a bug, or data no check foresaw) ended the cycle.

        Exiting would stop the keepalive and let the guard destroy every VM of the node;
        carrying on keeps the lease (renewed by its own thread, untouched here) and the
        VMs as they are, and tries again after a bounded, jittered backoff.
        """
        delay = self.backoff.failed()
        self.ctx.log.exception("cycle_failed", revision=self.last_revision,
                               failures=self.backoff.failures, retry_in_s=round(delay, 2))
        return delay

    def cycle(self) -> bool:
        """One reconcile pass.  Returns True when the agent should exit."""
        self.select_keyspace()
        m = self.membership
        reg = m.renew(self.exiting)
        if reg is None:
            return False  # lost a registration race: the next cycle registers again
        if m.flags.fenced and not reg.keeper.valid():
            return False
        snap = (self.v2.snapshot(reg.create_revision) if self.v2 is not None
                else self.ctx.store.snapshot())
        self.last_revision = snap.revision
        self.invalid.report(snap)
        if self.v2 is None:
            self.watch.ensure(snap.revision)
        if frozen(self, reg, snap):
            return False  # a keyspace migration under way: write nothing
        if not m.visible(snap, reg):
            return False
        sync_cordon(self.ctx, snap, reg)
        self.execution.reconcile(snap)
        if self.v2 is not None and m.acting_allowed():
            self.v2.clean_up(reg.create_revision)
        if not self.exiting:
            return False
        active, inflight = self.execution.drain_state()
        if not active and not inflight:
            self.ctx.log.info("drained_exiting", revision=snap.revision)
            m.leave(reg, "drained: no VM runs here")
            return True
        self.ctx.log.info("draining", remaining=active, revision=snap.revision)
        return False
