"""`WatchedState` against real etcd: events in order, exactly once, across a stalled
member (SIGSTOP) and across a compaction that forces a re-list.

The stalls use an injected clock: the state asks for progress and gives up on the
stream only when the test moves the clock, so the writes and the compaction are done
before it looks elsewhere (no race with a timer)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from schemas.snapshot import RawKV
from store.etcd import EtcdStore, Put, StoreCompacted
from store.paging import KeyRange, list_range
from store.watchmodel import Change, WatchedState
from tests.harness import EtcdCluster, EtcdMember, wait_until
from tests.integration.helpers import wakeups

pytestmark = pytest.mark.integration

VMS = KeyRange.prefix("/vmha/a/n1/")
CONFIG = KeyRange.key("/vmha/config")
REG = KeyRange.key("/vmha/n/n1/reg")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fresh(store: EtcdStore, ranges: list[KeyRange]) -> list[RawKV]:
    """The ranges read now, at one revision, in key order."""
    rev: int | None = None
    out: list[tuple[bytes, RawKV]] = []
    for keys in ranges:
        for page in list_range(store.range_request, keys, rev):
            rev = page.revision
            out.extend(zip(page.raw_keys, page.kvs, strict=True))
    return [kv for _, kv in sorted(out, key=lambda x: x[0])]


def collect(state: WatchedState, n: int, timeout: float = 10.0) -> list[Change]:
    out: list[Change] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out.extend(state.wait(0.1))
    return out


def ordered(changes: list[Change]) -> list[tuple[int, str, bool]]:
    # Events of one revision may come from several watchers in any order.
    return sorted((c.revision, c.key, c.kv is None) for c in changes)


def test_events_of_the_ranges_applied_in_order_with_progress_requests(
        etcd: EtcdCluster, store: EtcdStore) -> None:
    store.put("/vmha/a/n1/v1", "a")
    store.put("/vmha/config", "c0")
    store.put("/vmha/a/n2/v9", "another node's")
    state = WatchedState(store, [VMS, CONFIG, REG], check_interval_s=0.2,
                         progress_timeout_s=1.0)
    try:
        rev = state.start()
        assert state.items() == (rev, fresh(store, [VMS, CONFIG, REG]))
        want = [(store.put("/vmha/a/n1/v2", "b"), "/vmha/a/n1/v2", False)]
        store.put("/vmha/a/n2/v9", "not watched")
        want.append((store.put("/vmha/config", "c1"), "/vmha/config", False))
        both = store.txn([], [Put("/vmha/a/n1/v3", "c"), Put("/vmha/n/n1/reg", "r")])
        want += [(both.revision, "/vmha/a/n1/v3", False), (both.revision, "/vmha/n/n1/reg", False)]
        store.delete("/vmha/a/n1/v1")
        want.append((store.revision(), "/vmha/a/n1/v1", True))
        changes = collect(state, len(want))
        assert ordered(changes) == sorted(want)
        assert [c.revision for c in changes] == sorted(c.revision for c in changes)
        assert state.items() == (store.revision(), fresh(store, [VMS, CONFIG, REG]))

        # Idle: progress requests every 0.2 s, each answered (etcd 3.4 has them).
        asked = state.stats["progress_requests"]
        time.sleep(1.0)
        assert state.stats["progress_requests"] >= asked + 3
        assert state.stats["stalls"] == 0 and state.stats["resumes"] == 0

        # A range added on the running stream, one removed.
        store.put("/vmha/n/n2/reg", "peer")
        state.add(KeyRange.key("/vmha/n/n2/reg"))
        assert state.get("/vmha/n/n2/reg") is not None
        assert state.remove(VMS) and not state.remove(VMS)
        assert state.get("/vmha/a/n1/v2") is None
        store.put("/vmha/a/n1/v4", "no longer watched")
        peer = store.put("/vmha/n/n2/reg", "peer again")
        assert [(c.key, c.revision) for c in collect(state, 1)] == [("/vmha/n/n2/reg", peer)]
        assert state.wait(0.3) == []
        assert state.items()[1] == fresh(store, [CONFIG, REG, KeyRange.key("/vmha/n/n2/reg")])
        with pytest.raises(ValueError, match="disjoint"):
            state.add(KeyRange.prefix("/vmha/n/"))
        assert state.stats["lists"] == 1 and state.stats["duplicates"] == 0
    finally:
        state.close()


@contextmanager
def stopped(member: EtcdMember) -> Iterator[None]:
    assert member.proc is not None
    os.kill(member.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(member.proc.pid, signal.SIGCONT)


def stall(state: WatchedState, clock: Clock) -> None:
    """Move the clock past the check interval, then past the progress timeout: the
    stream on a stopped member gets a question and no answer."""
    asked = state.stats["progress_requests"]
    clock.now += 0.5
    wait_until(lambda: state.stats["progress_requests"] > asked, 5, what="progress request")
    clock.now += 1.0


def started(etcd3: EtcdCluster, clock: Clock) -> tuple[EtcdStore, WatchedState, EtcdMember,
                                                       EtcdStore]:
    store = EtcdStore(etcd3.endpoints, timeout=0.5)
    for i in range(10):
        store.put(f"/vmha/a/n1/v{i}", "0")
    store.put("/vmha/config", "c0")
    state = WatchedState(store, [VMS, CONFIG], check_interval_s=0.5, progress_timeout_s=1.0,
                         clock=clock)
    state.start()
    member = next(m for m in etcd3.members if m.endpoint == state.endpoint)
    others = EtcdStore(",".join(m.endpoint for m in etcd3.members if m is not member),
                       timeout=0.5, retry_budget=5.0)
    return store, state, member, others


def test_a_stopped_member_under_the_stream_resumes_from_the_last_revision(
        etcd3: EtcdCluster) -> None:
    clock = Clock()
    store, state, member, others = started(etcd3, clock)
    try:
        want = [(others.put("/vmha/a/n1/v0", "1"), "/vmha/a/n1/v0", False)]
        assert ordered(collect(state, 1)) == want
        with stopped(member):
            got = [(others.put(f"/vmha/a/n1/v{i}", "2"), f"/vmha/a/n1/v{i}", False)
                   for i in range(10)]
            got.append((others.put("/vmha/config", "c1"), "/vmha/config", False))
            others.delete("/vmha/a/n1/v9")
            got.append((others.revision(), "/vmha/a/n1/v9", True))
            got.append((others.put("/vmha/a/n1/new", "3"), "/vmha/a/n1/new", False))
            assert state.wait(0.3) == [], "nothing arrives from the stopped member"
            stall(state, clock)
            changes = collect(state, len(got))
            assert ordered(changes) == sorted(got), "every event once, none lost"
            assert state.endpoint not in (None, member.endpoint)
            assert state.items()[1] == fresh(others, [VMS, CONFIG])
            assert state.stats["stalls"] == 1 and state.stats["resumes"] == 1
            assert state.stats["lists"] == 1, "resumed, not re-listed"
            assert state.wait(0.3) == []
    finally:
        state.close()
        store.close()
        others.close()


def test_compaction_while_the_stream_is_away_relists_without_loss(
        etcd3: EtcdCluster) -> None:
    clock = Clock()
    store, state, member, others = started(etcd3, clock)
    try:
        with stopped(member):
            written = {(others.put(f"/vmha/a/n1/v{i}", "2"), f"/vmha/a/n1/v{i}", False)
                       for i in range(5)}
            others.delete("/vmha/a/n1/v9")
            written.add((others.revision(), "/vmha/a/n1/v9", True))
            others.client.compact(others.revision())
            stall(state, clock)
            changes: list[Change] = []
            with pytest.raises(StoreCompacted):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    changes.extend(state.wait(0.1))
            # Nothing the resumed watch could not deliver was made up or doubled.
            assert len(ordered(changes)) == len(set(ordered(changes)))
            assert set(ordered(changes)) <= written
            with pytest.raises(StoreCompacted):
                state.wait(0)          # until the owner re-lists
            rev = state.start()
            assert state.items() == (rev, fresh(others, [VMS, CONFIG]))
            assert state.stats["lists"] == 2
            after = others.put("/vmha/a/n1/v1", "after the re-list")
            assert [(c.key, c.revision) for c in collect(state, 1)] == [("/vmha/a/n1/v1", after)]
    finally:
        state.close()
        store.close()
        others.close()


class CountingClock:
    """The real clock, counting its reads: how often the state looked at the time."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return time.monotonic()


