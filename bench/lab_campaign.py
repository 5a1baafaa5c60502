"""Fault campaign on the lab: seeded, repeatable random faults against real QEMU guests.

Like :mod:`bench.campaign`, but on :class:`lab.cluster.LabCluster`: real
etcd, three lab libvirt nodes (namespaced libvirtd, QEMU), vmha agents with the
libvirt adapter, two orchestrators, and a handful of tiny 32 MiB guests.  Root only.

Invariants, from ground truth (every libvirtd asked directly) and etcd history:

I1  at most one running instance per VM: ground truth polled every ~50 ms in a
    thread; a VM counts as double only if seen running on two nodes in two
    consecutive polls (a live migration's switch-over can fall between the reads
    of one poll);
I2  every declared VM runs again within ``--converge`` seconds after each fault;
I3  every placement (and leader fence record) in etcd's history carries the epoch of
    the leader key that existed at that revision; every status was written while its
    node was registered (:class:`bench.campaign.HistoryChecker`, a watch from rev 1);
I4  a VM that is not running at the end of a step has a visible ``pending``
    placement with a reason (else it is missing without a reason).

Faults: kill -9 of an agent (its guard fences the node's domains), SIGSTOP of an
agent past the TTL then SIGCONT, a host crash (libvirtd + QEMU SIGKILL, agent
killed) then the node and agent back, kill -9 of the leader orchestrator, a drain by
lease revoke then ``vmha node uncordon``, and the destination libvirtd killed during
a drain's live migrations then restarted.  Dead daemons are restarted the way
systemd would (Restart=always, 0.5 s) unless the fault holds them down.

    python -m bench.lab_campaign --seed 1 --faults 30
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from bench.campaign import HistoryChecker, pct
from lab import tiny_guest_xml
from lab.cluster import LabCluster, kill_with_children
from schemas import ClusterConfig, Keyspace
from store.etcd import EtcdStore, StoreUnavailable

KS = Keyspace()
#: libvirt's "no limit" for migrateSetMaxSpeed (MiB/s)
UNLIMITED_MIB_S = 8796093022207
FAULTS = ("kill_agent", "stop_agent", "crash_host", "kill_leader", "drain_revoke",
          "migration_dst_crash")

#: tests/conftest.py's TEST_CONFIG timings.
CONFIG = ClusterConfig(lease_ttl_s=2, keepalive_interval_s=0.4, self_fence_safety_s=0.5,
                       fence_margin_s=1.0, stop_timeout_s=2.0)


class LabPoller:
    """I1: ground truth every ~50 ms; a double must persist over two consecutive polls."""

    def __init__(self, lc: LabCluster, interval: float = 0.05) -> None:
        self.lc = lc
        self.interval = interval
        self.samples = 0
        self.transient_doubles = 0
        self.violations: list[dict[str, Any]] = []
        self.truth: dict[str, list[str]] = {}
        self.history: list[tuple[float, dict[str, list[str]]]] = []
        self._prev: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LabPoller:
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                truth = self.lc.ground_truth()
            except Exception:  # noqa: BLE001 - a node being torn down mid-read
                self._stop.wait(self.interval)
                continue
            doubles = {vm: ns for vm, ns in truth.items() if len(ns) > 1}
            for vm, ns in doubles.items():
                prev = self._prev.get(vm, [])
                common = sorted(set(ns) & set(prev))
                if len(prev) > 1 and len(common) > 1:
                    self.violations.append({"invariant": "I1", "vm": vm, "nodes": common,
                                            "at": time.time()})
                else:
                    self.transient_doubles += 1
            self._prev = doubles
            self.truth = truth
            self.history.append((t, truth))
            if len(self.history) > 20000:
                del self.history[:10000]
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)


@dataclass
class StepResult:
    step: int
    kind: str
    target: str
    started: float
    duration_s: float = 0.0
    converged: bool = True
    recovery_s: dict[str, float] = field(default_factory=dict)
    affected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class LabCampaign:
    def __init__(self, seed: int, workdir: Path, vms: int = 5, converge_s: float = 60.0,
                 verbose: bool = True) -> None:
        self.seed = seed
        # The fault kinds follow from the seed alone; targets are drawn from the nodes
        # that run VMs at the time, durations from a per-step generator.
        self.rng = random.Random(seed)
        self.node_rng = random.Random(seed + 1_000_003)
        self.step_rng = random.Random(seed)
        self.workdir = workdir
        self.vms = [f"vm{i}" for i in range(vms)]
        self.converge_s = converge_s
        self.verbose = verbose
        self.lc = LabCluster(workdir / "lab", workdir / "logs")
        self.store: EtcdStore | None = None
        self.history: HistoryChecker | None = None
        self.poller: LabPoller | None = None
        self.held: set[str] = set()
        self.results: list[StepResult] = []
        self.i4: list[dict[str, Any]] = []
        self.restarts = {"agent": 0, "orchestrator": 0}
        self._sup_stop = threading.Event()
        self._dead_since: dict[str, float] = {}
        self._sup_lock = threading.Lock()

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[lab seed {self.seed} {time.strftime('%H:%M:%S')}] {msg}",
                  file=sys.stderr, flush=True)

    # ---- set-up ------------------------------------------------------------------------

    def vmha(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmha", "--etcd",
                               self.lc.endpoints, *args], capture_output=True, text=True,
                              timeout=60)

    def start(self) -> None:
        self.lc.start(CONFIG.to_json())
        self.store = EtcdStore(self.lc.endpoints, retry_budget=2.0, timeout=2.0)
        self.history = HistoryChecker(EtcdStore(self.lc.endpoints, retry_budget=2.0,
                                                timeout=2.0))
        self.history.ensure()
        for vm in self.vms:
            x = self.workdir / f"{vm}.xml"
            x.write_text(tiny_guest_xml(vm))
            r = self.vmha("vm", "add", vm, "--memory-mib", "32", "--xml", str(x))
            if r.returncode != 0:
                raise RuntimeError(f"vm add {vm}: {r.stderr}")
        self.poller = LabPoller(self.lc).start()
        threading.Thread(target=self._supervise, daemon=True).start()
        if not self.wait_settled(90):
            raise RuntimeError(f"lab cluster did not come up: {self.lc.ground_truth()}")
        self.log("cluster up")

    def _supervise(self) -> None:
        """systemd's Restart=always, RestartSec=0.5, for agents and orchestrators."""
        while not self._sup_stop.wait(0.1):
            with self._sup_lock:
                for kind, ds in (("agent", self.lc.agents), ("orchestrator",
                                                             self.lc.orchestrators)):
                    for n, d in list(ds.items()):
                        if n in self.held or d.alive():
                            self._dead_since.pop(n, None)
                            continue
                        since = self._dead_since.setdefault(n, time.monotonic())
                        if time.monotonic() - since >= 0.5:
                            self._dead_since.pop(n, None)
                            self.restarts[kind] += 1
                            if kind == "agent":
                                self.lc.start_agent(n)
                            else:
                                self.lc.start_orchestrator(n)

    def stop(self) -> None:
        self._sup_stop.set()
        if self.poller:
            self.poller.stop()
        for s in (self.store, self.history.store if self.history else None):
            if s is not None:
                with contextlib.suppress(Exception):  # tear-down goes on
                    s.close()
        self.lc.stop()

    # ---- observation -------------------------------------------------------------------

    def truth(self) -> dict[str, list[str]]:
        return self.lc.ground_truth()

    def get_json(self, key: str) -> dict[str, Any] | None:
        assert self.store is not None
        try:
            kv = self.store.get(key)
        except StoreUnavailable:
            return None
        return dict(json.loads(kv.value)) if kv else None

    def leader(self) -> str | None:
        d = self.get_json(KS.leader)
        return str(d["id"]) if d else None

    def registrations(self) -> dict[str, dict[str, Any]]:
        assert self.store is not None
        try:
            return {kv.key.rsplit("/", 1)[1]: json.loads(kv.value)
                    for kv in self.store.get_prefix(KS.prefix + "/nodes/")}
        except StoreUnavailable:
            return {}

    def cordoned(self) -> list[str]:
        return [n for n in self.lc.node_names if self.get_json(KS.cordon(n)) is not None]

    def vms_on(self, n: str) -> list[str]:
        return sorted(vm for vm, ns in self.truth().items() if n in ns)

    def leader_rev(self) -> int | None:
        assert self.store is not None
        try:
            kv = self.store.get(KS.leader)
        except StoreUnavailable:
            return None
        return int(kv.create_revision) if kv else None

    def settled(self, replaced: dict[str, Any], old_leader: int | None) -> bool:
        truth = self.truth()
        if not all(len(truth.get(vm, [])) == 1 for vm in self.vms):
            return False
        if not all(d.alive() for d in self.lc.agents.values()):
            return False
        regs = self.registrations()
        if not set(regs) >= set(self.lc.node_names):
            return False
        if any(regs[n].get("lease_id") == lease for n, lease in replaced.items()):
            return False  # the faulted agent's old registration is still there
        rev = self.leader_rev()
        return rev is not None and rev != old_leader

    def wait_settled(self, timeout: float, t0: float | None = None,
                     rec: StepResult | None = None, replaced: dict[str, Any] | None = None,
                     old_leader: int | None = None, min_wait: float = 0.0,
                     stable_s: float = 1.5) -> bool:
        """Every declared VM runs on exactly one node, every agent alive and registered
        (the faulted ones with a new lease), a (new, after kill_leader) leader; not
        before ``min_wait`` s (a fault's effects show only after the lease TTL and the
        fence window) and held for ``stable_s``.  Per VM, recovery runs from ``t0`` to
        the first poll that sees it running again after one that saw it down."""
        start = time.monotonic()
        end = start + timeout
        ok_since: float | None = None
        while time.monotonic() < end:
            now = time.monotonic()
            if self.settled(replaced or {}, old_leader):
                ok_since = ok_since if ok_since is not None else now
                if now - start >= min_wait and now - ok_since >= stable_s:
                    break
            else:
                ok_since = None
            time.sleep(0.1)
        else:
            return False
        if rec is not None and t0 is not None and self.poller is not None:
            hist = [(t, tr) for t, tr in list(self.poller.history) if t >= t0]
            for vm in self.vms:
                down_seen = False
                for t, tr in hist:
                    if len(tr.get(vm, [])) != 1:
                        down_seen = True
                    elif down_seen:
                        rec.recovery_s[vm] = round(t - t0, 3)
                        break
            rec.affected = sorted(rec.recovery_s)
        return True

    def check_i4(self, rec: StepResult) -> None:
        truth = self.truth()
        for vm in self.vms:
            if len(truth.get(vm, [])) == 1:
                continue
            p = self.get_json(KS.vm_placement(vm))
            if not (p and p.get("kind") == "pending" and p.get("reason")):
                self.i4.append({"invariant": "I4", "step": rec.step, "vm": vm,
                                "placement": p, "truth": truth.get(vm)})

    # ---- faults ------------------------------------------------------------------------

    def revoke(self, node: str) -> bool:
        reg = self.registrations().get(node)
        if reg is None:
            return False
        subprocess.run(["etcdctl", "--endpoints", self.lc.endpoints, "lease", "revoke",
                        str(reg["lease_id"])], capture_output=True, timeout=20)
        return True

    def uncordon(self, node: str, rec: StepResult) -> None:
        r = self.vmha("node", "uncordon", node)
        if r.returncode != 0:
            rec.notes.append(f"uncordon {node}: rc={r.returncode} {r.stderr.strip()[-200:]}")

    def step(self, i: int) -> StepResult:
        assert self.history is not None
        kind = self.rng.choice(FAULTS)
        busy = sorted({n for ns in self.truth().values() for n in ns})
        node = self.node_rng.choice(busy or list(self.lc.node_names))
        self.step_rng = random.Random(f"{self.seed}/{i}")
        rec = StepResult(i, kind, node, time.time())
        t0 = time.monotonic()
        ttl = CONFIG.lease_ttl_s
        regs = self.registrations()
        replaced: dict[str, Any] = {}
        old_leader: int | None = None
        if kind in ("kill_agent", "stop_agent", "crash_host", "drain_revoke",
                    "migration_dst_crash") and node in regs:
            replaced[node] = regs[node].get("lease_id")
        if kind == "kill_leader":
            old_leader = self.leader_rev()
        if kind == "kill_agent":
            # kill -9 of the agent alone: its guard fences the node's domains
            self.lc.agents[node].kill()
        elif kind == "stop_agent":
            self.held.add(node)
            self.lc.agents[node].signal(signal.SIGSTOP)
            time.sleep(ttl + self.step_rng.uniform(1.0, 2.0))
            self.lc.agents[node].signal(signal.SIGCONT)
            self.held.discard(node)
        elif kind == "crash_host":
            with self._sup_lock:
                self.held.add(node)
            kill_with_children(self.lc.agents[node])
            self.lc.crash_node(node)
            time.sleep(ttl + self.step_rng.uniform(1.0, 3.0))
            self.lc.restart_node(node)
            self.held.discard(node)  # the supervisor starts its agent again
        elif kind == "kill_leader":
            rec.target = self.leader() or "-"
            if rec.target in self.lc.orchestrators:
                self.lc.orchestrators[rec.target].kill()
            else:
                rec.notes.append("no leader to kill")
        elif kind == "drain_revoke":
            if self.revoke(node):
                end = time.monotonic() + 30
                while time.monotonic() < end and self.lc.node_domains(node):
                    time.sleep(0.05)
                if self.lc.node_domains(node):
                    rec.notes.append(f"{node} not drained in 30 s")
            else:
                rec.notes.append("node not registered")
            self.uncordon(node, rec)
        elif kind == "migration_dst_crash":
            dst = self.crash_migration_target(node, rec)
            rec.target = f"{node}->{dst or '-'}"
            if dst in regs:
                replaced[dst] = regs[dst].get("lease_id")
            self.uncordon(node, rec)
        min_wait = ttl + CONFIG.self_fence_safety_s + CONFIG.fence_margin_s + 1.0
        rec.converged = self.wait_settled(self.converge_s, t0, rec, replaced, old_leader,
                                          min_wait)
        # a drained/crashed node may have come back cordoned: uncordon so capacity returns
        for n in self.cordoned():
            self.uncordon(n, rec)
        rec.duration_s = round(time.monotonic() - t0, 3)
        if not rec.converged:
            rec.notes.append(f"I2: not settled within {self.converge_s} s: {self.truth()}")
            self.check_i4(rec)
        if not self.history.caught_up(20):
            rec.notes.append("history watch behind")
        return rec

    def crash_migration_target(self, src: str, rec: StepResult) -> str | None:
        """Drain ``src`` by lease revoke, its guests' migration bandwidth throttled so
        that the copy takes a while; as soon as a guest streams in on a target (or,
        failing that, its placement names one), crash that node (libvirtd + QEMU) and
        its agent, lift the throttle, then bring node and agent back."""
        victims = self.vms_on(src)
        if not victims:
            rec.notes.append("nothing to migrate")
            return None
        conn = None
        try:
            conn = libvirt.open(self.lc.nodes[src].uri)
            for vm in victims:
                conn.lookupByName(vm).migrateSetMaxSpeed(1, 0)
        except libvirt.libvirtError as exc:
            rec.notes.append(f"throttle failed: {exc}")
        try:
            if not self.revoke(src):
                rec.notes.append("source not registered")
                return None
            dst = None
            how = ""
            others = [n for n in self.lc.node_names if n != src]
            end = time.monotonic() + 15
            while time.monotonic() < end and dst is None:
                for n in others:
                    doms = self.lc.node_domains(n)
                    hit = [vm for vm in victims if doms.get(vm) == "migrating"]
                    if hit:
                        dst, how = n, f"{hit[0]} streaming in on {n}"
                        break
                if dst is None:
                    for vm in victims:
                        p = self.get_json(KS.vm_placement(vm))
                        if p and p.get("kind") == "migrate" and p.get("from_node") == src \
                                and p.get("node") not in (None, src) \
                                and time.monotonic() > end - 13:
                            dst = str(p["node"])
                            how = (f"{vm} placed on {dst} "
                                   f"({self.lc.node_domains(dst).get(vm, 'absent')})")
                            break
                time.sleep(0.01)
            if dst is None:
                rec.notes.append("no migration seen in 15 s")
                return None
            rec.notes.append(how)
            time.sleep(self.step_rng.uniform(0.0, 0.3))
            with self._sup_lock:
                self.held.add(dst)
            kill_with_children(self.lc.agents[dst])
            self.lc.crash_node(dst)
        finally:
            if conn is not None:
                for vm in victims:
                    with contextlib.suppress(libvirt.libvirtError):  # gone already
                        conn.lookupByName(vm).migrateSetMaxSpeed(UNLIMITED_MIB_S, 0)
                conn.close()
        down = CONFIG.lease_ttl_s + self.step_rng.uniform(1.0, 2.0)
        time.sleep(down)
        rec.notes.append(f"dst down {down:.1f} s")
        self.lc.restart_node(dst)
        self.held.discard(dst)
        return dst

    def run(self, faults: int, deadline: float | None) -> None:
        for i in range(faults):
            if deadline is not None and time.monotonic() > deadline:
                self.log(f"time budget reached after {i} faults")
                break
            r = self.step(i)
            self.results.append(r)
            line = {"step": r.step, "kind": r.kind, "target": r.target,
                    "duration_s": r.duration_s, "converged": r.converged,
                    "affected": r.affected, "recovery_s": r.recovery_s,
                    "violations_so_far": len(self.violations()), "notes": r.notes}
            print(json.dumps(line), flush=True)

    # ---- results -----------------------------------------------------------------------

    def violations(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.poller:
            out += self.poller.violations
        if self.history:
            out += self.history.violations
        out += [{"invariant": "I2", "step": r.step, "kind": r.kind}
                for r in self.results if not r.converged]
        out += self.i4
        return out

    def summary(self, wall_s: float) -> dict[str, Any]:
        rec = [s for r in self.results for s in r.recovery_s.values()]
        by_kind: dict[str, int] = {}
        rec_by_kind: dict[str, list[float]] = {}
        for r in self.results:
            by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
            rec_by_kind.setdefault(r.kind, []).extend(r.recovery_s.values())
        viol = self.violations()
        per_inv: dict[str, int] = {}
        for v in viol:
            per_inv[v["invariant"]] = per_inv.get(v["invariant"], 0) + 1
        durs = [r.duration_s for r in self.results]
        return {
            "seed": self.seed, "vms": len(self.vms), "nodes": list(self.lc.node_names),
            "config": json.loads(CONFIG.to_json()),
            "faults": len(self.results), "by_kind": by_kind,
            "violations": len(viol), "violations_by_invariant": per_inv,
            "violation_samples": viol[:20],
            "i1_samples": self.poller.samples if self.poller else 0,
            "i1_transient_doubles": self.poller.transient_doubles if self.poller else 0,
            "i3_checked": self.history.checked if self.history else {},
            "fault_to_running_s": {"n": len(rec), "p50": pct(rec, 50), "p95": pct(rec, 95),
                                   "max": max(rec) if rec else None},
            "fault_to_running_by_kind": {k: {"n": len(v), "p50": pct(v, 50),
                                             "p95": pct(v, 95)}
                                         for k, v in rec_by_kind.items()},
            "step_duration_s": {"p50": pct(durs, 50), "p95": pct(durs, 95),
                                "max": max(durs) if durs else None,
                                "total": round(sum(durs), 1)},
            "restarts": self.restarts, "wall_s": round(wall_s, 1),
            "steps": [r.__dict__ for r in self.results],
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lab_campaign")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults", type=int, default=30)
    ap.add_argument("--vms", type=int, default=5)
    ap.add_argument("--converge", type=float, default=60.0)
    ap.add_argument("--minutes", type=float, help="stop starting new faults after this long")
    ap.add_argument("--out", default="results/campaign-lab.json")
    a = ap.parse_args(argv)
    started = time.monotonic()
    deadline = started + a.minutes * 60 if a.minutes else None
    wd = Path(tempfile.mkdtemp(prefix=f"vmha-lab-campaign-{a.seed}-", dir="/dev/shm"))
    c = LabCampaign(a.seed, wd, vms=a.vms, converge_s=a.converge)
    summary: dict[str, Any]
    try:
        c.start()
        c.run(a.faults, deadline)
        if c.history is not None:
            c.history.caught_up(20)
        time.sleep(0.5)
        summary = c.summary(time.monotonic() - started)
    finally:
        c.stop()
    summary["command"] = " ".join(["python -m bench.lab_campaign", *sys.argv[1:]])
    summary["workdir"] = str(wd)
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=2))
    return 0 if summary["violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
