"""Lease keepalives on one long-lived gRPC stream per store (used by `store.etcd`).

A keepalive round sends one `LeaseKeepAliveRequest` per lease on the store's stream and
waits, up to the round's deadline, for an answer to each.  The stream stays open from
round to round: no new HTTP/2 stream, request iterator and gRPC thread per keepalive
(bench/keepalive.py measures the difference).

Matching an answer to its request: etcd's server handles a keepalive stream one request
at a time (receive, renew, send) and so answers in the order it received.  Each lease
ID has a queue of the rounds waiting for it on this stream, in send order, and an
answer goes to the oldest.  An answer can therefore only complete the round that sent
the request it answers, and the caller counts its deadline from that round's send time.

A round that gets no full answer within its deadline ends the stream: the member is
stalled, partitioned or between leaders, and a late answer must never be taken for a
later round's.  Every round still waiting on it fails at once (`StoreUnavailable`, a
temporary error), the ring moves to the next endpoint (`EndpointRing.failed`) and the
next round opens a new stream there.  A stream the member ends (killed, restarting, an
error from its lessor) fails its rounds the same way, with the error mapped by
`store.errors.store_error`.

Idle cost: the stream is on `grpc.aio`, read on the process's event loop
(`store.aioloop`), where an open stream waits for its next answer without waking any
thread (gRPC's synchronous client wakes a reading thread every 0.1 s and a channel
thread every 0.2 s, per stream).  Rounds are still sent and awaited from the caller's
thread, which only posts the requests to the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio
import structlog
from pyetcd import etcdrpc

from store import aioloop
from store.errors import StoreError, StoreUnavailable, store_error
from store.ring import AioEndpointRing

__all__ = ["KeepaliveRing", "KeepaliveStreams"]

log = structlog.get_logger("vmha.store")


class KeepaliveRing(AioEndpointRing):
    """Keepalive's own channels, one per endpoint, used in turn.

    The stream goes to the current endpoint; a transient failure makes the next endpoint
    current (`EndpointRing`).  Each agent starts at a random endpoint, which spreads the
    renewals over members."""

    def __init__(self, endpoints: Sequence[tuple[str, int]],
                 creds: grpc.ChannelCredentials | None) -> None:
        super().__init__(endpoints, creds, etcdrpc.LeaseStub)


class _Round:
    """One round: the TTL etcd answered for each of its leases, or the stream's error."""

    def __init__(self, lease_ids: Sequence[int]) -> None:
        self.ttls: dict[int, int] = {}
        self.wanted = len(lease_ids)
        self.error: StoreError | None = None
        self.done = threading.Event()


class _Stream:
    """One LeaseKeepAlive call on one endpoint, on the event loop: its requests, the
    rounds waiting on it, and the task reading its answers.  `waiting` and `ended` are
    guarded by the owning `KeepaliveStreams`' lock; the call and its request queue are
    touched only on the loop (`send` and `cancel` post to it)."""

    def __init__(self, index: int, target: str, stub: Callable[[], Any],
                 auth: tuple[Any, Any]) -> None:
        self.index, self.target = index, target
        self.waiting: dict[int, deque[_Round]] = {}
        self.ended = False
        self._requests: aioloop.RequestQueue | None = None
        self.call: Any = None
        aioloop.post(self._start, stub, auth)

    def _start(self, stub: Callable[[], Any], auth: tuple[Any, Any]) -> None:
        self._requests = aioloop.RequestQueue()
        self.call = stub().LeaseKeepAlive(self._requests.requests(), credentials=auth[0],
                                          metadata=auth[1])

    def _put(self, req: Any) -> None:
        if self._requests is not None:
            self._requests.put(req)

    def _cancel(self) -> None:
        self._put(None)
        if self.call is not None:
            self.call.cancel()

    def send(self, lease_ids: Sequence[int]) -> None:
        for lease_id in lease_ids:
            aioloop.post(self._put, etcdrpc.LeaseKeepAliveRequest(ID=lease_id))

    def cancel(self) -> None:
        aioloop.post(self._cancel)


