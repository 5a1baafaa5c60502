"""Channels of their own to every etcd member, used in turn (keepalive, watch streams;
these on `grpc.aio`)."""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio
import structlog

from store import aioloop

__all__ = ["AioEndpointRing", "EndpointRing"]

log = structlog.get_logger("vmha.store")


class EndpointRing:
    """One channel and stub per endpoint; one endpoint is current.

    The main client fails over only after a call's full timeout and then skips the
    member for a while; a keepalive or a stalled watch stream cannot wait that long.
    A caller that gives up on the current endpoint calls `failed()`, which makes the
    next one current, so a stalled or partitioned member costs one deadline.  Each
    process starts at a random endpoint, which spreads the load over the members."""

    def __init__(self, endpoints: Sequence[tuple[str, int]],
                 creds: grpc.ChannelCredentials | None,
                 stub: Callable[[grpc.Channel], Any],
                 options: Sequence[tuple[str, Any]] | None = None) -> None:
        targets = [f"{h}:{p}" for h, p in endpoints]
        opts = list(options or [])
        self._channels = [grpc.secure_channel(t, creds, opts) if creds is not None
                          else grpc.insecure_channel(t, opts) for t in targets]
        self._targets = targets
        self._stubs = [stub(c) for c in self._channels]
        self._lock = threading.Lock()
        self._current = random.randrange(len(targets))

    def current(self) -> tuple[int, str, Any]:
        with self._lock:
            i = self._current
        return i, self._targets[i], self._stubs[i]

    def failed(self, index: int) -> None:
        """The endpoint at `index` did not answer: use the next one (unless another
        thread has moved on already)."""
        with self._lock:
            if self._current == index:
                self._current = (index + 1) % len(self._stubs)

    def close(self) -> None:
        for c in self._channels:
            c.close()


class AioEndpointRing(EndpointRing):
    """`EndpointRing` on `grpc.aio` channels (`store.aioloop`): `current()` gives, as
    its stub, a function that returns the endpoint's stub and is called on the loop
    (an aio channel belongs to the loop it was made on, so it is made there, at first
    use)."""

    def __init__(self, endpoints: Sequence[tuple[str, int]],
                 creds: grpc.ChannelCredentials | None,
                 stub: Callable[[grpc.aio.Channel], Any],
                 options: Sequence[tuple[str, Any]] | None = None) -> None:
        self._targets = [f"{h}:{p}" for h, p in endpoints]
        self._creds, self._opts, self._make_stub = creds, list(options or []), stub
        self._aio: list[tuple[grpc.aio.Channel, Any] | None] = [None] * len(self._targets)
        self._lock = threading.Lock()
        self._current = random.randrange(len(self._targets))
        self._stubs = [functools.partial(self._stub_on_loop, i)
                       for i in range(len(self._targets))]

    def _stub_on_loop(self, index: int) -> Any:
        made = self._aio[index]
        if made is None:
            t = self._targets[index]
            ch = (grpc.aio.secure_channel(t, self._creds, self._opts)
                  if self._creds is not None else grpc.aio.insecure_channel(t, self._opts))
            made = self._aio[index] = (ch, self._make_stub(ch))
        return made[1]

    def close(self) -> None:
        if not aioloop.run(self._close(), timeout=5.0):
            log.warning("stream_channels_closing", reason="the event loop has not closed "
                        "them within 5 s; it goes on")

    async def _close(self) -> None:
        for made in self._aio:
            if made is not None:
                await made[0].close()
        self._aio = [None] * len(self._targets)
