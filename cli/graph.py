"""The migration graph: which VMs moved between which nodes, drawn and ranked.

Pure functions over the event history (schemas.events): no etcd, no clock, no files.

- A **live move** is a `migration` event (from `from_node` to `node`).
- A **cold move** is a `boot` of a VM on another node after the node it was on was
  lost (`node_lost`) or fenced (`fence`): the VM was restarted elsewhere.  A `node_back`
  before any fence (a drain's lease revoke, a short partition) cancels this: the VMs
  never stopped, and whatever moves them afterwards is a migration.

The **ranking** is PageRank on the node transition graph (edge weight = number of
moves from one node to the other, every VM together), computed by power iteration.
A node ranks high when VMs keep ending up on it, and higher still when they come from
nodes that themselves receive many.

Output: DOT text (for Graphviz) and a self-contained SVG (nodes on a circle, one arrow
per VM and source -> target, coloured per VM, its count on the arrow) that needs no
Graphviz.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any, Literal

from schemas.events import Event

MoveKind = Literal["live", "cold"]


@dataclass(frozen=True)
class Move:
    vm: str
    source: str
    target: str
    at: float
    kind: MoveKind
    downtime_ms: float | None = None


@dataclass(frozen=True)
class Edge:
    """All moves of one VM from one node to another."""

    vm: str
    source: str
    target: str
    count: int
    live: int
    cold: int
    last_at: float


@dataclass(frozen=True)
class NodeRank:
    node: str
    score: float
    moves_in: int
    moves_out: int


@dataclass(frozen=True)
class MigrationGraph:
    nodes: tuple[str, ...]
    edges: tuple[Edge, ...]
    ranking: tuple[NodeRank, ...]  # best first
    moves: int = 0
    last_at: float | None = None
    vms: tuple[str, ...] = field(default=())

    def version(self) -> str:
        """Changes whenever the drawing would: cheap to compare in a polling client."""
        return f"{len(self.nodes)}-{self.moves}-{self.last_at or 0:.6f}"


# ---- moves from events -------------------------------------------------------------------


def moves_from_events(events: Iterable[Event]) -> list[Move]:
    """Every live and cold move in the history, in time order."""
    where: dict[str, str] = {}  # VM -> node it was last seen booting on / arriving at
    orphaned: dict[str, str] = {}  # VM -> the lost node it was on, until it boots again
    fenced: set[str] = set()  # lost nodes whose loss a fence confirmed (no node_back undo)
    out: list[Move] = []
    for e in sorted(events, key=lambda x: x.id):
        if e.kind == "migration" and e.vm and e.node:
            src = e.from_node or where.get(e.vm)
            if src and src != e.node:
                out.append(Move(e.vm, src, e.node, e.at, "live", e.downtime_ms))
            where[e.vm] = e.node
            orphaned.pop(e.vm, None)
        elif e.kind == "boot" and e.vm and e.node:
            lost = orphaned.pop(e.vm, None)
            if lost is not None and lost != e.node:
                out.append(Move(e.vm, lost, e.node, e.at, "cold"))
            where[e.vm] = e.node
        elif e.kind == "placement" and e.vm and e.node and e.vm not in where:
            where[e.vm] = e.node  # a decision, only used where nothing better is known
        elif e.kind in ("node_lost", "fence") and e.node:
            if e.kind == "fence":
                fenced.add(e.node)
            for vm, node in where.items():
                if node == e.node:
                    orphaned.setdefault(vm, node)
        elif e.kind == "node_back" and e.node:
            if e.node not in fenced:
                for vm in [v for v, n in orphaned.items() if n == e.node]:
                    del orphaned[vm]
            fenced.discard(e.node)
    return out


# ---- graph and ranking -------------------------------------------------------------------


def pagerank(nodes: Sequence[str], weights: Mapping[tuple[str, str], float],
             damping: float = 0.85, tol: float = 1e-12, max_iter: int = 500) -> dict[str, float]:
    """PageRank of a weighted directed graph by power iteration; the scores sum to 1.

    A node without outgoing weight (dangling) spreads its score evenly over all nodes,
    and every step teleports `1 - damping` evenly, so the result is unique for any graph.
    Edges that name nodes outside `nodes`, self-loops and non-positive weights are ignored.
    """
    if not 0.0 <= damping < 1.0:
        raise ValueError("damping must be in [0, 1)")
    names = sorted(set(nodes))
    n = len(names)
    if n == 0:
        return {}
    idx = {name: i for i, name in enumerate(names)}
    out_w = [0.0] * n
    links: list[list[tuple[int, float]]] = [[] for _ in range(n)]  # target -> [(source, w)]
    for (s, t), w in sorted(weights.items()):
        if s in idx and t in idx and s != t and w > 0:
            links[idx[t]].append((idx[s], float(w)))
            out_w[idx[s]] += float(w)
    rank = [1.0 / n] * n
    for _ in range(max_iter):
        dangling = sum(rank[i] for i in range(n) if out_w[i] == 0.0)
        base = (1.0 - damping) / n + damping * dangling / n
        new = [base + damping * sum(rank[s] * w / out_w[s] for s, w in links[t])
               for t in range(n)]
        total = sum(new)
        new = [x / total for x in new]
        delta = sum(abs(a - b) for a, b in zip(new, rank, strict=True))
        rank = new
        if delta < tol:
            break
    return {name: rank[idx[name]] for name in names}


def build_graph(moves: Iterable[Move], nodes: Iterable[str] = (),
                damping: float = 0.85) -> MigrationGraph:
    """Aggregate moves per (VM, source, target); rank nodes by PageRank on the moves."""
    agg: dict[tuple[str, str, str], list[Move]] = {}
    all_nodes = set(nodes)
    for m in moves:
        if m.source == m.target:
            continue
        agg.setdefault((m.vm, m.source, m.target), []).append(m)
        all_nodes.update((m.source, m.target))
    edges = tuple(Edge(vm, s, t, len(ms), sum(m.kind == "live" for m in ms),
                       sum(m.kind == "cold" for m in ms), max(m.at for m in ms))
                  for (vm, s, t), ms in sorted(agg.items()))
    weights: dict[tuple[str, str], float] = {}
    moves_in: dict[str, int] = {}
    moves_out: dict[str, int] = {}
    for e in edges:
        weights[(e.source, e.target)] = weights.get((e.source, e.target), 0.0) + e.count
        moves_in[e.target] = moves_in.get(e.target, 0) + e.count
        moves_out[e.source] = moves_out.get(e.source, 0) + e.count
    scores = pagerank(sorted(all_nodes), weights, damping)
    ranking = tuple(sorted((NodeRank(n, scores[n], moves_in.get(n, 0), moves_out.get(n, 0))
                            for n in scores), key=lambda r: (-round(r.score, 12), r.node)))
    return MigrationGraph(
        nodes=tuple(sorted(all_nodes)), edges=edges, ranking=ranking,
        moves=sum(e.count for e in edges),
        last_at=max((e.last_at for e in edges), default=None),
        vms=tuple(sorted({e.vm for e in edges})))


def graph_from_events(events: Iterable[Event], nodes: Iterable[str] = (),
                      since: float | None = None, until: float | None = None) -> MigrationGraph:
    """The graph of the moves inside [since, until].  Pass the whole history: a cold move
    inside the window may depend on a node_lost before it."""
    moves = [m for m in moves_from_events(events)
             if (since is None or m.at >= since) and (until is None or m.at <= until)]
    return build_graph(moves, nodes)


def graph_to_json(g: MigrationGraph) -> dict[str, Any]:
    colors = vm_colors(g.vms)
    return {
        "nodes": list(g.nodes),
        "moves": g.moves,
        "version": g.version(),
        "edges": [{"vm": e.vm, "source": e.source, "target": e.target, "count": e.count,
                   "live": e.live, "cold": e.cold, "last_at": e.last_at,
                   "color": colors[e.vm]} for e in g.edges],
        "ranking": [{"position": i + 1, "node": r.node, "score": round(r.score, 6),
                     "moves_in": r.moves_in, "moves_out": r.moves_out}
                    for i, r in enumerate(g.ranking)],
    }


# ---- colours -----------------------------------------------------------------------------

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2",
           "#8c564b", "#bcbd22", "#7f7f7f")


def vm_colors(vms: Iterable[str]) -> dict[str, str]:
    """A distinct colour per VM, stable for a given set of names (sorted order)."""
    out: dict[str, str] = {}
    for i, vm in enumerate(sorted(set(vms))):
        if i < len(PALETTE):
            out[vm] = PALETTE[i]
        else:  # golden-angle hues after the palette
            out[vm] = _hsl_hex((i * 137.508) % 360.0, 0.65, 0.42)
    return out


def _hsl_hex(h: float, s: float, lum: float) -> str:
    c = (1 - abs(2 * lum - 1)) * s
    x = c * (1 - abs((h / 60.0) % 2 - 1))
    m = lum - c / 2
    r, g, b = [(c, x, 0.0), (x, c, 0.0), (0.0, c, x), (0.0, x, c), (x, 0.0, c),
               (c, 0.0, x)][int(h // 60) % 6]
    return "#" + "".join(f"{round((v + m) * 255):02x}" for v in (r, g, b))


# ---- DOT ---------------------------------------------------------------------------------


def _dot_id(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


STATE_FILL = {"ready": "#d9f2d9", "cordoned": "#fff0c2", "lost": "#f8d0d0",
              "fenced": "#f0b0b0"}


def to_dot(g: MigrationGraph, node_states: Mapping[str, str] | None = None) -> str:
    states = node_states or {}
    colors = vm_colors(g.vms)
    score = {r.node: r.score for r in g.ranking}
    lines = ["digraph vmha_migrations {", '  graph [label="vmha migrations (rank: PageRank)", '
             'labelloc=t, fontname="sans-serif", layout=circo];',
             '  node [shape=ellipse, style=filled, fontname="sans-serif", fillcolor="#eeeeee"];',
             '  edge [fontname="sans-serif", fontsize=10];']
    for n in g.nodes:
        st = states.get(n)
        label = f"{n}\\nrank {score.get(n, 0.0):.3f}" + (f"\\n{st}" if st else "")
        fill = STATE_FILL.get(st or "", "#eeeeee")
        lines.append(f'  {_dot_id(n)} [label="{label}", fillcolor="{fill}"];')
    for e in g.edges:
        style = "dashed" if e.live == 0 else "solid"
        lines.append(f"  {_dot_id(e.source)} -> {_dot_id(e.target)} "
                     f'[color="{colors[e.vm]}", fontcolor="{colors[e.vm]}", style={style}, '
                     f"label={_dot_id(f'{e.vm} x{e.count}')}, "
                     f"tooltip={_dot_id(_edge_title(e))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _edge_title(e: Edge) -> str:
    return (f"{e.vm}: {e.source} -> {e.target}, {e.count} move(s) "
            f"({e.live} live, {e.cold} cold)")


# ---- SVG (no Graphviz needed) ------------------------------------------------------------


def _f(x: float) -> str:
    return f"{x:.1f}"


def to_svg(g: MigrationGraph, node_states: Mapping[str, str] | None = None,
           size: int = 560) -> str:
    """Nodes on a circle (radius by rank), one curved arrow per (VM, source -> target),
    coloured per VM, the count on the arrow; a legend of VMs below."""
    states = node_states or {}
    colors = vm_colors(g.vms)
    score = {r.node: r.score for r in g.ranking}
    top = max(score.values(), default=1.0) or 1.0
    n = len(g.nodes)
    cx = cy = size / 2
    ring = size / 2 - 70
    pos: dict[str, tuple[float, float]] = {}
    for i, name in enumerate(g.nodes):
        if n == 1:
            pos[name] = (cx, cy)
        else:
            a = -math.pi / 2 + 2 * math.pi * i / n
            pos[name] = (cx + ring * math.cos(a), cy + ring * math.sin(a))
    radius = {name: 18.0 + 16.0 * score.get(name, 0.0) / top for name in g.nodes}
    legend_rows = max(1, math.ceil(len(g.vms) / 4))
    height = size + 24 + 20 * legend_rows
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="vmha-graph" width="{size}" '
           f'height="{height}" viewBox="0 0 {size} {height}" font-family="sans-serif" '
           f'role="img" aria-label="migration graph">',
           "<title>vmha migration graph</title>", "<defs>"]
    for i, vm in enumerate(g.vms):
        out.append(f'<marker id="vmha-ah-{i}" viewBox="0 0 10 10" refX="9" refY="5" '
                   f'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
                   f'<path d="M0,0 L10,5 L0,10 z" fill="{colors[vm]}"/></marker>')
    out.append("</defs>")
    if n == 0:
        out.append(f'<text x="{_f(cx)}" y="{_f(cy)}" text-anchor="middle" fill="#666">'
                   "no nodes and no migrations yet</text>")
    vm_index = {vm: i for i, vm in enumerate(g.vms)}
    by_pair: dict[tuple[str, str], list[Edge]] = {}
    for e in g.edges:
        by_pair.setdefault((e.source, e.target), []).append(e)
    out.append('<g class="edges">')
    labels: list[str] = []
    for (s, t), edges in sorted(by_pair.items()):
        (x1, y1), (x2, y2) = pos[s], pos[t]
        dx, dy = x2 - x1, y2 - y1
        dist = math.hypot(dx, dy) or 1.0
        ux, uy = dx / dist, dy / dist
        px, py = uy, -ux  # left of the direction: s->t and t->s bend to opposite sides
        for k, e in enumerate(edges):
            bend = 26.0 * (k + 1)
            mx, my = (x1 + x2) / 2 + px * bend * 2, (y1 + y2) / 2 + py * bend * 2
            # start and end on the node circles, pointing towards the control point
            sx, sy = _toward(x1, y1, mx, my, radius[s])
            ex, ey = _toward(x2, y2, mx, my, radius[t] + 2)
            lx, ly = 0.25 * sx + 0.5 * mx + 0.25 * ex, 0.25 * sy + 0.5 * my + 0.25 * ey
            color = colors[e.vm]
            dash = ' stroke-dasharray="6 4"' if e.live == 0 else ""
            title = escape(_edge_title(e))
            out.append(f'<path class="edge" data-vm="{escape(e.vm)}" '
                       f'data-source="{escape(s)}" data-target="{escape(t)}" '
                       f'data-count="{e.count}" d="M{_f(sx)},{_f(sy)} Q{_f(mx)},{_f(my)} '
                       f'{_f(ex)},{_f(ey)}" fill="none" stroke="{color}" '
                       f'stroke-width="{_f(1.5 + min(e.count, 6) * 0.5)}"{dash} '
                       f'marker-end="url(#vmha-ah-{vm_index[e.vm]})"><title>{title}</title>'
                       "</path>")
            labels.append(f'<g class="edge-label"><title>{title}</title>'
                          f'<circle cx="{_f(lx)}" cy="{_f(ly)}" r="9" fill="#fff" '
                          f'stroke="{color}"/><text x="{_f(lx)}" y="{_f(ly + 4)}" '
                          f'text-anchor="middle" font-size="11" fill="{color}">{e.count}'
                          "</text></g>")
    out.append("</g>")
    out.append('<g class="edge-labels">' + "".join(labels) + "</g>")
    out.append('<g class="nodes">')
    for name in g.nodes:
        x, y = pos[name]
        st = states.get(name)
        fill = STATE_FILL.get(st or "", "#eeeeee")
        r = radius[name]
        sc = score.get(name, 0.0)
        out.append(f'<g class="node" data-node="{escape(name)}"><title>'
                   f"{escape(name)}: rank {sc:.3f}{escape(', ' + st) if st else ''}</title>"
                   f'<circle cx="{_f(x)}" cy="{_f(y)}" r="{_f(r)}" fill="{fill}" '
                   f'stroke="#333" stroke-width="1.5"/>'
                   f'<text x="{_f(x)}" y="{_f(y + 4)}" text-anchor="middle" font-size="12" '
                   f'font-weight="bold">{escape(name)}</text>'
                   f'<text x="{_f(x)}" y="{_f(y + r + 14)}" text-anchor="middle" '
                   f'font-size="10" fill="#444">rank {sc:.3f}'
                   f"{escape(' · ' + st) if st else ''}</text></g>")
    out.append("</g>")
    out.append(f'<g class="legend" transform="translate(10,{size + 8})">')
    if not g.vms:
        out.append('<text x="0" y="12" font-size="12" fill="#666">no migrations in the '
                   "window</text>")
    count_by_vm: dict[str, int] = {}
    for e in g.edges:
        count_by_vm[e.vm] = count_by_vm.get(e.vm, 0) + e.count
    for i, vm in enumerate(g.vms):
        x, y = (i % 4) * (size - 20) / 4, (i // 4) * 20
        out.append(f'<g class="legend-vm" data-vm="{escape(vm)}">'
                   f'<line x1="{_f(x)}" y1="{_f(y + 8)}" x2="{_f(x + 22)}" y2="{_f(y + 8)}" '
                   f'stroke="{colors[vm]}" stroke-width="3"/>'
                   f'<text x="{_f(x + 28)}" y="{_f(y + 12)}" font-size="12">{escape(vm)} '
                   f"({count_by_vm[vm]})</text></g>")
    out.append("</g></svg>")
    return "\n".join(out) + "\n"


def _toward(x: float, y: float, tx: float, ty: float, r: float) -> tuple[float, float]:
    d = math.hypot(tx - x, ty - y) or 1.0
    return x + (tx - x) / d * r, y + (ty - y) / d * r
