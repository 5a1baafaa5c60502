"""Paged reads (`EtcdStore.list_pages`, `count_only`) against a real etcd.

The full-size check (33,000 keys of 4 kB) is `make bench-paging`; here 1,200 keys of
4 kB (≈ 5 MB) already exceed gRPC's default 4 MiB receive limit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from schemas.snapshot import RawKV
from store.etcd import EtcdStore, Put, StoreCompacted, StoreRejected, StoreUnavailable
from store.paging import SHRINK_ABOVE, raw_kv
from tests.harness import EtcdCluster

pytestmark = pytest.mark.integration

GRPC_DEFAULT_LIMIT = 4 * 1024 * 1024
PREFIX = "/vmha/p/"


def fill(store: EtcdStore, n: int, size: int, prefix: str = PREFIX) -> None:
    """n keys of `size` bytes, 100 to a txn (etcd allows 128 operations in one)."""
    for first in range(0, n, 100):
        store.txn([], [Put(f"{prefix}{i:05d}", f"{i:05d}".ljust(size, "x"))
                       for i in range(first, min(n, first + 100))])


def at_revision(store: EtcdStore, prefix: str, revision: int) -> list[RawKV]:
    """The whole prefix in one range at `revision` (needs the raised receive limit)."""
    resp = store.client.get_prefix_response(prefix, revision=revision)
    return [raw_kv(kv) for kv in resp.kvs]


@pytest.fixture
def big(etcd: EtcdCluster) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd.endpoints)
    yield s
    s.close()


def test_pages_read_past_the_receive_limit_at_one_revision(etcd: EtcdCluster,
                                                           big: EtcdStore) -> None:
    fill(big, 1200, 4096)
    big.put("/vmha/p0", "just past the prefix")
    small = EtcdStore(etcd.endpoints, max_receive_bytes=GRPC_DEFAULT_LIMIT, retry_budget=0.3)
    try:
        with pytest.raises(StoreUnavailable, match="larger than max"):
            small.get_prefix(PREFIX)   # one range: ≈ 5 MB, refused by the client

        pages = small.list_pages(PREFIX)
        first = next(pages)
        rev = first.revision
        # Writes between pages: a later key changed, one deleted, one added, and a key
        # already read changed.  None of them may show in this listing.
        big.put(f"{PREFIX}01199", "changed")
        big.delete(f"{PREFIX}01198")
        big.put(f"{PREFIX}zzz", "new")
        big.put(f"{PREFIX}00000", "changed")
        rest = list(pages)
        kvs = first.kvs + [kv for p in rest for kv in p.kvs]

        assert all(p.revision == rev for p in rest)
        assert kvs == at_revision(big, PREFIX, rev)
        assert [kv.key for kv in kvs] == [f"{PREFIX}{i:05d}" for i in range(1200)]
        assert max(kv.mod_revision for kv in kvs) <= rev
        assert kvs != big.get_prefix(PREFIX), "the writes happened, after the revision"
        # 256 keys of 4 kB exceed 1 MiB: the limit halves and stays there.
        assert first.limit == 256 and first.size > SHRINK_ABOVE
        assert [p.limit for p in rest] == [128] * len(rest)
        assert max(p.size for p in [first, *rest]) < GRPC_DEFAULT_LIMIT
        assert len(rest) == (1200 - 256 + 127) // 128

        count = small.count_only(PREFIX)
        assert count.count == len(big.get_prefix(PREFIX)) == 1200
        assert count.revision == big.revision()
    finally:
        small.close()


def test_small_values_come_in_full_pages_and_keys_only(big: EtcdStore) -> None:
    fill(big, 600, 100)
    pages = list(big.list_pages(PREFIX))
    assert [len(p.kvs) for p in pages] == [256, 256, 88]
    assert [p.limit for p in pages] == [256, 256, 256]
    keys_only = [kv for p in big.list_pages(PREFIX, keys_only=True) for kv in p.kvs]
    assert [kv.key for kv in keys_only] == [kv.key for p in pages for kv in p.kvs]
    assert all(kv.value == b"" for kv in keys_only)
    assert [p.kvs for p in big.list_pages("/vmha/none/")] == [[]]
    assert big.count_only("/vmha/none/").count == 0


def test_a_compacted_revision_raises_store_compacted(big: EtcdStore) -> None:
    fill(big, 300, 100)
    pages = big.list_pages(PREFIX)
    rev = next(pages).revision
    big.put(f"{PREFIX}00299", "changed")
    now = big.revision()
    big.client.compact(now)
    with pytest.raises(StoreCompacted):
        next(pages)                   # the second page, at the listing's revision
    with pytest.raises(StoreCompacted):
        next(big.list_pages(PREFIX, revision=rev))
    # At the compaction revision itself, and at none, the read succeeds.
    assert sum(len(p.kvs) for p in big.list_pages(PREFIX, revision=now)) == 300
    with pytest.raises(StoreRejected) as future:
        next(big.list_pages(PREFIX, revision=now + 100))
    assert not isinstance(future.value, StoreCompacted)