class KeepaliveStreams:
    """The store's keepalive stream: opened on the ring's current endpoint when a round
    needs one, kept until it fails."""

    def __init__(self, ring: KeepaliveRing, auth: Callable[[], tuple[Any, Any]]) -> None:
        """`auth`: the client's per-call credentials and metadata, read at each open."""
        self._ring = ring
        self._auth = auth
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._closed = False

    def endpoint(self) -> str:
        """The endpoint the next round goes to (its stream's, if one is open)."""
        with self._lock:
            if self._stream is not None:
                return self._stream.target
        return self._ring.current()[1]

    def renew(self, lease_ids: Sequence[int], timeout: float) -> dict[int, int]:
        """One round: a keepalive for each of `lease_ids` (distinct), sent together;
        the TTL etcd answered for each (0: the lease is gone).  Raises StoreUnavailable
        when an answer is missing after `timeout` s or the stream failed."""
        if len(set(lease_ids)) != len(lease_ids) or not lease_ids:
            raise ValueError(f"a keepalive round needs distinct lease ids, got {lease_ids}")
        rnd = _Round(lease_ids)
        with self._lock:
            if self._closed:
                raise StoreUnavailable("etcd keepalive: the store is closed")
            stream = self._stream
            if stream is None:
                stream = self._stream = self._open()
            # Waiting before sending: the answer cannot arrive before its round is known.
            for lease_id in lease_ids:
                stream.waiting.setdefault(lease_id, deque()).append(rnd)
            stream.send(lease_ids)
        if not rnd.done.wait(timeout):
            with self._lock:
                if not rnd.done.is_set():
                    # DEADLINE_EXCEEDED as gRPC names it: no answer in time.
                    self._end(stream, StoreUnavailable(
                        f"etcd keepalive via {stream.target} failed: DEADLINE_EXCEEDED "
                        f"(no answer within {timeout:g} s)"))
        if rnd.error is not None:
            raise rnd.error
        return rnd.ttls

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._stream is not None:
                self._end(self._stream, StoreUnavailable("etcd keepalive: the store is closed"))

    def _open(self) -> _Stream:
        index, target, stub = self._ring.current()
        stream = _Stream(index, target, stub, self._auth())
        aioloop.post(self._spawn_reader, stream)   # after the stream's start: in order
        return stream

    def _spawn_reader(self, stream: _Stream) -> None:
        _tasks.add(t := asyncio.ensure_future(self._read(stream)))
        t.add_done_callback(_tasks.discard)

    async def _read(self, stream: _Stream) -> None:
        """On the loop: hand each answer to its round, then fail the stream's rounds
        when it ends."""
        err: StoreError | None
        try:
            while (resp := await stream.call.read()) is not grpc.aio.EOF:
                if not self._answered(stream, int(resp.ID), int(resp.TTL)):
                    return
            err = StoreUnavailable(f"etcd keepalive via {stream.target} failed: the member "
                                   "ended the stream")
        except asyncio.CancelledError:
            err = StoreUnavailable(f"etcd keepalive via {stream.target}: cancelled")
        except grpc.RpcError as exc:
            err = store_error(f"keepalive via {stream.target}", exc)
            if err is None:  # pragma: no cover - every RpcError maps to a StoreError
                raise
        with self._lock:
            self._end(stream, err)

    def _answered(self, stream: _Stream, lease_id: int, ttl: int) -> bool:
        """Give an answer to the oldest round waiting for its lease; False once the
        stream has ended (its rounds have failed: a late answer counts for nothing)."""
        with self._lock:
            if stream.ended:
                return False
            rounds = stream.waiting.get(lease_id)
            if not rounds:
                # etcd answers only what was asked; an answer nobody waits for cannot
                # be matched to a send time, so it renews nothing here.
                log.warning("keepalive_answer_unasked", lease=f"{lease_id:x}",
                            endpoint=stream.target)
                return True
            rnd = rounds.popleft()
            if not rounds:
                del stream.waiting[lease_id]
            rnd.ttls[lease_id] = ttl
            if len(rnd.ttls) == rnd.wanted:
                rnd.done.set()
            return True

    def _end(self, stream: _Stream, err: StoreError) -> None:
        """Under the lock: the stream fails every round waiting on it, is cancelled, and
        (an unavailable member) the ring moves on.  Once only."""
        if stream.ended:
            return
        stream.ended = True
        for rounds in stream.waiting.values():
            for rnd in rounds:
                if not rnd.done.is_set():
                    rnd.error = err
                    rnd.done.set()
        stream.waiting.clear()
        stream.cancel()
        if self._stream is stream:
            self._stream = None
        if isinstance(err, StoreUnavailable):
            self._ring.failed(stream.index)


# Reading tasks, referenced until done (the loop keeps only weak references).
_tasks: set[asyncio.Future[None]] = set()
