"""Lease keepalive with a self-fencing deadline on a monotonic clock.

Two threads: one renews the lease, the other watches the deadline.  They are
separate because a keepalive call can block for its whole gRPC timeout; the
deadline must fire on time regardless.  The deadline is counted from the *send*
time of the last keepalive etcd acknowledged (see fencing.policy).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from fencing.policy import self_fence_deadline
from schemas.errors import TemporaryError
from schemas.models import ClusterConfig

log = structlog.get_logger("vmha.lease")


class LeaseStore(Protocol):
    def keepalive(self, lease_id: int) -> int: ...



class LeaseKeeper:
    def __init__(self, store: LeaseStore, cfg: ClusterConfig, lease_id: int, granted_sent_at: float,
                 *, on_gone: Callable[[bool], None], on_deadline: Callable[[], None],
                 on_renewed: Callable[[], None] | None = None,
                 unavailable: type[BaseException] = TemporaryError,
                 clock: Callable[[], float] = time.monotonic, name: str = "lease") -> None:
        """`on_gone(before_deadline)` fires once when etcd says the lease no longer exists:
        before the deadline that can only be a revoke (a drain); after it, an expiry.
        `on_deadline()` fires once when the deadline passes without a renewal.
        `unavailable`: the error a keepalive raises when etcd does not answer; it is
        logged and retried.  Anything else ends renewal loudly (a bug), and the deadline
        monitor still fences on time."""
        self.store = store
        self.cfg = cfg
        self.lease_id = lease_id
        self._clock = clock
        self._on_gone = on_gone
        self._on_deadline = on_deadline
        self._on_renewed = on_renewed
        self._unavailable = unavailable
        self._name = name
        self._lock = threading.Lock()
        self.deadline = self_fence_deadline(granted_sent_at, cfg)
        self.last_renew_latency_s: float | None = None
        self.deadline_passed = False
        self.gone = False
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._renew_loop, name=f"{name}-keepalive",
                                          daemon=True),
                         threading.Thread(target=self._deadline_loop, name=f"{name}-deadline",
                                          daemon=True)]

    def start(self) -> LeaseKeeper:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def valid(self) -> bool:
        """True while the lease is certainly held (before the self-fencing deadline)."""
        with self._lock:
            return not self.gone and not self.deadline_passed and self._clock() < self.deadline

    def remaining(self) -> float:
        with self._lock:
            return self.deadline - self._clock()

    def _renew_loop(self) -> None:
        interval = self.cfg.keepalive_interval_s
        while not self._stop.wait(interval if not self.deadline_passed else interval / 4):
            sent = self._clock()
            try:
                ttl = self.store.keepalive(self.lease_id)
            except self._unavailable as exc:
                log.warning("keepalive_failed", lease=f"{self.lease_id:x}", error=str(exc),
                            remaining_s=round(self.remaining(), 3), who=self._name)
                continue
            if self._stop.is_set():
                return
            if ttl <= 0:
                with self._lock:
                    before = self._clock() < self.deadline and not self.deadline_passed
                    self.gone = True
                log.info("lease_gone", lease=f"{self.lease_id:x}", revoked=before, who=self._name)
                # Renewal ends, but the deadline monitor keeps running until the owner
                # calls stop(): a drained agent that cannot re-register in time must still
                # fence itself by the old deadline.
                self._on_gone(before)
                return
            with self._lock:
                self.deadline = max(self.deadline, self_fence_deadline(sent, self.cfg))
                self.last_renew_latency_s = self._clock() - sent
                recovered = self.deadline_passed
                self.deadline_passed = False
            if recovered:
                log.warning("lease_recovered_after_deadline", lease=f"{self.lease_id:x}",
                            who=self._name)
            if self._on_renewed:
                self._on_renewed()

    def _deadline_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                now = self._clock()
                fire = not self.deadline_passed and now >= self.deadline
                if fire:
                    self.deadline_passed = True
                wait = max(0.01, min(0.05, self.deadline - now))
            if fire:
                log.error("self_fence_deadline", lease=f"{self.lease_id:x}", who=self._name)
                self._on_deadline()
            self._stop.wait(wait)
