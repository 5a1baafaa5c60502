"""`vmha demo`: a whole cluster on this machine, a drain and a crash, narrated.

Real etcd, two orchestrators, three node agents on the fake hypervisor (each agent's
guard process is the fake "host"; when the agent dies the guard destroys its guests at
the agent's deadline).  `vmha demo` without --fake runs the real-QEMU lab demo.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hypervisor.fake import fake_ground_truth
from lab.configs import LAB_CONFIG
from lab.localcluster import FakeCluster, start_etcd, wait_until
from schemas import Keyspace
from store.etcd import EtcdStore

KS = Keyspace()


def say(msg: str) -> None:
    print(msg, flush=True)


def events(fc: FakeCluster, event: str) -> list[dict[str, Any]]:
    out = []
    for d in [*fc.agents.values(), *fc.orchestrators.values()]:
        for line in d.log_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == event:
                rec["_daemon"] = d.name
                out.append(rec)
    return out


def where(fc: FakeCluster) -> dict[str, list[str]]:
    return fake_ground_truth(fc.fake_root)


def show_vms(fc: FakeCluster) -> None:
    truth = where(fc)
    say("    VM     RUNS ON")
    for vm in sorted(truth):
        say(f"    {vm:<6} {','.join(truth[vm])}")


def run_demo(workdir: Path | None = None) -> int:
    own = workdir is None
    wd = workdir or Path(tempfile.mkdtemp(prefix="vmha-demo-"))
    wd.mkdir(parents=True, exist_ok=True)
    say("== vmha demo: real etcd + 2 orchestrators + 3 node agents (fake hypervisor)")
    t0 = time.monotonic()
    etcd = start_etcd(1)
    fc = FakeCluster(etcd, wd)
    store = EtcdStore(etcd.endpoints)
    summary: list[tuple[str, str]] = []
    try:
        store.put(KS.config, LAB_CONFIG.to_json())
        say(f"-- etcd ready at {etcd.endpoints} in {time.monotonic() - t0:.2f} s; "
            f"lease TTL {LAB_CONFIG.lease_ttl_s} s, fence margin {LAB_CONFIG.fence_margin_s} s")
        for n in ("n1", "n2", "n3"):
            fc.start_agent(n, memory_mib=4096, vcpus=8, migrate_seconds=0.25)
        fc.start_orchestrator("orch-a")
        fc.start_orchestrator("orch-b")
        wait_until(lambda: store.get(KS.leader), 15, what="a leader")
        leader = json.loads(store.get(KS.leader).value)["id"]  # type: ignore[union-attr]
        say(f"-- leader elected: {leader}")
        cli = [sys.executable, "-m", "vmha", "--etcd", etcd.endpoints]
        t = time.monotonic()
        for i in range(6):
            subprocess.run([*cli, "vm", "add", f"vm{i}", "--memory-mib", str(512 + 256 * (i % 3))],
                           check=True, capture_output=True)
        say("-- declared 6 VMs (vm add); waiting for them to run ...")
        wait_until(lambda: len(where(fc)) == 6, 30, what="6 VMs running")
        summary.append(("6 VMs declared, placed and booted", f"{time.monotonic() - t:.2f} s"))
        show_vms(fc)

        victims = sorted(vm for vm, ns in where(fc).items() if "n1" in ns)
        lease = json.loads(store.get(KS.node("n1")).value)["lease_id"]  # type: ignore[union-attr]
        say(f"\n-- DRAIN: etcdctl lease revoke {lease}   (node n1, running {', '.join(victims)})")
        t = time.monotonic()
        subprocess.run(["etcdctl", "--endpoints", etcd.endpoints, "lease", "revoke", lease],
                       check=True, capture_output=True)
        wait_until(lambda: not any("n1" in ns for ns in where(fc).values()), 30,
                   what="n1 empty")
        drain_s = time.monotonic() - t
        for e in events(fc, "migrate_done"):
            say(f"    live-migrated {e['vm']}: n1 -> {e['target']} in {e['wall_s']:.2f} s "
                "(no reboot)")
        say(f"    n1 drained in {drain_s:.2f} s; n1 stays cordoned: "
            f"{store.get(KS.cordon('n1')) is not None}")
        summary.append((f"drain of n1 ({len(victims)} VMs, live migration)", f"{drain_s:.2f} s"))
        show_vms(fc)

        subprocess.run([*cli, "node", "uncordon", "n1"], check=True, capture_output=True)
        say("\n-- vmha node uncordon n1   (n1 may receive VMs again; nothing moves back by itself)")

        victims = sorted(vm for vm, ns in where(fc).items() if "n2" in ns)
        say(f"\n-- CRASH: kill -9 of n2's agent (its guard destroys {', '.join(victims)} "
            "at the deadline)")
        t = time.monotonic()
        crash_wall = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        fc.agents["n2"].kill()
        wait_until(lambda: store.get(KS.node("n2")) is None, 30, what="n2 lease expiry")
        say(f"    n2's lease expired after {time.monotonic() - t:.2f} s; waiting for the fence "
            "window before any cold boot ...")
        wait_until(lambda: all(where(fc).get(v) for v in victims), 30, what="VMs back")
        crash_s = time.monotonic() - t
        fence = json.loads(store.get(KS.fence("n2")).value)  # type: ignore[union-attr]
        say(f"    fence record: method={fence['method']} outcome={fence['outcome']} "
            f"({fence['reason']})")
        for e in events(fc, "boot"):
            if e["vm"] in victims and e["_daemon"] != "n2" and e["timestamp"] >= crash_wall:
                say(f"    cold-booted {e['vm']} on {e['_daemon']}")
        summary.append((f"crash of n2 -> {len(victims)} VMs running elsewhere",
                        f"{crash_s:.2f} s"))
        show_vms(fc)
        doubles = {vm: ns for vm, ns in where(fc).items() if len(ns) > 1}
        say("\n== summary")
        for what, took in summary:
            say(f"    {what:<48} {took:>8}")
        say(f"    VMs running: {len(where(fc))}/6, running twice: {len(doubles)}")
        subprocess.run([*cli, "status"], check=False)
        return 0 if len(where(fc)) == 6 and not doubles else 1
    finally:
        fc.stop()
        store.close()
        etcd.stop()
        if own:
            shutil.rmtree(wd, ignore_errors=True)
        say(f"-- demo finished in {time.monotonic() - t0:.1f} s; all processes stopped")
