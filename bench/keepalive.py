"""Benchmark (not a test): the CPU cost of lease renewal in the agent's process.

One etcd member on loopback; KEEPERS keepers in this process, each the real
`fencing.lease.LeaseKeeper` with its own `EtcdStore` (its own channels, as every agent
has), renewing two leases in one round (the registration lease and, as its partner, the
liveness lease: keyspace 2's agent).  After a warm-up of two intervals, for SECONDS:

* CPU seconds of this process (user + system, `resource.getrusage`) per keeper-second:
  what one agent's renewals cost in Python (the gRPC threads included);
* etcd's CPU seconds per second;
* each acknowledged round's latency (send of its first request to the last answer),
  p50 and p99, and how many rounds were acknowledged, failed, or missed a deadline.

Usage: python -m bench.keepalive --keepers 50 100 --seconds 30 [--interval 0.5]
       [--out results/bench-keepalive.json]

Measured on a shared 2-core box (nice 15), before (a new LeaseKeepAlive stream per
keepalive, the round's two one after the other) and after (one long-lived stream per
store, both sent together):

    interval  keepers  CPU ms per keeper-second  etcd CPU s/s   round p50 / p99 ms
    0.5 s     50       4.68 -> 2.40              0.088 -> 0.042  3.3 / 12.3 -> 1.1 / 8.1
    0.5 s     100      4.00 -> 2.20              0.098 -> 0.050  6.9 / 907 -> 1.8 / 8.0
    2 s       50       1.90 -> 1.54              0.036 -> 0.020  3.5 / 17.3 -> 1.0 / 5.9
    2 s       100      1.68 -> 1.40              0.051 -> 0.028  3.0 / 13.8 -> 1.1 / 7.6

(0.5 s with 100 keepers: 97 failed attempts before, 0 after; no deadline missed.)

Then the stream on grpc.aio, read on the process's event loop (`store.aioloop`) instead
of a reading thread and gRPC's channel thread per store, 100 keepers, 20 s each:

    interval  CPU ms per keeper-second  round p50 / p99 ms     failed attempts
    0.5 s     1.98 -> 1.46              0.9 / 3.4 -> 0.8 / 2.5  1 -> 0
    2 s       0.82 -> 0.64              1.2 / 3.2 -> 1.1 / 2.6  0 -> 0
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import structlog

from bench.common import md_table, percentile
from bench.scale_metrics import cpu_seconds
from fencing.lease import LeaseKeeper
from lab.localcluster import EtcdCluster, start_etcd
from schemas.models import ClusterConfig
from store.etcd import EtcdStore, StoreUnavailable


def _own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Events:
    """Counts the keepers' log events by name (the keepers log each failed attempt) and
    drops them: thousands of warnings would cost CPU the bench measures."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def processor(self, _logger: Any, _name: str, event: MutableMapping[str, Any]
                  ) -> Mapping[str, Any]:
        with self._lock:
            self.counts[str(event.get("event"))] += 1
        raise structlog.DropEvent


class Keepers:
    """KEEPERS keepers, started spread over one interval (agents do not renew in step)."""

    def __init__(self, cluster: EtcdCluster, cfg: ClusterConfig, n: int) -> None:
        self.cfg = cfg
        self.latencies: list[float] = []
        self.measuring = False
        self.deadlines = 0
        self.gone = 0
        self._lock = threading.Lock()
        self.stores = [EtcdStore(cluster.endpoints) for _ in range(n)]
        self.keepers: list[LeaseKeeper] = []
        for i, store in enumerate(self.stores):
            sent = time.monotonic()
            reg, alive = store.grant_lease(cfg.lease_ttl_s), store.grant_lease(cfg.lease_ttl_s)
            self.keepers.append(LeaseKeeper(
                store, cfg, reg, sent, on_gone=self._gone, on_deadline=self._deadline,
                on_renewed=functools.partial(self._renewed, i), unavailable=StoreUnavailable,
                name=f"bench-{i}", partner=alive, on_partner_gone=lambda _p: self._gone(True)))

    def _renewed(self, i: int) -> None:
        latency = self.keepers[i].last_renew_latency_s
        if self.measuring and latency is not None:
            with self._lock:
                self.latencies.append(latency)

    def _gone(self, _before: bool) -> None:
        with self._lock:
            self.gone += 1

    def _deadline(self) -> None:
        with self._lock:
            self.deadlines += 1

    def start(self) -> None:
        gap = self.cfg.keepalive_interval_s / max(1, len(self.keepers))
        for k in self.keepers:
            k.start()
            time.sleep(gap)

    def stop(self) -> None:
        for k in self.keepers:
            k.stop()
        for s in self.stores:
            s.close()


