"""One etcd watch stream (`WatchStream`), the watchers on it, and when to doubt it
(`Liveness`); the model kept from it is `store.watchmodel.WatchedState`."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from pyetcd import etcdrpc

from schemas.snapshot import RawKV
from store.paging import KeyRange

__all__ = ["Change", "Liveness", "WatchStream", "Watcher"]


@dataclass(frozen=True)
class Change:
    """One event applied to the model: the key's new value, or None once deleted."""

    key: str
    kv: RawKV | None
    revision: int


class Liveness:
    """When to ask a stream for progress and when to give up on it (clock-free: the
    caller passes the time).  Any response proves the stream alive, so a busy stream
    is never asked; an idle one is asked every `interval` s and dead `timeout` s after
    a question without an answer."""

    SEND, DEAD = "send", "dead"

    def __init__(self, interval: float, timeout: float, now: float) -> None:
        self.interval, self.timeout = interval, timeout
        self.asked_at: float | None = None
        self.next_check = now + interval

    def answered(self, now: float) -> None:
        self.asked_at = None
        self.next_check = now + self.interval

    def due_in(self, now: float) -> float:
        """Seconds until `poll` may act (a question to send, or an answer overdue); an
        answer only moves that later, so a caller sleeping this long is never late."""
        if self.asked_at is not None:
            return self.asked_at + self.timeout - now
        return self.next_check - now

    def poll(self, now: float) -> str | None:
        if self.asked_at is not None:
            return self.DEAD if now - self.asked_at >= self.timeout else None
        if now >= self.next_check:
            self.asked_at = now
            return self.SEND
        return None


class Watcher:
    def __init__(self, keys: KeyRange, next_rev: int) -> None:
        self.keys = keys
        self.next_rev = next_rev   # the first revision not yet applied
        self.removed = False


class WatchStream:
    """One gRPC watch stream: its request queue, the call, and the thread reading it.
    `pending`/`ids` are guarded by the owning state's lock."""

    def __init__(self, index: int, target: str, stub: Any, auth: tuple[Any, Any]) -> None:
        self.index, self.target = index, target
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.pending: deque[Watcher] = deque()   # created, in request order, unanswered
        self.ids: dict[int, Watcher] = {}
        self.opened = False
        self.ready = threading.Event()            # every create answered, or the end
        self._call = stub.Watch(self._iter_requests(), credentials=auth[0], metadata=auth[1])

    def _iter_requests(self) -> Iterator[Any]:
        while (req := self._requests.get()) is not None:
            yield req

    def run(self, on_response: Callable[[WatchStream, Any], None],
            on_end: Callable[[WatchStream, BaseException | None], None]) -> None:
        def read() -> None:
            try:
                for resp in self._call:
                    on_response(self, resp)
            except grpc.RpcError as exc:
                on_end(self, exc)
                return
            on_end(self, None)

        threading.Thread(target=read, daemon=True, name=f"vmha-watch-{self.target}").start()

    def create(self, w: Watcher) -> None:
        self.pending.append(w)
        self._requests.put(etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=w.keys.start, range_end=w.keys.end, start_revision=w.next_rev)))

    def cancel(self, watch_id: int) -> None:
        self._requests.put(etcdrpc.WatchRequest(
            cancel_request=etcdrpc.WatchCancelRequest(watch_id=watch_id)))

    def progress(self) -> None:
        self._requests.put(etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest()))

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self.ready.set()
