"""Channels of their own to every etcd member, used in turn (keepalive, watch streams)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

__all__ = ["EndpointRing"]


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
