"""Live migration over plain TCP against TLS (`migration_tls`) on the lab.

For each variant a two-node lab cluster (real etcd, lab libvirtd nodes, vmha agents,
one orchestrator; the TLS variant with the lab's CA, :mod:`lab.pki`) runs one guest,
and ``vmha vm migrate --wait`` moves it back and forth ``--rounds`` times each way.
Per migration the VM status reports libvirt's completed-job statistics (downtime and
total time, measured by QEMU on the destination) and the bench adds the wall time of
the request.  Root only.

    nice -n 15 python -m bench.migration_tls --rounds 5 --out results/migration-tls.json

The default guest is a tiny BIOS guest (32 MiB, mostly untouched memory), so the
numbers show the fixed costs TLS adds (handshakes, the peer connection), not bulk
encryption throughput; ``--memory-mib`` makes it larger.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import pct
from lab import tiny_guest_xml
from lab.cluster import LabCluster
from lab.configs import FAST_CONFIG
from lab.localcluster import wait_until
from schemas import Keyspace, VmStatus
from schemas.models import MigrationStats
from store.etcd import EtcdStore

KS = Keyspace()
VM = "m0"
NODES = ("n1", "n2")


def _vmha(lc: LabCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmha", "--etcd", lc.endpoints, *args],
                          capture_output=True, text=True, timeout=120, check=False)


def _status(store: EtcdStore) -> VmStatus | None:
    kv = store.get(KS.vm_status(VM))
    return VmStatus.from_json(kv.value) if kv else None


def _running_on(store: EtcdStore, lc: LabCluster) -> str | None:
    st = _status(store)
    truth = lc.ground_truth().get(VM, [])
    if st is not None and st.state == "running" and truth == [st.node]:
        return st.node
    return None


def _arrival_stats(store: EtcdStore, dst: str) -> MigrationStats | None:
    st = _status(store)
    if st is None or st.migration is None or st.migration.target != dst:
        return None
    return st.migration


def run_variant(tls: bool, rounds: int, memory_mib: int, workdir: Path) -> dict[str, Any]:
    lc = LabCluster(workdir / "lab", workdir / "logs", node_names=NODES, tls=tls)
    config = FAST_CONFIG.model_copy(update={"migration_tls": tls})
    lc.start(config.to_json(), orchestrators=1)
    store = EtcdStore(lc.endpoints)
    migrations: list[dict[str, Any]] = []
    try:
        wait_until(lambda: all(store.get(KS.node(n)) for n in NODES), 60, 0.1,
                   "agents registered")
        xml = workdir / f"{VM}.xml"
        xml.write_text(tiny_guest_xml(VM, memory_mib=memory_mib))
        r = _vmha(lc, "vm", "add", VM, "--memory-mib", str(memory_mib), "--xml", str(xml))
        if r.returncode != 0:
            raise RuntimeError(f"vm add: {r.stderr}")
        wait_until(lambda: _running_on(store, lc), 60, 0.1, f"{VM} running")
        for _ in range(2 * rounds):
            src = _running_on(store, lc)
            assert src is not None
            dst = NODES[1] if src == NODES[0] else NODES[0]
            t0 = time.monotonic()
            r = _vmha(lc, "vm", "migrate", VM, "--to", dst, "--wait", "--timeout", "60")
            wall_ms = (time.monotonic() - t0) * 1000.0
            if r.returncode != 0:
                raise RuntimeError(f"migrate {src} -> {dst}: {r.stdout} {r.stderr}")
            # the arrival report carries the completed job's statistics
            stats = wait_until(partial(_arrival_stats, store, dst), 30, 0.1, "migration stats")
            assert stats is not None
            migrations.append({"from": src, "to": dst, "downtime_ms": stats.downtime_ms,
                               "total_ms": stats.total_ms,
                               "request_wall_ms": round(wall_ms, 1)})
            print(f"{'tls' if tls else 'plain'} {src}->{dst}: downtime "
                  f"{stats.downtime_ms} ms, total {stats.total_ms} ms", file=sys.stderr)
    finally:
        store.close()
        lc.stop()
    return {"migrations": migrations, **_summary(migrations)}


def _summary(ms: list[dict[str, Any]]) -> dict[str, Any]:
    def col(key: str) -> list[float]:
        return [float(m[key]) for m in ms if m[key] is not None]

    return {"n": len(ms),
            "downtime_ms_p50": pct(col("downtime_ms"), 50),
            "downtime_ms_max": max(col("downtime_ms"), default=None),
            "total_ms_p50": pct(col("total_ms"), 50),
            "total_ms_max": max(col("total_ms"), default=None),
            "request_wall_ms_p50": pct(col("request_wall_ms"), 50)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=5, help="migrations each way per variant")
    ap.add_argument("--memory-mib", type=int, default=32)
    ap.add_argument("--out", default="results/migration-tls.json")
    args = ap.parse_args(argv)
    result: dict[str, Any] = {
        "command": "python -m bench.migration_tls " + " ".join(argv or sys.argv[1:]),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "guest": {"kind": "tiny BIOS guest", "memory_mib": args.memory_mib},
        "rounds_each_way": args.rounds,
        "started_at": time.time(),
    }
    for variant in ("plain", "tls"):
        with tempfile.TemporaryDirectory(prefix=f"vmha-mig-{variant}-") as tmp:
            result[variant] = run_variant(variant == "tls", args.rounds, args.memory_mib,
                                          Path(tmp))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for variant in ("plain", "tls"):
        s = result[variant]
        print(f"{variant:5}  n={s['n']}  downtime p50 {s['downtime_ms_p50']} ms  "
              f"total p50 {s['total_ms_p50']} ms  request p50 {s['request_wall_ms_p50']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
