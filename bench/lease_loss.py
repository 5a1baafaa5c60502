"""Benchmark (not a test): lease loss -> placement written -> VM running elsewhere.

Fake hypervisor, real etcd, real daemons as processes.  Two kinds of trial:

* drain: the node's lease is revoked (what `etcdctl lease revoke` does); measured from
  the revoke to the leader's placement and to the VM reported running on its new node.
* crash: the node's agent is killed (-9); measured from the moment the lease is seen
  expired (its registration key disappears) to the placement and to running elsewhere.
  This includes the configured fence margin by design.

Usage: python -m bench.lease_loss --trials 50 --out results/bench-lease-loss.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import percentile
from cli.common import default_domain_xml
from hypervisor.fake import fake_ground_truth
from lab.configs import FAST_CONFIG
from lab.localcluster import FakeCluster, running_fake_cluster, wait_until
from schemas import Keyspace, VmSpec, VmStatus
from store.etcd import EtcdStore

KS = Keyspace()
CONFIG = FAST_CONFIG
POLL = 0.002


def stats(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50_ms": round(percentile(xs, 50) * 1000, 1),
            "p99_ms": round(percentile(xs, 99) * 1000, 1), "min_ms": round(min(xs) * 1000, 1),
            "max_ms": round(max(xs) * 1000, 1), "mean_ms": round(statistics.mean(xs) * 1000, 1)}


def node_of(fc: FakeCluster, vm: str) -> str:
    nodes = fake_ground_truth(fc.fake_root).get(vm) or []
    assert len(nodes) == 1, nodes
    return nodes[0]


def placement_rev(store: EtcdStore, vm: str) -> int:
    kv = store.get(KS.vm_placement(vm))
    return kv.mod_revision if kv else 0


def running_elsewhere(store: EtcdStore, fc: FakeCluster, vm: str, old: str) -> bool:
    kv = store.get(KS.vm_status(vm))
    if kv is None:
        return False
    st = VmStatus.from_json(kv.value)
    truth = fake_ground_truth(fc.fake_root).get(vm) or []
    return st.node != old and st.state == "running" and truth == [st.node]


def wait(pred: Any, timeout: float = 30.0) -> float:
    wait_until(pred, timeout, POLL)
    return time.monotonic()


def trial_drain(store: EtcdStore, fc: FakeCluster, vm: str) -> tuple[float, float]:
    old = node_of(fc, vm)
    rev = placement_rev(store, vm)
    lease = int(json.loads(store.get(KS.node(old)).value)["lease_id"], 16)  # type: ignore[union-attr]
    t0 = time.monotonic()
    store.revoke_lease(lease)
    t1 = wait(lambda: placement_rev(store, vm) != rev)
    t2 = wait(lambda: running_elsewhere(store, fc, vm, old))
    store.delete(KS.cordon(old))
    wait_until(lambda: (kv := store.get(KS.node(old))) and not json.loads(kv.value)["cordoned"],
               15, POLL)
    return t1 - t0, t2 - t0


def trial_crash(store: EtcdStore, fc: FakeCluster, vm: str) -> tuple[float, float]:
    old = node_of(fc, vm)
    rev = placement_rev(store, vm)
    fc.agents[old].kill()
    t0 = wait(lambda: store.get(KS.node(old)) is None)
    t1 = wait(lambda: placement_rev(store, vm) != rev)
    t2 = wait(lambda: running_elsewhere(store, fc, vm, old))
    fc.start_agent(old)
    wait_until(lambda: store.get(KS.node(old)) is not None, 15, POLL)
    return t1 - t0, t2 - t0


def run_trials(store: EtcdStore, fc: FakeCluster, trials: int) -> dict[str, Any]:
    store.put(KS.vm_spec("b0"), VmSpec(name="b0", domain_xml=default_domain_xml("b0", 256, 1),
                                       memory_mib=256, vcpus=1).to_json())
    wait_until(lambda: fake_ground_truth(fc.fake_root).get("b0"), 20, POLL)
    results: dict[str, Any] = {"config": CONFIG.model_dump(by_alias=True),
                               "hypervisor": "fake (processes), real etcd 1 member"}
    for kind, fn in (("drain", trial_drain), ("crash", trial_crash)):
        to_place, to_run = [], []
        for i in range(trials):
            a, b = fn(store, fc, "b0")
            to_place.append(a)
            to_run.append(b)
            print(f"{kind} {i + 1}/{trials}: placement {a * 1000:.1f} ms, "
                  f"running {b * 1000:.1f} ms", file=sys.stderr, flush=True)
        results[kind] = {"lease_loss_to_placement": stats(to_place),
                         "lease_loss_to_running_elsewhere": stats(to_run)}
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--out", default="results/bench-lease-loss.json")
    args = ap.parse_args(argv)
    wd = Path(tempfile.mkdtemp(prefix="vmha-bench-"))
    with running_fake_cluster(CONFIG.to_json(), wd, migrate_seconds=0.05) as (fc, store):
        results = run_trials(store, fc, args.trials)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0

if __name__ == "__main__":
    sys.exit(main())
