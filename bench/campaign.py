"""Fault campaign: seeded, repeatable random fault schedules against a fake-hypervisor
cluster on real etcd (3 members), checking vmha's invariants after every step.

Invariants (checked from ground truth and etcd history, never from vmha's own view;
:mod:`lab.invariants` and :mod:`bench.campaign_core`):

I1  at most one running instance per VM (the fake hypervisor's guest processes, one per
    running domain, which only a destroy ends: sampled every 10 ms by a thread, for the
    whole campaign);
I2  every declared VM runs again within `converge_s` after each fault is healed, while
    the cluster has the capacity for it;
I3  no write from a stale leader epoch or a stale agent was accepted: every placement
    and leader-written fence record in etcd's history carries the epoch of the leader
    key that existed at that revision; every status was written while its node was
    registered (a watch from revision 1, re-established after member deaths);
I4  a VM that fits nowhere gets a visible `pending` placement with a reason.

Faults: kill -9 of an agent / the leader / an etcd member; SIGSTOP of an agent or the
leader past the lease TTL, then SIGCONT; an agent cut off from etcd by a TCP proxy
that turns into a black hole while its VMs keep running; a fence agent that hangs or
fails (fence_policy=both); quorum loss (2 of 3 members) and return; etcd compaction;
capacity exhaustion (a VM that fits nowhere); and (issue 11, :mod:`bench.campaign_faults`)
an etcd member stalled (SIGSTOP) or black-holed (packets dropped, no RST), a rolling etcd
restart, an agent SIGKILLed and restarted within the TTL next to its guard service, and
hostile keys and values; and (issue 12, :mod:`bench.campaign_moves`) drains by lease
revoke, moves, rebalances, and agents killed while a live migration from or to their
node is in flight (``--migrate-seconds`` long).  Dead agents are restarted the way systemd would
(Restart=always, 0.5 s), unless the fault holds them down.

The last node (``svc_node``) runs its guard as its own service (``vmha guard``, as
vmha-guard.service does): the agent restart hits it, the other agent faults hit the
other nodes (their guards are the agents' children, so a killed agent is fenced).
Clients reach each member through a :class:`bench.dropproxy.DropProxy` (the
black hole); each agent through its own :class:`bench.tcpproxy.Proxy` in front of those
(its partition).

Self-fences are counted per step and node, and each one that happened while etcd
quorum was reachable from the node is a *needless* self-fence (the definition is in
:mod:`bench.campaign_core`); a run with any violation or needless self-fence exits 1.

    python -m bench.campaign --seeds 1 2 3 --steps 100 --out results/campaign.json
    python -m bench.campaign --negative-control   # guard off: must report a double run
    python -m bench.campaign --needless-control   # guard timeout too short: needless fences
    python -m bench.campaign --lost-destroy-control  # destroys lost: must report double runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from bench.campaign_classic import ClassicFaults, xml
from bench.campaign_core import CampaignCore, StepResult
from bench.campaign_faults import NEW_FAULTS, NewFaults
from bench.campaign_keys import CampaignKeys
from bench.campaign_moves import MOVE_FAULTS, MoveFaults
from bench.common import pct
from bench.dropproxy import DropProxy
from bench.tcpproxy import Proxy
from fencing.liveness_fence import liveness_window
from hypervisor.fake import kill_guests
from lab.configs import FAST_CONFIG, LAB_CONFIG
from lab.invariants import DoubleRunChecker, FakeTruth, HistoryChecker
from lab.localcluster import Daemon, EtcdCluster, poll_until, start_etcd
from lab.procs import kill_guards_under
from schemas import ClusterConfig, VmSpec
from schemas.models import FenceDevice
from store.etcd import EtcdStore

ALL_FAULTS = ("kill_agent", "kill_leader", "kill_etcd", "stop_agent", "stop_leader",
              "partition_agent", "fence_hang", "fence_fail", "quorum_loss", "compact",
              "capacity", *NEW_FAULTS, *MOVE_FAULTS)
#: ``--timing``: the tests' short timing (a fault costs seconds), the lab's, or the
#: shipped defaults (what operators run; guard timeout 4.5 s, docs/fencing.md).
TIMINGS: dict[str, ClusterConfig] = {"fast": FAST_CONFIG, "lab": LAB_CONFIG,
                                     "default": ClusterConfig()}
AGENT_FAULTS = ("kill_agent", "stop_agent", "partition_agent", "fence_hang", "fence_fail")

__all__ = ["ALL_FAULTS", "Campaign", "StepResult", "lost_destroy_control", "main",
           "needless_control", "negative_control", "run_campaign"]


class Campaign(CampaignCore, ClassicFaults, NewFaults, MoveFaults):
    def __init__(self, seed: int, workdir: Path, *, nodes: int = 3, vms: int = 6,
                 guard: bool = True, fence_policy: str = "self",
                 faults: tuple[str, ...] = ALL_FAULTS, converge_s: float = 40.0,
                 verbose: bool = True, config: ClusterConfig = FAST_CONFIG,
                 migrate_seconds: float = 1.0, keyspace: int = 1) -> None:
        super().__init__(seed, vms, converge_s, verbose, FakeTruth(workdir / "hv"),
                         CampaignKeys(keyspace))
        self.base_config = config
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.guard = guard
        self.fence_policy = fence_policy
        self.faults = tuple(f for f in faults
                            if fence_policy != "self" or f not in ("fence_hang", "fence_fail"))
        self.fake_root = workdir / "hv"
        self.mode_file = workdir / "fence-mode"
        self.agents: dict[str, Daemon] = {}
        self.orchs: dict[str, Daemon] = {}
        self.proxies: dict[str, list[Proxy]] = {}
        self.drops: list[DropProxy] = []
        self.svc_node = self.nodes[-1]
        self.guards: dict[str, Daemon] = {}
        self.compacted = 0
        self.guard_kills = 0
        self.etcd: EtcdCluster | None = None
        # A fake live migration takes this long, so a kill can land in the middle of it.
        self.migrate_seconds = migrate_seconds
        self.mid_migration_kills = 0
        self.replaced_by_fault: dict[str, int] = {}

    # ---- set-up ------------------------------------------------------------------------

    def config(self) -> ClusterConfig:
        devices: dict[str, FenceDevice] = {}
        if self.fence_policy != "self":
            devices["*"] = FenceDevice(
                agent=[sys.executable, "-m", "bench.fence_fault"],
                params={"uri": f"fake://{self.fake_root}/{{node}}",
                        "mode_file": str(self.mode_file)}, timeout_s=2.0)
        return self.base_config.model_copy(update={
            "guard_enabled": self.guard, "fence_policy": self.fence_policy,
            "fence_devices": devices, "fence_retry_initial_s": 0.5, "fence_retry_max_s": 2.0})

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mode_file.write_text("ok")
        self.etcd = start_etcd(3, base=None)
        self.store = EtcdStore(self.etcd.endpoints, retry_budget=1.0, timeout=1.0)
        self.history = HistoryChecker(EtcdStore(self.etcd.endpoints, retry_budget=1.0,
                                                timeout=1.0), self.keys.layout)
        self.history.ensure()
        self.keys.prepare(self.store)  # keyspace 2's marker, before any daemon starts
        self.store.put(self.keys.config, self.keys.config_json(self.config()))
        self.drops = [DropProxy(m.client_port) for m in self.etcd.members]
        for n in self.nodes:
            self.proxies[n] = [Proxy(d.port) for d in self.drops]
            self.start_agent(n)
        for o in ("o1", "o2"):
            self.start_orch(o)
        poll_until(lambda: set(self.registrations()) >= set(self.nodes), 30)
        for vm in self.vms:
            self.store.put(self.keys.spec(vm), VmSpec(name=vm, domain_xml=xml(vm, 512),
                                                  memory_mib=512, vcpus=1).to_json())
        self.sampler = DoubleRunChecker(self.source, interval=0.01).start()
        self.start_supervisor()
        if not self.wait_settled(60):
            raise RuntimeError("cluster did not come up")
        self.log("cluster up")

    def start_agent(self, n: str) -> None:
        eps = ",".join(p.endpoint for p in self.proxies[n])
        extra = []
        if n == self.svc_node:
            extra = ["--guard-socket", str(self.start_guard(n))]
        d = Daemon(n, ["--etcd", eps, "agent", "--name", n, "--fake-root", str(self.fake_root),
                       "--memory-mib", "4096", "--vcpus", "8", "--fake-migrate-seconds",
                       str(self.migrate_seconds), "--log-format", "json", *extra],
                   self.workdir / f"agent-{n}.log")
        self.agents[n] = d.start()

    def start_guard(self, n: str) -> Path:
        """Node ``n``'s guard service unless it runs (it exits when it fires); its socket."""
        sock = self.workdir / f"guard-{n}.sock"
        running = self.guards.get(n)
        if running is not None and running.alive():
            return sock
        sock.unlink(missing_ok=True)
        # Through the node's own proxies, as its agent reaches etcd.
        eps = ",".join(p.endpoint for p in self.proxies[n])
        d = Daemon(f"guard-{n}", ["--etcd", eps, "guard", "--fake-root", str(self.fake_root),
                                  "--name", n, "--socket", str(sock), "--hold-lease",
                                  "--log-format", "json"],
                   self.workdir / f"guard-{n}.log")
        self.guards[n] = d.start()
        poll_until(lambda: sock.exists() or not d.alive(), 15)
        return sock

    def fence_logs(self) -> dict[str, list[Path]]:
        return {n: [self.workdir / f"agent-{n}.log", self.workdir / f"guard-{n}.log"]
                for n in self.nodes}

    def start_orch(self, o: str) -> None:
        assert self.etcd is not None
        d = Daemon(o, ["--etcd", ",".join(p.endpoint for p in self.drops), "orchestrator",
                       "--name", o,
                       "--log-format", "json"], self.workdir / f"orch-{o}.log")
        self.orchs[o] = d.start()

    def daemons(self) -> dict[str, dict[str, Daemon]]:
        return {"agent": self.agents, "orchestrator": self.orchs}

    def restart(self, kind: str, name: str, dead: Daemon) -> None:
        if kind == "orchestrator":
            self.start_orch(name)
            return
        if dead.proc is not None and dead.proc.returncode == -signal.SIGKILL \
                and "guard_fired" in dead.log_text()[-20000:]:
            self.guard_kills += 1
        self.start_agent(name)

    def stop(self) -> None:
        self.stop_checks()
        for d in [*self.agents.values(), *self.orchs.values(), *self.guards.values()]:
            d.kill()
        # Guards outlive their agents by design: end them by the pid they wrote.
        time.sleep(0.2)
        for n in self.nodes:
            with contextlib.suppress(OSError, ValueError):  # no guard, or gone already
                os.kill(int((self.fake_root / n / "host.pid").read_text()), signal.SIGKILL)
        # A guard that fired earlier destroys until its node registers again: end it too.
        kill_guards_under(self.fake_root)
        kill_guests(self.fake_root)  # processes of their own, outliving every daemon
        for ps in self.proxies.values():
            for p in ps:
                p.close()
        for dp in self.drops:
            dp.close()
        if self.store:
            self.store.close()
        if self.etcd:
            self.etcd.stop()

    # ---- faults ------------------------------------------------------------------------

    def step(self, i: int, kind: str | None = None, node: str | None = None) -> StepResult:
        """One fault, healed, then converged and checked; random unless kind/node given."""
        assert self.etcd is not None and self.store is not None and self.history is not None
        if kind is None:
            kind = self.rng.choice(self.faults)
        # Agent faults hit a node that runs VMs (else they prove nothing).
        if node is None:
            # The guard-service node takes the agent restart, the others the rest.
            pool = self.nodes[:-1] if kind in AGENT_FAULTS else self.nodes
            node = self.rng.choice([n for n in self.busy_nodes() if n in pool] or pool)
        rec = StepResult(i, kind, node, time.time())
        marks = self.log_marks()
        t0 = time.monotonic()
        watch = sorted(self.truth())  # recovery is timed for every VM that goes down
        replaced: dict[str, int] = {}
        if kind in AGENT_FAULTS:
            reg = self.registrations().get(node)
            if reg is not None:
                replaced[node] = reg
        self.replaced_by_fault = {}
        getattr(self, f"_fault_{kind}")(rec, node, i)
        replaced.update(self.replaced_by_fault)  # agents a fault killed or drained
        # An adopted registration shows its worth only past the old lease's TTL and the
        # leader's fence window.
        wait = self.restart_wait() if kind == "agent_restart" else 0.0
        rec.converged = self.wait_settled(self.converge_s, t0=t0, rec=rec, watch=watch,
                                          replaced=replaced, min_wait=wait)
        if kind == "agent_restart":
            self.check_agent_restart(rec)
        self.count_fences(rec, marks)
        rec.duration_s = round(time.monotonic() - t0, 3)
        if not rec.converged:
            rec.notes.append(f"I2: not converged within {self.converge_s} s: {self.truth()}")
        if not self.history.caught_up():
            rec.notes.append("history watch behind")
        return rec

    def restart_wait(self) -> float:
        """How long an agent restart is watched: past the old lease's TTL and the
        leader's fence window after it (keyspace 1: the margin, as always measured;
        keyspace 2: the liveness window of `bounded`, the longest mode `auto` resolves
        to, section 4 of docs/keyspace-v2.md)."""
        cfg = self.config()
        window = cfg.fence_margin_s
        if self.keys.version == 2:
            window = max(window, liveness_window(cfg, "bounded") or 0.0)
        return cfg.lease_ttl_s + window + 1.0

    # ---- results -----------------------------------------------------------------------

    def report_step(self, r: StepResult) -> None:
        self.log(f"step {r.step} {r.kind} {r.target}: {r.duration_s:.1f}s converged="
                 f"{r.converged} violations={len(self.violations())} "
                 f"self_fenced={','.join(r.self_fenced) or '-'} "
                 f"needless={len(self.needless_fences())} "
                 f"{' '.join(r.notes)[:200]}")

    def summary(self) -> dict[str, Any]:
        rec = self.recovery_times()
        checks = self.checks()
        return {
            "seed": self.seed, "keyspace": self.keys.version, "guard": self.guard,
            "fence_policy": self.fence_policy,
            **{k: checks[k] for k in ("faults", "by_kind", "violations",
                                      "violation_samples", "self_fences",
                                      "self_fences_by_node", "needless_self_fences",
                                      "needless_samples", "i1_samples", "i3_checked")},
            "recovery_s": {**self.spread(rec),
                           "mean": round(statistics.mean(rec), 3) if rec else None},
            "agent_restarts": self.restarts["agent"], "guard_kills": self.guard_kills,
            "reattach": self.reattach_times(),
            "mid_migration_kills": self.mid_migration_kills,
            "duration_s": round(sum(r.duration_s for r in self.results), 1),
            "steps": [r.__dict__ for r in self.results],
        }


    def reattach_times(self) -> dict[str, list[float]]:
        """From the guard service's log: how long the node went without an agent
        (SIGKILL → the new process's first pet) and the guard's deadline left then."""
        out: dict[str, list[float]] = {"unattended_s": [], "margin_s": []}
        path = self.workdir / f"guard-{self.svc_node}.log"
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            if '"agent_reattached"' not in line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            out["unattended_s"].append(float(ev["unattended_s"]))
            out["margin_s"].append(float(ev["margin_s"]))
        return out


