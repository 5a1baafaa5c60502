"""The keepalive's own gRPC channels to the etcd members (used by `store.etcd`)."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import Any

import grpc
from pyetcd import etcdrpc

__all__ = ["KeepaliveRing"]


class KeepaliveRing:
    """Keepalive's own channels, one per endpoint, used in turn.

    The main client fails over only after a call's full timeout and then skips the
    member for a while; a keepalive cannot wait that long.  Here one attempt goes to
    the current endpoint with the keepalive's own deadline; a transient failure makes
    the next endpoint current, so a stalled or partitioned member costs one deadline.
    Each agent starts at a random endpoint, which spreads the renewals over members."""

    def __init__(self, endpoints: Sequence[tuple[str, int]],
                 creds: grpc.ChannelCredentials | None) -> None:
        targets = [f"{h}:{p}" for h, p in endpoints]
        self._channels = [grpc.secure_channel(t, creds) if creds is not None
                          else grpc.insecure_channel(t) for t in targets]
        self._targets = targets
        self._stubs = [etcdrpc.LeaseStub(c) for c in self._channels]
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
