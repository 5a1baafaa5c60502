"""The simulated world of a scenario: an etcd-like key store and each node's hypervisor.

The store keeps every value as JSON with its create/mod revision and lease, bumps the
revision on each write, and checks transaction compares as etcd does; a snapshot goes
through `ClusterSnapshot.from_kvs`, the daemons' own parsing.  Domains are what each
node's hypervisor runs.  Nothing here decides: the planners do (tests/scenarios/actors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hypervisor.base import Domain, DomainState
from orchestrator.model_v2 import LeaderModel
from schemas.keys import Keyspace
from schemas.models import Model
from schemas.snapshot import ClusterSnapshot, RawKV

KS = Keyspace()
WALL0 = 1_700_000_000.0  # wall clock at virtual time 0


class ScenarioError(ValueError):
    """The scenario's files are wrong (a bad event, an unknown node or VM)."""


@dataclass
class Rec:
    value: dict[str, Any]
    create_revision: int
    mod_revision: int
    lease: int = 0


# A compare: (key, "create" | "mod", expected revision; 0 means "does not exist").
Compare = tuple[str, str, int]


@dataclass
class Store:
    revision: int
    kv: dict[str, Rec] = field(default_factory=dict)
    # (node, VM) -> the last status that node wrote of VM: the status keys keyspace 2
    # keeps per node (tests/scenarios/v2.py), superseded ones included.
    status_writes: dict[tuple[str, str], Rec] = field(default_factory=dict)

    def get(self, key: str) -> Rec | None:
        return self.kv.get(key)

    def put(self, key: str, value: Model | dict[str, Any], lease: int = 0) -> int:
        self.revision += 1
        data = value if isinstance(value, dict) else value.model_dump(by_alias=True,
                                                                      mode="json")
        old = self.kv.get(key)
        create = old.create_revision if old is not None else self.revision
        self.kv[key] = Rec(data, create, self.revision, lease)
        if key.endswith("/status") and key.startswith(KS.root + "vms/"):
            self.status_writes[(str(data.get("node")), str(data.get("vm")))] = self.kv[key]
        return self.revision

    def delete(self, key: str) -> None:
        if key in self.kv:
            self.revision += 1
            del self.kv[key]

    def holds(self, compares: list[Compare]) -> bool:
        for key, what, expected in compares:
            rec = self.kv.get(key)
            actual = 0 if rec is None else (rec.create_revision if what == "create"
                                            else rec.mod_revision)
            if actual != expected:
                return False
        return True

    def txn(self, compares: list[Compare], key: str, value: Model | None,
            lease: int = 0) -> bool:
        """One put (or delete, value None) if every compare holds."""
        if not self.holds(compares):
            return False
        if value is None:
            self.delete(key)
        else:
            self.put(key, value, lease)
        return True

    def snapshot(self) -> ClusterSnapshot:
        kvs = [RawKV(k, json.dumps(r.value).encode(), r.create_revision, r.mod_revision,
                     r.lease) for k, r in sorted(self.kv.items())]
        snap = ClusterSnapshot.from_kvs(KS, self.revision, kvs)
        if snap.errors:
            raise ScenarioError(f"invalid values in the scenario: {[str(e) for e in snap.errors]}")
        return snap


@dataclass
class Dom:
    state: DomainState
    managed: bool = True
    incoming: bool = False
    arrived_from: str | None = None  # the source of the live migration that brought it

    def domain(self, name: str) -> Domain:
        return Domain(name, self.state, managed=self.managed, incoming=self.incoming)

    @property
    def active(self) -> bool:
        return self.state in ("running", "paused")


@dataclass
class Migration:
    vm: str
    source: str
    target: str
    placement_id: str
    started: float = 0.0  # virtual time (the source's clock for migration_timeout_s)
    # The source asked libvirt to abort it (the reason): the job ends, aborted, at its
    # next event (`migration-done` then means the abort won the race).
    aborting: str = ""


