"""etcd with auth enabled: a request outside the user's role is `PermissionDenied` (a
`StoreRejected`, permanent, not retried), for reads, paged reads, writes, txns and
watched states alike."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from pyetcd.client import Endpoint, MultiEndpointEtcd3Client

from schemas.errors import PermanentError
from store.etcd import Cmp, EtcdStore, PermissionDenied, Put
from store.paging import KeyRange
from store.watchmodel import WatchedState
from tests.harness import EtcdCluster

pytestmark = pytest.mark.integration


class PasswordStore(EtcdStore):
    """A store that authenticates with a user name and password (vmha itself will use
    client certificates, keyspace-v2.md section 5; the error mapping is the same)."""

    def __init__(self, endpoints: str, user: str, password: str) -> None:
        self._user, self._password = user, password
        super().__init__(endpoints, retry_budget=3.0)

    def _make_client(self) -> MultiEndpointEtcd3Client:
        eps = [Endpoint(h, p, secure=False, time_retry=0.5) for h, p in self._endpoints]
        client = MultiEndpointEtcd3Client(endpoints=eps, timeout=self._timeout, failover=True,
                                          user=self._user, password=self._password)
        # gRPC sends call credentials only over TLS; the token as metadata is enough.
        client.call_credentials = None
        return client


def etcdctl(etcd: EtcdCluster, *args: str) -> None:
    subprocess.run(["etcdctl", "--endpoints", etcd.endpoints, *args], check=True,
                   capture_output=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"})


def watch(store: EtcdStore, keys: KeyRange) -> None:
    state = WatchedState(store, [keys])
    try:
        state.start()
    finally:
        state.close()


def test_requests_outside_the_role_are_permission_denied(etcd: EtcdCluster) -> None:
    etcdctl(etcd, "user", "add", "root:rootpw")
    etcdctl(etcd, "role", "add", "n1")
    etcdctl(etcd, "role", "grant-permission", "n1", "readwrite", "--prefix=true", "/vmha/n/n1/")
    etcdctl(etcd, "user", "add", "n1:n1pw")
    etcdctl(etcd, "user", "grant-role", "n1", "n1")
    etcdctl(etcd, "auth", "enable")
    root = PasswordStore(etcd.endpoints, "root", "rootpw")
    n1 = PasswordStore(etcd.endpoints, "n1", "n1pw")
    try:
        root.put("/vmha/n/n2/reg", "n2's")
        n1.put("/vmha/n/n1/reg", "mine")
        assert n1.txn([Cmp("/vmha/n/n1/reg", "create", ">", 0)],
                      [Put("/vmha/n/n1/alive", "1")]).succeeded
        assert [kv.key for p in n1.list_pages("/vmha/n/n1/") for kv in p.kvs] == [
            "/vmha/n/n1/alive", "/vmha/n/n1/reg"]
        assert n1.count_only("/vmha/n/n1/").count == 2
        before = root.revision()

        denied = [
            lambda: n1.put("/vmha/n/n2/reg", "not mine"),
            lambda: n1.txn([], [Put("/vmha/n/n1/x", "1"), Put("/vmha/n/n2/x", "1")]),
            lambda: n1.get("/vmha/n/n2/reg"),
            lambda: n1.get_prefix("/vmha/"),
            lambda: next(n1.list_pages("/vmha/n/")),
            lambda: n1.count_only("/vmha/"),
            lambda: watch(n1, KeyRange.prefix("/vmha/n/n2/")),
        ]
        for request in denied:
            started = time.monotonic()
            with pytest.raises(PermissionDenied) as info:
                request()
            assert isinstance(info.value, PermanentError)
            assert time.monotonic() - started < 1.0, "refused at once, never retried"
        assert root.revision() == before, "no denied write took effect"
        assert root.get("/vmha/n/n2/reg").value == b"n2's"  # type: ignore[union-attr]
    finally:
        n1.close()
        root.close()
