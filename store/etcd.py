"""The only module that talks to etcd.  Everything else goes through `EtcdStore`.

Contract for callers:

* `StoreUnavailable` means "etcd could not be reached within the retry budget"; it
  is a *temporary* error.  Daemons log it and try again next cycle; they never act
  on missing information.  `StoreRejected` means etcd answered and refused the
  request (permanent).  Only connection errors are retried: any other exception (a
  bug in the caller) propagates at once, never disguised as an outage.
* Writes that decide anything (placements, fence records, statuses, the leader
  key) go through `txn()` with compares: compare-and-swap on the key's
  mod_revision plus the writer's fencing token (the leader key's create_revision
  for the leader, the node registration's create_revision for an agent).  A
  failed compare returns `succeeded=False`; it is not an error.
* `put()`/`delete()` without compares are used only for operator intent (specs,
  cordon markers) from the CLI and for the agent's own cordon marker.
* Keepalive is one round (`keepalive_round()`: a request per lease, sent together)
  with its own short deadline, on a long-lived stream on the store's own channels
  (`store.keepalive`); looping is the caller's job because the caller owns the
  self-fencing deadline.  A round that fails for a reason of the way to etcd ends the
  stream and moves the ring to the next endpoint, so the caller's next attempt (at
  once) opens a stream to another member.

Known behaviour of the etcd client designed around here: its single-endpoint
client blacklists an endpoint for 300 s after one UNAVAILABLE error, so we build a
`MultiEndpointEtcd3Client` with a short `time_retry`; failed calls raise
`ConnectionFailedError`, retried below with tenacity; watch callbacks all run on
one thread and get an error object (not an exception) when the member dies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from pyetcd import etcdrpc
from pyetcd.client import Endpoint, MultiEndpointEtcd3Client
from pyetcd.watch import WatchResponse
from tenacity import (
    RetryError,
    retry,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from schemas.keys import Keyspace
from schemas.snapshot import ClusterSnapshot, RawKV
from schemas.txn import Cmp, Delete, Put, TxnResult
from store.errors import (
    CALL_ERRORS,
    CLIENT_ERRORS,
    LeaseNotFound,
    PermissionDenied,
    StoreCompacted,
    StoreError,
    StoreRejected,
    StoreUnavailable,
    is_transient,
    store_error,
)
from store.keepalive import KeepaliveRing, KeepaliveStreams
from store.paging import KeyRange, Page, RangeCount, count_range, list_range, raw_kv
from store.ring import AioEndpointRing, EndpointRing
from store.versions import member_versions

__all__ = ["Cmp", "Delete", "EtcdStore", "LeaseNotFound", "PermissionDenied", "Put",
           "StoreCompacted", "StoreError", "StoreRejected", "StoreUnavailable", "TlsFiles",
           "TxnResult", "is_transient", "parse_endpoints", "store_error"]

log = structlog.get_logger("vmha.store")

R = TypeVar("R")

# gRPC refuses answers over 4 MiB by default: three values of 1.4 MiB (under etcd's
# own 1.5 MiB request limit) would make every snapshot of the prefix fail, leaving no
# daemon able to decide.  Oversized values are refused by the snapshot, unread; the
# range that carries them must still arrive.  The bound is etcd's: its quota.
MAX_RANGE_BYTES = 2 * 1024 ** 3 - 1


@dataclass(frozen=True)
class TlsFiles:
    """TLS to etcd: the CA that signed the etcd servers' certificates, and optionally a
    client certificate and key (etcd's --client-cert-auth)."""

    cacert: str
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS client certificate and key must be given together")
        return grpc.ssl_channel_credentials(root_certificates=read(self.cacert),
                                            private_key=read(self.key),
                                            certificate_chain=read(self.cert))


def parse_endpoints(spec: str | Sequence[str]) -> list[tuple[str, int]]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        item = item.strip()
        for scheme in ("http://", "https://"):
            if item.startswith(scheme):
                item = item[len(scheme):]
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {item!r} must look like HOST:PORT")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


class EtcdStore:
    def __init__(self, endpoints: str | Sequence[str], keyspace: Keyspace | None = None,
                 timeout: float = 2.0, retry_budget: float = 3.0,
                 tls: TlsFiles | None = None, max_receive_bytes: int = MAX_RANGE_BYTES) -> None:
        """`max_receive_bytes` is lowered only by tests and benchmarks (to show that paged
        reads fit under gRPC's default limit)."""
        self.keyspace = keyspace or Keyspace()
        self._tls = tls
        self._channel_options = [("grpc.max_receive_message_length", max_receive_bytes)]
        self._endpoints = parse_endpoints(endpoints)
        self._timeout = timeout
        self._retry_budget = retry_budget
        self._lock = threading.Lock()
        self._client = self._make_client()
        self._keepalive_ring = KeepaliveRing(
            self._endpoints, self._tls.credentials() if self._tls else None)
        self._keepalives = KeepaliveStreams(self._keepalive_ring, lambda: self.call_auth)

    def _make_client(self) -> MultiEndpointEtcd3Client:
        creds = self._tls.credentials() if self._tls else None
        eps = [Endpoint(h, p, secure=creds is not None, creds=creds, time_retry=0.5,
                        opts=self._channel_options)
               for h, p in self._endpoints]
        return MultiEndpointEtcd3Client(endpoints=eps, timeout=self._timeout, failover=True)

    @property
    def retry_budget(self) -> float:
        return self._retry_budget

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def client(self) -> MultiEndpointEtcd3Client:
        return self._client

    def close(self) -> None:
        self._keepalives.close()
        self._client.close()
        self._keepalive_ring.close()

    def call(self, what: str, fn: Callable[[], R], budget: float | None = None) -> R:
        """`fn` (one request to etcd) with the store's retries and error mapping: for
        the store's own modules that send requests the client has no call for
        (`store.auth`)."""
        return self._call(what, fn, budget)

    def _call(self, what: str, fn: Callable[[], R], budget: float | None = None) -> R:
        @retry(
            retry=retry_if_exception(is_transient),
            stop=stop_after_delay(self._retry_budget if budget is None else budget),
            wait=wait_random_exponential(multiplier=0.05, max=0.5),
            reraise=False,
        )
        def attempt() -> R:
            return fn()

        try:
            return attempt()
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise StoreUnavailable(f"etcd {what} failed: {cause!r}") from cause
        except CLIENT_ERRORS as exc:
            err = store_error(what, exc)
            if err is None:  # pragma: no cover - every client error maps to a StoreError
                raise
            raise err from exc

    # ---- reads -------------------------------------------------------------------------

    def snapshot(self) -> ClusterSnapshot:
        """All of vmha's keys at one revision (a single linearizable range read)."""
        resp = self._call("range", lambda: self._client.get_prefix_response(self.keyspace.root))
        kvs = [raw_kv(kv) for kv in resp.kvs]
        return ClusterSnapshot.from_kvs(self.keyspace, resp.header.revision, kvs)

    def get(self, key: str, timeout: float | None = None,
            budget: float | None = None) -> RawKV | None:
        """`timeout`: each attempt's deadline (the store's by default); `budget`: how
        long attempts go on (the store's retry budget by default)."""
        request = self._client._build_get_range_request(key)
        resp = self._call("get", lambda: self._rpc(self._client.kvstub.Range, request, timeout),
                          budget)
        if not resp.kvs:
            return None
        return raw_kv(resp.kvs[0])

    def get_prefix(self, prefix: str) -> list[RawKV]:
        resp = self._call("range", lambda: self._client.get_prefix_response(prefix))
        return [raw_kv(kv) for kv in resp.kvs]

    def revision(self) -> int:
        resp = self._call("range", lambda: self._client.get_response(self.keyspace.config))
        return int(resp.header.revision)

    def range_request(self, request: Any, what: str = "range") -> Any:
        """One `RangeRequest`, retried as every call (paged reads and counts build it)."""
        return self._call(what, lambda: self._rpc(self._client.kvstub.Range, request))

    def _rpc(self, method: Callable[..., R], request: Any, timeout: float | None = None) -> R:
        """One request to the current member within `timeout` (the store's by default);
        a failure of the way to it (unreachable, deadline exceeded) fails the client over,
        so the next attempt goes to the next member."""
        try:
            return method(request, self._timeout if timeout is None else timeout,
                          credentials=self._client.call_credentials,
                          metadata=self._client.metadata)
        except grpc.RpcError as exc:
            self._client._manage_grpc_errors(exc)  # fails over, or re-raises
            raise

    def list_pages(self, prefix: str, revision: int | None = None,
                   keys_only: bool = False) -> Iterator[Page]:
        """Every key under `prefix` in pages, all at one revision (`store.paging`)."""
        return list_range(self.range_request, KeyRange.prefix(prefix), revision, keys_only)

    def count_only(self, prefix: str) -> RangeCount:
        """How many keys are under `prefix` now (a range with count_only: no key sent)."""
        return count_range(self.range_request, KeyRange.prefix(prefix))

    def channel_ring(self, stub: Callable[[grpc.Channel], Any]) -> EndpointRing:
        """Channels of their own to every member, for a long-lived stream
        (`store.watchmodel`), with the client's TLS and receive limit."""
        return EndpointRing(self._endpoints, self._tls.credentials() if self._tls else None,
                            stub, self._channel_options)

    def aio_channel_ring(self, stub: Callable[[Any], Any]) -> AioEndpointRing:
        """`channel_ring` on `grpc.aio` (`store.aioloop`): for the watch streams, read
        on the process's one event loop."""
        return AioEndpointRing(self._endpoints,
                               self._tls.credentials() if self._tls else None,
                               stub, self._channel_options)

    @property
    def call_auth(self) -> tuple[Any, Any]:
        """The client's per-call credentials and metadata, for calls on own channels."""
        return self._client.call_credentials, self._client.metadata

    def members(self) -> list[tuple[str, list[str]]]:
        """The cluster's members: (name, client URLs) each, sorted."""
        return sorted(self._call("member list", lambda: [
            (m.name or f"{m.id:x}", list(m.client_urls)) for m in self._client.members]))

    def member_versions(self, members: list[tuple[str, list[str]]],
                        timeout: float = 1.0) -> dict[str, str | None]:
        """Each member's server version (None: no answer), `store.versions`."""
        return member_versions(members, self._tls.credentials() if self._tls else None,
                               self.call_auth, timeout)

    # ---- writes ------------------------------------------------------------------------

    def put(self, key: str, value: str, lease: int = 0) -> int:
        resp = self._call("put", lambda: self._client.put(key, value, lease=lease or None))
        return int(resp.header.revision)

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", lambda: self._client.delete(key)))

    def txn(self, compares: Sequence[Cmp], ops: Sequence[Put | Delete],
            budget: float | None = None, timeout: float | None = None) -> TxnResult:
        """`timeout`: each attempt's deadline (the store's by default).  An attempt whose
        answer was lost may have applied: the next one then finds its compares false."""
        t = self._client.transactions

        def build() -> tuple[list[Any], list[Any]]:
            cmps = []
            for c in compares:
                base = {"create": t.create, "mod": t.mod, "version": t.version,
                        "value": t.value}[c.target](c.key)
                cmps.append({"==": base.__eq__, "!=": base.__ne__, "<": base.__lt__,
                             ">": base.__gt__}[c.op](c.value))
            success = [t.put(o.key, o.value, lease=o.lease or None) if isinstance(o, Put)
                       else t.delete(o.key) for o in ops]
            return cmps, success

        def run() -> TxnResult:
            cmps, success = build()
            resp = self._rpc(self._client.kvstub.Txn, self._txn_request(cmps, success),
                             timeout)
            return TxnResult(bool(resp.succeeded), int(resp.header.revision))

        return self._call("txn", run, budget)

    def _txn_request(self, cmps: list[Any], success: list[Any]) -> Any:
        return etcdrpc.TxnRequest(compare=[c.build_message() for c in cmps],
                                  success=self._client._ops_to_requests(success), failure=[])

    # ---- leases ------------------------------------------------------------------------

    def grant_lease(self, ttl: int, timeout: float | None = None,
                    budget: float | None = None) -> int:
        """A new lease of `ttl` seconds; `timeout` and `budget` as for `get`.  An attempt
        whose answer was lost leaves a lease with no key, which expires after `ttl`."""
        request = etcdrpc.LeaseGrantRequest(TTL=ttl)
        return int(self._call("lease grant", lambda: self._rpc(
            self._client.leasestub.LeaseGrant, request, timeout), budget).ID)

    def keepalive(self, lease_id: int, timeout: float | None = None) -> int:
        """One keepalive of one lease (`keepalive_round`); the TTL etcd granted, 0 if
        the lease is gone.  `timeout`: the store's timeout by default."""
        return self.keepalive_round([lease_id], timeout)[lease_id]

    def keepalive_round(self, lease_ids: Sequence[int], timeout: float | None = None
                        ) -> dict[int, int]:
        """A keepalive for each of `lease_ids`, sent together on the store's long-lived
        keepalive stream, all answered within `timeout` seconds (default: the store's
        timeout): the TTL etcd granted each, 0 for a lease that is gone.

        Raises StoreUnavailable at once (no retry), after making the next endpoint
        current: the caller owns the deadline and tries again at once.
        """
        return self._keepalives.renew(lease_ids, self._timeout if timeout is None
                                      else timeout)

    def keepalive_endpoint(self) -> str:
        """The member the next keepalive round goes to (HOST:PORT)."""
        return self._keepalives.endpoint()

    def revoke_lease(self, lease_id: int, timeout: float | None = None,
                     budget: float | None = None) -> None:
        """`timeout` and `budget` as for `get`."""
        request = etcdrpc.LeaseRevokeRequest(ID=lease_id)

        def revoke() -> None:
            try:
                self._rpc(self._client.leasestub.LeaseRevoke, request, timeout)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return  # already revoked or expired: the outcome the caller wants
                raise
        self._call("lease revoke", revoke, budget)

    def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL in seconds; -1 if the lease does not exist."""
        return int(self._call("lease ttl", lambda: self._client.get_lease_info(lease_id)).TTL)

    # ---- watches -----------------------------------------------------------------------

    def watch_prefix(self, prefix: str, start_revision: int,
                     on_revision: Callable[[int], None],
                     on_error: Callable[[BaseException], None]) -> Callable[[], None]:
        """Watch a prefix from `start_revision`; returns a cancel function.

        `on_revision` gets the header revision of each batch of events; `on_error`
        is called once when the watch dies (member gone, compaction): the caller
        then re-lists and watches again from the snapshot's revision + 1.
        """

        def callback(resp: Any) -> None:
            if isinstance(resp, WatchResponse):
                on_revision(int(resp.header.revision))
            else:
                on_error(resp if isinstance(resp, BaseException) else RuntimeError(str(resp)))

        watch_id = self._call("watch", lambda: self._client.add_watch_prefix_callback(
            prefix, callback, start_revision=start_revision))

        def cancel() -> None:
            try:
                self._client.cancel_watch(watch_id)
            except CALL_ERRORS as exc:
                if store_error("watch cancel", exc) is None:
                    raise
                # The watch dies with its member anyway; nothing is left to undo.
                log.debug("watch_cancel_failed", error=repr(exc))

        return cancel
