"""One etcd watch stream (`WatchStream`), the watchers on it, and when to doubt it
(`Liveness`); the model kept from it is `store.watchmodel.WatchedState`."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from pyetcd import etcdrpc

from schemas.snapshot import RawKV
from store import aioloop
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
    """One gRPC watch stream on `grpc.aio` (`store.aioloop`): its requests, the call,
    and the task reading it.  Every method but `run`'s callbacks is called from other
    threads and only posts work to the loop, in order; the callbacks run on the loop
    and must not block.  `pending`/`ids` are guarded by the owning state's lock.

    `stub`: a function returning the endpoint's stub, called on the loop
    (`store.ring.AioEndpointRing`)."""

    def __init__(self, index: int, target: str, stub: Callable[[], Any],
                 auth: tuple[Any, Any]) -> None:
        self.index, self.target = index, target
        self.pending: deque[Watcher] = deque()   # created, in request order, unanswered
        self.ids: dict[int, Watcher] = {}
        self.opened = False
        self.ready = threading.Event()            # every create answered, or the end
        self._requests: aioloop.RequestQueue | None = None
        self._call: Any = None
        self._closed = False
        aioloop.post(self._start, stub, auth)

    # ---- on the loop ---------------------------------------------------------------

    def _start(self, stub: Callable[[], Any], auth: tuple[Any, Any]) -> None:
        if self._closed:
            return
        self._requests = aioloop.RequestQueue()
        self._call = stub().Watch(self._requests.requests(), credentials=auth[0],
                                  metadata=auth[1])

    def _put(self, req: Any) -> None:
        if self._requests is not None:
            self._requests.put(req)

    def _read_task(self, on_response: Callable[[WatchStream, Any], None],
                   on_end: Callable[[WatchStream, BaseException | None], None]) -> None:
        if self._call is None:
            on_end(self, None)   # closed before it started
            return
        _tasks.add(t := asyncio.ensure_future(self._read(on_response, on_end)))
        t.add_done_callback(_tasks.discard)

    async def _read(self, on_response: Callable[[WatchStream, Any], None],
                    on_end: Callable[[WatchStream, BaseException | None], None]) -> None:
        try:
            while (resp := await self._call.read()) is not grpc.aio.EOF:
                on_response(self, resp)
        except grpc.RpcError as exc:
            on_end(self, exc)
            return
        except asyncio.CancelledError:
            on_end(self, None)   # cancelled here (close): its owner has moved on
            return
        on_end(self, None)

    def _close(self) -> None:
        self._put(None)
        if self._call is not None:
            self._call.cancel()

    # ---- from any thread -------------------------------------------------------------

    def run(self, on_response: Callable[[WatchStream, Any], None],
            on_end: Callable[[WatchStream, BaseException | None], None]) -> None:
        aioloop.post(self._read_task, on_response, on_end)

    def create(self, w: Watcher) -> None:
        self.pending.append(w)
        aioloop.post(self._put, etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=w.keys.start, range_end=w.keys.end, start_revision=w.next_rev)))

    def cancel(self, watch_id: int) -> None:
        aioloop.post(self._put, etcdrpc.WatchRequest(
            cancel_request=etcdrpc.WatchCancelRequest(watch_id=watch_id)))

    def progress(self) -> None:
        aioloop.post(self._put, etcdrpc.WatchRequest(
            progress_request=etcdrpc.WatchProgressRequest()))

    def close(self) -> None:
        self._closed = True
        aioloop.post(self._close)
        self.ready.set()


# Reading tasks, referenced until done (the loop keeps only weak references).
_tasks: set[asyncio.Future[None]] = set()