def run_campaign(seed: int, steps: int, *, workdir: Path | None = None, guard: bool = True,
                 fence_policy: str = "self", faults: tuple[str, ...] = ALL_FAULTS,
                 deadline: float | None = None, verbose: bool = True,
                 timing: str = "fast", migrate_seconds: float = 1.0,
                 keyspace: int = 1) -> dict[str, Any]:
    wd = workdir or Path(tempfile.mkdtemp(prefix=f"vmha-campaign-{seed}-"))
    # I2: every VM runs again within 40 s of the heal with the test timing; the
    # default timing's TTL (6 s) and fence window (18-19.5 s) take longer.
    c = Campaign(seed, wd, guard=guard, fence_policy=fence_policy, faults=faults,
                 verbose=verbose, config=TIMINGS[timing],
                 converge_s=40.0 if timing == "fast" else 60.0,
                 migrate_seconds=migrate_seconds, keyspace=keyspace)
    try:
        c.start()
        c.run(steps, deadline)
        return c.summary()
    finally:
        c.stop()


def negative_control(seed: int = 1, workdir: Path | None = None) -> dict[str, Any]:
    """Guard disabled, an agent frozen past its lease: the checker must see a double run."""
    wd = workdir or Path(tempfile.mkdtemp(prefix="vmha-campaign-neg-"))
    c = Campaign(seed, wd, guard=False, faults=("stop_agent",), converge_s=15.0)
    try:
        c.start()
        assert c.sampler is not None and c.history is not None
        sampler = c.sampler
        node = max(c.nodes, key=lambda n: len(c.vms_on(n)))
        c.hold(node)
        c.agents[node].signal(signal.SIGSTOP)
        poll_until(lambda: sampler.violations, 15, 0.1)
        c.agents[node].signal(signal.SIGCONT)
        time.sleep(3.0)  # the resumed agent acts on stale state: etcd must refuse its writes
        c.history.caught_up()
        return {"double_runs_seen": len(sampler.violations), "first": sampler.violations[:1],
                "stale_writes_accepted": len(c.history.violations)}
    finally:
        c.stop()