def test_an_idle_state_sleeps_until_its_check_and_still_finds_a_stall(
        etcd3: EtcdCluster) -> None:
    """The supervisor sleeps until the next liveness check is due instead of ticking
    (a quarter of the shorter interval): an idle state reads the clock about once per
    check, and a stopped member is still given up on, on the real clock."""
    clock = CountingClock()
    store = EtcdStore(etcd3.endpoints, timeout=0.5)
    store.put("/vmha/config", "c0")
    state = WatchedState(store, [CONFIG], check_interval_s=10.0, progress_timeout_s=2.0,
                         clock=clock)
    try:
        state.start()
        time.sleep(0.2)
        before = clock.reads
        time.sleep(2.0)
        assert clock.reads - before <= 1, f"{clock.reads - before} clock reads in 2 s"
    finally:
        state.close()
    state = WatchedState(store, [CONFIG], check_interval_s=1.0, progress_timeout_s=1.0,
                         clock=clock)
    try:
        state.start()
        member = next(m for m in etcd3.members if m.endpoint == state.endpoint)
        with stopped(member):
            # Due after the check interval plus the progress timeout (2 s); the bound
            # is generous for a loaded machine (how soon is the benchmarks' business;
            # the read count here would count the answers that came meanwhile too).
            wait_until(lambda: state.stats["stalls"] == 1, 10, what="the stall found")
            wait_until(lambda: state.endpoint not in (None, member.endpoint), 5,
                       what="resumed on another member")
    finally:
        state.close()
        store.close()


