"""The etcd store adapter against a real etcd server."""

from __future__ import annotations

import threading
import time

import pytest

from store.etcd import Cmp, Delete, EtcdStore, Put, StoreUnavailable
from store.watch import PrefixWatch
from tests.harness import EtcdCluster, wait_until

pytestmark = pytest.mark.integration


def test_txn_compare_and_swap(store: EtcdStore) -> None:
    r1 = store.txn([Cmp("/vmha/x", "create", "==", 0)], [Put("/vmha/x", "1")])
    assert r1.succeeded
    again = store.txn([Cmp("/vmha/x", "create", "==", 0)], [Put("/vmha/x", "2")])
    assert not again.succeeded
    kv = store.get("/vmha/x")
    assert kv is not None and kv.value == b"1" and kv.create_revision == r1.revision
    stale = store.txn([Cmp("/vmha/x", "mod", "==", r1.revision - 1)], [Delete("/vmha/x")])
    assert not stale.succeeded and store.get("/vmha/x") is not None
    ok = store.txn([Cmp("/vmha/x", "mod", "==", r1.revision)], [Delete("/vmha/x")])
    assert ok.succeeded and store.get("/vmha/x") is None


def test_lease_keepalive_revoke_and_expiry(store: EtcdStore) -> None:
    lease = store.grant_lease(1)
    store.put("/vmha/nodes/a", "{}", lease)
    assert store.keepalive(lease) >= 1
    store.revoke_lease(lease)
    assert store.keepalive(lease) == 0  # gone while etcd answers: a revoke
    assert store.get("/vmha/nodes/a") is None
    store.revoke_lease(lease)  # revoking twice is harmless
    short = store.grant_lease(1)
    store.put("/vmha/nodes/b", "{}", short)
    wait_until(lambda: store.get("/vmha/nodes/b") is None, 3, what="lease expiry")
    assert store.lease_ttl(short) == -1


def test_snapshot_is_one_revision(store: EtcdStore) -> None:
    store.put("/vmha/vms/a/spec", "{bad")
    store.put("/other/key", "ignored")
    snap = store.snapshot()
    assert snap.revision >= 2
    assert [e.key for e in snap.errors] == ["/vmha/vms/a/spec"]
    assert not snap.specs


def test_prefix_watch_wakes_and_recovers_after_member_restart(etcd: EtcdCluster) -> None:
    store = EtcdStore(etcd.endpoints)
    wake = threading.Event()
    watch = PrefixWatch(store, "/vmha/", wake)
    watch.ensure(store.revision())
    store.put("/vmha/a", "1")
    assert wake.wait(3)
    wake.clear()
    etcd.restart_member(etcd.members[0])
    assert wake.wait(5), "a lost watch wakes its owner so it re-lists"
    etcd.wait_ready()
    wake.clear()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            watch.ensure(store.snapshot().revision)
            break
        except StoreUnavailable:
            time.sleep(0.1)
    wake.clear()
    store.put("/vmha/b", "2")
    assert wake.wait(5), "the watch is re-established from the last snapshot"
    watch.stop()
    store.close()


def test_unreachable_etcd_raises_store_unavailable() -> None:
    from lab.localcluster import free_ports

    (port,) = free_ports(1)
    s = EtcdStore(f"127.0.0.1:{port}", retry_budget=0.5, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        s.snapshot()
    assert time.monotonic() - started < 5
    s.close()


def test_a_bug_in_a_request_propagates_and_is_not_retried_as_an_outage(etcd: EtcdCluster) -> None:
    """A ValueError from building the request (here a revision out of int64 range) is a
    programming error: it surfaces as itself, not as "etcd unavailable" after retries."""
    s = EtcdStore(etcd.endpoints, retry_budget=1.0)
    calls = []

    def bad() -> None:
        calls.append(1)
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="out of range"):
        s.txn([Cmp("/vmha/x", "mod", "==", 2 ** 64)], [Put("/vmha/x", "1")])
    with pytest.raises(ValueError, match="a bug"):
        s._call("get", bad)
    assert calls == [1], "tried once, never retried"
    assert s.get("/vmha/x") is None
    s.close()


def test_a_refused_request_is_permanent_not_an_outage(store: EtcdStore) -> None:
    """etcd answered and refused (INVALID_ARGUMENT): StoreRejected, a PermanentError."""
    from schemas.errors import PermanentError
    from store.etcd import StoreRejected

    with pytest.raises(StoreRejected, match="duplicate key") as info:
        store.txn([], [Put("/vmha/x", "1"), Put("/vmha/x", "2")])
    assert isinstance(info.value, PermanentError)
    assert not isinstance(info.value, StoreUnavailable)
    assert store.get("/vmha/x") is None


def test_a_lost_compare_is_a_result_not_an_error(store: EtcdStore) -> None:
    store.put("/vmha/x", "1")
    res = store.txn([Cmp("/vmha/x", "create", "==", 0)], [Put("/vmha/x", "2")])
    assert res.succeeded is False and res.revision > 0


def test_history_event_etcd_refuses_is_logged_as_rejected_and_never_raises(
        store: EtcdStore) -> None:
    """History is best-effort: an event etcd refuses (too large) neither blocks the
    caller nor passes for an outage."""
    from structlog.testing import capture_logs

    from store.history import HistoryWriter

    writer = HistoryWriter(store, "test")
    with capture_logs() as logs:
        assert writer.record("drain", node="n1", reason="x" * 1_700_000) is None
    assert [(e["event"], e["log_level"]) for e in logs] == [("event_rejected", "error")]
    assert writer.record("drain", node="n1", reason="fits") is not None


def test_write_with_an_expired_lease_is_lease_not_found(store: EtcdStore) -> None:
    # An agent whose grant + write outlasted the TTL must see "lease gone", so it can
    # register afresh, not a generic refusal that ends its cycle as a bug would.
    from store.etcd import LeaseNotFound

    lease = store.grant_lease(5)
    store.revoke_lease(lease)
    with pytest.raises(LeaseNotFound):
        store.txn([Cmp("/vmha/nodes/x", "create", "==", 0)],
                  [Put("/vmha/nodes/x", "{}", lease)])
    assert store.get("/vmha/nodes/x") is None