def lost_destroy_control(seed: int = 1, workdir: Path | None = None) -> dict[str, Any]:
    """Guard on, but one node's destroys are lost (the fake reports success and kills
    nothing): its agent killed, its guard fires and misses, the leader boots its VMs
    elsewhere, and I1 must see each of them twice.  (Before guests were processes of
    their own, the guard's exit ended them: this control passed without a miss.)"""
    wd = workdir or Path(tempfile.mkdtemp(prefix="vmha-campaign-lost-"))
    c = Campaign(seed, wd, faults=("kill_agent",), converge_s=15.0)
    try:
        c.start()
        assert c.sampler is not None
        sampler = c.sampler
        node = max(c.nodes[:-1], key=lambda n: len(c.vms_on(n)))
        victims = c.vms_on(node)
        (c.fake_root / node / "destroy-noop").touch()
        c.hold(node)
        c.agents[node].kill()
        poll_until(lambda: {v["vm"] for v in sampler.violations} >= set(victims), 30, 0.1)
        return {"node": node, "victims": victims, "double_runs_seen": len(sampler.violations),
                "vms_seen_twice": sorted({v["vm"] for v in sampler.violations}),
                "first": sampler.violations[:1]}
    finally:
        c.stop()


def needless_control(seed: int = 1, workdir: Path | None = None) -> dict[str, Any]:
    """A member stall during which an agent freezes past its guard timeout: the campaign
    must count a needless self-fence (quorum stayed reachable)."""
    wd = workdir or Path(tempfile.mkdtemp(prefix="vmha-campaign-needless-"))
    c = Campaign(seed, wd, faults=("stall_etcd",), converge_s=30.0)
    try:
        c.start()
        node = max(c.nodes[:-1], key=lambda n: len(c.vms_on(n)))
        c.results.append(c.step(0, "stall_frozen_agent", node))
        return {"needless_self_fences": len(c.needless_fences()),
                "samples": c.needless_fences(), "violations": len(c.violations())}
    finally:
        c.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.campaign")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--policy", choices=["self", "external", "both", "mixed"], default="mixed",
                    help="mixed: odd seeds self, even seeds both")
    ap.add_argument("--minutes", type=float, help="stop starting new steps after this long")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run in parallel")
    ap.add_argument("--negative-control", action="store_true")
    ap.add_argument("--needless-control", action="store_true",
                    help="an agent frozen during a member stall: must count a needless fence")
    ap.add_argument("--timing", choices=sorted(TIMINGS), default="fast",
                    help="cluster timing: the tests' (fast), the lab's, or the shipped "
                         "defaults")
    ap.add_argument("--lost-destroy-control", action="store_true",
                    help="a node whose destroys are lost: must report its VMs running twice")
    ap.add_argument("--faults", nargs="+", choices=ALL_FAULTS, default=list(ALL_FAULTS),
                    help="the fault kinds drawn from (default: all)")
    ap.add_argument("--migrate-seconds", type=float, default=1.0,
                    help="how long a fake live migration takes (kills land mid-way)")
    ap.add_argument("--keyspace", type=int, choices=[1, 2], default=1,
                    help="the keyspace the cluster runs (2: its marker written before the "
                         "daemons start) and the checkers read")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.lost_destroy_control:
        res = lost_destroy_control(a.seeds[0])
        print(json.dumps(res, indent=2))
        return 0 if res["double_runs_seen"] else 1
    if a.needless_control:
        res = needless_control(a.seeds[0])
        print(json.dumps(res, indent=2))
        return 0 if res["needless_self_fences"] else 1
    if a.negative_control:
        res = negative_control(a.seeds[0])
        print(json.dumps(res, indent=2))
        return 0 if res["double_runs_seen"] else 1
    started, started_wall = time.monotonic(), time.time()
    runs: list[dict[str, Any]] = []
    total: dict[str, Any] = {}
    # Seeds in parallel, each its own cluster (a fault campaign mostly waits).
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        futs = [pool.submit(run_seed, seed, a.steps, a.policy, a.minutes, started_wall,
                            tuple(a.faults), a.migrate_seconds, a.timing, a.keyspace)
                for seed in a.seeds]
        for fut in as_completed(futs):
            got = fut.result()
            if got is None:
                continue  # started past the time budget
            runs.append(got)
            total = totals(sorted(runs, key=lambda r: int(r["seed"])),
                           time.monotonic() - started,
                           argv if argv is not None else sys.argv[1:])
            if a.out:  # after every seed: a cut-short run still leaves its results
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps(total, indent=2))
    print(json.dumps({k: v for k, v in total.items() if k != "runs"}, indent=2))
    return 0 if total and total["violations"] == 0 and total["needless_self_fences"] == 0 \
        else 1


