"""Fault campaign: seeded, repeatable random fault schedules against a fake-hypervisor
cluster on real etcd (3 members), checking vmha's invariants after every step.

Invariants (checked from ground truth and etcd history, never from vmha's own view):

I1  at most one running instance per VM (the fake hypervisor's files + host processes,
    sampled every 10 ms by a thread, for the whole campaign);
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
capacity exhaustion (a VM that fits nowhere).  Dead agents are restarted the way
systemd would (Restart=always, 0.5 s), unless the fault holds them down.

    python -m bench.campaign --seeds 1 2 3 --steps 100 --out results/campaign.json
    python -m bench.campaign --negative-control   # guard off: must report a double run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.tcpproxy import Proxy
from hypervisor.fake import fake_ground_truth
from lab.localcluster import Daemon, EtcdCluster, start_etcd
from schemas import ClusterConfig, Keyspace, Placement, VmSpec
from schemas.models import FenceDevice
from store.etcd import EtcdStore, StoreUnavailable

KS = Keyspace()
ALL_FAULTS = ("kill_agent", "kill_leader", "kill_etcd", "stop_agent", "stop_leader",
              "partition_agent", "fence_hang", "fence_fail", "quorum_loss", "compact",
              "capacity")
AGENT_FAULTS = ("kill_agent", "stop_agent", "partition_agent", "fence_hang", "fence_fail")


def xml(name: str, mem: int) -> str:
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>{mem}</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>")


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))], 3)


class DoubleRunSampler:
    """I1 from ground truth, sampled continuously."""

    def __init__(self, root: Path, interval: float = 0.01) -> None:
        self.root = root
        self.interval = interval
        self.violations: list[dict[str, Any]] = []
        self.samples = 0
        self.truth: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> DoubleRunSampler:
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            truth = fake_ground_truth(self.root)
            self.truth = truth
            for vm, nodes in truth.items():
                if len(nodes) > 1:
                    self.violations.append({"invariant": "I1", "vm": vm, "nodes": nodes,
                                            "at": time.time()})
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


class HistoryChecker:
    """I3 over etcd's history, from a watch that starts at revision 1."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.last_rev = 0
        self.leader_terms: dict[int, int | None] = {}  # epoch -> revision that ended it
        self.regs: dict[str, list[list[int | None]]] = {}  # node -> [[create, end]]
        self.violations: list[dict[str, Any]] = []
        self.checked = {"placement": 0, "status": 0, "fence": 0}
        self._lock = threading.Lock()
        self._cancel: Any = None
        self._broken = True

    def _cb(self, resp: Any) -> None:
        events = getattr(resp, "events", None)
        if events is None:
            self._broken = True
            return
        with self._lock:
            for ev in events:
                self._event(ev)

    def _event(self, ev: Any) -> None:
        rev = int(ev.mod_revision)
        if rev <= self.last_rev:
            return
        key = ev.key.decode()
        deleted = type(ev).__name__ == "DeleteEvent"
        ref = KS.parse(key)
        self.last_rev = rev
        if ref is None:
            return
        if ref.kind == "leader":
            if deleted:
                for e, end in self.leader_terms.items():
                    if end is None:
                        self.leader_terms[e] = rev
            else:
                self.leader_terms.setdefault(int(ev.create_revision), None)
            return
        if ref.kind == "node":
            ivs = self.regs.setdefault(ref.name, [])
            if deleted:
                for iv in ivs:
                    if iv[1] is None:
                        iv[1] = rev
            elif not ivs or ivs[-1][0] != int(ev.create_revision):
                ivs.append([int(ev.create_revision), None])
            return
        if deleted:
            return
        try:
            data = json.loads(ev.value)
        except ValueError:
            return
        if ref.kind == "vm_placement":
            self.checked["placement"] += 1
            self._check_epoch(rev, int(data.get("epoch", -1)), key)
        elif ref.kind == "fence" and data.get("method") in ("self", "external"):
            self.checked["fence"] += 1
            self._check_epoch(rev, int(data.get("epoch", -1)), key)
        elif ref.kind == "vm_status":
            self.checked["status"] += 1
            node = data.get("node", "")
            ok = any(c is not None and c <= rev and (end is None or rev < end)
                     for c, end in self.regs.get(node, []))
            if not ok:
                self.violations.append({"invariant": "I3", "key": key, "revision": rev,
                                        "why": f"status from {node} while not registered"})

    def _check_epoch(self, rev: int, epoch: int, key: str) -> None:
        end = self.leader_terms.get(epoch, -1)
        if epoch not in self.leader_terms or not (epoch <= rev and (end is None or rev < end)):
            self.violations.append({"invariant": "I3", "key": key, "revision": rev,
                                    "why": f"epoch {epoch} was not the leader at {rev}"})

    def ensure(self) -> None:
        if not self._broken:
            return
        try:
            if self._cancel is not None:
                with contextlib.suppress(Exception):  # the old watch is dead anyway
                    self.store.client.cancel_watch(self._cancel)
            self._cancel = self.store.client.add_watch_prefix_callback(
                KS.root, self._cb, start_revision=self.last_rev + 1)
            self._broken = False
        except Exception:  # noqa: BLE001 - etcd unavailable: try again next step
            self._broken = True

    def caught_up(self, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.ensure()
            try:
                cur = self.store.revision()
            except StoreUnavailable:
                time.sleep(0.2)
                continue
            with self._lock:
                if self.last_rev >= cur - 1 or self._only_foreign_after(cur):
                    return True
            time.sleep(0.05)
        return False

    def _only_foreign_after(self, cur: int) -> bool:
        # History events live outside the watched prefix; probe the tail once.
        try:
            kvs = self.store.get_prefix(KS.root)
        except StoreUnavailable:
            return False
        return max((kv.mod_revision for kv in kvs), default=0) <= self.last_rev


@dataclass
class StepResult:
    step: int
    kind: str
    target: str
    started: float
    duration_s: float = 0.0
    converged: bool = True
    recovery_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Campaign:
    def __init__(self, seed: int, workdir: Path, *, nodes: int = 3, vms: int = 6,
                 guard: bool = True, fence_policy: str = "self",
                 faults: tuple[str, ...] = ALL_FAULTS, converge_s: float = 40.0,
                 verbose: bool = True) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.vms = [f"vm{i}" for i in range(vms)]
        self.guard = guard
        self.fence_policy = fence_policy
        self.faults = tuple(f for f in faults
                            if fence_policy != "self" or f not in ("fence_hang", "fence_fail"))
        self.converge_s = converge_s
        self.verbose = verbose
        self.fake_root = workdir / "hv"
        self.mode_file = workdir / "fence-mode"
        self.agents: dict[str, Daemon] = {}
        self.orchs: dict[str, Daemon] = {}
        self.proxies: dict[str, list[Proxy]] = {}
        self.held: set[str] = set()  # agents the supervisor must not restart now
        self.results: list[StepResult] = []
        self.agent_restarts = 0
        self.compacted = 0
        self.guard_kills = 0
        self.etcd: EtcdCluster | None = None
        self.store: EtcdStore | None = None
        self.sampler: DoubleRunSampler | None = None
        self.history: HistoryChecker | None = None
        self._sup_stop = threading.Event()
        self._dead_since: dict[str, float] = {}

    # ---- set-up ------------------------------------------------------------------------

    def config(self) -> ClusterConfig:
        devices: dict[str, FenceDevice] = {}
        if self.fence_policy != "self":
            devices["*"] = FenceDevice(
                agent=[sys.executable, "-m", "bench.fence_fault"],
                params={"uri": f"fake://{self.fake_root}/{{node}}",
                        "mode_file": str(self.mode_file)}, timeout_s=2.0)
        return ClusterConfig(lease_ttl_s=2, keepalive_interval_s=0.4, self_fence_safety_s=0.5,
                             fence_margin_s=1.0, stop_timeout_s=2.0, guard_enabled=self.guard,
                             fence_policy=self.fence_policy,  # type: ignore[arg-type]
                             fence_devices=devices, fence_retry_initial_s=0.5,
                             fence_retry_max_s=2.0)

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[seed {self.seed} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mode_file.write_text("ok")
        self.etcd = start_etcd(3, base=None)
        self.store = EtcdStore(self.etcd.endpoints, retry_budget=1.0, timeout=1.0)
        self.history = HistoryChecker(EtcdStore(self.etcd.endpoints, retry_budget=1.0,
                                                timeout=1.0))
        self.history.ensure()
        self.store.put(KS.config, self.config().to_json())
        for n in self.nodes:
            self.proxies[n] = [Proxy(m.client_port) for m in self.etcd.members]
            self.start_agent(n)
        for o in ("o1", "o2"):
            self.start_orch(o)
        end = time.monotonic() + 30
        while set(self.registrations()) < set(self.nodes) and time.monotonic() < end:
            time.sleep(0.05)
        for vm in self.vms:
            self.store.put(KS.vm_spec(vm), VmSpec(name=vm, domain_xml=xml(vm, 512),
                                                  memory_mib=512, vcpus=1).to_json())
        self.sampler = DoubleRunSampler(self.fake_root).start()
        threading.Thread(target=self._supervise, daemon=True).start()
        if not self.wait_converged(60):
            raise RuntimeError("cluster did not come up")
        self.log("cluster up")

    def start_agent(self, n: str) -> None:
        eps = ",".join(p.endpoint for p in self.proxies[n])
        d = Daemon(n, ["--etcd", eps, "agent", "--name", n, "--fake-root", str(self.fake_root),
                       "--memory-mib", "4096", "--vcpus", "8", "--log-format", "json"],
                   self.workdir / f"agent-{n}.log")
        self.agents[n] = d.start()

    def start_orch(self, o: str) -> None:
        assert self.etcd is not None
        d = Daemon(o, ["--etcd", self.etcd.endpoints, "orchestrator", "--name", o,
                       "--log-format", "json"], self.workdir / f"orch-{o}.log")
        self.orchs[o] = d.start()

    def _supervise(self) -> None:
        """systemd's Restart=always with RestartSec=0.5 for agents and orchestrators."""
        while not self._sup_stop.wait(0.1):
            for n, d in list(self.agents.items()) + list(self.orchs.items()):
                if n in self.held or d.alive():
                    self._dead_since.pop(n, None)
                    continue
                since = self._dead_since.setdefault(n, time.monotonic())
                if time.monotonic() - since >= 0.5:
                    self._dead_since.pop(n, None)
                    if n in self.agents:
                        if d.proc is not None and d.proc.returncode == -signal.SIGKILL \
                                and "guard_fired" in d.log_text()[-20000:]:
                            self.guard_kills += 1
                        self.agent_restarts += 1
                        self.start_agent(n)
                    else:
                        self.start_orch(n)

    def stop(self) -> None:
        self._sup_stop.set()
        if self.sampler:
            self.sampler.stop()
        for d in [*self.agents.values(), *self.orchs.values()]:
            d.kill()
        # Guards outlive their agents by design: end them by the pid they wrote.
        time.sleep(0.2)
        for n in self.nodes:
            try:
                pid = int((self.fake_root / n / "host.pid").read_text())
                import os

                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
        for ps in self.proxies.values():
            for p in ps:
                p.close()
        if self.store:
            self.store.close()
        if self.etcd:
            self.etcd.stop()

    # ---- observation -------------------------------------------------------------------

    def truth(self) -> dict[str, list[str]]:
        return fake_ground_truth(self.fake_root)

    def leader(self) -> str | None:
        assert self.store is not None
        try:
            kv = self.store.get(KS.leader)
        except StoreUnavailable:
            return None
        return str(json.loads(kv.value)["id"]) if kv else None

    def registrations(self) -> dict[str, int]:
        assert self.store is not None
        try:
            return {kv.key.rsplit("/", 1)[1]: kv.create_revision
                    for kv in self.store.get_prefix(KS.prefix + "/nodes/")}
        except StoreUnavailable:
            return {}

    def wait_converged(self, timeout: float, watch: list[str] | None = None,
                       t0: float | None = None, rec: StepResult | None = None,
                       replaced: dict[str, int] | None = None) -> bool:
        """I2: every declared VM runs exactly once, every agent is registered, and each
        node in `replaced` holds a registration other than the one it had (its agent
        died and came back).  A watched VM's recovery time runs from `t0` to the first
        time it is seen running again after having been seen down."""
        end = time.monotonic() + timeout
        pending = set(watch or [])
        down: set[str] = set()
        while time.monotonic() < end:
            truth = self.truth()
            now = time.monotonic()
            for vm in list(pending):
                if len(truth.get(vm, [])) != 1:
                    down.add(vm)
                elif vm in down:
                    pending.discard(vm)
                    if rec is not None and t0 is not None:
                        rec.recovery_s[vm] = round(now - t0, 3)
            if all(len(truth.get(vm, [])) == 1 for vm in self.vms):
                regs = self.registrations()
                fresh = all(regs.get(n, c) != c for n, c in (replaced or {}).items())
                if set(regs) >= set(self.nodes) and fresh and self.leader():
                    return True
            time.sleep(0.05)
        return False

    # ---- faults ------------------------------------------------------------------------

    def vms_on(self, n: str) -> list[str]:
        return sorted(vm for vm, ns in self.truth().items() if n in ns)

    def step(self, i: int, kind: str | None = None, node: str | None = None) -> StepResult:
        """One fault, healed, then converged and checked; random unless kind/node given."""
        assert self.etcd is not None and self.store is not None and self.history is not None
        if kind is None:
            kind = self.rng.choice(self.faults)
        # Agent faults hit a node that runs VMs (else they prove nothing).
        busy = sorted({n for ns in self.truth().values() for n in ns})
        if node is None:
            node = self.rng.choice(busy or self.nodes)
        rec = StepResult(i, kind, node, time.time())
        t0 = time.monotonic()
        watch: list[str] = []
        replaced: dict[str, int] = {}
        ttl = 2.0
        watch = sorted(self.truth())  # recovery is timed for every VM that goes down
        if kind in AGENT_FAULTS:
            reg = self.registrations().get(node)
            if reg is not None:
                replaced[node] = reg
        if kind == "kill_agent":
            self.agents[node].kill()
        elif kind == "stop_agent":
            self.held.add(node)
            self.agents[node].signal(signal.SIGSTOP)
            time.sleep(ttl + self.rng.uniform(1.0, 2.0))
            self.agents[node].signal(signal.SIGCONT)
            self.held.discard(node)
            if not self.agents[node].alive():
                rec.notes.append("agent killed by its guard while stopped")
        elif kind == "partition_agent":
            for p in self.proxies[node]:
                p.block()
            time.sleep(ttl + self.rng.uniform(0.5, 2.0))
            for p in self.proxies[node]:
                p.unblock()
        elif kind in ("fence_hang", "fence_fail"):
            self.mode_file.write_text("hang" if kind == "fence_hang" else "fail")
            self.held.add(node)
            self.agents[node].kill()
            time.sleep(ttl + self.rng.uniform(2.0, 4.0))
            self.mode_file.write_text("ok")
            self.held.discard(node)
        elif kind == "kill_leader":
            rec.target = self.leader() or "-"
            if rec.target in self.orchs:
                self.orchs[rec.target].kill()
        elif kind == "stop_leader":
            rec.target = self.leader() or "-"
            if rec.target in self.orchs:
                d = self.orchs[rec.target]
                self.held.add(rec.target)
                d.signal(signal.SIGSTOP)
                time.sleep(ttl + self.rng.uniform(0.5, 2.0))
                d.signal(signal.SIGCONT)
                self.held.discard(rec.target)
        elif kind == "kill_etcd":
            m = self.rng.choice(self.etcd.members)
            rec.target = m.name
            self.etcd.kill_member(m)
            time.sleep(self.rng.uniform(0.2, 2.0))
            self.etcd.start_member(m)
        elif kind == "quorum_loss":
            ms = self.rng.sample(self.etcd.members, 2)
            rec.target = "+".join(m.name for m in ms)
            for m in ms:
                self.etcd.kill_member(m)
            time.sleep(ttl + self.rng.uniform(0.5, 2.0))
            for m in ms:
                self.etcd.start_member(m)
        elif kind == "compact":
            self.history.caught_up()
            try:
                rev = min(self.store.revision(), self.history.last_rev)
                if rev > self.compacted:  # etcd refuses to compact twice to one revision
                    self.store.client.compact(rev)
                    self.compacted = rev
                rec.target = f"rev{rev}"
            except Exception as exc:  # noqa: BLE001 - etcd may be busy: note it
                rec.notes.append(f"compact failed: {exc!r}")
        elif kind == "capacity":
            big = f"big{i}"
            self.store.put(KS.vm_spec(big), VmSpec(name=big, domain_xml=xml(big, 100000),
                                                   memory_mib=100000, vcpus=1).to_json())
            ok = False
            end = time.monotonic() + 10
            while time.monotonic() < end and not ok:
                kv = self.store.get(KS.vm_placement(big))
                if kv:
                    pl = Placement.from_json(kv.value)
                    ok = pl.kind == "pending" and bool(pl.reason)
                time.sleep(0.05)
            if not ok:
                rec.notes.append("I4: unplaceable VM not visibly pending")
                self.sampler.violations.append({"invariant": "I4", "vm": big})  # type: ignore[union-attr]
            self.store.delete(KS.vm_spec(big))
            self.store.delete(KS.vm_placement(big))
            rec.target = big
        rec.converged = self.wait_converged(self.converge_s, watch, t0, rec, replaced)
        rec.duration_s = round(time.monotonic() - t0, 3)
        if not rec.converged:
            rec.notes.append(f"I2: not converged within {self.converge_s} s: {self.truth()}")
        if not self.history.caught_up():
            rec.notes.append("history watch behind")
        return rec

    def run(self, steps: int, deadline: float | None = None) -> None:
        for i in range(steps):
            if deadline is not None and time.monotonic() > deadline:
                self.log(f"time budget reached after {i} steps")
                break
            r = self.step(i)
            self.results.append(r)
            v = len(self.violations())
            self.log(f"step {i} {r.kind} {r.target}: {r.duration_s:.1f}s converged="
                     f"{r.converged} violations={v} {' '.join(r.notes)[:200]}")

    def violations(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.sampler:
            out += self.sampler.violations
        if self.history:
            out += self.history.violations
        out += [{"invariant": "I2", "step": r.step, "kind": r.kind}
                for r in self.results if not r.converged]
        return out

    def summary(self) -> dict[str, Any]:
        rec = [s for r in self.results for s in r.recovery_s.values()]
        by_kind: dict[str, int] = {}
        for r in self.results:
            by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
        viol = self.violations()
        return {
            "seed": self.seed, "guard": self.guard, "fence_policy": self.fence_policy,
            "faults": len(self.results), "by_kind": by_kind,
            "violations": len(viol), "violation_samples": viol[:20],
            "i1_samples": self.sampler.samples if self.sampler else 0,
            "i3_checked": self.history.checked if self.history else {},
            "recovery_s": {"n": len(rec), "p50": pct(rec, 50), "p95": pct(rec, 95),
                           "max": max(rec) if rec else None,
                           "mean": round(statistics.mean(rec), 3) if rec else None},
            "agent_restarts": self.agent_restarts, "guard_kills": self.guard_kills,
            "duration_s": round(sum(r.duration_s for r in self.results), 1),
            "steps": [r.__dict__ for r in self.results],
        }


def run_campaign(seed: int, steps: int, *, workdir: Path | None = None, guard: bool = True,
                 fence_policy: str = "self", faults: tuple[str, ...] = ALL_FAULTS,
                 deadline: float | None = None, verbose: bool = True) -> dict[str, Any]:
    wd = workdir or Path(tempfile.mkdtemp(prefix=f"vmha-campaign-{seed}-"))
    c = Campaign(seed, wd, guard=guard, fence_policy=fence_policy, faults=faults,
                 verbose=verbose)
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
        node = max(c.nodes, key=lambda n: len(c.vms_on(n)))
        c.held.add(node)
        c.agents[node].signal(signal.SIGSTOP)
        end = time.monotonic() + 15
        while time.monotonic() < end and not c.sampler.violations:  # type: ignore[union-attr]
            time.sleep(0.1)
        c.agents[node].signal(signal.SIGCONT)
        time.sleep(3.0)  # the resumed agent acts on stale state: etcd must refuse its writes
        assert c.history is not None
        c.history.caught_up()
        return {"double_runs_seen": len(c.sampler.violations),  # type: ignore[union-attr]
                "first": c.sampler.violations[:1],  # type: ignore[union-attr]
                "stale_writes_accepted": len(c.history.violations)}
    finally:
        c.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.campaign")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--policy", choices=["self", "external", "both", "mixed"], default="mixed",
                    help="mixed: odd seeds self, even seeds both")
    ap.add_argument("--minutes", type=float, help="stop starting new steps after this long")
    ap.add_argument("--negative-control", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.negative_control:
        res = negative_control(a.seeds[0])
        print(json.dumps(res, indent=2))
        return 0 if res["double_runs_seen"] else 1
    started = time.monotonic()
    deadline = started + a.minutes * 60 if a.minutes else None
    runs = []
    for seed in a.seeds:
        if deadline is not None and time.monotonic() > deadline:
            break
        policy = a.policy if a.policy != "mixed" else ("self" if seed % 2 else "both")
        runs.append(run_campaign(seed, a.steps, fence_policy=policy, deadline=deadline))
    rec = [s for r in runs for st in r["steps"] for s in st["recovery_s"].values()]
    total = {"seeds": [r["seed"] for r in runs], "faults": sum(r["faults"] for r in runs),
             "violations": sum(r["violations"] for r in runs),
             "wall_s": round(time.monotonic() - started, 1),
             "recovery_s": {"n": len(rec), "p50": pct(rec, 50), "p95": pct(rec, 95)},
             "runs": runs}
    summary = {k: v for k, v in total.items() if k != "runs"}
    print(json.dumps(summary, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(total, indent=2))
    return 0 if total["violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
