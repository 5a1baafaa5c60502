"""Build ClusterSnapshots from concise Python data, through the real JSON path.

Every value is serialised to JSON and parsed back by ``ClusterSnapshot.from_kvs``,
so the tests exercise key parsing and validation exactly as the daemons do.

    snap = cluster(
        nodes={"a": (8192, 8), "b": (4096, 4)},
        cordons=["a"],
        fences={"x": 42},                       # node -> mod_revision of its fence record
        specs={"vm1": (1024, 1), "vm2": (512, 1, "stopped")},
        placements={"vm1": boot("a", id="p1")},
        statuses={"vm1": running("a", "p1")},
    )
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from typing import Any

from schemas.keys import Keyspace
from schemas.snapshot import ClusterSnapshot, RawKV

KS = Keyspace()
DEFAULT_REVISION = 100

NodeData = tuple[int, int] | Mapping[str, Any]
SpecData = tuple[int, int] | tuple[int, int, str]


def domain_xml(name: str) -> str:
    return f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory></domain>"


# ---- JSON values ---------------------------------------------------------------------------


def node_value(name: str, memory_mib: int = 8192, vcpus: int = 8, *, cordoned: bool = False,
               lease_id: str = "1a2b", uri: str | None = None,
               address: str | None = None) -> dict[str, Any]:
    return {
        "schema": 1,
        "name": name,
        "lease_id": lease_id,
        "libvirt_uri": uri if uri is not None else f"qemu+tcp://{name}/system",
        "migration_address": address if address is not None else f"10.0.0.{len(name)}",
        "capacity": {"memory_mib": memory_mib, "vcpus": vcpus},
        "cpu": {"model": "qemu64", "vendor": "AMD"},
        "cordoned": cordoned,
        "agent": {"pid": 1234, "hostname": f"host-{name}", "version": "0.1.0"},
        "registered_at": 1_700_000_000.0,
    }


def cordon_value(node: str, reason: str = "maintenance") -> dict[str, Any]:
    return {"schema": 1, "node": node, "reason": reason, "by": "operator", "at": 1.0}


def alive_value(node: str, lease_id: str = "3c4d") -> dict[str, Any]:
    return {"schema": 1, "node": node, "lease_id": lease_id, "at": 1.0}


def fence_value(node: str, lease_id: str = "1a2b") -> dict[str, Any]:
    return {"schema": 1, "node": node, "lease_id": lease_id, "method": "self",
            "outcome": "success", "reason": "lease expired", "epoch": 1, "duration_s": 1.0,
            "fenced_at": 2.0}


def spec_value(name: str, memory_mib: int = 1024, vcpus: int = 1,
               state: str = "running") -> dict[str, Any]:
    return {"schema": 1, "name": name, "domain_xml": domain_xml(name),
            "memory_mib": memory_mib, "vcpus": vcpus, "state": state}


def leader_value() -> dict[str, Any]:
    return {"schema": 1, "id": "leader-1", "host": "h1", "pid": 99, "lease_id": "ff",
            "elected_at": 3.0}


# Placements and statuses: the vm field is filled in from the key by `cluster`.


def boot(node: str, id: str = "p1", **kw: Any) -> dict[str, Any]:
    return {"kind": "boot", "node": node, "id": id, **kw}


def migrate(from_node: str, node: str, id: str = "p1", **kw: Any) -> dict[str, Any]:
    return {"kind": "migrate", "node": node, "from_node": from_node, "id": id, **kw}


def pending(reason: str, id: str = "p1", **kw: Any) -> dict[str, Any]:
    return {"kind": "pending", "node": None, "reason": reason, "id": id, **kw}


def placement_value(vm: str, data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"schema": 1, "vm": vm, "epoch": 1, "reason": "test",
                           "scores": {}, "decided_at": 10.0, "from_node": None}
    out.update({k: v for k, v in data.items() if k != "mod"})
    return out


def status(node: str, state: str, placement_id: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"node": node, "state": state, "placement_id": placement_id, **kw}


def running(node: str, placement_id: str | None = None, **kw: Any) -> dict[str, Any]:
    return status(node, "running", placement_id, **kw)


def stopped(node: str, placement_id: str | None = None, **kw: Any) -> dict[str, Any]:
    return status(node, "stopped", placement_id, **kw)


def status_value(vm: str, data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"schema": 1, "vm": vm, "since": 5.0}
    out.update({k: v for k, v in data.items() if k != "mod"})
    return out


# ---- key/values and snapshots --------------------------------------------------------------


def raw(key: str, value: Mapping[str, Any] | str | bytes, mod_revision: int = 10,
        create_revision: int | None = None, lease: int = 0) -> RawKV:
    if isinstance(value, Mapping):
        data = json.dumps(value).encode()
    elif isinstance(value, str):
        data = value.encode()
    else:
        data = value
    return RawKV(key, data, create_revision if create_revision is not None else mod_revision,
                 mod_revision, lease)


def snapshot(kvs: Iterable[RawKV], revision: int = DEFAULT_REVISION) -> ClusterSnapshot:
    return ClusterSnapshot.from_kvs(KS, revision, list(kvs))


def cluster(*, revision: int = DEFAULT_REVISION,
            nodes: Mapping[str, NodeData] | Iterable[str] = (),
            cordons: Iterable[str] = (),
            fences: Mapping[str, int] | Iterable[str] = (),
            specs: Mapping[str, SpecData] | Iterable[str] = (),
            placements: Mapping[str, Mapping[str, Any]] | None = None,
            statuses: Mapping[str, Mapping[str, Any]] | None = None,
            config: Mapping[str, Any] | None = None,
            extra: Iterable[RawKV] = (),
            strict: bool = True) -> ClusterSnapshot:
    """A snapshot of the given cluster, each key with its own mod_revision.

    nodes:      name -> (memory_mib, vcpus) or node_value() keyword arguments; or just names
    fences:     name -> mod_revision of the fence record; or just names (auto revisions)
    specs:      vm -> (memory_mib, vcpus[, state]); or just names (1024 MiB, 1 vCPU)
    placements: vm -> boot()/migrate()/pending() data (optional "mod": its mod_revision)
    statuses:   vm -> running()/stopped()/status() data (optional "mod")
    strict:     fail if any value was refused (the test data itself is wrong)
    """
    revs = itertools.count(10)
    kvs: list[RawKV] = []
    if config is not None:
        kvs.append(raw(KS.config, {"schema": 1, **config}, next(revs)))
    node_map: Mapping[str, NodeData] = (
        nodes if isinstance(nodes, Mapping) else {n: (8192, 8) for n in nodes})
    cordon_set = set(cordons)
    for name, data in node_map.items():
        kw: dict[str, Any] = (
            {"memory_mib": data[0], "vcpus": data[1]} if isinstance(data, tuple) else dict(data))
        kw.setdefault("cordoned", name in cordon_set)
        kvs.append(raw(KS.node(name), node_value(name, **kw), next(revs), lease=0x1A2B))
    for name in sorted(cordon_set):
        kvs.append(raw(KS.cordon(name), cordon_value(name), next(revs)))
    fence_map = fences if isinstance(fences, Mapping) else {n: next(revs) for n in fences}
    for name, mod in fence_map.items():
        kvs.append(raw(KS.fence(name), fence_value(name), mod))
    spec_map: Mapping[str, SpecData] = (
        specs if isinstance(specs, Mapping) else {v: (1024, 1) for v in specs})
    for vm, sdata in spec_map.items():
        kvs.append(raw(KS.vm_spec(vm), spec_value(vm, *sdata), next(revs)))
    for vm, pdata in (placements or {}).items():
        kvs.append(raw(KS.vm_placement(vm), placement_value(vm, pdata),
                       pdata.get("mod", next(revs))))
    for vm, stdata in (statuses or {}).items():
        kvs.append(raw(KS.vm_status(vm), status_value(vm, stdata),
                       stdata.get("mod", next(revs))))
    kvs.extend(extra)
    snap = snapshot(kvs, revision)
    if strict and snap.errors:
        raise AssertionError(f"test data refused: {[str(e) for e in snap.errors]}")
    return snap
