"""Benchmark (not a test): crash -> running on keyspace 2 with liveness fencing
(docs/keyspace-v2.md, section 4; part 7's acceptance: p50 <= 5 s at TTL 3).

A keyspace-2 cluster of two nodes on the fake hypervisor (agents with the guard
service, as vmha-guard.service runs them), one orchestrator and one VM, with the test
config (TTL 3 s, keepalive 0.3 s, margin 1.0 s) and `liveness_fence` as given.  Each
round crashes the node the VM runs on: SIGKILL of its agent and its guard service, and
its guests killed (the host lost power); then it waits for the VM to run on the other
node, and restarts the crashed node's guard and agent for the next round.  Measured per
crash: crash -> fence record (`fenced_at`, wall clock) and crash -> the guest running on
the other node (the fake's ground truth, polled every 20 ms), with the fence record's
reason; a DoubleRunChecker samples the fake's guests throughout (0 violations required).

Usage: python -m bench.liveness_crash --mode bounded --crashes 10 --out results/x.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import pct
from cli.common import default_domain_xml
from hypervisor.fake import fake_ground_truth, kill_guests
from lab.configs import FAST_CONFIG
from lab.invariants import DoubleRunChecker, FakeTruth
from lab.localcluster import EtcdCluster, FakeCluster, start_etcd, wait_until
from schemas.keys_v2 import KeyspaceV2
from schemas.models import ClusterConfig, FenceRecord, VmSpec
from schemas.models_v2 import KeyspaceVersion
from store.etcd import EtcdStore

KS = KeyspaceV2()
VM = "web1"
NODES = ("n1", "n2")


def config(mode: str) -> ClusterConfig:
    return FAST_CONFIG.model_copy(update={"liveness_fence": mode})


def start(etcd: EtcdCluster, workdir: Path, mode: str) -> tuple[FakeCluster, EtcdStore]:
    """The cluster on keyspace 2 with `mode`, the VM running."""
    store = EtcdStore(etcd.endpoints)
    store.put(KS.config, config(mode).to_json())
    store.put(KS.version, KeyspaceVersion(keyspace=2, state="done", started_at=time.time(),
                                          by="operator:bench", tool_version="bench").to_json())
    store.put(KS.spec(VM), VmSpec(name=VM, domain_xml=default_domain_xml(VM, 64, 1),
                                  memory_mib=64, vcpus=1).to_json())
    fc = FakeCluster(etcd, workdir, guard_service=True)
    for n in NODES:
        fc.start_agent(n)
    wait_until(lambda: all(store.get(KS.reg(n)) for n in NODES), 30, what="agents registered")
    fc.start_orchestrator("o1")
    wait_until(lambda: running_on(fc) is not None, 30, what=f"{VM} running")
    return fc, store


def running_on(fc: FakeCluster) -> str | None:
    nodes = fake_ground_truth(fc.fake_root).get(VM) or []
    return nodes[0] if len(nodes) == 1 else None


def crash_once(fc: FakeCluster, store: EtcdStore, timeout: float = 40.0) -> dict[str, Any]:
    """Crash the VM's node; the times until its fence record and until the VM runs on
    the other node; then bring the crashed node back (registered, its fence cleared)."""
    victim = running_on(fc)
    assert victim is not None, f"{VM} runs on no single node"
    wall0, t0 = time.time(), time.monotonic()
    fc.agents[victim].kill()
    fc.guards[victim].kill()
    kill_guests(fc.fake_root / victim)
    other = wait_until(lambda: (n := running_on(fc)) is not None and n != victim and n,
                       timeout, interval=0.02, what=f"{VM} running elsewhere")
    t_running = time.monotonic() - t0
    kv = store.get(KS.fence(victim))
    fence = FenceRecord.from_json(kv.value) if kv is not None else None
    out = {"victim": victim, "to": other, "crash_to_running_s": round(t_running, 3),
           "crash_to_fence_s": round(fence.fenced_at - wall0, 3) if fence else None,
           "fence_reason": fence.reason if fence else None}
    fc.start_agent(victim)  # its guard service first, as the units order it
    wait_until(lambda: store.get(KS.reg(victim)) is not None
               and store.get(KS.fence(victim)) is None, timeout,
               what=f"{victim} back and unfenced")
    return out


def run(mode: str, crashes: int, workdir: Path) -> dict[str, Any]:
    etcd = start_etcd(1)
    fc, store = start(etcd, workdir, mode)
    rounds: list[dict[str, Any]] = []
    try:
        with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
            for _ in range(crashes):
                rounds.append(crash_once(fc, store))
                print(json.dumps({"mode": mode, **rounds[-1]}), flush=True)
        versions = store.member_versions(store.members())
    finally:
        fc.stop()
        store.close()
        etcd.stop()
    running = [r["crash_to_running_s"] for r in rounds]
    fences = [r["crash_to_fence_s"] for r in rounds if r["crash_to_fence_s"] is not None]
    return {"mode": mode, "crashes": len(rounds), "etcd_versions": versions,
            "config": json.loads(config(mode).to_json()),
            "crash_to_running_s": {"p50": pct(running, 50), "min": min(running),
                                   "max": max(running)},
            "crash_to_fence_s": {"p50": pct(fences, 50), "min": min(fences),
                                 "max": max(fences)} if fences else None,
            "double_run_violations": len(checker.violations), "samples": checker.samples,
            "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", action="append", choices=["auto", "fast", "bounded", "off"],
                    help="liveness_fence (repeat for several; default bounded and fast)")
    ap.add_argument("--crashes", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = []
    for mode in args.mode or ["bounded", "fast"]:
        with tempfile.TemporaryDirectory(prefix=f"vmha-liveness-{mode}-") as d:
            results.append(run(mode, args.crashes, Path(d)))
    doc = {"bench": "liveness_crash", "at": time.time(), "results": results}
    text = json.dumps(doc, indent=2, sort_keys=True)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps([{k: r[k] for k in ("mode", "crashes", "crash_to_running_s",
                                          "crash_to_fence_s", "double_run_violations")}
                      for r in results], indent=2))


if __name__ == "__main__":
    main()
