"""Random but reproducible clusters for the placement benchmark and property tests.

Nodes of three sizes, VMs of five sizes, about 10% of the VMs in hard anti-affinity
groups of three, an initial placement (power of two random choices, respecting capacity
and anti-affinity) with every VM running where it is placed.  Values are built with
`model_construct` (no validation: the values are correct by construction and 50,000
domain XML parses would dominate the run time).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from schemas.keys import Keyspace
from schemas.models import (
    AgentInfo,
    Capacity,
    ClusterConfig,
    CpuInfo,
    NodeRegistration,
    Placement,
    VmSpec,
    VmStatus,
)
from schemas.snapshot import ClusterSnapshot, Entry

KS = Keyspace()
NODE_SIZES = [(65536, 32), (131072, 64), (262144, 96)]
VM_SIZES = [(1024, 1), (2048, 2), (4096, 2), (8192, 4), (16384, 8)]
VM_WEIGHTS = [30, 30, 20, 15, 5]


@dataclass(frozen=True)
class GenNode:
    name: str
    memory_mib: int
    vcpus: int


@dataclass(frozen=True)
class GenVm:
    name: str
    memory_mib: int
    vcpus: int
    anti: str | None
    node: str


@dataclass(frozen=True)
class Generated:
    nodes: list[GenNode]
    vms: list[GenVm]

    def snapshot(self, config: ClusterConfig | None = None) -> ClusterSnapshot:
        return build_snapshot(self, config)


def generate(n_nodes: int, n_vms: int, seed: int = 1, fill: float = 0.65,
             anti_share: float = 0.1) -> Generated:
    rng = random.Random(seed)
    nodes = [GenNode(f"n{i:05d}", *rng.choice(NODE_SIZES)) for i in range(n_nodes)]
    total = sum(n.memory_mib for n in nodes)
    # VM sizes scaled so the cluster ends up about `fill` full.
    raw = [rng.choices(VM_SIZES, VM_WEIGHTS)[0] for _ in range(n_vms)]
    scale = fill * total / max(1, sum(m for m, _ in raw))
    sizes = [(max(512, int(m * scale) // 256 * 256), v) for m, v in raw]
    used = {n.name: [0, 0] for n in nodes}
    cap = {n.name: (n.memory_mib, n.vcpus) for n in nodes}
    anti_nodes: dict[str, set[str]] = {}
    vms: list[GenVm] = []
    n_anti = int(n_vms * anti_share) // 3 * 3
    for i, (m, v) in enumerate(sizes):
        anti = f"g{i // 3:05d}" if i < n_anti else None
        taken = anti_nodes.setdefault(anti, set()) if anti else set()
        best: str | None = None
        for _ in range(8):  # two random choices that fit, least utilised wins
            cands = [nodes[rng.randrange(n_nodes)].name for _ in range(2)]
            ok = [c for c in cands if c not in taken and used[c][0] + m <= cap[c][0]
                  and used[c][1] + v <= cap[c][1]]
            if ok:
                best = min(ok, key=lambda c: (used[c][0] / cap[c][0], c))
                break
        if best is None:
            continue  # leave it out: the generated cluster must be valid
        used[best][0] += m
        used[best][1] += v
        taken.add(best)
        vms.append(GenVm(f"vm{i:06d}", m, v, anti, best))
    return Generated(nodes, vms)


def _xml(name: str) -> str:
    return f"<domain type='kvm'><name>{name}</name></domain>"


def build_snapshot(g: Generated, config: ClusterConfig | None = None) -> ClusterSnapshot:
    agent = AgentInfo.model_construct(pid=1, hostname="h", version="bench")
    cpu = CpuInfo.model_construct(model="qemu64", vendor="AMD")
    nodes: dict[str, Entry[Any]] = {}
    for n in g.nodes:
        reg = NodeRegistration.model_construct(
            name=n.name, lease_id="1", libvirt_uri=f"qemu+tcp://{n.name}/system",
            migration_address="10.0.0.1", migration_group=None,
            capacity=Capacity.model_construct(memory_mib=n.memory_mib, vcpus=n.vcpus),
            cpu=cpu, cordoned=False, agent=agent, registered_at=1.0)
        nodes[n.name] = Entry(reg, KS.node(n.name), 10, 10, 1)
    specs: dict[str, Entry[Any]] = {}
    placements: dict[str, Entry[Any]] = {}
    statuses: dict[str, Entry[Any]] = {}
    for vm in g.vms:
        spec = VmSpec.model_construct(
            name=vm.name, domain_xml=_xml(vm.name), memory_mib=vm.memory_mib, vcpus=vm.vcpus,
            state="running", priority=0, anti_affinity=[vm.anti] if vm.anti else [],
            soft_anti_affinity=[], affinity=[], soft_affinity=[], node_preferences={},
            allowed_nodes=[])
        pid = f"gen-{vm.name}"
        p = Placement.model_construct(id=pid, vm=vm.name, node=vm.node, kind="boot",
                                      from_node=None, epoch=1, reason="generated", scores={},
                                      decided_at=1.0)
        s = VmStatus.model_construct(vm=vm.name, node=vm.node, state="running",
                                     placement_id=pid, since=1.0, error=None,
                                     failed_target=None, migration=None)
        specs[vm.name] = Entry(spec, KS.vm_spec(vm.name), 20, 20)
        placements[vm.name] = Entry(p, KS.vm_placement(vm.name), 30, 30)
        statuses[vm.name] = Entry(s, KS.vm_status(vm.name), 40, 40)
    cfg = config or ClusterConfig()
    return ClusterSnapshot(revision=100, config=cfg, nodes=nodes, specs=specs,
                           placements=placements, statuses=statuses)
