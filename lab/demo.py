"""`vmha demo`: the whole story on real QEMU guests, on this machine (root).

A real etcd with authentication on, three lab libvirt nodes (one namespaced libvirtd
each), one node agent per node on its libvirtd, two orchestrators; then four guests:
three tiny BIOS-only ones and one Linux kernel guest whose console prints its uptime
every second.

The cluster runs on keyspace 2 with etcd's auth (docs/keyspace-v2.md, section 5): etcd
serves TLS only to certificates of the lab's etcd CA, each daemon logs in as its own
user (``node-n1``, ``orchestrator``, ...), and `vmha auth setup` ran as root before any
daemon started.  The operator's writes (`vmha vm add`, `vmha node uncordon`) are `vmha`
commands with the operator's certificate, on keyspace 2.

0. **auth**: n1's certificate is refused writing n2's registration and a placement,
   the operator's revoking a node's lease; etcd's revision does not move.
1. **drain**: ``etcdctl lease revoke`` (as root) of the node that runs the Linux guest;
   every VM there live-migrates away.  For each migration the VM's status in etcd carries
   the total time and the downtime (libvirt's job statistics); the Linux guest's uptime
   keeps counting across the move.
2. **crash**: another node dies (its agent, guard, libvirtd and QEMU are SIGKILLed).
   Once its lease has expired and the fence window has passed, its VMs cold-boot
   elsewhere, exactly once.
3. a summary table; then everything is stopped and removed.

Progress is shown while waiting.  Ctrl-C stops and removes everything too.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from lab.cluster import LabCluster
from lab.commands import EXIT_INTERRUPTED, interrupts, say, wait_progress
from lab.configs import LAB_CONFIG
from lab.etcdpki import OPERATOR, ROOT, node_user
from lab.localcluster import poll_until
from schemas.keys_v2 import KeyspaceV2

KS = KeyspaceV2()
TINY = ("web1", "web2", "db1")
LINUX = "linux1"
TINY_MIB = 32
LINUX_MIB = 96


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.wd = workdir
        self.lc = LabCluster(workdir / "nodes", workdir / "logs", etcd_dir=workdir / "etcd",
                             auth=True)
        self.console = workdir / "guests" / f"{LINUX}.console.log"
        self.store: Any = None
        self.timings: list[tuple[str, str]] = []
        self.rows: dict[str, dict[str, Any]] = {}

    # ---- small helpers ---------------------------------------------------------------------

    def etcdctl(self, user: str) -> list[str]:
        """etcdctl on the lab's etcd, logged in as ``user``."""
        from lab.labauth import etcdctl

        assert self.lc.pki is not None
        return etcdctl(self.lc.endpoints, self.lc.pki, user)

    def status(self, vm: str) -> dict[str, Any] | None:
        """The VM's current status: of its nodes' status keys, the one written last."""
        kvs = [kv for n in self.lc.node_names if (kv := self.store.get(KS.status(n, vm)))]
        if not kvs:
            return None
        return dict(json.loads(max(kvs, key=lambda kv: kv.mod_revision).value))

    def truth(self) -> dict[str, list[str]]:
        return self.lc.ground_truth()

    def where(self) -> str:
        truth = self.truth()
        return ", ".join(f"{vm}@{'+'.join(truth.get(vm, [])) or '-'}"
                         for vm in (*TINY, LINUX) if vm in self.rows)

    def uptime(self) -> float | None:
        from lab import guest_uptime

        return guest_uptime(self.console)

    def running_as_reported(self, vms: list[str], avoid: str | None = None) -> bool:
        truth = self.truth()
        for vm in vms:
            st = self.status(vm)
            nodes = truth.get(vm, [])
            if len(nodes) != 1 or nodes[0] == avoid or not st or st["state"] != "running" \
                    or st["node"] != nodes[0]:
                return False
        return True

    def table(self) -> None:
        truth = self.truth()
        say(f"    {'VM':<8} {'GUEST':<14} {'NODE':<5} {'STATUS IN ETCD'}")
        for vm in self.rows:
            st = self.status(vm) or {}
            kind = "Linux kernel" if vm == LINUX else "tiny (BIOS)"
            up = f", uptime {self.uptime():.1f} s" if vm == LINUX and self.uptime() else ""
            say(f"    {vm:<8} {kind:<14} {'+'.join(truth.get(vm, [])) or '-':<5} "
                f"{st.get('state', '-')} on {st.get('node', '-')}{up}")

    # ---- the story ---------------------------------------------------------------------------

    def start(self) -> None:
        from lab import DEFAULT_CACHE, ensure_kernel_artifacts

        t = time.monotonic()
        say("-- preparing the Linux guest's kernel and initramfs (from setup's cache)")
        ensure_kernel_artifacts(DEFAULT_CACHE)
        say("-- starting etcd, 3 libvirt nodes (namespaced libvirtd), 3 agents, "
            "2 orchestrators ...")
        self.lc.start(LAB_CONFIG.to_json())
        self.store = self.lc.store(OPERATOR)

        def ready() -> bool:
            return self.store.get(KS.leader) is not None and all(
                self.store.get(KS.reg(n)) for n in self.lc.node_names)

        wait_progress(ready, 40, "agents registered and a leader elected")
        leader = json.loads(self.store.get(KS.leader).value)["id"]
        say(f"    etcd {self.lc.endpoints}; nodes {', '.join(self.lc.node_names)}; "
            f"leader {leader}; lease TTL {LAB_CONFIG.lease_ttl_s} s, fence margin "
            f"{LAB_CONFIG.fence_margin_s} s  ({time.monotonic() - t:.1f} s)")
        say(f"    etcd: TLS, client certificates, auth on; keyspace 2; users by CN: root, "
            f"orchestrator, operator, monitoring, {', '.join(map(node_user, self.lc.node_names))}"
            f" (CA and certificates in {self.lc.pki.dir if self.lc.pki else '-'})")
        say(f"    look around in another shell:  {' '.join(self.etcdctl(OPERATOR))} get "
            "--prefix /vmha/ --keys-only")
        self.timings.append(("lab up (etcd with auth, 3 libvirtd, 3 agents, 2 orchestrators)",
                             f"{time.monotonic() - t:.1f} s"))

    def auth(self) -> None:
        from lab.labauth import refusals

        assert self.lc.pki is not None
        n1, n2 = self.lc.node_names[:2]
        say(f"\n-- AUTH: each daemon writes only its own keys (CN={node_user(n1)} is "
            f"{n1}'s agent and guard)")
        for line in refusals(self.lc.endpoints, self.lc.prefix, self.lc.pki, n1, n2):
            say(f"    {line}")

    def boot(self) -> None:
        from lab import DEFAULT_CACHE, kernel_guest_xml, tiny_guest_xml

        t = time.monotonic()
        guests = self.wd / "guests"
        guests.mkdir(parents=True, exist_ok=True)
        say(f"\n-- BOOT: the operator adds {' '.join(TINY)} (tiny, {TINY_MIB} MiB) and {LINUX} "
            f"(Linux, {LINUX_MIB} MiB): `vmha vm add` with CN={OPERATOR} ({KS.spec('VM')})")
        for vm in TINY:
            (guests / f"{vm}.xml").write_text(tiny_guest_xml(vm, TINY_MIB))
            self.add(vm, TINY_MIB, guests / f"{vm}.xml")
        wait_progress(lambda: self.running_as_reported(list(TINY)), 60, "tiny guests running",
                      self.where)
        (guests / f"{LINUX}.xml").write_text(
            kernel_guest_xml(LINUX, DEFAULT_CACHE, self.console, LINUX_MIB))
        self.add(LINUX, LINUX_MIB, guests / f"{LINUX}.xml")
        wait_progress(lambda: self.running_as_reported([LINUX]) and (self.uptime() or 0) >= 5,
                      90, f"{LINUX} to boot Linux (TCG, no KVM) and run 5 s",
                      lambda: f"{self.where()}; console: {self.uptime() or 'booting'}")
        for vm in self.rows:
            self.rows[vm]["booted_on"] = self.truth()[vm][0]
        self.timings.append(("4 guests declared, placed, booted",
                             f"{time.monotonic() - t:.1f} s"))
        self.table()

    def vmha(self, *args: str) -> str:
        """`vmha ARGS` as the operator (its certificate); its output."""
        from lab.labauth import vmha_as

        assert self.lc.pki is not None
        return vmha_as(self.lc.endpoints, self.lc.prefix, self.lc.pki, OPERATOR, *args)

    def add(self, vm: str, mib: int, xml: Path) -> None:
        """`vmha vm add` as the operator."""
        self.vmha("vm", "add", vm, "--memory-mib", str(mib), "--xml", str(xml))
        self.rows[vm] = {"guest": "Linux" if vm == LINUX else "tiny"}

    def drain(self) -> str:
        from lab import wait_guest_uptime

        node = self.truth()[LINUX][0]
        victims = sorted(vm for vm, ns in self.truth().items() if node in ns)
        reg = self.store.get(KS.reg(node))
        assert reg is not None
        lease = f"{reg.lease:x}"
        revoke = [*self.etcdctl(ROOT), "lease", "revoke", lease]
        say(f"\n-- DRAIN {node} (runs {', '.join(victims)}): revoke its etcd lease (root)")
        say(f"    $ {' '.join(revoke)}")
        before = self.uptime()
        t = time.monotonic()
        subprocess.run(revoke, check=True, capture_output=True, timeout=30)

        def done() -> bool:
            return not self.lc.node_domains(node) and self.running_as_reported(victims, node)

        wait_progress(done, 90, f"{node} to drain by live migration", self.where)
        drain_s = time.monotonic() - t
        # the arrival reports carry the statistics; give a late one a moment
        poll_until(lambda: all((self.status(vm) or {}).get("migration") for vm in victims),
                   5.0, 0.1)
        for vm in victims:
            st = self.status(vm) or {}
            mig = st.get("migration") or {}
            self.rows[vm].update(migrated=f"{mig.get('source')} -> {mig.get('target')}",
                                 total_ms=mig.get("total_ms"), downtime_ms=mig.get("downtime_ms"))
            say(f"    live-migrated {vm:<7} {mig.get('source')} -> {mig.get('target')}: "
                f"downtime {_ms(mig.get('downtime_ms'))}, total {_ms(mig.get('total_ms'))} "
                f"(status.migration in etcd)")
        if before is not None:
            # the guest prints once a second: wait for a line written on the new node
            after = wait_guest_uptime(self.console, before + drain_s + 1.0, 20)
            elapsed = time.monotonic() - t
            say(f"    {LINUX} uptime (from its serial console) before the drain {before:.1f} s, "
                f"{elapsed:.1f} s later {after:.1f} s: the same kernel kept running, no reboot")
            self.rows[LINUX]["uptime"] = (f"{before:.1f} s -> {after:.1f} s over "
                                          f"{elapsed:.1f} s")
        cordoned = self.store.get(KS.cordon(node)) is not None
        say(f"    {node} drained in {drain_s:.1f} s; it stays cordoned ({cordoned}) until "
            f"the operator deletes {KS.cordon(node)} (`vmha node uncordon {node}`)")
        self.timings.append((f"drain of {node}: {len(victims)} live migrations",
                             f"{drain_s:.1f} s"))
        self.table()
        out = self.vmha("node", "uncordon", node)
        say(f"\n-- vmha node uncordon {node} as {OPERATOR}: {out.strip()} "
            "(nothing moves back by itself)")
        return node

    def crash(self, drained: str) -> None:
        truth = self.truth()
        load = {n: [vm for vm, ns in truth.items() if n in ns] for n in self.lc.node_names
                if n != drained}
        # the busiest node, preferring one without the Linux guest
        node = max(sorted(load), key=lambda n: (len(load[n]) > 0, LINUX not in load[n],
                                                len(load[n])))
        victims = sorted(load[node])
        say(f"\n-- CRASH {node} (runs {', '.join(victims) or 'nothing'}): kill -9 of its "
            "agent and guard, SIGKILL of its libvirtd and QEMU processes")
        t = time.monotonic()
        self.lc.crash_host(node)
        marks: dict[str, float] = {}

        def phase() -> str:
            if "lease" not in marks and self.store.get(KS.reg(node)) is None:
                marks["lease"] = time.monotonic() - t
            if "fence" not in marks and self.store.get(KS.fence(node)) is not None:
                marks["fence"] = time.monotonic() - t
            if "fence" in marks:
                return f"fenced at {marks['fence']:.1f} s; cold boots: {self.where()}"
            if "lease" in marks:
                return f"lease expired at {marks['lease']:.1f} s; fence window running"
            return f"lease of {node} still alive (TTL {LAB_CONFIG.lease_ttl_s} s)"

        def back() -> bool:
            phase()
            return self.running_as_reported(victims, node)

        crash_s = wait_progress(back, 90, f"{node}'s VMs to run elsewhere", phase)
        fence_kv = self.store.get(KS.fence(node))
        fence = json.loads(fence_kv.value) if fence_kv else {}
        say(f"    lease expired after {marks.get('lease', 0):.1f} s, fence record after "
            f"{marks.get('fence', 0):.1f} s: method={fence.get('method')} "
            f"outcome={fence.get('outcome')}")
        truth = self.truth()
        for vm in victims:
            say(f"    cold-booted {vm} on {truth[vm][0]} (after the fence record, once)")
            self.rows[vm]["crash"] = f"{node} -> {truth[vm][0]} (cold boot)"
        if LINUX in victims:
            say(f"    {LINUX} rebooted: its uptime starts again ({self.uptime()})")
        say(f"    crash -> all {len(victims)} VMs running elsewhere: {crash_s:.1f} s")
        self.timings.append((f"crash of {node} -> {len(victims)} VMs running elsewhere",
                             f"{crash_s:.1f} s"))
        self.table()

    def summary(self, total: float) -> int:
        truth = self.truth()
        doubles = {vm: ns for vm, ns in truth.items() if len(ns) > 1}
        say("\n== summary")
        say(f"    {'VM':<8} {'GUEST':<6} {'BOOTED':<7} {'LIVE MIGRATION':<16} {'DOWNTIME':>9} "
            f"{'TOTAL':>9}  {'CRASH':<24} {'NOW':<5}")
        for vm, r in self.rows.items():
            say(f"    {vm:<8} {r['guest']:<6} {r.get('booted_on', '-'):<7} "
                f"{r.get('migrated', '-'):<16} {_ms(r.get('downtime_ms')):>9} "
                f"{_ms(r.get('total_ms')):>9}  {r.get('crash', '-'):<24} "
                f"{'+'.join(truth.get(vm, [])) or '-':<5}")
        downs = [r["downtime_ms"] for r in self.rows.values() if r.get("downtime_ms") is not None]
        if downs:
            say(f"    migration downtime: median {statistics.median(downs):.0f} ms, "
                f"max {max(downs):.0f} ms")
        if LINUX in self.rows and self.rows[LINUX].get("uptime"):
            say(f"    {LINUX} uptime across its live migration: {self.rows[LINUX]['uptime']}")
        for what, took in self.timings:
            say(f"    {what:<56} {took:>8}")
        say(f"    {'whole demo so far':<56} {total:>6.1f} s")
        ok = len(truth) == len(self.rows) and not doubles
        say(f"    VMs running: {len(truth)}/{len(self.rows)}; running on two nodes at once: "
            f"{len(doubles)}  -> {'OK' if ok else 'FAILED'}")
        return 0 if ok else 1


