"""Benchmark (not a test): paged reads at full size (keyspace-v2.md section 3, part 1).

One etcd member; KEYS keys of VALUE_BYTES each (default 33,000 of 4 kB: what 10,000
VMs of 4 kB XML come to) under one prefix.  A client with gRPC's default 4 MiB receive
limit reads them:

* in one range: must fail with the message-size error (what `snapshot()` would hit);
* in pages (`EtcdStore.list_pages`) while a writer changes keys: every page at one
  revision, equal to a single range at that revision read with the raised limit;
* into a `WatchedState` (paged list + one watch stream), then a burst of writes
  applied from the watch.

Usage: python -m bench.paging --keys 33000 --value-bytes 4096 --out results/bench-paging.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import pct
from lab.localcluster import start_etcd
from store.etcd import EtcdStore, Put, StoreUnavailable
from store.paging import KeyRange, raw_kv
from store.watchmodel import WatchedState

PREFIX = "/vmha/spec/"
GRPC_DEFAULT_LIMIT = 4 * 1024 * 1024


def fill(store: EtcdStore, keys: int, size: int) -> float:
    started = time.monotonic()
    for first in range(0, keys, 100):
        store.txn([], [Put(f"{PREFIX}vm{i:06d}", f"{i:06d}".ljust(size, "x"))
                       for i in range(first, min(keys, first + 100))], budget=30)
    return time.monotonic() - started


def whole_range(small: EtcdStore) -> dict[str, Any]:
    started = time.monotonic()
    try:
        n = len(small.get_prefix(PREFIX))
        return {"failed": False, "keys": n}
    except StoreUnavailable as exc:
        return {"failed": True, "error": str(exc)[:300],
                "seconds": round(time.monotonic() - started, 3)}


def paged(small: EtcdStore, big: EtcdStore, keys: int, endpoints: str) -> dict[str, Any]:
    stop = threading.Event()
    writes = [0]

    def writer() -> None:   # rewrites keys all over the prefix while the pages are read
        w = EtcdStore(endpoints)
        i = 0
        while not stop.is_set():
            w.put(f"{PREFIX}vm{(i * 7919) % keys:06d}", f"rewritten {i}")
            writes[0] += 1
            i += 1
        w.close()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    page_s, sizes, limits, revs, kvs = [], [], [], set(), []
    started = last = time.monotonic()
    for page in small.list_pages(PREFIX):
        now = time.monotonic()
        page_s.append(now - last)
        last = now
        sizes.append(page.size)
        limits.append(page.limit)
        revs.add(page.revision)
        kvs.extend(page.kvs)
    total = time.monotonic() - started
    stop.set()
    t.join()
    (rev,) = revs
    check_started = time.monotonic()
    one = [raw_kv(kv) for kv in big.client.get_prefix_response(PREFIX, revision=rev).kvs]
    one_s = time.monotonic() - check_started
    return {"keys": len(kvs), "pages": len(sizes), "seconds": round(total, 3),
            "page_p50_s": pct(page_s, 50), "page_p99_s": pct(page_s, 99),
            "page_max_bytes": max(sizes), "bytes": sum(sizes),
            "limits": sorted(set(limits)), "one_revision": len(revs) == 1,
            "writes_during_listing": writes[0],
            "equal_to_single_range_at_revision": kvs == one,
            "all_mod_revisions_at_or_below": max(kv.mod_revision for kv in kvs) <= rev,
            "single_range_raised_limit_seconds": round(one_s, 3)}


def watched(small: EtcdStore, big: EtcdStore, burst: int) -> dict[str, Any]:
    state = WatchedState(small, [KeyRange.prefix(PREFIX)])
    try:
        started = time.monotonic()
        rev = state.start()
        start_s = time.monotonic() - started
        started = time.monotonic()
        for i in range(burst):
            big.put(f"{PREFIX}vm{i:06d}", f"burst {i}")
        last = big.revision()
        applied = 0
        while state.revision < last and time.monotonic() - started < 60:
            applied += len(state.wait(0.5))
        apply_s = time.monotonic() - started
        # The stream may have applied the burst before the loop's first look: collect it.
        applied += len(state.wait(0.0))
        _, items = state.items()
        return {"list_revision": rev, "start_seconds": round(start_s, 3),
                "burst_writes": burst, "changes_applied": applied,
                "burst_seconds": round(apply_s, 3), "model_keys": len(items),
                "equal_to_fresh_read": items == big.get_prefix(PREFIX)}
    finally:
        state.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.paging")
    ap.add_argument("--keys", type=int, default=33_000)
    ap.add_argument("--value-bytes", type=int, default=4096)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--out", default="results/bench-paging.json")
    a = ap.parse_args(argv)
    cluster = start_etcd(1)
    try:
        big = EtcdStore(cluster.endpoints)
        small = EtcdStore(cluster.endpoints, max_receive_bytes=GRPC_DEFAULT_LIMIT,
                          retry_budget=1.0)
        res: dict[str, Any] = {"keys": a.keys, "value_bytes": a.value_bytes,
                               "receive_limit_bytes": GRPC_DEFAULT_LIMIT}
        res["fill_seconds"] = round(fill(big, a.keys, a.value_bytes), 3)
        res["whole_range"] = whole_range(small)
        res["paged"] = paged(small, big, a.keys, cluster.endpoints)
        res["count_only"] = small.count_only(PREFIX).count
        res["watched_state"] = watched(small, big, a.burst)
        small.close()
        big.close()
    finally:
        cluster.stop()
    p = res["paged"]
    res["ok"] = bool(res["whole_range"]["failed"] and p["one_revision"]
                     and p["equal_to_single_range_at_revision"] and p["keys"] == a.keys
                     and res["count_only"] == a.keys
                     and res["watched_state"]["equal_to_fresh_read"]
                     and res["watched_state"]["changes_applied"] == a.burst)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