def test_an_idle_stream_wakes_no_thread(etcd: EtcdCluster) -> None:
    """The stream is read on the process's grpc.aio loop: while nothing arrives, no
    thread of the state's (nor the loop) wakes.  gRPC's synchronous client would wake
    a reading thread every 0.1 s and a channel thread every 0.2 s, per stream."""
    store = EtcdStore(etcd.endpoints)
    before = {t.ident for t in threading.enumerate()}
    state = WatchedState(store, [CONFIG], check_interval_s=10.0, progress_timeout_s=2.0)
    try:
        state.start()
        time.sleep(0.5)
        mine = [t for t in threading.enumerate()
                if t.ident not in before or t.name == "vmha-grpc-aio"]
        counts = {t.name: wakeups(t) for t in mine}
        time.sleep(2.0)
        woke = {t.name: wakeups(t) - counts[t.name] for t in mine if t.is_alive()}
        assert sum(woke.values()) <= 3, woke
        # ... and an event still arrives at once.
        rev = store.put("/vmha/config", "c1")
        assert [(c.key, c.revision) for c in collect(state, 1, 5.0)] == [("/vmha/config", rev)]
    finally:
        state.close()
        store.close()


def test_the_keys_only_check_finds_a_model_that_differs(etcd: EtcdCluster,
                                                        store: EtcdStore) -> None:
    """The agent's periodic check of its watch (nodeagent.agent_v2): a keys-only listing
    at the model's revision, so no value (domain XML) is sent again; it must still find
    a key the model lacks, one too many, a stale revision, and a compacted revision."""
    xml = "x" * 4000
    store.put("/vmha/a/n1/v1", xml)
    store.put("/vmha/a/n1/v2", xml)
    store.put("/vmha/config", "c")
    state = WatchedState(store, [VMS, CONFIG, REG])
    sizes: list[int] = []
    real = store.range_request

    def measured(req: object) -> object:
        resp = real(req)  # type: ignore[arg-type]
        sizes.append(resp.ByteSize())
        return resp

    store.range_request = measured  # type: ignore[assignment,method-assign]
    try:
        state.start()
        sizes.clear()
        assert state.verify()
        assert sizes and sum(sizes) < 1000, f"values were sent: {sizes}"
        key = b"/vmha/a/n1/v1"
        kv = state._kvs[key]
        with state._lock:  # a lost delete event: one key too many
            state._kvs[b"/vmha/a/n1/v0"] = kv
        assert not state.verify()
        with state._lock:  # a lost put: a key missing
            del state._kvs[b"/vmha/a/n1/v0"], state._kvs[key]
        assert not state.verify()
        with state._lock:  # a lost change: the value of an older revision
            state._kvs[key] = RawKV(kv.key, b"older", kv.create_revision,
                                    kv.mod_revision - 1, kv.lease)
        assert not state.verify()
        state.start()
        assert state.verify()
        # Written and compacted past while nobody asked: the model's revision is gone.
        store.put("/vmha/config", "c2")
        wait_until(lambda: state.revision == store.revision(), 10, what="the change seen")
        rev = state.revision
        store.put("/vmha/other", "moves the revision")
        store.client.compact(store.revision())
        assert rev < store.revision()
        assert not state.verify()
    finally:
        state.close()