@dataclass
class NodeSim:
    """One hypervisor host and its agent."""

    name: str
    registration: dict[str, Any]  # the JSON the agent registers (lease id and flags vary)
    domains: dict[str, Dom] = field(default_factory=dict)
    # up | down (crashed, killed, exited) | stuck (revoked, not back) | off (not simulated)
    agent: str = "up"
    token: int = 0  # create_revision of its registration: the agent's fencing token
    busy: set[str] = field(default_factory=set)  # VMs migrating out
    backoff: dict[tuple[str, str], float] = field(default_factory=dict)  # (vm, target)
    exiting: bool = False  # SIGTERM: drain, then leave
    refuse: dict[str, str] = field(default_factory=dict)  # VM -> the error its boot gets
    deadline: float | None = None  # a stuck agent self-fences at this virtual time
    back_at: float | None = None  # a revoked agent registers again at this virtual time
    back_cordoned: bool = True  # ... cordoned (a drain), or not (etcd revoked both leases)

    def domains_view(self) -> dict[str, Domain]:
        return {vm: d.domain(vm) for vm, d in self.domains.items()}


@dataclass
class LeaderSim:
    enabled: bool = True
    epoch: int = 1
    lost_since: dict[str, float] = field(default_factory=dict)
    last_leases: dict[str, str] = field(default_factory=dict)
    # Keyspace 2's liveness fencing ("liveness" in start.json): the mode the leader
    # resolved; "off" (every older scenario): no liveness keys are simulated at all.
    liveness: str = "off"
    both_gone_since: dict[str, float] = field(default_factory=dict)
    external: set[str] = field(default_factory=set)  # nodes whose fence device runs
    waits: dict[str, str] = field(default_factory=dict)  # VM -> its last logged wait


@dataclass
class World:
    store: Store
    nodes: dict[str, NodeSim]
    leader: LeaderSim
    t: float = 0.0
    tick_s: float = 1.0
    auto_migrate: bool = False
    migrations: list[Migration] = field(default_factory=list)
    leases: int = 0x1A2B  # the last lease id handed out
    log: list[str] = field(default_factory=list)
    version: int = 0  # bumped on every change to the hypervisors
    keyspace: int = 1  # 2: the leader decides on keyspace 2's adapter (tests/scenarios/v2.py)
    leader_model: LeaderModel | None = None  # keyspace 2: what the leader decided on

    @property
    def wall(self) -> float:
        return WALL0 + self.t

    def node(self, name: str) -> NodeSim:
        if name not in self.nodes:
            raise ScenarioError(f"unknown node {name!r}")
        return self.nodes[name]

    def changed(self) -> None:
        self.version += 1

    def emit(self, actor: str, verb: str, subject: str, detail: str = "",
             reason: str = "") -> None:
        t = self.t
        stamp = f"{t:.1f}" if abs(t * 10 - round(t * 10)) < 1e-9 else f"{t:g}"
        line = f"{stamp:>7}  {actor:<7} {verb:<10} {subject}"
        if detail:
            line += f" {detail}"
        if reason:
            line += f" -- {reason}"
        self.log.append(line.rstrip())

    def register(self, name: str) -> None:
        """The node's agent registers with a new lease (cordoned if a marker says so)."""
        n = self.node(name)
        self.leases += 1
        reg = {**n.registration, "lease_id": f"{self.leases:x}",
               "cordoned": self.store.get(KS.cordon(name)) is not None,
               "registered_at": self.wall}
        self.store.put(KS.node(name), reg, lease=self.leases)
        self.store.delete(KS.leaving(name))  # same transaction in nodeagent.membership
        if self.leader.liveness != "off":  # the liveness key, in the same transaction
            self.store.put(KS.alive(name), {"schema": 1, "node": name,
                                            "lease_id": f"{self.leases:x}", "at": self.wall})
        rec = self.store.get(KS.node(name))
        assert rec is not None
        n.token, n.agent, n.deadline = rec.create_revision, "up", None
        self.emit(name, "register", name, f"lease {self.leases:x}",
                  "cordoned" if reg["cordoned"] else "")

    def lease_gone(self, name: str, alive_too: bool = False) -> None:
        """The node's registration disappears (lease expired or revoked); `alive_too`:
        its liveness key as well (both leases expired, or etcd revoked both)."""
        self.store.delete(KS.node(name))
        if alive_too and self.store.get(KS.alive(name)) is not None:
            self.store.delete(KS.alive(name))
