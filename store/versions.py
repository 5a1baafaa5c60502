"""Each etcd member's server version, asked of the member itself (`Maintenance.Status`
on each client URL of `Cluster.MemberList`): the leader's liveness fencing is `fast`
under `auto` only when every member has the stale-leader revocation fix
(fencing.liveness_fence).  A member that does not answer within the timeout is
reported as None (the caller treats it as old)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
from pyetcd import etcdrpc


def _target(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return f"{parts.hostname}:{parts.port or 2379}"


def member_versions(members: Sequence[tuple[str, Sequence[str]]],
                    creds: grpc.ChannelCredentials | None, call_auth: tuple[Any, Any],
                    timeout: float) -> dict[str, str | None]:
    """member name -> version, from the first of its client URLs that answers."""
    call_creds, metadata = call_auth
    out: dict[str, str | None] = {}
    for name, urls in members:
        out[name] = None
        for url in urls:
            target = _target(url)
            channel = (grpc.secure_channel(target, creds) if creds is not None
                       else grpc.insecure_channel(target))
            try:
                resp = etcdrpc.MaintenanceStub(channel).Status(
                    etcdrpc.StatusRequest(), timeout, credentials=call_creds,
                    metadata=metadata)
            except grpc.RpcError:
                continue  # the next URL; none answering leaves None
            finally:
                channel.close()
            out[name] = str(resp.version)
            break
    return out
