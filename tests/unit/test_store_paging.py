"""Paged reads and watch liveness: the pure parts (key ranges, the page limit, when a
stream is asked for progress and given up on).  The etcd side is in
tests/integration/test_store_paging.py and test_watchmodel.py."""

from __future__ import annotations

import pytest

from schemas.errors import PermanentError, TemporaryError
from store.errors import PermissionDenied, StoreCompacted, StoreRejected, watch_cancel_error
from store.etcd import EtcdStore
from store.paging import GROW_BELOW, PAGE_KEYS, SHRINK_ABOVE, KeyRange, PageLimit, prefix_end
from store.watchmodel import WatchedState
from store.watchstream import Liveness


def test_prefix_end_is_etcds_range_end() -> None:
    assert prefix_end(b"/vmha/") == b"/vmha0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"  # no key above: no upper bound
    assert KeyRange.prefix("") == KeyRange(b"\0", b"\0")  # every key


def test_key_ranges_contain_and_overlap() -> None:
    vmha = KeyRange.prefix("/vmha/")
    assert vmha.contains(b"/vmha/a") and vmha.contains(b"/vmha/")
    assert not vmha.contains(b"/vmha0") and not vmha.contains(b"/vmha")
    one = KeyRange.key("/vmha/config")
    assert one.contains(b"/vmha/config") and not one.contains(b"/vmha/config2")
    assert one.overlaps(vmha) and vmha.overlaps(one)
    # The leader's two ranges: everything under /vmha/ but the assignments.
    below = KeyRange.between("/vmha/", "/vmha/a/")
    above = KeyRange.between("/vmha/a0", "/vmha0")
    assignments = KeyRange.prefix("/vmha/a/")
    assert not below.overlaps(above) and not above.overlaps(below)
    assert not below.overlaps(assignments) and not assignments.overlaps(above)
    assert below.overlaps(vmha) and above.overlaps(vmha)
    assert not KeyRange.key("/vmha/a").overlaps(KeyRange.key("/vmha/b"))
    assert KeyRange.prefix("").overlaps(KeyRange.key("zzz"))
    with pytest.raises(ValueError, match="empty key range"):
        KeyRange.between("/b", "/a")


def test_page_limit_halves_on_large_pages_and_doubles_back_to_the_cap() -> None:
    limit = PageLimit()
    assert limit.limit == PAGE_KEYS == 256
    assert [limit.update(SHRINK_ABOVE + 1) for _ in range(9)] == [128, 64, 32, 16, 8, 4, 2,
                                                                   1, 1]
    assert limit.update(SHRINK_ABOVE) == 1          # at 1 MiB exactly: kept
    assert limit.update(GROW_BELOW) == 1            # at 256 KiB exactly: kept
    assert [limit.update(GROW_BELOW - 1) for _ in range(10)] == [2, 4, 8, 16, 32, 64, 128,
                                                                  256, 256, 256]
    with pytest.raises(ValueError):
        PageLimit(max_keys=0)


def test_liveness_asks_an_idle_stream_and_gives_up_after_the_timeout() -> None:
    live = Liveness(interval=10.0, timeout=2.0, now=100.0)
    assert live.poll(109.9) is None
    assert live.poll(110.0) == Liveness.SEND
    assert live.poll(111.9) is None                  # asked, waiting for the answer
    live.answered(111.0)
    assert live.poll(120.9) is None and live.poll(121.0) == Liveness.SEND
    assert live.poll(122.9) is None
    assert live.poll(123.0) == Liveness.DEAD          # no answer within 2 s


def test_any_response_defers_the_question() -> None:
    live = Liveness(interval=10.0, timeout=2.0, now=0.0)
    for t in range(1, 60):                            # a busy stream: events every second
        live.answered(float(t))
        assert live.poll(float(t) + 0.5) is None


def test_watch_cancel_reasons_map_to_store_errors() -> None:
    compacted = watch_cancel_error("watch /vmha/", "", 42)
    assert isinstance(compacted, StoreCompacted) and isinstance(compacted, TemporaryError)
    denied = watch_cancel_error("watch /vmha/", "etcdserver: permission denied", 0)
    assert isinstance(denied, PermissionDenied) and isinstance(denied, PermanentError)
    other = watch_cancel_error("watch /vmha/", "", 0)
    assert isinstance(other, StoreRejected) and not isinstance(other, PermissionDenied)
    assert "canceled" in str(other)


def test_a_watched_state_needs_disjoint_ranges_and_keeps_its_last() -> None:
    # Nothing connects before start(): no etcd needed for the checks on ranges.
    store = EtcdStore("127.0.0.1:9")
    try:
        with pytest.raises(ValueError, match="disjoint"):
            WatchedState(store, [KeyRange.prefix("/vmha/n/"), KeyRange.key("/vmha/n/n1/reg")])
        with pytest.raises(ValueError, match="at least one"):
            WatchedState(store, [])
        state = WatchedState(store, [KeyRange.prefix("/vmha/a/n1/"), KeyRange.key("/vmha/config")])
        assert state.remove(KeyRange.key("/vmha/config"))
        assert not state.remove(KeyRange.key("/vmha/config"))
        with pytest.raises(ValueError, match="last watched range"):
            state.remove(KeyRange.prefix("/vmha/a/n1/"))
        state.close()
    finally:
        store.close()
