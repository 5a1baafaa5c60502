"""Lease keepalive with a self-fencing deadline on a monotonic clock.

Two threads: one renews the lease, the other watches the deadline.  They are
separate because a keepalive call can block for its whole RPC deadline; the
deadline must fire on time regardless.  The deadline is counted from the *send*
time of the last keepalive etcd acknowledged (see fencing.policy).

A keepalive that fails (a member stalled, killed, partitioned, or between leaders) is
tried again at once, on the next endpoint (the store moves on after a failure), with
a short jittered backoff between attempts; each attempt has its own deadline
(`keepalive_timeout_s`).  fencing.policy.renewal_gap is the longest gap this leaves
between two acknowledged renewals, and validate_timing checks it fits before the
guard fires.

A keeper may renew a second lease in the same round (`partner`: keyspace 2's liveness
lease, docs/keyspace-v2.md section 4): both keepalives are sent together on the store's
long-lived keepalive stream (`store.keepalive`) and must both be answered within the
round's deadline; the round counts as acknowledged only when etcd acknowledged both,
so the deadline is the minimum over both leases of (last acknowledged send + TTL -
safety).  The partner found gone is reported once
(`on_partner_gone`) and the deadline stays where it was until a new partner is set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_when_event_set,
    wait_random_exponential,
)

from fencing.policy import self_fence_deadline
from schemas.errors import TemporaryError
from schemas.models import ClusterConfig

log = structlog.get_logger("vmha.lease")


# The first retry after a failed keepalive waits at most this long (then doubling, up to
# a quarter of the interval): "at once", without a tight loop on a refused connection.
RETRY_FIRST_WAIT_S = 0.02

# The deadline thread sleeps until the deadline: it only ever moves later, so waking at
# the old one and sleeping again fires exactly on time (polling every 50 ms cost a
# thousand agents on one host a third of a core).  The cap bounds a sleep measured on the
# Event's monotonic clock when an injected clock runs otherwise, and the check once a
# deadline has passed (a renewal may clear it).
DEADLINE_CHECK_MAX_S = 1.0


class LeaseStore(Protocol):
    def keepalive_round(self, lease_ids: Sequence[int], timeout: float | None = None
                        ) -> dict[int, int]: ...


class LeaseKeeper:
    def __init__(self, store: LeaseStore, cfg: ClusterConfig, lease_id: int, granted_sent_at: float,
                 *, on_gone: Callable[[bool], None], on_deadline: Callable[[], None] | None,
                 on_renewed: Callable[[], None] | None = None,
                 unavailable: type[BaseException] = TemporaryError,
                 clock: Callable[[], float] = time.monotonic, name: str = "lease",
                 partner: int = 0,
                 on_partner_gone: Callable[[int], None] | None = None) -> None:
        """`on_gone(before_deadline)` fires once when etcd says the lease no longer exists:
        before the deadline that can only be a revoke (a drain); after it, an expiry.  It
        runs on the renewal thread, whose work ends with the lease (or on the thread whose
        `found_gone` came first), so it may take a while (keyspace 2's agent registers
        again there); the deadline thread goes on meanwhile.
        `on_deadline()` fires once when the deadline passes without a renewal; None: the
        deadline is not watched (a lease that fences nothing, such as the liveness lease).
        `unavailable`: the error a keepalive raises when etcd does not answer; it is
        logged and retried at once on the next member.  Anything else is logged with its
        traceback and retried a little later: only the deadline monitor may fence."""
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
        self.partner = partner
        self._partner_gone = False
        self._on_partner_gone = on_partner_gone
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._renew_loop, name=f"{name}-keepalive",
                                          daemon=True)]
        if on_deadline is not None:
            self._threads.append(threading.Thread(target=self._deadline_loop,
                                                  name=f"{name}-deadline", daemon=True))

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

    def _retrying(self) -> Retrying:
        """Attempts of one renewal: again at once after a failure (the store has moved
        to the next endpoint), for up to one interval; then the loop starts another."""
        interval = self.cfg.keepalive_interval_s
        return Retrying(retry=retry_if_exception_type(self._unavailable),
                        stop=stop_after_delay(interval) | stop_when_event_set(self._stop),
                        wait=wait_random_exponential(multiplier=RETRY_FIRST_WAIT_S,
                                                     max=interval / 4),
                        sleep=self._pause, before_sleep=self._log_failure, reraise=True)

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)  # stop() ends the pause; the stop condition ends the retry

    def _log_failure(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning("keepalive_failed", lease=f"{self.lease_id:x}", error=str(exc),
                    attempt=state.attempt_number, remaining_s=round(self.remaining(), 3),
                    who=self._name)

    def set_partner(self, lease_id: int) -> None:
        """Renew `lease_id` as the partner from the next round on (a replacement)."""
        with self._lock:
            self.partner, self._partner_gone = lease_id, False

    def _attempt(self) -> tuple[float, int, bool, int]:
        """One round: (send time, the lease's TTL, whether the partner, if any, was
        acknowledged too, the partner the round was for).  Both keepalives go out
        together, answered within one `keepalive_timeout_s`; a partner found gone is not
        asked again."""
        with self._lock:
            partner, gone = self.partner, self._partner_gone
        ids = [self.lease_id] + ([partner] if partner and not gone else [])
        # Noted before the send: the deadline counts from it, never from the answer.
        sent = self._clock()
        ttls = self.store.keepalive_round(ids, self.cfg.keepalive_timeout_s)
        ttl = ttls[self.lease_id]
        if ttl <= 0 or not partner:
            return sent, ttl, True, partner
        return sent, ttl, not gone and ttls[partner] > 0, partner

    def _renew_loop(self) -> None:
        retrying = self._retrying()
        wait = self.cfg.keepalive_interval_s
        while not self._stop.wait(wait):
            try:
                sent, ttl, both, partner = retrying(self._attempt)
            except self._unavailable as exc:
                if self._stop.is_set():
                    # The owner stopped this keeper (and may have closed the store):
                    # the last round's failure is no renewal failure.
                    log.debug("keepalive_stopped", lease=f"{self.lease_id:x}",
                              error=str(exc), who=self._name)
                    return
                # A whole interval of attempts failed: go on at once (the deadline
                # thread fences if this lasts).
                log.warning("keepalive_failed", lease=f"{self.lease_id:x}", error=str(exc),
                            remaining_s=round(self.remaining(), 3), who=self._name)
                wait = 0.0
                continue
            except Exception as exc:  # noqa: BLE001 - see below
                if self._stop.is_set():
                    log.debug("keepalive_stopped", lease=f"{self.lease_id:x}",
                              error=repr(exc), who=self._name)
                    return
                # An error nobody foresaw (a refused request, a closed channel, a bug):
                # ending this thread would leave a healthy node to self-fence at its
                # deadline.  Only the deadline may fence; renewal goes on, a little later.
                log.exception("keepalive_error", lease=f"{self.lease_id:x}",
                              remaining_s=round(self.remaining(), 3), who=self._name)
                wait = self.cfg.keepalive_interval_s / 4
                continue
            wait = self.cfg.keepalive_interval_s
            if self._stop.is_set():
                return
            if ttl <= 0:
                self._gone()
                return
            if both:
                self._renewed(sent)
            else:
                self._partner_lost(partner)

    def found_gone(self) -> None:
        """Another thread learned from etcd that the lease is gone: reported as this
        keeper's renewal would, once.  A second report would be read against a
        deadline the first one already ended (`valid()` is false once gone): a revoke
        reported again as an expiry."""
        self._gone()

    def _gone(self) -> None:
        with self._lock:
            if self.gone:
                return
            before = self._clock() < self.deadline and not self.deadline_passed
            self.gone = True
        log.info("lease_gone", lease=f"{self.lease_id:x}", revoked=before, who=self._name)
        # Renewal ends, but the deadline monitor keeps running until the owner calls
        # stop(): a drained agent that cannot re-register in time must still fence
        # itself by the old deadline.
        self._on_gone(before)

    def _partner_lost(self, partner: int) -> None:
        """The partner lease `partner` is gone: the deadline no longer moves (it is the
        minimum over both leases); reported once per partner.  A partner replaced while
        the round was in flight is not the one found gone: the next round asks it."""
        with self._lock:
            if partner != self.partner:
                return
            first = not self._partner_gone
            self._partner_gone = True
        if first:
            log.info("partner_lease_gone", lease=f"{self.lease_id:x}",
                     partner=f"{partner:x}", remaining_s=round(self.remaining(), 3),
                     who=self._name)
            if self._on_partner_gone is not None:
                self._on_partner_gone(partner)

    def extend_deadline(self, until: float) -> None:
        """Move a lease's deadline later (fencing.policy.revoked_deadline: a revoked
        lease); a deadline that has passed already stays passed."""
        with self._lock:
            if not self.deadline_passed:
                self.deadline = max(self.deadline, until)

    def _renewed(self, sent: float) -> None:
        with self._lock:
            self.deadline = max(self.deadline, self_fence_deadline(sent, self.cfg))
            self.last_renew_latency_s = self._clock() - sent
            recovered = self.deadline_passed
            self.deadline_passed = False
        if recovered:
            log.warning("lease_recovered_after_deadline", lease=f"{self.lease_id:x}",
                        who=self._name)
        if self._on_renewed:
            try:
                self._on_renewed()
            except Exception:  # noqa: BLE001 - the lease is renewed; the callback's
                # failure (e.g. petting a guard that is restarting) must not end renewal.
                log.exception("renewed_callback_failed", lease=f"{self.lease_id:x}",
                              who=self._name)

    def _deadline_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                now = self._clock()
                fire = not self.deadline_passed and now >= self.deadline
                if fire:
                    self.deadline_passed = True
                wait = DEADLINE_CHECK_MAX_S if self.deadline_passed else min(
                    DEADLINE_CHECK_MAX_S, self.deadline - now)
            if fire:
                log.error("self_fence_deadline", lease=f"{self.lease_id:x}", who=self._name)
                if self._on_deadline is not None:
                    self._on_deadline()
            self._stop.wait(wait)
