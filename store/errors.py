"""The store's errors, and how an error of the etcd client maps to one of them.

`StoreUnavailable` and `StoreCompacted` are temporary (retry, or re-list); every
`StoreRejected` is permanent: etcd answered and refused, and sends the same answer
again.  Anything else the client raises that is not one of its own errors is a bug in
the caller and propagates as itself.
"""

from __future__ import annotations

import grpc
from pyetcd import exceptions as etcd_exc

from schemas.errors import PermanentError, TemporaryError, VmhaError

__all__ = ["CALL_ERRORS", "CLIENT_ERRORS", "LeaseNotFound", "PermissionDenied",
           "StoreCompacted", "StoreError", "StoreRejected", "StoreUnavailable", "is_transient",
           "store_error", "watch_cancel_error"]


class StoreError(VmhaError):
    """Base of the errors the store raises for etcd (not for bugs in its callers)."""


class StoreUnavailable(StoreError, TemporaryError):
    """etcd did not answer within the retry budget (temporary)."""


class StoreCompacted(StoreError, TemporaryError):
    """The revision asked for was compacted: re-read a snapshot and start from it."""


class StoreRejected(StoreError, PermanentError):
    """etcd answered and refused the request (invalid argument, permission...): sending
    it again gets the same answer."""


class LeaseNotFound(StoreRejected):
    """The request names a lease etcd no longer has (expired or revoked): the same
    request fails again, a new lease may succeed."""


class PermissionDenied(StoreRejected):
    """etcd's auth refused the request: the credential's role does not cover a key it
    reads, writes or watches.  Told apart from other refusals because, with one role per
    node (keyspace 2), it means a bug in the request or an operator's grant, never bad
    data."""


# What the client raises when etcd (or the way to it) is down, slow or changing leader.
_TRANSIENT_ETCD: tuple[type[BaseException], ...] = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    etcd_exc.NoServerAvailableError,
    etcd_exc.InternalServerError,
    etcd_exc.WatchTimedOut,
)
# gRPC codes of a server that is unreachable, overloaded, or dropped the stream
# ("Stream removed" arrives as UNKNOWN when a member dies mid-call).
_TRANSIENT_GRPC = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN,
})
# pyetcd's endpoint failover raises a bare ValueError with this text when two threads
# mark the same endpoint failed at once.  Any other ValueError is a bug and propagates.
_FAILED_NODE = "Trying to use a failed node"
# Everything the etcd client raises on purpose; other exceptions are programming errors.
CLIENT_ERRORS: tuple[type[BaseException], ...] = (etcd_exc.Etcd3Exception, grpc.RpcError)
# What the client may raise from a call: its errors, and the failover ValueError above.
CALL_ERRORS: tuple[type[BaseException], ...] = (*CLIENT_ERRORS, ValueError)


def is_transient(exc: BaseException) -> bool:
    """True for an error that says etcd is unreachable or busy, so retrying may help."""
    if isinstance(exc, _TRANSIENT_ETCD):
        return True
    if isinstance(exc, grpc.RpcError):
        code = getattr(exc, "code", None)
        # An RpcError without a status is a transport failure, not an answer.
        return code is None or code() in _TRANSIENT_GRPC
    return isinstance(exc, ValueError) and str(exc) == _FAILED_NODE


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    return code() if callable(code) else None


def _details(exc: grpc.RpcError) -> str:
    details = getattr(exc, "details", None)
    return str(details()) if callable(details) else ""


def store_error(what: str, exc: BaseException) -> StoreError | None:
    """The StoreError for an exception from the etcd client; None for anything else."""
    if is_transient(exc):
        return StoreUnavailable(f"etcd {what} failed: {exc!r}")
    if isinstance(exc, etcd_exc.RevisionCompactedError):
        return StoreCompacted(f"etcd {what}: revision compacted: {exc!r}")
    if isinstance(exc, grpc.RpcError):
        code = _code(exc)
        if code == grpc.StatusCode.NOT_FOUND:
            return LeaseNotFound(f"etcd refused {what}: lease not found: {exc!r}")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return PermissionDenied(f"etcd refused {what}: permission denied: {exc!r}")
        # A read at a revision etcd has compacted ("mvcc: required revision has been
        # compacted"); a future revision is the same code and stays a refusal.
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in _details(exc):
            return StoreCompacted(f"etcd {what}: revision compacted: {exc!r}")
    if isinstance(exc, CLIENT_ERRORS):
        return StoreRejected(f"etcd refused {what}: {exc!r}")
    return None


def watch_cancel_error(what: str, reason: str, compact_revision: int) -> StoreError:
    """The error of a watch etcd canceled: compacted, denied, or refused otherwise."""
    if compact_revision:
        return StoreCompacted(f"etcd {what}: revision {compact_revision} compacted")
    if "permission denied" in reason:
        return PermissionDenied(f"etcd refused {what}: {reason}")
    return StoreRejected(f"etcd refused {what}: {reason or 'canceled'}")