def run(cluster: EtcdCluster, cfg: ClusterConfig, n: int, seconds: float,
        events: Events) -> dict[str, Any]:
    keepers = Keepers(cluster, cfg, n)
    etcd_pid = cluster.members[0].proc.pid if cluster.members[0].proc else 0
    try:
        keepers.start()
        time.sleep(2 * cfg.keepalive_interval_s)
        events.counts.clear()
        cpu0, etcd0, t0 = _own_cpu(), cpu_seconds(etcd_pid), time.monotonic()
        keepers.measuring = True
        time.sleep(seconds)
        keepers.measuring = False
        cpu, etcd, dt = _own_cpu() - cpu0, cpu_seconds(etcd_pid) - etcd0, time.monotonic() - t0
    finally:
        keepers.stop()
    lat = keepers.latencies
    expected = n * dt / cfg.keepalive_interval_s
    return {
        "keepers": n, "seconds": round(dt, 1),
        "cpu_ms_per_keeper_s": round(1000 * cpu / (n * dt), 3),
        "process_cpu_s_per_s": round(cpu / dt, 3),
        "etcd_cpu_s_per_s": round(etcd / dt, 3),
        "rounds_acknowledged": len(lat), "rounds_expected": round(expected),
        "round_p50_ms": round(1000 * percentile(lat, 50), 1) if lat else None,
        "round_p99_ms": round(1000 * percentile(lat, 99), 1) if lat else None,
        "round_max_ms": None if not lat else round(1000 * max(lat), 1),
        "attempts_failed": events.counts["keepalive_failed"],
        "errors": events.counts["keepalive_error"],
        "deadlines_missed": keepers.deadlines, "leases_gone": keepers.gone,
    }


def report(cfg: ClusterConfig, rows: list[dict[str, Any]]) -> str:
    head = (f"Keepalive cost: 1 etcd member, two leases a keeper in one round, interval "
            f"{cfg.keepalive_interval_s} s, timeout {cfg.keepalive_timeout_s} s")
    table = md_table(
        ["keepers", "CPU ms per keeper-second", "process CPU s/s", "etcd CPU s/s",
         "round p50 ms", "round p99 ms", "rounds acked / expected", "failed attempts",
         "deadlines missed"],
        [[r["keepers"], r["cpu_ms_per_keeper_s"], r["process_cpu_s_per_s"],
          r["etcd_cpu_s_per_s"], r["round_p50_ms"], r["round_p99_ms"],
          f"{r['rounds_acknowledged']} / {r['rounds_expected']}", r["attempts_failed"],
          r["deadlines_missed"]] for r in rows])
    return "\n".join([head, "", *table])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keepers", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=None,
                    help="keepalive_interval_s (default: the default config's)")
    ap.add_argument("--timeout", type=float, default=None, help="keepalive_timeout_s")
    ap.add_argument("--ttl", type=int, default=None, help="lease_ttl_s")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    update = {k: v for k, v in (("keepalive_interval_s", args.interval),
                                ("keepalive_timeout_s", args.timeout),
                                ("lease_ttl_s", args.ttl)) if v is not None}
    cfg = ClusterConfig(**update)
    events = Events()
    structlog.configure(processors=[events.processor])
    cluster = start_etcd(1)
    try:
        rows = [run(cluster, cfg, n, args.seconds, events) for n in args.keepers]
    finally:
        cluster.stop()
    text = report(cfg, rows)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": cfg.model_dump(), "runs": rows}, indent=2))
        args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
