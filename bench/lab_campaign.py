"""Fault campaign on the lab: seeded, repeatable random faults against real QEMU guests.

Like :mod:`bench.campaign` (and on the same :mod:`bench.campaign_core`), but on
:class:`lab.cluster.LabCluster`: real etcd, three lab libvirt nodes (namespaced
libvirtd, QEMU), vmha agents with the libvirt adapter, two orchestrators, and a handful
of tiny 32 MiB guests.  Root only.

Invariants, from ground truth (every libvirtd asked directly) and etcd history
(:mod:`lab.invariants`):

I1  at most one running instance per VM: ground truth polled every ~50 ms in a
    thread; a VM seen running on two nodes in one poll counts as double only if it
    still runs on the node read first once it was seen on the other (a live
    migration's switch-over can fall between the reads of one poll);
I2  every declared VM runs again within ``--converge`` seconds after each fault;
I3  every placement (and leader fence record) in etcd's history carries the epoch of
    the leader key that existed at that revision; every status was written while its
    node was registered (:class:`lab.invariants.HistoryChecker`, a watch from rev 1);
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
import time
from pathlib import Path
from typing import Any

import libvirt

from bench.campaign_core import KS, CampaignCore, StepResult
from bench.common import pct
from lab import tiny_guest_xml
from lab.cluster import LabCluster, kill_with_children
from lab.configs import FAST_CONFIG
from lab.invariants import DoubleRunChecker, HistoryChecker, LabTruth, visibly_pending
from lab.localcluster import Daemon, poll_until
from store.etcd import EtcdStore

#: libvirt's "no limit" for migrateSetMaxSpeed (MiB/s)
UNLIMITED_MIB_S = 8796093022207
FAULTS = ("kill_agent", "stop_agent", "crash_host", "kill_leader", "drain_revoke",
          "migration_dst_crash")
NODE_FAULTS = ("kill_agent", "stop_agent", "crash_host", "drain_revoke", "migration_dst_crash")
CONFIG = FAST_CONFIG


class LabCampaign(CampaignCore):
    log_tag = "lab seed"
    log_to_stderr = True
    settle_interval = 0.1

    def __init__(self, seed: int, workdir: Path, vms: int = 5, converge_s: float = 60.0,
                 verbose: bool = True) -> None:
        self.lc = LabCluster(workdir / "lab", workdir / "logs")
        super().__init__(seed, vms, converge_s, verbose, LabTruth(self.lc))
        # The fault kinds follow from the seed alone; targets are drawn from the nodes
        # that run VMs at the time, durations from a per-step generator.
        self.rng = random.Random(seed)
        self.node_rng = random.Random(seed + 1_000_003)
        self.step_rng = random.Random(seed)
        self.workdir = workdir

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
        self.sampler = DoubleRunChecker(self.source, interval=0.05).start()
        self.start_supervisor()
        if not self.wait_settled(90, stable_s=1.5):
            raise RuntimeError(f"lab cluster did not come up: {self.lc.ground_truth()}")
        self.log("cluster up")

    def daemons(self) -> dict[str, dict[str, Daemon]]:
        return {"agent": self.lc.agents, "orchestrator": self.lc.orchestrators}

    def restart(self, kind: str, name: str, dead: Daemon) -> None:
        if kind == "agent":
            self.lc.start_agent(name)
        else:
            self.lc.start_orchestrator(name)

    def stop(self) -> None:
        self.stop_checks()
        for s in (self.store, self.history.store if self.history else None):
            if s is not None:
                with contextlib.suppress(Exception):  # tear-down goes on
                    s.close()
        self.lc.stop()

    # ---- faults ------------------------------------------------------------------------

    def cordoned(self) -> list[str]:
        return [n for n in self.lc.node_names if self.get_json(KS.cordon(n)) is not None]

    def check_i4(self, rec: StepResult) -> None:
        assert self.store is not None
        truth = self.truth()
        for vm in self.vms:
            if len(truth.get(vm, [])) != 1 and not visibly_pending(self.store, vm):
                self.i4.append({"invariant": "I4", "step": rec.step, "vm": vm,
                                "placement": self.get_json(KS.vm_placement(vm)),
                                "truth": truth.get(vm)})

    def revoke(self, node: str) -> bool:
        reg = self.get_json(KS.node(node))
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
        node = self.node_rng.choice(self.busy_nodes() or list(self.lc.node_names))
        self.step_rng = random.Random(f"{self.seed}/{i}")
        rec = StepResult(i, kind, node, time.time())
        t0 = time.monotonic()
        regs = self.registrations()
        replaced = {node: regs[node]} if kind in NODE_FAULTS and node in regs else {}
        old_leader = self.leader_rev() if kind == "kill_leader" else None
        dst = getattr(self, f"_fault_{kind}")(rec, node)
        if dst in regs:  # migration_dst_crash: the crashed target registers anew too
            replaced[dst] = regs[dst]
        ttl = CONFIG.lease_ttl_s
        min_wait = ttl + CONFIG.self_fence_safety_s + CONFIG.fence_margin_s + 1.0
        rec.converged = self.wait_settled(self.converge_s, t0=t0, rec=rec, replaced=replaced,
                                          old_leader=old_leader, min_wait=min_wait,
                                          stable_s=1.5)
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

    def _down_for(self, low: float, high: float) -> None:
        """Hold a fault for the lease TTL plus a random extra."""
        time.sleep(CONFIG.lease_ttl_s + self.step_rng.uniform(low, high))

    def _fault_kill_agent(self, rec: StepResult, node: str) -> None:
        # kill -9 of the agent alone: its guard fences the node's domains
        self.lc.agents[node].kill()

    def _fault_stop_agent(self, rec: StepResult, node: str) -> None:
        self.hold(node)
        self.lc.agents[node].signal(signal.SIGSTOP)
        self._down_for(1.0, 2.0)
        self.lc.agents[node].signal(signal.SIGCONT)
        self.held.discard(node)

    def _fault_crash_host(self, rec: StepResult, node: str) -> None:
        self.hold(node)
        kill_with_children(self.lc.agents[node])
        self.lc.crash_node(node)
        self._down_for(1.0, 3.0)
        self.lc.restart_node(node)
        self.held.discard(node)  # the supervisor starts its agent again

    def _fault_kill_leader(self, rec: StepResult, node: str) -> None:
        rec.target = self.leader() or "-"
        if rec.target in self.lc.orchestrators:
            self.lc.orchestrators[rec.target].kill()
        else:
            rec.notes.append("no leader to kill")

    def _fault_drain_revoke(self, rec: StepResult, node: str) -> None:
        if self.revoke(node):
            if poll_until(lambda: not self.lc.node_domains(node), 30) is None:
                rec.notes.append(f"{node} not drained in 30 s")
        else:
            rec.notes.append("node not registered")
        self.uncordon(node, rec)

    def _fault_migration_dst_crash(self, rec: StepResult, node: str) -> str | None:
        dst = self.crash_migration_target(node, rec)
        rec.target = f"{node}->{dst or '-'}"
        self.uncordon(node, rec)
        return dst

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
            found = self._migration_target(src, victims)
            if found is None:
                rec.notes.append("no migration seen in 15 s")
                return None
            dst, how = found
            rec.notes.append(how)
            time.sleep(self.step_rng.uniform(0.0, 0.3))
            self.hold(dst)
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

    def _migration_target(self, src: str, victims: list[str]) -> tuple[str, str] | None:
        """The node a guest of ``src`` streams in on (within 15 s), or after 2 s the one
        its placement names; and how it was found."""
        others = [n for n in self.lc.node_names if n != src]
        placement_after = time.monotonic() + 2

        def seen() -> tuple[str, str] | None:
            for n in others:
                doms = self.lc.node_domains(n)
                hit = [vm for vm in victims if doms.get(vm) == "migrating"]
                if hit:
                    return n, f"{hit[0]} streaming in on {n}"
            if time.monotonic() <= placement_after:
                return None
            for vm in victims:
                p = self.get_json(KS.vm_placement(vm))
                if p and p.get("kind") == "migrate" and p.get("from_node") == src \
                        and p.get("node") not in (None, src):
                    dst = str(p["node"])
                    return dst, f"{vm} placed on {dst} " \
                                f"({self.lc.node_domains(dst).get(vm, 'absent')})"
            return None

        return poll_until(seen, 15, 0.01)

    # ---- results -----------------------------------------------------------------------

    def report_step(self, r: StepResult) -> None:
        line = {"step": r.step, "kind": r.kind, "target": r.target,
                "duration_s": r.duration_s, "converged": r.converged,
                "affected": r.affected, "recovery_s": r.recovery_s,
                "violations_so_far": len(self.violations()), "notes": r.notes}
        print(json.dumps(line), flush=True)

    def summary(self, wall_s: float) -> dict[str, Any]:
        rec_by_kind: dict[str, list[float]] = {}
        for r in self.results:
            rec_by_kind.setdefault(r.kind, []).extend(r.recovery_s.values())
        durs = [r.duration_s for r in self.results]
        return {
            "seed": self.seed, "vms": len(self.vms), "nodes": list(self.lc.node_names),
            "config": json.loads(CONFIG.to_json()), **self.checks(),
            "fault_to_running_s": self.spread(self.recovery_times()),
            "fault_to_running_by_kind": {k: {"n": len(v), "p50": pct(v, 50),
                                             "p95": pct(v, 95)}
                                         for k, v in rec_by_kind.items()},
            "step_duration_s": {**self.spread(durs), "total": round(sum(durs), 1)},
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
