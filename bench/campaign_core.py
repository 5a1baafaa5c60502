"""What the two fault campaigns share (:mod:`bench.campaign` on the fake hypervisor,
:mod:`bench.lab_campaign` on the lab): supervision of the daemons, the cluster as etcd
shows it, settling after a fault (I2) with per-VM recovery times, and the results.

I1 (never two running copies), I3 (no stale write accepted) and I4 (visibly pending)
are checked by :mod:`lab.invariants`; I2 is here: after each fault, every declared VM
runs again (exactly once), every agent is alive and registered (the faulted ones with
a new registration), and there is a leader (a new one after the leader was killed).

Self-fences are counted per step and node: a node self-fenced in a step when its agent's
or its guard's log gained ``self_fence_deadline``, ``self_fenced_domain`` or
``guard_fired`` between the step's start and the end of its settling.  Such a
self-fence is *needed* only when etcd quorum was not reachable from the node (by its
agent) during the fault, which the fault schedule defines: the fault took 2 of the 3
members away (``quorum_loss``), or it cut that node's agent off from etcd, the node
being the fault's target: the agent killed with nothing to adopt its lease
(``kill_agent``, ``fence_hang``, ``fence_fail``: its guard is its own child), frozen
past the TTL (``stop_agent``) or its connections black-holed (``partition_agent``).
Every other self-fence is *needless*: with all members on loopback, one member stalled,
black-holed, killed or restarted, an etcd compaction, a leader fault, hostile values or
an agent restarted within the TTL next to its guard service leave quorum reachable
from every node.  Needless self-fences fail a run like violations.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.campaign_keys import CampaignKeys
from bench.common import pct
from lab.invariants import DoubleRunChecker, HistoryChecker, Truth, TruthSource
from lab.localcluster import Daemon, poll_until
from schemas import Keyspace
from store.etcd import EtcdStore, StoreUnavailable

KS = Keyspace()
#: systemd's RestartSec for the daemons (Restart=always).
RESTART_S = 0.5


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
    self_fenced: list[str] = field(default_factory=list)
    needless: list[str] = field(default_factory=list)


#: Faults that cut their target node's agent off from etcd quorum.
CUT_OFF_FAULTS = ("kill_agent", "stop_agent", "partition_agent", "fence_hang", "fence_fail",
                  "move_kill_source", "move_kill_target", "drain_kill_target")
#: Faults that take etcd quorum away from every node.
NO_QUORUM_FAULTS = ("quorum_loss",)
#: Log events of a self-fence (the agent's deadline, its destroys, a guard firing).
FENCE_EVENTS = ("self_fence_deadline", "self_fenced_domain", "guard_fired")


def needless(kind: str, target: str, node: str) -> bool:
    """Whether ``node``'s self-fence during a ``kind`` fault on ``target`` was needless:
    etcd quorum was reachable from it (see the module docstring)."""
    if kind in NO_QUORUM_FAULTS:
        return False
    return not (kind in CUT_OFF_FAULTS and target == node)


def fence_events(text: str) -> int:
    """How many self-fence events a stretch of JSON log lines holds."""
    n = 0
    for line in text.splitlines():
        if not any(e in line for e in FENCE_EVENTS):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") in FENCE_EVENTS:
            n += 1
    return n


class CampaignCore:
    """A fault campaign's skeleton; subclasses start the cluster and inject the faults.

    Subclasses set ``store``, ``sampler`` and ``history`` when they start, and implement
    :meth:`daemons`, :meth:`restart` and :meth:`step`."""

    #: how a log line starts, and where it goes
    log_tag = "seed"
    log_to_stderr = False
    #: how often settling looks at the cluster
    settle_interval = 0.05

    def __init__(self, seed: int, vms: int, converge_s: float, verbose: bool,
                 source: TruthSource, keys: CampaignKeys | None = None) -> None:
        self.seed = seed
        # The keyspace the cluster runs (and the checkers read): 1 unless told.
        self.keys = keys or CampaignKeys()
        self.vms = [f"vm{i}" for i in range(vms)]
        self.converge_s = converge_s
        self.verbose = verbose
        self.source = source
        self.store: EtcdStore | None = None
        self.sampler: DoubleRunChecker | None = None
        self.history: HistoryChecker | None = None
        self.held: set[str] = set()  # daemons the supervisor must not restart now
        self.results: list[StepResult] = []
        self.i4: list[dict[str, Any]] = []
        self.flagged: list[dict[str, Any]] = []  # a fault's own check failed
        self.restarts = {"agent": 0, "orchestrator": 0}
        self._sup_stop = threading.Event()
        self._sup_lock = threading.Lock()
        self._dead_since: dict[str, float] = {}

    # ---- to implement ----------------------------------------------------------------

    def daemons(self) -> dict[str, dict[str, Daemon]]:
        """``{"agent": {name: daemon}, "orchestrator": {name: daemon}}``."""
        raise NotImplementedError

    def restart(self, kind: str, name: str, dead: Daemon) -> None:
        raise NotImplementedError

    def step(self, i: int) -> StepResult:
        raise NotImplementedError

    def report_step(self, r: StepResult) -> None:
        raise NotImplementedError

    def fence_logs(self) -> dict[str, list[Path]]:
        """Node -> the logs its self-fences show in (agent, guard); none by default."""
        return {}

    # ---- self-fences -----------------------------------------------------------------

    def log_marks(self) -> dict[Path, int]:
        """Where each fence log ends now (a step's self-fences are after it)."""
        return {p: (p.stat().st_size if p.exists() else 0)
                for ps in self.fence_logs().values() for p in ps}

    def count_fences(self, rec: StepResult, marks: dict[Path, int]) -> None:
        """Into ``rec``: the nodes that self-fenced since ``marks``, and which needlessly."""
        for node, paths in self.fence_logs().items():
            n = 0
            for p in paths:
                if not p.exists():
                    continue
                with p.open("rb") as f:
                    f.seek(marks.get(p, 0))
                    n += fence_events(f.read().decode(errors="replace"))
            if n:
                rec.self_fenced.append(node)
                if needless(rec.kind, rec.target, node):
                    rec.needless.append(node)
                    rec.notes.append(f"needless self-fence of {node}")

    # ---- supervision -----------------------------------------------------------------

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[{self.log_tag} {self.seed} {time.strftime('%H:%M:%S')}] {msg}",
                  file=sys.stderr if self.log_to_stderr else sys.stdout, flush=True)

    def start_supervisor(self) -> None:
        threading.Thread(target=self._supervise, daemon=True).start()

    def hold(self, name: str) -> None:
        """Keep the supervisor from restarting ``name`` (it may be mid-round)."""
        with self._sup_lock:
            self.held.add(name)

    def release(self, name: str) -> None:
        """Let the supervisor restart ``name`` again."""
        with self._sup_lock:
            self.held.discard(name)

    def _supervise(self) -> None:
        """systemd's Restart=always with RestartSec=0.5, for agents and orchestrators."""
        while not self._sup_stop.wait(0.1):
            with self._sup_lock:
                for kind, ds in self.daemons().items():
                    for n, d in list(ds.items()):
                        if n in self.held or d.alive():
                            self._dead_since.pop(n, None)
                            continue
                        since = self._dead_since.setdefault(n, time.monotonic())
                        if time.monotonic() - since >= RESTART_S:
                            self._dead_since.pop(n, None)
                            self.restarts[kind] += 1
                            self.restart(kind, n, d)

    def stop_checks(self) -> None:
        """Stop the supervisor and the I1 sampler."""
        self._sup_stop.set()
        if self.sampler:
            self.sampler.stop()

    # ---- observation -----------------------------------------------------------------

    def truth(self) -> Truth:
        return self.source.read()

    def vms_on(self, n: str) -> list[str]:
        return sorted(vm for vm, ns in self.truth().items() if n in ns)

    def busy_nodes(self) -> list[str]:
        return sorted({n for ns in self.truth().values() for n in ns})

    def get_json(self, key: str) -> dict[str, Any] | None:
        assert self.store is not None
        try:
            kv = self.store.get(key)
        except StoreUnavailable:
            return None
        return dict(json.loads(kv.value)) if kv else None

    def leader(self) -> str | None:
        d = self.get_json(self.keys.leader)
        return str(d["id"]) if d else None

    def leader_rev(self) -> int | None:
        """The leader's epoch (its key's create revision)."""
        assert self.store is not None
        try:
            kv = self.store.get(self.keys.leader)
        except StoreUnavailable:
            return None
        return int(kv.create_revision) if kv else None

    def registrations(self) -> dict[str, int]:
        """Node -> the create revision of its registration (new after a re-register)."""
        assert self.store is not None
        try:
            kvs = self.store.get_prefix(self.keys.reg_scan)
        except StoreUnavailable:
            return {}
        return {node: kv.create_revision for kv in kvs
                if (node := self.keys.reg_node(kv.key)) is not None}

    # ---- I2: settling --------------------------------------------------------------------

    def settled(self, replaced: dict[str, int], old_leader: int | None) -> bool:
        """Every declared VM runs exactly once, every agent is alive and registered (each
        node in ``replaced`` with another registration than that one), and there is a
        leader other than ``old_leader``."""
        truth = self.truth()
        if not all(len(truth.get(vm, [])) == 1 for vm in self.vms):
            return False
        agents = self.daemons()["agent"]
        if not all(d.alive() for d in agents.values()):
            return False
        regs = self.registrations()
        if not set(regs) >= set(agents):
            return False
        if any(regs[n] == created for n, created in replaced.items()):
            return False  # the faulted agent's old registration is still there
        rev = self.leader_rev()
        return rev is not None and rev != old_leader

    def wait_settled(self, timeout: float, *, t0: float | None = None,
                     rec: StepResult | None = None, watch: list[str] | None = None,
                     replaced: dict[str, int] | None = None, old_leader: int | None = None,
                     min_wait: float = 0.0, stable_s: float = 0.0) -> bool:
        """:meth:`settled`, not before ``min_wait`` s (a fault's effects show only after
        the lease TTL and the fence window) and held for ``stable_s``.  Into ``rec``: per
        VM of ``watch`` (default: all), the recovery time from ``t0`` (monotonic) to the
        first sample that saw it running again after one that saw it down."""
        start = time.monotonic()
        ok_since: list[float] = []

        def held() -> bool:
            now = time.monotonic()
            if not self.settled(replaced or {}, old_leader):
                ok_since.clear()
                return False
            ok_since[:] = ok_since or [now]
            return now - start >= min_wait and now - ok_since[0] >= stable_s

        ok = poll_until(held, timeout, self.settle_interval) is not None
        if rec is not None and t0 is not None and self.sampler is not None:
            rec.recovery_s = self.sampler.recovery(watch or self.vms, t0)
            rec.affected = sorted(rec.recovery_s)
        return ok

    # ---- results -------------------------------------------------------------------------

    def run(self, steps: int, deadline: float | None = None) -> None:
        for i in range(steps):
            if deadline is not None and time.monotonic() > deadline:
                self.log(f"time budget reached after {i} steps")
                break
            r = self.step(i)
            self.results.append(r)
            self.report_step(r)

    def violations(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.sampler:
            out += self.sampler.violations
        if self.history:
            out += self.history.violations
        out += [{"invariant": "I2", "step": r.step, "kind": r.kind}
                for r in self.results if not r.converged]
        out += self.i4
        out += self.flagged
        return out

    def needless_fences(self) -> list[dict[str, Any]]:
        return [{"step": r.step, "kind": r.kind, "target": r.target, "node": n}
                for r in self.results for n in r.needless]

    def recovery_times(self) -> list[float]:
        return [s for r in self.results for s in r.recovery_s.values()]

    def checks(self) -> dict[str, Any]:
        """How much the checkers saw, and what they found."""
        viol = self.violations()
        per_inv: dict[str, int] = {}
        for v in viol:
            per_inv[v["invariant"]] = per_inv.get(v["invariant"], 0) + 1
        by_kind: dict[str, int] = {}
        for r in self.results:
            by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
        fenced: dict[str, int] = {}
        for r in self.results:
            for n in r.self_fenced:
                fenced[n] = fenced.get(n, 0) + 1
        return {"faults": len(self.results), "by_kind": by_kind,
                "self_fences": sum(fenced.values()), "self_fences_by_node": fenced,
                "needless_self_fences": len(self.needless_fences()),
                "needless_samples": self.needless_fences()[:20],
                "violations": len(viol), "violations_by_invariant": per_inv,
                "violation_samples": viol[:20],
                "i1_samples": self.sampler.samples if self.sampler else 0,
                "i1_transient_doubles": self.sampler.transient_doubles if self.sampler else 0,
                "i3_checked": self.history.checked if self.history else {}}

    @staticmethod
    def spread(xs: list[float]) -> dict[str, Any]:
        return {"n": len(xs), "p50": pct(xs, 50), "p95": pct(xs, 95),
                "max": max(xs) if xs else None}


__all__ = ["CUT_OFF_FAULTS", "KS", "NO_QUORUM_FAULTS", "CampaignCore", "StepResult",
           "fence_events", "needless"]
