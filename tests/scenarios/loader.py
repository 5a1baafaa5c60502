"""A scenario's `start.json` (compact cluster state) read into a `World`.

Every value is completed with defaults, stored as the JSON the daemons write, and read
back through the real validation, so a start file that loads is a state the leader and
the agents could see.  The format is described in tests/scenarios/README.md.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas.models import RUNNING_STATES
from tests.scenarios.model import (
    KS,
    WALL0,
    Dom,
    LeaderSim,
    NodeSim,
    Rec,
    ScenarioError,
    Store,
    World,
)

DEFAULT_REVISION = 100
TOP_KEYS = {"comment", "revision", "epoch", "tick_s", "auto_migrate", "leader", "agents",
            "config", "nodes", "cordons", "fences", "vms", "placements", "statuses", "moves",
            "domains", "refuse", "liveness"}


def domain_xml(name: str) -> str:
    return f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory></domain>"


def registration(name: str, data: dict[str, Any]) -> dict[str, Any]:
    extra = {k: v for k, v in data.items()
             if k not in ("memory_mib", "vcpus", "registered", "mod_revision")}
    return {"schema": 1, "name": name, "lease_id": "0",
            "libvirt_uri": f"qemu+tcp://{name}/system",
            "migration_address": f"10.0.0.{len(name)}",
            "capacity": {"memory_mib": data.get("memory_mib", 8192),
                         "vcpus": data.get("vcpus", 8)},
            "cpu": {"model": "qemu64", "vendor": "AMD"}, "cordoned": False,
            "agent": {"pid": 1234, "hostname": f"host-{name}", "version": "0.1.0"},
            "registered_at": WALL0, **extra}


def spec(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"schema": 1, "name": name, "domain_xml": domain_xml(name), "memory_mib": 1024,
            "vcpus": 1, **data}


def fence(node: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"schema": 1, "node": node, "lease_id": "1a2b", "method": "self",
            "outcome": "success", "reason": "lease expired", "epoch": 1, "duration_s": 1.0,
            "fenced_at": 2.0, **data}


def placement(vm: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"schema": 1, "vm": vm, "id": "p1", "node": None, "from_node": None, "epoch": 1,
            "reason": "test", "scores": {}, "decided_at": 10.0, **data}


def status(vm: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"schema": 1, "vm": vm, "placement_id": None, "since": 5.0, **data}


def _mapping(data: Any, what: str) -> dict[str, dict[str, Any]]:
    if isinstance(data, list):
        return {name: {} for name in data}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ScenarioError(f"{what}: expected a list of names or an object of objects")
    return data


class _Keys:
    """Puts keys with their given mod_revision, or the next free one from 10 up."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.auto: Iterator[int] = itertools.count(10)

    def put(self, key: str, value: dict[str, Any], lease: int = 0) -> Rec:
        value = dict(value)
        mod = value.pop("mod_revision", None)
        rev = int(mod) if mod is not None else next(self.auto)
        rec = Rec(value, rev, rev, lease)
        self.store.kv[key] = rec
        return rec


# The timing the scenarios' waits were written for (a TTL of 5 s, a 10 s fence window):
# the defaults before issue 11 raised them, with RPC and election timeouts that keep them
# valid under the member-fault rule (docs/fencing.md).  A scenario's "config" overrides it.
SCENARIO_TIMING = {"lease_ttl_s": 5, "keepalive_interval_s": 1.0, "keepalive_timeout_s": 0.25,
                   "etcd_election_timeout_s": 0.5}


