"""The rebalancer: a few live migrations that even out memory utilisation (pure).

Objective: G = sum over schedulable nodes of (u - mean u)^2, u = used / effective memory
(n times the variance of the utilisations).  Each move is a live migration that lowers G,
by at least `min_gain`; the reverse of a move would raise G by the same amount, so a later
run never undoes an earlier one (hysteresis).  The planner also leaves alone the VMs the
rebalancer moved within the last interval and spends at most `max_moves` per interval.
A move never breaks a hard rule (the checks of `Placer.choose`, within the source's
migration group) and never lowers the VM's soft score.

Search per move: sources from the most utilised down, each tried against the 16 least
utilised nodes; the first source with a move that gains enough gives the move (its best
VM and target).  A source without one is skipped until a move changes the set of least
utilised nodes (at most 64 sources per move).  A step costs O(nodes), not O(nodes x VMs).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from orchestrator.placement import Placer
from schemas.models import VmSpec

REASON_PREFIX = "rebalance:"
TARGETS = 16
SOURCES = 64  # sources tried per move: bounds an idle run (balanced cluster) to O(nodes)


@dataclass(frozen=True)
class Move:
    vm: str
    source: str
    target: str
    gain: float
    reason: str
    scores: dict[str, float]


def objective(placer: Placer) -> float:
    """G: the sum of squared deviations of the node utilisations from their mean."""
    u = [placer.nodes[n].util for n in placer.sched]
    mean = sum(u) / len(u) if u else 0.0
    return sum((x - mean) ** 2 for x in u)


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
    stuck: set[str] = set()
    n_all = max(1, len(placer.sched))
    while len(moves) < budget:
        open_nodes = [n for n in placer.sched
                      if inflight[n] < per_node_limit and nodes[n].memory_mib > 0]
        targets = heapq.nsmallest(TARGETS, open_nodes, key=lambda n: (nodes[n].util, n))
        if not targets:
            break
        floor, ceiling = nodes[targets[0]].util, nodes[targets[-1]].util
        total = sum(nodes[n].util for n in placer.sched)
        best: tuple[float, str, str, str] | None = None  # (-gain, vm, source, target)
        for src in heapq.nsmallest(SOURCES, (n for n in open_nodes
                                             if by_node.get(n) and n not in stuck),
                                   key=lambda n: (-nodes[n].util, n)):
            if nodes[src].util <= floor:
                break
            best = _best_move(placer, specs, by_node[src], src, targets, min_gain, total,
                              n_all)
            if best is not None:
                break
            stuck.add(src)
        if best is None:
            break
        neg_gain, vm, src, t = best
        spec = specs[vm]
        us, ut = nodes[src].util, nodes[t].util
        placer.charge(vm, spec, src, -1)
        placer.charge(vm, spec, t, +1)
        by_node[src].remove(vm)
        if nodes[src].util < ceiling:
            stuck.clear()  # the source may now be a target: earlier dead ends may open
        inflight[src] += 1
        inflight[t] += 1
        reason = (f"{REASON_PREFIX} live-migrate from {src} ({us * 100:.0f}% memory used) to "
                  f"{t} ({ut * 100:.0f}% used); lowers the spread of utilisations (G) by "
                  f"{-neg_gain:.4f} (min_gain {min_gain})")
        moves.append(Move(vm, src, t, -neg_gain, reason,
                          {src: float(nodes[src].free_memory_mib),
                           t: float(nodes[t].free_memory_mib)}))
    return moves


def _best_move(placer: Placer, specs: Mapping[str, VmSpec], vms: list[str], src: str,
               targets: list[str], min_gain: float, total: float,
               n_all: int) -> tuple[float, str, str, str] | None:
    nodes = placer.nodes
    best: tuple[float, str, str, str] | None = None  # (-gain, vm, source, target)
    ns = nodes[src]
    us = ns.util
    for vm in vms:
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
                d_sq = (ds * ds - 2 * us * ds) + (2 * nt.util * dt + dt * dt)
                shift = dt - ds
                gain = -(d_sq - (2 * total * shift + shift * shift) / n_all)
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
