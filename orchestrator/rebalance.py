"""The rebalancer: a few live migrations that even out memory utilisation (pure).

Objective: F = sum over schedulable nodes of u^2, u = used / effective memory.  Each move
is the single live migration (VM, target) that lowers F the most, and it is made only if
it lowers F by at least `min_gain`.  The reverse of a move would raise F by the same
amount, so a later run never undoes an earlier one (hysteresis); the planner also leaves
alone VMs the rebalancer moved within the last interval, and spends at most `max_moves`
per interval.  A move never breaks a hard rule (same checks as `Placer.choose`, within
the source's migration group) and never lowers the VM's soft score.

Candidates per step: the 3 most utilised nodes that have movable VMs as sources and the
16 least utilised nodes as targets; only when that finds no move, 30 x 64, then 300 x 256.
A step costs O(nodes), not O(nodes x VMs).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from orchestrator.placement import Placer
from schemas.models import VmSpec

REASON_PREFIX = "rebalance:"
WIDTHS = ((3, 16), (30, 64), (300, 256))  # (sources, targets) per attempt


@dataclass(frozen=True)
class Move:
    vm: str
    source: str
    target: str
    gain: float
    reason: str
    scores: dict[str, float]


def objective(placer: Placer) -> float:
    return sum(placer.nodes[n].util ** 2 for n in placer.sched)


def plan_moves(placer: Placer, specs: Mapping[str, VmSpec], movable: Iterable[str], *,
               budget: int, min_gain: float, per_node_limit: int,
               inflight: Counter[str] | None = None) -> list[Move]:
    """Choose up to `budget` moves; `placer` is updated as if they had happened."""
    inflight = Counter() if inflight is None else inflight
    by_node: dict[str, list[str]] = {}
    for vm in sorted(movable):
        node = placer.where.get(vm)
        if node is not None and node in placer.nodes and placer.nodes[node].schedulable:
            by_node.setdefault(node, []).append(vm)
    moves: list[Move] = []
    nodes = placer.nodes
    while len(moves) < budget:
        open_nodes = [n for n in placer.sched
                      if inflight[n] < per_node_limit and nodes[n].memory_mib > 0]
        best: tuple[float, str, str, str] | None = None  # (-gain, vm, source, target)
        for n_src, n_tgt in WIDTHS:
            best = _best_move(placer, specs, by_node, open_nodes, n_src, n_tgt, min_gain)
            if best is not None or n_src >= len(open_nodes):
                break
        if best is None:
            break
        neg_gain, vm, src, t = best
        spec = specs[vm]
        us, ut = nodes[src].util, nodes[t].util
        placer.charge(vm, spec, src, -1)
        placer.charge(vm, spec, t, +1)
        by_node[src].remove(vm)
        inflight[src] += 1
        inflight[t] += 1
        reason = (f"{REASON_PREFIX} live-migrate from {src} ({us * 100:.0f}% memory used) to "
                  f"{t} ({ut * 100:.0f}% used); lowers the sum of squared utilisations by "
                  f"{-neg_gain:.4f} (min_gain {min_gain})")
        moves.append(Move(vm, src, t, -neg_gain, reason,
                          {src: float(nodes[src].free_memory_mib),
                           t: float(nodes[t].free_memory_mib)}))
    return moves


def _best_move(placer: Placer, specs: Mapping[str, VmSpec], by_node: dict[str, list[str]],
               open_nodes: list[str], n_src: int, n_tgt: int,
               min_gain: float) -> tuple[float, str, str, str] | None:
    nodes = placer.nodes
    sources = heapq.nlargest(n_src, (n for n in open_nodes if by_node.get(n)),
                             key=lambda n: (nodes[n].util, n))
    targets = heapq.nsmallest(n_tgt, open_nodes, key=lambda n: (nodes[n].util, n))
    best: tuple[float, str, str, str] | None = None  # (-gain, vm, source, target)
    for src in sources:
        ns = nodes[src]
        us = ns.util
        for vm in by_node[src]:
            spec = specs[vm]
            ds = spec.memory_mib / ns.memory_mib
            placer.charge(vm, spec, src, -1)
            try:
                soft_here = placer.soft_score(spec, src)
                for t in targets:
                    if t == src:
                        continue
                    nt = nodes[t]
                    dt = spec.memory_mib / nt.memory_mib
                    gain = -((ds * ds - 2 * us * ds) + (2 * nt.util * dt + dt * dt))
                    if gain < min_gain or (best is not None and -gain > best[0]):
                        continue
                    if placer.verdict(spec, t, exclude={src}, live_group=ns.group,
                                      aff=None) is not None:
                        continue
                    if placer.soft_score(spec, t) < soft_here:
                        continue
                    key = (-gain, vm, src, t)
                    if best is None or key < best:
                        best = key
            finally:
                placer.charge(vm, spec, src, +1)
    return best
