"""The store's keepalive rounds on one long-lived stream (store.keepalive), against real
etcd: answers matched to leases, one stream for many rounds, and a stream broken by its
member (stopped, killed mid-round) failing the round within its deadline, the next
round going to another member."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest

from store.etcd import EtcdStore, StoreUnavailable
from tests.harness import EtcdCluster, EtcdMember
from tests.integration.helpers import stopped, store_on_follower, wakeups

pytestmark = pytest.mark.integration

TIMEOUT_S = 0.5
# Scheduling slack on a shared 2-core box, for a round that must end at its deadline.
SLACK_S = 0.4


def streams_started(member: EtcdMember) -> int:
    """How many LeaseKeepAlive streams the member has accepted (its /metrics)."""
    with urllib.request.urlopen(f"http://{member.endpoint}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(r'^grpc_server_started_total\{grpc_method="LeaseKeepAlive",'
                  r'grpc_service="etcdserverpb.Lease",grpc_type="bidi_stream"\} (\d+)',
                  text, re.MULTILINE)
    return int(m.group(1)) if m else 0


def test_one_round_renews_both_leases_on_one_stream(etcd: EtcdCluster,
                                                    store: EtcdStore) -> None:
    a, b = store.grant_lease(30), store.grant_lease(30)
    before = streams_started(etcd.members[0])
    for _ in range(10):
        ttls = store.keepalive_round([a, b], TIMEOUT_S)
        assert set(ttls) == {a, b} and all(t > 0 for t in ttls.values()), ttls
    assert store.keepalive(a) > 0  # a single keepalive rides the same stream
    assert streams_started(etcd.members[0]) - before == 1
    # Another client revokes one: etcd answers TTL 0 for it, and only for it.
    other = EtcdStore(etcd.endpoints)
    try:
        other.revoke_lease(b)
    finally:
        other.close()
    ttls = store.keepalive_round([a, b], TIMEOUT_S)
    assert ttls[a] > 0 and ttls[b] == 0, ttls
    with pytest.raises(ValueError, match="distinct"):
        store.keepalive_round([a, a], TIMEOUT_S)


def test_a_stalled_member_fails_the_round_at_its_deadline_and_the_next_goes_on(
        etcd3: EtcdCluster) -> None:
    store, member = store_on_follower(etcd3)
    try:
        a, b = store.grant_lease(30), store.grant_lease(30)
        assert all(t > 0 for t in store.keepalive_round([a, b], TIMEOUT_S).values())
        with stopped(member):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="DEADLINE_EXCEEDED") as err:
                store.keepalive_round([a, b], TIMEOUT_S)
            took = time.monotonic() - t0
            assert TIMEOUT_S <= took < TIMEOUT_S + SLACK_S, took
            assert member.endpoint in str(err.value)
            # The next round opens a stream to another member and is answered.
            assert store.keepalive_endpoint() != member.endpoint
            t1 = time.monotonic()
            ttls = store.keepalive_round([a, b], TIMEOUT_S)
            assert all(t > 0 for t in ttls.values()) and time.monotonic() - t1 < TIMEOUT_S
    finally:
        store.close()


def test_a_member_killed_mid_round_fails_it_at_once_and_the_next_goes_on(
        etcd3: EtcdCluster) -> None:
    store, member = store_on_follower(etcd3)
    try:
        a, b = store.grant_lease(30), store.grant_lease(30)
        assert all(t > 0 for t in store.keepalive_round([a, b], TIMEOUT_S).values())
        failed: list[BaseException] = []
        ended = threading.Event()

        def round_in_flight() -> None:
            try:
                store.keepalive_round([a, b], 5.0)
            except StoreUnavailable as exc:
                failed.append(exc)
            finally:
                ended.set()

        with stopped(member):
            # Sent on the stream, unanswered (the member is stopped) ...
            threading.Thread(target=round_in_flight, daemon=True).start()
            time.sleep(0.3)
            assert not ended.is_set()
            # ... when the member dies: the stream breaks under the round.
            t0 = time.monotonic()
            etcd3.kill_member(member)
            assert ended.wait(2.0), "the round outlived its stream"
        assert failed and time.monotonic() - t0 < 2.0, failed
        assert store.keepalive_endpoint() != member.endpoint
        ttls = store.keepalive_round([a, b], TIMEOUT_S)
        assert all(t > 0 for t in ttls.values()), ttls
    finally:
        store.close()


def test_an_open_stream_wakes_no_thread_between_rounds(store: EtcdStore) -> None:
    """Between rounds the open stream waits on the process's grpc.aio loop: no thread
    wakes.  gRPC's synchronous client would wake a reading thread every 0.1 s and the
    channel's thread every 0.2 s (15 a second, per agent, while idle)."""
    before = {t.ident for t in threading.enumerate()}
    a = store.grant_lease(30)
    store.keepalive_round([a], TIMEOUT_S)
    time.sleep(0.3)
    mine = [t for t in threading.enumerate()
            if t.ident not in before or t.name == "vmha-grpc-aio"]
    counts = {t.name: wakeups(t) for t in mine}
    time.sleep(2.0)
    woke = {t.name: wakeups(t) - counts[t.name] for t in mine if t.is_alive()}
    assert sum(woke.values()) <= 3, woke
    # ... and the rounds that follow are answered on the same stream.
    for _ in range(5):
        assert store.keepalive_round([a], TIMEOUT_S)[a] > 0


def test_a_member_killed_between_rounds_ends_the_stream_at_once(
        etcd3: EtcdCluster) -> None:
    """No round in flight: the call's end (gRPC's callback) still fails the stream at
    once, so the next round goes to another member instead of failing first."""
    store, member = store_on_follower(etcd3)
    try:
        a = store.grant_lease(30)
        assert store.keepalive_round([a], TIMEOUT_S)[a] > 0
        assert store.keepalive_endpoint() == member.endpoint
        etcd3.kill_member(member)
        deadline = time.monotonic() + 2.0
        while store.keepalive_endpoint() == member.endpoint and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.keepalive_endpoint() != member.endpoint, "the ended stream went unseen"
        assert store.keepalive_round([a], TIMEOUT_S)[a] > 0
    finally:
        store.close()
