"""A watch used only as a wake-up signal (daemons re-read on every wake-up)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from store.etcd import EtcdStore, StoreCompacted, StoreUnavailable

log = structlog.get_logger("vmha.store")


class PrefixWatch:
    """A watch used as a wake-up signal, re-established from the last snapshot.

    Daemons re-read a full snapshot on every wake-up, so a lost or compacted watch
    costs only one extra list; `ensure()` is called each cycle with the revision
    of the snapshot just read.
    """

    def __init__(self, store: EtcdStore, prefix: str, wake: threading.Event) -> None:
        self._store = store
        self._prefix = prefix
        self._wake = wake
        self._alive = False
        self._cancel: Callable[[], None] | None = None
        self.last_seen_revision = 0
        self._lock = threading.Lock()

    def _on_revision(self, rev: int) -> None:
        self.last_seen_revision = max(self.last_seen_revision, rev)
        self._wake.set()

    def _on_error(self, err: BaseException) -> None:
        with self._lock:
            self._alive = False
        log.info("watch_lost", prefix=self._prefix, error=repr(err),
                 last_seen_revision=self.last_seen_revision)
        self._wake.set()

    def ensure(self, snapshot_revision: int) -> None:
        with self._lock:
            if self._alive:
                return
        start = max(snapshot_revision, self.last_seen_revision) + 1
        try:
            cancel = self._store.watch_prefix(self._prefix, start, self._on_revision,
                                              self._on_error)
        except (StoreUnavailable, StoreCompacted) as exc:
            log.info("watch_start_failed", prefix=self._prefix, error=repr(exc))
            return
        with self._lock:
            self._alive = True
            self._cancel = cancel

    def stop(self) -> None:
        with self._lock:
            cancel, self._cancel, self._alive = self._cancel, None, False
        if cancel:
            cancel()