def _ms(v: object) -> str:
    return f"{v:.0f} ms" if isinstance(v, int | float) else "-"


def run_lab_demo(workdir: Path | None = None) -> int:
    own = workdir is None
    wd = (workdir or Path(tempfile.mkdtemp(prefix="vmha-demo-", dir="/var/tmp"))).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    say("== vmha demo: real etcd with auth on, 3 libvirt nodes with QEMU guests, 3 node "
        f"agents, 2 orchestrators, on keyspace 2 (work dir {wd})")
    demo = Demo(wd)
    rc = 1
    with interrupts():
        try:
            demo.start()
            demo.auth()
            demo.boot()
            drained = demo.drain()
            demo.crash(drained)
            rc = demo.summary(time.monotonic() - t0)
        except KeyboardInterrupt:
            say("\ninterrupted")
            rc = EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - reported, then everything is torn down
            say(f"\ndemo failed: {type(exc).__name__}: {exc}")
            say(f"    logs: {wd / 'logs'} (kept)")
            own = False
        finally:
            say("-- stopping every process the demo started ...")
            if demo.store is not None:
                demo.store.close()
            demo.lc.stop()
            if own:
                shutil.rmtree(wd, ignore_errors=True)
            say(f"-- demo finished in {time.monotonic() - t0:.1f} s; all processes stopped"
                + (f", {wd} removed" if own else ""))
    return rc
