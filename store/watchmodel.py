"""A model of some key ranges kept by one etcd watch stream (keyspace 2, section 3).

`WatchedState` lists its ranges at one revision R (paged), then watches each from R+1
on one gRPC stream of its own and applies the events in order.  The stream is read on
the process's `grpc.aio` event loop (`store.aioloop`): an idle stream wakes no thread.
What can go wrong:

* etcd cancels a watcher with a compact revision (a resume from a revision etcd has
  compacted): the owner's `wait()` raises `StoreCompacted`; the owner calls `start()`,
  which re-lists and re-watches.  A canceled watcher for another reason (permission)
  raises `PermissionDenied`/`StoreRejected` the same way.
* the stream breaks (member gone, connection reset): it is re-created on the next
  member, each watcher resuming after the last event it applied, so no event is lost
  or applied twice; a re-list happens only if that revision is compacted.
* the stream stalls (a member stopped or cut off answers nothing, the connection stays
  up): every `check_interval_s` without a response a progress request is sent on the
  stream, and no response within `progress_timeout_s` re-creates it.  The supervising
  thread sleeps until the next of these is due (or a break wakes it), not on a tick:
  an idle state costs it two wake-ups per `check_interval_s`.

Resumes use each watcher's last event revision, never a header revision: etcd 3.4
(before 3.4.25) may answer a progress request ahead of events still queued for a
watcher, and a watcher catching up gets headers of the newest revision with more
events to come, so a header proves liveness but not delivery.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from pyetcd import etcdrpc
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from schemas.errors import InvariantError
from schemas.snapshot import RawKV
from store.errors import (
    StoreCompacted,
    StoreError,
    StoreUnavailable,
    store_error,
    watch_cancel_error,
)
from store.etcd import EtcdStore
from store.paging import KeyRange, list_range, raw_kv
from store.watchstream import Change, Liveness, Watcher, WatchStream

__all__ = ["Change", "WatchedState"]

log = structlog.get_logger("vmha.store")

_DELETE = 1  # mvccpb.Event.EventType.DELETE


class WatchedState:
    """The key-values of disjoint key ranges, kept current by one watch stream.

    The owner calls `start()` (list, then watch), then `wait()` in its loop; `wait()`
    returns the changes applied since its last call and raises `StoreCompacted` or
    `StoreRejected` when the owner must `start()` again.  `add()`/`remove()` watch or
    forget a range on the running stream."""

    def __init__(self, store: EtcdStore, ranges: Sequence[KeyRange], *,
                 check_interval_s: float = 10.0, progress_timeout_s: float = 2.0,
                 retry_max_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 notify: threading.Event | None = None) -> None:
        """`notify` is set on each change and failure (a daemon's wake-up event)."""
        self._store = store
        self._notify = notify
        self._watchers: list[Watcher] = []
        for keys in ranges:
            self._check_disjoint(keys)
            self._watchers.append(Watcher(keys, 0))
        if not self._watchers:
            raise ValueError("a watched state needs at least one key range")
        self._check_interval, self._progress_timeout = check_interval_s, progress_timeout_s
        self._retry_max, self._clock = retry_max_s, clock
        self._ring = store.aio_channel_ring(etcdrpc.WatchStub)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._list_lock = threading.Lock()   # start/add/remove: one at a time
        self._open_lock = threading.Lock()   # one stream opening at a time
        self._kvs: dict[bytes, RawKV] = {}
        self._revision = 0
        self._changes: list[Change] = []
        self._failure: StoreError | None = None
        self._stream: WatchStream | None = None
        self._started = False
        self._gen = 0
        self._liveness = Liveness(check_interval_s, progress_timeout_s, clock())
        self._closed = threading.Event()
        self._kick = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.stats = {"lists": 0, "resumes": 0, "stalls": 0, "progress_requests": 0,
                      "events": 0, "duplicates": 0}
        self.last_alive = clock()

    # ---- owner's API ---------------------------------------------------------------

    def start(self) -> int:
        """List every range at one revision R, then watch them all from R+1 on a new
        stream; returns R.  Raises StoreUnavailable/StoreCompacted (try again later)."""
        with self._lock:
            self._gen += 1
            self._started, old, self._stream = False, self._stream, None
        if old is not None:
            old.close()
        with self._list_lock:
            try:
                rev, kvs = self._list([w.keys for w in self._watchers])
            except StoreError as exc:
                with self._lock:
                    self._failure = exc
                raise
            with self._lock:
                self._kvs, self._revision, self._changes = kvs, rev, []
                for w in self._watchers:
                    w.next_rev = rev + 1
                self._failure, self._started = None, True
                self.stats["lists"] += 1
                gen = self._gen
            log.info("watch_listed", revision=rev, keys=len(kvs),
                     ranges=[str(w.keys) for w in self._watchers])
            with self._open_lock:
                try:
                    self._open(gen, "start", budget=self._store.retry_budget)
                except StoreUnavailable as exc:
                    with self._lock:
                        if gen == self._gen:   # the owner starts again (wait() says so)
                            self._failure, self._started = exc, False
                    raise
        with self._lock:
            self._raise_failure()
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                                name="vmha-watch-supervisor")
            self._supervisor.start()
        return rev

    def wait(self, timeout: float | None) -> list[Change]:
        """The changes applied since the last call, in order, once there is one or
        after `timeout` s (then maybe none; None: no timeout, `close()` ends it)."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._changes) or self._failure is not None
                                or self._closed.is_set(), timeout)
            self._raise_failure()
            changes, self._changes = self._changes, []
            return changes

    def pending(self) -> bool:
        """True if changes were applied that no `wait` has returned yet."""
        with self._cond:
            return bool(self._changes)

    def add(self, keys: KeyRange) -> int:
        """Watch one more range (listed now, at its own revision R', watched from
        R'+1); returns R'."""
        with self._list_lock:
            with self._lock:
                self._check_disjoint(keys)
            rev, kvs = self._list([keys])
            with self._lock:
                w = Watcher(keys, rev + 1)
                self._watchers.append(w)
                self._kvs.update(kvs)
                if self._stream is not None:
                    self._stream.create(w)
        return rev

    def remove(self, keys: KeyRange) -> bool:
        """Stop watching `keys` and forget its key-values; False if not watched.  The
        last range stays (close the state instead)."""
        with self._list_lock, self._lock:
            w = next((w for w in self._watchers if w.keys == keys), None)
            if w is None:
                return False
            if len(self._watchers) == 1:
                raise ValueError(f"{keys} is the last watched range: close the state")
            w.removed = True
            self._watchers.remove(w)
            for k in [k for k in self._kvs if keys.contains(k)]:
                del self._kvs[k]
            if self._stream is not None:
                for watch_id, bound in self._stream.ids.items():
                    if bound is w:
                        self._stream.cancel(watch_id)
            return True

    def verify(self) -> bool:
        """A check of the watch that sends no value: every watched range listed keys
        only, at the model's revision, holds exactly the keys and mod revisions the model
        does.  False: they differ, or that revision is compacted (the owner lists
        again).  A model behind a watcher's progress differs too: only a listing costs."""
        with self._lock:
            rev = self._revision
            held = {k: kv.mod_revision for k, kv in self._kvs.items()}
            ranges = [w.keys for w in self._watchers]
        seen: dict[bytes, int] = {}
        try:
            for keys in ranges:
                for page in list_range(self._store.range_request, keys, rev, keys_only=True):
                    seen.update((k, kv.mod_revision)
                                for k, kv in zip(page.raw_keys, page.kvs, strict=True))
        except StoreCompacted:
            return False
        return seen == held

    @property
    def revision(self) -> int:
        with self._lock:
            return self._revision

    def get(self, key: str) -> RawKV | None:
        with self._lock:
            return self._kvs.get(key.encode())

    def items(self) -> tuple[int, list[RawKV]]:
        """The revision and every key-value, in key order (one consistent view)."""
        with self._lock:
            return self._revision, [self._kvs[k] for k in sorted(self._kvs)]

    @property
    def endpoint(self) -> str | None:
        """The member the stream is open to (None while it is not)."""
        with self._lock:
            s = self._stream
            return s.target if s is not None and s.opened else None

    def close(self) -> None:
        self._closed.set()
        self._kick.set()
        with self._cond:
            stream, self._stream, self._started = self._stream, None, False
            self._cond.notify_all()
        if stream is not None:
            stream.close()
        if self._supervisor is not None:
            self._supervisor.join(5)
        self._ring.close()

    # ---- listing and the stream ------------------------------------------------------

    def _raise_failure(self) -> None:
        """Raise what the owner must act on (a new instance each time, so an owner that
        asks again and again does not grow one traceback)."""
        if self._failure is not None:
            raise type(self._failure)(*self._failure.args)

    def _check_disjoint(self, keys: KeyRange) -> None:
        for w in self._watchers:
            if w.keys.overlaps(keys):
                raise ValueError(f"watched ranges must be disjoint: {keys} and {w.keys}")

    def _list(self, ranges: list[KeyRange]) -> tuple[int, dict[bytes, RawKV]]:
        rev: int | None = None
        kvs: dict[bytes, RawKV] = {}
        for keys in ranges:   # the first range's revision for all: one snapshot
            for page in list_range(self._store.range_request, keys, rev):
                rev = page.revision
                kvs.update(zip(page.raw_keys, page.kvs, strict=True))
        if rev is None:
            raise InvariantError("a listing yields at least one page")
        return rev, kvs

    def _open(self, gen: int, why: str, budget: float | None) -> None:
        """Open a stream and create every watcher on it, retried on the next member
        until open, `budget` s have passed, or this generation is over."""
        def stop(state: RetryCallState) -> bool:
            return self._abandoned(gen) or (
                budget is not None and (state.seconds_since_start or 0.0) >= budget)

        def sleep(seconds: float) -> None:
            self._closed.wait(seconds)   # close() ends the wait

        Retrying(retry=retry_if_exception_type(StoreUnavailable), stop=stop,
                 wait=wait_random_exponential(multiplier=0.05, max=self._retry_max),
                 sleep=sleep, reraise=True)(self._open_once, gen, why)

    def _abandoned(self, gen: int) -> bool:
        with self._lock:
            return self._closed.is_set() or gen != self._gen or self._failure is not None

    def _open_once(self, gen: int, why: str) -> None:
        index, target, stub = self._ring.current()
        with self._lock:
            if self._closed.is_set() or gen != self._gen or self._failure is not None:
                return
            stream = WatchStream(index, target, stub, self._store.call_auth)
            self._stream = stream
            for w in self._watchers:
                stream.create(w)
            stream.run(self._on_response, self._on_end)
        stream.ready.wait(self._progress_timeout)
        with self._lock:
            if self._stream is stream and stream.opened:
                self._liveness = Liveness(self._check_interval, self._progress_timeout,
                                          self._clock())
                self.last_alive = self._clock()
                if why == "resume":
                    self.stats["resumes"] += 1
                log.info("watch_stream_opened", endpoint=target, why=why,
                         revision=self._revision,
                         from_revision=min((w.next_rev for w in self._watchers), default=0))
                return
            if self._stream is stream:
                self._stream = None
            failed = self._failure is not None
        stream.close()
        if failed:
            return  # canceled by etcd while opening: the owner re-lists
        self._ring.failed(index)
        raise StoreUnavailable(f"etcd watch stream to {target} not open within "
                               f"{self._progress_timeout} s")

    def _supervise(self) -> None:
        wait = 0.0
        while not self._closed.is_set():
            # Until the liveness check is due, or a break, a stall or close kicks.
            self._kick.wait(max(0.01, wait))
            self._kick.clear()
            with self._lock:
                gen = self._gen
                reopen = self._started and self._stream is None and self._failure is None
            if reopen:
                with self._open_lock:
                    try:
                        self._open(gen, "resume", budget=None)
                    except StoreUnavailable as exc:
                        # Retried until abandoned: closed, re-listed or failed meanwhile.
                        log.debug("watch_resume_abandoned", error=str(exc))
                wait = 0.0
            else:
                wait = self._check_liveness()

    def _check_liveness(self) -> float:
        """Ask an idle stream for progress, or give up on one that did not answer in
        time; the seconds until the next check is due.  Without an open stream: at
        most `check_interval_s` (a stream opened since has its first check due that
        long after its opening, so that is never late either)."""
        with self._lock:
            stream = self._stream
            if stream is None or not stream.opened:
                return self._check_interval
            now = self._clock()
            action = self._liveness.poll(now)
            if action == Liveness.SEND:
                stream.progress()
                self.stats["progress_requests"] += 1
            if action != Liveness.DEAD:
                return min(self._liveness.due_in(now), self._check_interval)
            self._stream = None
            self.stats["stalls"] += 1
        log.warning("watch_stream_stalled", endpoint=stream.target,
                    timeout_s=self._progress_timeout)
        stream.close()
        self._ring.failed(stream.index)
        return 0.0

    def _on_end(self, stream: WatchStream, exc: BaseException | None) -> None:
        err = store_error(f"watch via {stream.target}", exc) if exc is not None else None
        with self._cond:
            if stream is not self._stream:
                return  # a stream closed on purpose, or replaced
            if err is not None and not isinstance(err, StoreUnavailable):
                self._fail(err)
                return
            self._stream = None
            stream.ready.set()
        log.info("watch_stream_broken", endpoint=stream.target, error=repr(exc))
        self._ring.failed(stream.index)
        self._kick.set()

    def _fail(self, err: StoreError) -> None:
        """etcd canceled a watcher (compaction, permission): the owner re-lists.
        Called with the lock held."""
        stream, self._stream, self._started = self._stream, None, False
        self._failure = err
        log.warning("watch_failed", error=str(err), revision=self._revision)
        self._cond.notify_all()
        if self._notify is not None:
            self._notify.set()
        if stream is not None:
            stream.close()

    def _on_response(self, stream: WatchStream, resp: Any) -> None:
        with self._cond:
            if stream is not self._stream:
                return
            now = self._clock()
            self.last_alive = now
            self._liveness.answered(now)
            if resp.created:
                self._on_created(stream, resp)
                return
            w = stream.ids.get(resp.watch_id)
            if w is None or w.removed:
                return  # a progress answer (watch_id -1), or a removed watcher's leftovers
            if resp.compact_revision or resp.canceled:
                self._fail(watch_cancel_error(f"watch {w.keys}", resp.cancel_reason,
                                              resp.compact_revision))
                return
            if resp.events:
                self._apply(w, resp)
                self._cond.notify_all()
                if self._notify is not None:
                    self._notify.set()

    def _on_created(self, stream: WatchStream, resp: Any) -> None:
        if not stream.pending:  # etcd answers creates in order: one per request
            self._fail(StoreUnavailable(f"etcd watch via {stream.target}: unexpected "
                                        f"created response {resp.watch_id}"))
            return
        w = stream.pending.popleft()
        if resp.canceled or resp.compact_revision:
            if not w.removed:
                self._fail(watch_cancel_error(f"watch {w.keys}", resp.cancel_reason,
                                              resp.compact_revision))
                return
        else:
            stream.ids[resp.watch_id] = w
            if w.removed:
                stream.cancel(resp.watch_id)
        if not stream.pending and not stream.opened:
            stream.opened = True
            stream.ready.set()

    def _apply(self, w: Watcher, resp: Any) -> None:
        # Events before the watcher's next revision were applied already (the events
        # of one revision always arrive in one response).
        floor = w.next_rev
        for ev in resp.events:
            kv = raw_kv(ev.kv)
            if kv.mod_revision < floor:
                self.stats["duplicates"] += 1
                continue
            key = bytes(ev.kv.key)
            if ev.type == _DELETE:
                self._kvs.pop(key, None)
                self._changes.append(Change(kv.key, None, kv.mod_revision))
            else:
                self._kvs[key] = kv
                self._changes.append(Change(kv.key, kv, kv.mod_revision))
            w.next_rev = kv.mod_revision + 1
            self.stats["events"] += 1
        self._revision = max(self._revision, int(resp.header.revision))