def run_seed(seed: int, steps: int, policy: str, minutes: float | None,
             started_wall: float, faults: tuple[str, ...] = ALL_FAULTS,
             migrate_seconds: float = 1.0, timing: str = "fast",
             keyspace: int = 1) -> dict[str, Any] | None:
    """One seed's campaign in a worker process; the budget counts from ``started_wall``."""
    left = None if minutes is None else started_wall + minutes * 60 - time.time()
    if left is not None and left <= 0:
        return None
    deadline = None if left is None else time.monotonic() + left
    policy = policy if policy != "mixed" else ("self" if seed % 2 else "both")
    return run_campaign(seed, steps, fence_policy=policy, deadline=deadline, faults=faults,
                        migrate_seconds=migrate_seconds, timing=timing, keyspace=keyspace)


def totals(runs: list[dict[str, Any]], wall_s: float, argv: list[str]) -> dict[str, Any]:
    """The seeds' results added up (faults by kind, violations, self-fences, recovery)."""
    rec = [s for r in runs for st in r["steps"] for s in st["recovery_s"].values()]
    by_kind: dict[str, int] = {}
    fenced: dict[str, int] = {}
    for r in runs:
        for k, n in r["by_kind"].items():
            by_kind[k] = by_kind.get(k, 0) + n
        for st in r["steps"]:
            for n in st["self_fenced"]:
                key = "needed" if n not in st["needless"] else "needless"
                fenced[f"{st['kind']}:{key}"] = fenced.get(f"{st['kind']}:{key}", 0) + 1
    return {"args": argv, "seeds": [r["seed"] for r in runs],
            "keyspace": sorted({r.get("keyspace", 1) for r in runs}),
            "faults": sum(r["faults"] for r in runs), "by_kind": dict(sorted(by_kind.items())),
            "violations": sum(r["violations"] for r in runs),
            "self_fences": sum(r["self_fences"] for r in runs),
            "self_fences_by_fault": dict(sorted(fenced.items())),
            "needless_self_fences": sum(r["needless_self_fences"] for r in runs),
            "mid_migration_kills": sum(r.get("mid_migration_kills", 0) for r in runs),
            "wall_s": round(wall_s, 1),
            "reattach": {k: {"n": len(v), "p50": pct(v, 50), "p95": pct(v, 95),
                             "min" if k == "margin_s" else "max":
                             (min(v) if k == "margin_s" else max(v)) if v else None}
                         for k in ("unattended_s", "margin_s")
                         for v in [[x for r in runs for x in r.get("reattach", {}).get(k, [])]]},
            "recovery_s": {"n": len(rec), "p50": pct(rec, 50), "p95": pct(rec, 95),
                           "max": max(rec) if rec else None},
            "runs": runs}


if __name__ == "__main__":
    sys.exit(main())
