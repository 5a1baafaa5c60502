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

Idle cost: gRPC's synchronous client wakes a thread blocked reading a stream every
0.1 s (its wait loop bounds the delay of signal handlers; there is no knob for it).  So
the stream's thread reads only while answers are owed (from a round's send to its last
answer, a round trip); between rounds it sleeps on a condition without a timeout, and
the call's done-callback (run by gRPC when the member ends the stream) wakes it to read
the stream's end, which fails the stream at once as before.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import structlog
from pyetcd import etcdrpc

from store.errors import StoreError, StoreUnavailable, store_error
from store.ring import EndpointRing

__all__ = ["KeepaliveRing", "KeepaliveStreams"]

log = structlog.get_logger("vmha.store")


class KeepaliveRing(EndpointRing):
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
    """One LeaseKeepAlive call on one endpoint: its request queue, the rounds waiting on
    it, and the thread reading its answers.  `waiting` and `ended` are guarded by the
    owning `KeepaliveStreams`' lock."""

    def __init__(self, index: int, target: str, stub: Any, auth: tuple[Any, Any]) -> None:
        self.index, self.target = index, target
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.waiting: dict[int, deque[_Round]] = {}
        self.ended = False
        # Requests sent and answers read (or to be read: the end of the call), guarded
        # by `owed`'s own lock; taken after the owner's lock, never before it.
        self.owed = threading.Condition(threading.Lock())
        self.sent = 0
        self.read = 0
        self.done = False
        self.call = stub.LeaseKeepAlive(self._iter_requests(), credentials=auth[0],
                                        metadata=auth[1])

    def asked(self, n: int) -> None:
        """`n` requests are on their way: the reader reads `n` more answers."""
        with self.owed:
            self.sent += n
            self.owed.notify()

    def finished(self) -> None:
        """The call ended (the member's doing, or `cancel`): read its end."""
        with self.owed:
            self.done = True
            self.owed.notify()

    def next_owed(self) -> None:
        """Wait, without a timeout (no wake-up while idle), until an answer or the end
        of the call is there to read."""
        with self.owed:
            self.owed.wait_for(lambda: self.sent > self.read or self.done)
            if self.sent > self.read:
                self.read += 1

    def _iter_requests(self) -> Iterator[Any]:
        while (req := self.requests.get()) is not None:
            yield req


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
            for lease_id in lease_ids:
                stream.requests.put(etcdrpc.LeaseKeepAliveRequest(ID=lease_id))
            stream.asked(len(lease_ids))
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
        threading.Thread(target=self._read, args=(stream,), daemon=True,
                         name=f"vmha-keepalive-{target}").start()
        # grpc.RpcContext.add_callback: run by gRPC when the call ends (False: it has
        # ended already).  `finished` takes only the stream's own lock.
        if not stream.call.add_callback(stream.finished):
            stream.finished()
        return stream

    def _read(self, stream: _Stream) -> None:
        err: StoreError | None
        try:
            while True:
                stream.next_owed()
                # An answer, or the call's end: StopIteration (the member ended it) or
                # RpcError (an error, or cancelled by `_end`).
                resp = next(stream.call)
                if not self._answered(stream, int(resp.ID), int(resp.TTL)):
                    return
        except StopIteration:
            err = StoreUnavailable(f"etcd keepalive via {stream.target} failed: the member "
                                   "ended the stream")
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
        stream.requests.put(None)
        stream.call.cancel()
        stream.finished()  # the reader reads the cancelled call's end and stops
        if self._stream is stream:
            self._stream = None
        if isinstance(err, StoreUnavailable):
            self._ring.failed(stream.index)