def load_world(data: dict[str, Any]) -> World:
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise ScenarioError(f"start.json: unknown keys {sorted(unknown)}")
    store = Store(int(data.get("revision", DEFAULT_REVISION)))
    keys = _Keys(store)
    epoch = int(data.get("epoch", 1))
    keys.put(KS.leader, {"schema": 1, "id": "leader-1", "host": "h1", "pid": 99,
                         "lease_id": "ff", "elected_at": WALL0, "mod_revision": epoch})
    if "config" in data:
        keys.put(KS.config, {"schema": 1, **SCENARIO_TIMING, **data["config"]})
    else:
        keys.put(KS.config, {"schema": 1, **SCENARIO_TIMING, "mod_revision": 5})
    nodes = _load_nodes(data, keys)
    _load_keys(data, keys)
    top = max((r.mod_revision for r in store.kv.values()), default=0)
    if top > store.revision:
        raise ScenarioError(f"start.json: revision {store.revision} is below a key's "
                            f"mod_revision {top}")
    liveness = str(data.get("liveness", "off"))
    if liveness not in ("off", "fast", "bounded"):
        raise ScenarioError(f"start.json: liveness {liveness!r} is not off, fast or bounded")
    if liveness != "off":  # each registered node's liveness key
        for name, n in nodes.items():
            if n.token:
                keys.put(KS.alive(name), {"schema": 1, "node": name, "lease_id": "1a2c",
                                          "at": WALL0}, 0x1A2C)
    world = World(store, nodes, LeaderSim(enabled=bool(data.get("leader", True)), epoch=epoch,
                                          liveness=liveness),
                  tick_s=float(data.get("tick_s", 1.0)),
                  auto_migrate=bool(data.get("auto_migrate", False)))
    _load_domains(world, data)
    _select_agents(world, data.get("agents"))
    for node, refused in data.get("refuse", {}).items():  # as `boot-refused` events at 0
        world.node(node).refuse.update(refused)
    store.snapshot()  # every value must validate
    return world


def _load_keys(data: dict[str, Any], keys: _Keys) -> None:
    """Cordon markers, fence records, specs, placements, statuses, move requests."""
    store = keys.store
    for name, c in _mapping(data.get("cordons", []), "cordons").items():
        keys.put(KS.cordon(name), {"schema": 1, "node": name, "reason": "maintenance",
                                   "by": "operator", "at": WALL0, **c})
        if KS.node(name) in store.kv:
            store.kv[KS.node(name)].value["cordoned"] = True
    for name, f in _mapping(data.get("fences", {}), "fences").items():
        keys.put(KS.fence(name), fence(name, f))
    for vm, s in _mapping(data.get("vms", {}), "vms").items():
        keys.put(KS.vm_spec(vm), spec(vm, s))
    for vm, p in _mapping(data.get("placements", {}), "placements").items():
        keys.put(KS.vm_placement(vm), placement(vm, p))
    for vm, s in _mapping(data.get("statuses", {}), "statuses").items():
        keys.put(KS.vm_status(vm), status(vm, s))
    for vm, m in _mapping(data.get("moves", {}), "moves").items():
        keys.put(KS.vm_move(vm), {"schema": 1, "vm": vm, "by": "operator",
                                  "requested_at": WALL0, **m})


def _load_nodes(data: dict[str, Any], keys: _Keys) -> dict[str, NodeSim]:
    nodes: dict[str, NodeSim] = {}
    for name, nd in _mapping(data.get("nodes", {}), "nodes").items():
        reg = registration(name, nd)
        n = NodeSim(name, reg)
        nodes[name] = n
        if nd.get("registered", True):
            mod = {"mod_revision": nd["mod_revision"]} if "mod_revision" in nd else {}
            rec = keys.put(KS.node(name), {**reg, "lease_id": "1a2b", **mod}, 0x1A2B)
            n.token = rec.create_revision
        else:
            n.agent = "down"
    return nodes


def _load_domains(world: World, data: dict[str, Any]) -> None:
    """Explicit `domains`, else one per running status on a registered node."""
    if "domains" in data:
        for node, doms in data["domains"].items():
            n = world.node(node)
            for vm, d in doms.items():
                n.domains[vm] = Dom(**d) if isinstance(d, dict) else Dom(d)
        return
    for key, rec in world.store.kv.items():
        ref = KS.parse(key)
        if ref is None or ref.kind != "vm_status":
            continue
        st, node = rec.value["state"], rec.value["node"]
        if st in RUNNING_STATES and node in world.nodes and world.nodes[node].agent == "up":
            world.nodes[node].domains[ref.name] = Dom("paused" if st == "paused" else "running")


def _select_agents(world: World, agents: Any) -> None:
    if agents is None:
        return
    for name, n in world.nodes.items():
        if name not in agents and n.agent == "up":
            n.agent = "off"  # registered, but its agent takes no part in this scenario


def load_start(path: Path) -> World:
    import json

    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ScenarioError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: expected a JSON object")
    return load_world(data)
