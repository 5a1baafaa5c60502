"""`vmha demo`: a whole cluster on this machine, a drain and a crash, narrated.

Real etcd, two orchestrators, three node agents on the fake hypervisor (each agent's
guard process is the fake "host"; when the agent dies the guard destroys its guests at
the agent's deadline).  `vmha demo` without --fake runs the real-QEMU lab demo.

As the lab demo, it runs with etcd's auth on, on keyspace 2 (lab.labauth): each daemon
logs in with a certificate of its own, the operator's writes (`vmha vm add`, `vmha node
uncordon`) are `vmha` commands with the operator's certificate, the drain's revoke is
root's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from hypervisor.fake import fake_ground_truth
from lab.configs import LAB_CONFIG
from lab.etcdpki import OPERATOR, ROOT, EtcdPki
from lab.labauth import enable_auth, etcdctl, refusals, vmha_as
from lab.localcluster import FakeCluster, start_etcd, wait_until
from schemas.keys_v2 import KeyspaceV2
from store.etcd import EtcdStore

KS = KeyspaceV2()
NODES = ("n1", "n2", "n3")


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


def status(store: EtcdStore, vm: str) -> dict[str, Any]:
    """The VM's current status: of its nodes' status keys, the one written last."""
    kvs = [kv for n in NODES if (kv := store.get(KS.status(n, vm)))]
    if not kvs:
        return {}
    return dict(json.loads(max(kvs, key=lambda kv: kv.mod_revision).value))


def show_vms(fc: FakeCluster, store: EtcdStore | None = None) -> None:
    truth = where(fc)
    say("    VM     RUNS ON" + ("  STATUS IN ETCD" if store else ""))
    for vm in sorted(truth):
        st = status(store, vm) if store else {}
        say(f"    {vm:<6} {','.join(truth[vm]):<7}"
            + (f"  {st.get('state', '-')} on {st.get('node', '-')}" if store else ""))


def run_demo(workdir: Path | None = None) -> int:
    own = workdir is None
    wd = workdir or Path(tempfile.mkdtemp(prefix="vmha-demo-"))
    wd.mkdir(parents=True, exist_ok=True)
    say("== vmha demo: real etcd with auth on + 2 orchestrators + 3 node agents "
        "(fake hypervisor), keyspace 2")
    t0 = time.monotonic()
    pki = EtcdPki(wd)
    etcd = start_etcd(1, tls=pki.server(["127.0.0.1"]))
    fc = FakeCluster(etcd, wd, pki=pki)
    store = EtcdStore(etcd.endpoints, tls=pki.client(OPERATOR))
    summary: list[tuple[str, str]] = []
    try:
        root = EtcdStore(etcd.endpoints, tls=pki.client(ROOT))
        try:
            root.put(KS.config, LAB_CONFIG.to_json())
        finally:
            root.close()
        enable_auth(etcd.endpoints, KS.prefix, pki, NODES, wd / "auth-setup.log")
        say(f"-- etcd ready at {etcd.endpoints} in {time.monotonic() - t0:.2f} s: TLS, a "
            "certificate per user, auth on (vmha auth setup as root); "
            f"lease TTL {LAB_CONFIG.lease_ttl_s} s, fence margin {LAB_CONFIG.fence_margin_s} s")
        for n in NODES:
            fc.start_agent(n, memory_mib=4096, vcpus=8, migrate_seconds=0.25)
        fc.start_orchestrator("orch-a")
        fc.start_orchestrator("orch-b")
        wait_until(lambda: store.get(KS.leader) and all(store.get(KS.reg(n)) for n in NODES),
                   15, what="a leader and every agent registered")
        leader = json.loads(store.get(KS.leader).value)["id"]  # type: ignore[union-attr]
        say(f"-- leader elected: {leader}")
        say("\n-- AUTH: each daemon writes only its own keys (CN=node-n1 is n1's agent)")
        for line in refusals(etcd.endpoints, KS.prefix, pki, "n1", "n2"):
            say(f"    {line}")
        t = time.monotonic()
        say(f"\n-- vmha vm add vm0 .. vm5 as {OPERATOR} (keyspace 2: {KS.spec('VM')})")
        for i in range(6):
            vm, mib = f"vm{i}", 512 + 256 * (i % 3)
            out = vmha_as(etcd.endpoints, KS.prefix, pki, OPERATOR, "vm", "add", vm,
                          "--memory-mib", str(mib))
            say(f"    $ vmha vm add {vm} --memory-mib {mib}: {out.strip()}")
        say("-- declared 6 VMs; waiting for them to run ...")
        wait_until(lambda: len(where(fc)) == 6, 30, what="6 VMs running")
        summary.append(("6 VMs declared, placed and booted", f"{time.monotonic() - t:.2f} s"))
        show_vms(fc, store)

        victims = sorted(vm for vm, ns in where(fc).items() if "n1" in ns)
        lease = f"{store.get(KS.reg('n1')).lease:x}"  # type: ignore[union-attr]
        say(f"\n-- DRAIN: etcdctl lease revoke {lease} as {ROOT}   (node n1, running "
            f"{', '.join(victims)})")
        t = time.monotonic()
        subprocess.run([*etcdctl(etcd.endpoints, pki, ROOT), "lease", "revoke", lease],
                       check=True, capture_output=True, timeout=30)
        wait_until(lambda: not any("n1" in ns for ns in where(fc).values()), 30,
                   what="n1 empty")
        drain_s = time.monotonic() - t
        for e in events(fc, "migrate_done"):
            say(f"    live-migrated {e['vm']}: n1 -> {e['target']} in {e['wall_s']:.2f} s "
                "(no reboot)")
        say(f"    n1 drained in {drain_s:.2f} s; n1 stays cordoned: "
            f"{store.get(KS.cordon('n1')) is not None}")
        summary.append((f"drain of n1 ({len(victims)} VMs, live migration)", f"{drain_s:.2f} s"))
        show_vms(fc, store)

        out = vmha_as(etcd.endpoints, KS.prefix, pki, OPERATOR, "node", "uncordon", "n1")
        say(f"\n-- vmha node uncordon n1 as {OPERATOR}: {out.strip()}   (n1 may receive VMs "
            "again; nothing moves back by itself)")

        victims = sorted(vm for vm, ns in where(fc).items() if "n2" in ns)
        say(f"\n-- CRASH: kill -9 of n2's agent (its guard destroys {', '.join(victims)} "
            "at the deadline)")
        t = time.monotonic()
        crash_wall = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        fc.agents["n2"].kill()
        wait_until(lambda: store.get(KS.reg("n2")) is None, 30, what="n2 lease expiry")
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
        show_vms(fc, store)
        doubles = {vm: ns for vm, ns in where(fc).items() if len(ns) > 1}
        say("\n== summary")
        for what, took in summary:
            say(f"    {what:<48} {took:>8}")
        say(f"    VMs running: {len(where(fc))}/6, running twice: {len(doubles)}")
        return 0 if len(where(fc)) == 6 and not doubles else 1
    finally:
        fc.stop()
        store.close()
        etcd.stop()
        if own:
            shutil.rmtree(wd, ignore_errors=True)
        say(f"-- demo finished in {time.monotonic() - t0:.1f} s; all processes stopped")
