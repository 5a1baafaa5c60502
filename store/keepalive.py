"""The keepalive's own gRPC channels to the etcd members (used by `store.etcd`)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from pyetcd import etcdrpc

from store.ring import EndpointRing

__all__ = ["KeepaliveRing"]


class KeepaliveRing(EndpointRing):
    """Keepalive's own channels, one per endpoint, used in turn.

    One attempt goes to the current endpoint with the keepalive's own deadline; a
    transient failure makes the next endpoint current (`EndpointRing`).  Each agent
    starts at a random endpoint, which spreads the renewals over members."""

    def __init__(self, endpoints: Sequence[tuple[str, int]],
                 creds: grpc.ChannelCredentials | None) -> None:
        super().__init__(endpoints, creds, etcdrpc.LeaseStub)
