"""Paged range reads at one revision, and key ranges (used by `EtcdStore` and
`store.watchmodel`).

A whole prefix read in one range is one gRPC message: at 10,000 VMs of 4 kB XML it is
about 50 MB, which only a raised receive limit lets through, and which the member
builds in memory at once.  Pages of at most 256 keys keep each answer near 1 MiB, well
under gRPC's 4 MiB default, and all pages are read at the revision of the first, so
the listing is one consistent snapshot however many writes happen meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pyetcd import etcdrpc

from schemas.keys import decode_key
from schemas.snapshot import RawKV

__all__ = ["GROW_BELOW", "PAGE_KEYS", "SHRINK_ABOVE", "KeyRange", "Page", "PageLimit",
           "RangeCount", "count_range", "list_all", "list_range", "prefix_end", "raw_kv"]

PAGE_KEYS = 256                # most keys asked for in one page
SHRINK_ABOVE = 1024 * 1024     # a page larger than this halves the limit ...
GROW_BELOW = 256 * 1024        # ... and one smaller than this doubles it (up to PAGE_KEYS)

# One range request in, its response out; retried by the caller (EtcdStore.range_request).
RangeFn = Callable[[Any], Any]


def raw_kv(kv: Any) -> RawKV:
    """A key-value from etcd; its key decoded so that it never raises (a key that is not
    UTF-8 keeps `\\xNN` escapes and is reported as invalid by the snapshot)."""
    return RawKV(decode_key(kv.key), bytes(kv.value), int(kv.create_revision),
                 int(kv.mod_revision), int(kv.lease))


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for every key starting with `prefix`: the prefix with its last
    byte below 0xff incremented; `\\0` (no upper bound) if there is none."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


@dataclass(frozen=True)
class KeyRange:
    """A key, or the keys in [start, end) in etcd's byte order (`end` b"\\0": no
    upper bound)."""

    start: bytes
    end: bytes = b""   # empty: the single key `start`

    @classmethod
    def key(cls, key: str) -> KeyRange:
        return cls(key.encode())

    @classmethod
    def prefix(cls, prefix: str) -> KeyRange:
        raw = prefix.encode()
        return cls(raw or b"\0", prefix_end(raw))

    @classmethod
    def between(cls, start: str, end: str) -> KeyRange:
        if end.encode() <= start.encode():
            raise ValueError(f"empty key range [{start!r}, {end!r})")
        return cls(start.encode(), end.encode())

    def contains(self, key: bytes) -> bool:
        if not self.end:
            return key == self.start
        return self.start <= key and (self.end == b"\0" or key < self.end)

    def overlaps(self, other: KeyRange) -> bool:
        if not self.end:
            return other.contains(self.start)
        if not other.end:
            return self.contains(other.start)
        # Two half-open intervals meet unless one ends before the other starts.
        return ((self.end == b"\0" or other.start < self.end)
                and (other.end == b"\0" or self.start < other.end))

    def __str__(self) -> str:
        if not self.end:
            return decode_key(self.start)
        return f"[{decode_key(self.start)}, {decode_key(self.end)})"


class PageLimit:
    """The number of keys asked for in the next page: it halves after a page over
    `shrink_above` bytes (large values) and doubles, up to `max_keys`, after one under
    `grow_below` bytes, so a page stays about 1 MiB whatever the values weigh."""

    def __init__(self, max_keys: int = PAGE_KEYS, shrink_above: int = SHRINK_ABOVE,
                 grow_below: int = GROW_BELOW) -> None:
        if max_keys < 1 or grow_below >= shrink_above:
            raise ValueError("page limit: need max_keys >= 1 and grow_below < shrink_above")
        self.max_keys = max_keys
        self.limit = max_keys
        self._shrink_above = shrink_above
        self._grow_below = grow_below

    def update(self, page_bytes: int) -> int:
        if page_bytes > self._shrink_above:
            self.limit = max(1, self.limit // 2)
        elif page_bytes < self._grow_below:
            self.limit = min(self.max_keys, self.limit * 2)
        return self.limit


@dataclass(frozen=True)
class Page:
    """One range answer: the revision the whole listing is read at, its key-values in
    key order (and their keys as etcd sent them), the keys asked for and the answer's
    size in bytes."""

    revision: int
    kvs: list[RawKV]
    raw_keys: list[bytes]
    limit: int
    size: int


@dataclass(frozen=True)
class RangeCount:
    count: int
    revision: int


def list_range(range_fn: RangeFn, keys: KeyRange, revision: int | None = None,
               keys_only: bool = False, limit: PageLimit | None = None) -> Iterator[Page]:
    """The keys of `keys` in pages, all at `revision` (default: the revision etcd
    answers the first page at).

    Raises `StoreCompacted` (through `range_fn`) when that revision has been compacted,
    possibly after some pages: the caller starts again at a new revision.  The next
    page starts at the last key + `\\0`, the smallest key after it."""
    limit = limit or PageLimit()
    rev = revision or 0
    start = keys.start
    while True:
        req = etcdrpc.RangeRequest(key=start, range_end=keys.end, limit=limit.limit,
                                   revision=rev, keys_only=keys_only)
        resp = range_fn(req)
        if not rev:
            # A range at revision 0 reads the newest state: its header names it.
            rev = int(resp.header.revision)
        page = Page(rev, [raw_kv(kv) for kv in resp.kvs], [bytes(kv.key) for kv in resp.kvs],
                    limit.limit, resp.ByteSize())
        yield page
        if not resp.more or not resp.kvs:
            return
        start = bytes(resp.kvs[-1].key) + b"\0"
        limit.update(page.size)


def list_all(range_fn: RangeFn, keys: KeyRange,
             revision: int | None = None) -> tuple[int, list[RawKV]]:
    """Every key-value of `keys` at one revision (the pages of `list_range` joined)."""
    rev, out = revision or 0, []
    for page in list_range(range_fn, keys, revision):
        rev = page.revision
        out.extend(page.kvs)
    return rev, out


def count_range(range_fn: RangeFn, keys: KeyRange) -> RangeCount:
    """How many keys `keys` holds now, and the revision etcd counted at."""
    resp = range_fn(etcdrpc.RangeRequest(key=keys.start, range_end=keys.end, count_only=True))
    return RangeCount(int(resp.count), int(resp.header.revision))
