"""The migration graph and the node ranking: pure functions, no etcd."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.graph import (
    Move,
    build_graph,
    graph_from_events,
    graph_to_json,
    moves_from_events,
    pagerank,
    to_dot,
    to_svg,
    vm_colors,
)
from schemas.events import Event, event_id

SVG = "{http://www.w3.org/2000/svg}"
_seq = itertools.count()


def ev(at: float, kind: str, **kw: object) -> Event:
    actor = str(kw.pop("actor", "test"))
    return Event(id=event_id(at, actor, next(_seq)), at=at, kind=kind, actor=actor,  # type: ignore[arg-type]
                 **kw)  # type: ignore[arg-type]


# ---- pagerank ----------------------------------------------------------------------------


def reference_pagerank(nodes: list[str], weights: dict[tuple[str, str], float],
                       d: float) -> dict[str, float]:
    """The stationary vector of the Google matrix, by Gaussian elimination."""
    n = len(nodes)
    ix = {x: i for i, x in enumerate(nodes)}
    out = [0.0] * n
    for (s, t), w in weights.items():
        if s != t and w > 0:
            out[ix[s]] += w
    g = [[(1 - d) / n for _ in range(n)] for _ in range(n)]  # g[t][s]: s -> t
    for i in range(n):
        if out[i] == 0:
            for j in range(n):
                g[j][i] += d / n
    for (s, t), w in weights.items():
        if s != t and w > 0:
            g[ix[t]][ix[s]] += d * w / out[ix[s]]
    # (G - I) r = 0, with the last equation replaced by sum(r) = 1
    a = [[g[i][j] - (1.0 if i == j else 0.0) for j in range(n)] + [0.0] for i in range(n)]
    a[-1] = [1.0] * n + [1.0]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[piv] = a[piv], a[col]
        for r in range(n):
            if r != col and a[r][col] != 0.0:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
    return {x: a[ix[x]][n] / a[ix[x]][ix[x]] for x in nodes}


def test_pagerank_empty_and_edgeless_graphs() -> None:
    assert pagerank([], {}) == {}
    assert pagerank(["a", "b", "c", "d"], {}) == pytest.approx(
        {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25})


def test_pagerank_two_nodes_closed_form() -> None:
    # a -> b only: r_a = (1-d)/2 + d r_b/2 (b dangles), sum 1  =>  r_a = 0.5 / (1 + d/2)
    r = pagerank(["a", "b"], {("a", "b"): 3.0}, damping=0.85)
    assert r["a"] == pytest.approx(0.5 / 1.425, abs=1e-9)
    assert r["b"] == pytest.approx(1 - 0.5 / 1.425, abs=1e-9)


def test_pagerank_cycle_is_uniform_and_hub_wins() -> None:
    cyc = pagerank(["a", "b", "c"], {("a", "b"): 1, ("b", "c"): 1, ("c", "a"): 1})
    assert cyc == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    star = pagerank(["hub", "x", "y", "z"], {("x", "hub"): 1, ("y", "hub"): 2, ("z", "hub"): 1})
    assert max(star, key=lambda k: star[k]) == "hub"
    assert star["x"] == pytest.approx(star["z"]) and star["x"] == pytest.approx(star["y"])


def test_pagerank_weights_matter_and_junk_is_ignored() -> None:
    r = pagerank(["s", "a", "b"], {("s", "a"): 1, ("s", "b"): 9, ("a", "a"): 50,
                                   ("s", "ghost"): 5, ("b", "s"): 0})
    assert r["b"] > r["a"]
    assert set(r) == {"a", "b", "s"}
    assert sum(r.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pagerank(["a"], {}, damping=1.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=6).flatmap(lambda n: st.tuples(
    st.just(n),
    st.dictionaries(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)),
                    st.integers(min_value=1, max_value=5), max_size=12),
    st.sampled_from([0.0, 0.5, 0.85, 0.95]))))
def test_pagerank_matches_the_google_matrix(case: tuple[int, dict[tuple[int, int], int],
                                                        float]) -> None:
    n, raw, d = case
    nodes = [f"n{i}" for i in range(n)]
    weights = {(f"n{s}", f"n{t}"): float(w) for (s, t), w in raw.items()}
    got = pagerank(nodes, weights, damping=d)
    want = reference_pagerank(nodes, weights, d)
    assert got == pytest.approx(want, abs=1e-8)
    assert sum(got.values()) == pytest.approx(1.0)


# ---- moves from the event history --------------------------------------------------------


def test_live_migrations_are_moves_and_the_source_defaults_to_the_last_location() -> None:
    events = [ev(1, "boot", vm="v1", node="n1"),
              ev(2, "migration", vm="v1", node="n2", from_node="n1", downtime_ms=12.0),
              ev(3, "migration", vm="v1", node="n3")]  # no from_node: last known place
    moves = moves_from_events(events)
    assert [(m.vm, m.source, m.target, m.kind) for m in moves] == [
        ("v1", "n1", "n2", "live"), ("v1", "n2", "n3", "live")]
    assert moves[0].downtime_ms == 12.0


def test_boot_after_node_lost_and_fence_is_a_cold_move() -> None:
    events = [ev(1, "boot", vm="v1", node="n1"), ev(1.1, "boot", vm="v2", node="n1"),
              ev(1.2, "boot", vm="v3", node="n2"),
              ev(5, "node_lost", node="n1"), ev(6, "fence", node="n1"),
              ev(7, "boot", vm="v1", node="n2"), ev(7.1, "boot", vm="v2", node="n3"),
              ev(8, "boot", vm="v3", node="n3")]  # v3 was not on the lost node
    moves = moves_from_events(events)
    assert [(m.vm, m.source, m.target, m.kind) for m in moves] == [
        ("v1", "n1", "n2", "cold"), ("v2", "n1", "n3", "cold")]


def test_drain_by_lease_revoke_gives_only_live_moves() -> None:
    # The revoke makes the node look lost until it registers again (node_back); then
    # its VMs migrate away.  A later reboot of a VM where it is is not a move.
    events = [ev(1, "placement", vm="v1", node="n1"), ev(1.5, "boot", vm="v1", node="n1"),
              ev(2, "node_lost", node="n1"), ev(2.2, "node_back", node="n1"),
              ev(3, "migration", vm="v1", node="n2", from_node="n1"),
              ev(9, "boot", vm="v1", node="n2")]
    assert [(m.source, m.target, m.kind) for m in moves_from_events(events)] == [
        ("n1", "n2", "live")]


def test_node_back_after_a_fence_does_not_cancel_the_cold_move() -> None:
    events = [ev(1, "boot", vm="v1", node="n1"), ev(2, "node_lost", node="n1"),
              ev(3, "fence", node="n1"), ev(3.5, "node_back", node="n1"),
              ev(4, "boot", vm="v1", node="n2")]
    assert [(m.source, m.target, m.kind) for m in moves_from_events(events)] == [
        ("n1", "n2", "cold")]


def test_booting_again_on_the_same_node_or_without_a_loss_is_no_move() -> None:
    events = [ev(1, "boot", vm="v1", node="n1"), ev(2, "node_lost", node="n1"),
              ev(3, "fence", node="n1"), ev(4, "boot", vm="v1", node="n1"),
              ev(5, "boot", vm="v2", node="n2"), ev(6, "boot", vm="v2", node="n3"),
              ev(7, "migration_failed", vm="v2", node="n1", from_node="n3")]
    assert moves_from_events(events) == []


def test_events_are_ordered_by_id_not_by_list_order() -> None:
    events = [ev(1, "boot", vm="v1", node="n1"), ev(2, "node_lost", node="n1"),
              ev(3, "boot", vm="v1", node="n2")]
    assert moves_from_events(reversed(events)) == moves_from_events(events)


# ---- graph building ----------------------------------------------------------------------


def mv(vm: str, s: str, t: str, at: float = 1.0, kind: str = "live") -> Move:
    return Move(vm, s, t, at, kind)  # type: ignore[arg-type]


def test_build_graph_one_edge_per_vm_and_direction_with_counts() -> None:
    g = build_graph([mv("v1", "a", "b", 1), mv("v1", "a", "b", 2, "cold"),
                     mv("v1", "b", "a", 3), mv("v2", "a", "b", 4), mv("v2", "c", "c", 5),
                     mv("v3", "d", "b", 0.5)],
                    nodes=["d", "c"])  # a self-move is no move
    assert g.nodes == ("a", "b", "c", "d")
    assert [(e.vm, e.source, e.target, e.count, e.live, e.cold) for e in g.edges] == [
        ("v1", "a", "b", 2, 1, 1), ("v1", "b", "a", 1, 1, 0), ("v2", "a", "b", 1, 1, 0),
        ("v3", "d", "b", 1, 1, 0)]
    assert g.moves == 5 and g.last_at == 4 and g.vms == ("v1", "v2", "v3")
    assert [r.node for r in g.ranking][:2] == ["b", "a"]  # b receives from a and d
    assert {r.node: (r.moves_in, r.moves_out) for r in g.ranking} == {
        "a": (1, 3), "b": (4, 1), "c": (0, 0), "d": (0, 1)}
    assert sum(r.score for r in g.ranking) == pytest.approx(1.0)
    # ties (c and d have the same score) sort by name
    assert [r.node for r in g.ranking][-2:] == ["c", "d"]


def test_graph_window_keeps_cold_moves_whose_loss_came_before_it() -> None:
    events = [ev(1, "boot", vm="v1", node="n1"), ev(2, "node_lost", node="n1"),
              ev(10, "boot", vm="v1", node="n2"),
              ev(20, "migration", vm="v1", node="n3", from_node="n2")]
    g = graph_from_events(events, nodes=["n1", "n2", "n3", "n4"], since=5, until=15)
    assert [(e.source, e.target, e.cold) for e in g.edges] == [("n1", "n2", 1)]
    assert "n4" in g.nodes
    assert graph_from_events(events).moves == 2
    assert g.version() != graph_from_events(events).version()


def test_json_dot_and_colours() -> None:
    g = build_graph([mv("web1", "n1", "n2"), mv("db", "n1", "n3", kind="cold")])
    data = graph_to_json(g)
    assert data["moves"] == 2 and [r["position"] for r in data["ranking"]] == [1, 2, 3]
    assert {e["vm"]: e["color"] for e in data["edges"]} == vm_colors(["web1", "db"])
    dot = to_dot(g, {"n1": "cordoned"})
    assert dot.startswith("digraph vmha_migrations {") and dot.rstrip().endswith("}")
    assert '"n1" -> "n2"' in dot and 'label="web1 x1"' in dot
    assert '"n1" -> "n3"' in dot and "style=dashed" in dot  # cold only
    assert "cordoned" in dot
    colors = vm_colors([f"vm{i}" for i in range(40)])
    assert len(set(colors.values())) == 40
    assert all(len(c) == 7 and c.startswith("#") for c in colors.values())


def test_dot_quotes_odd_names() -> None:
    g = build_graph([mv('a"b', "n\\1", "n2")])
    dot = to_dot(g)
    assert '"n\\\\1" -> "n2"' in dot and 'label="a\\"b x1"' in dot


def test_svg_is_valid_xml_with_one_arrow_per_edge() -> None:
    g = build_graph([mv("v1", "n1", "n2"), mv("v1", "n1", "n2"), mv("v2", "n1", "n2"),
                     mv("v2", "n2", "n1"), mv("<x&y>", "n3", "n1")])
    svg = to_svg(g, {"n1": "ready", "n2": "cordoned"})
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    paths = [p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]
    assert sorted((str(p.get("data-vm")), str(p.get("data-source")),
                   str(p.get("data-target")), str(p.get("data-count"))) for p in paths) == sorted([
        ("v1", "n1", "n2", "2"), ("v2", "n1", "n2", "1"), ("v2", "n2", "n1", "1"),
        ("<x&y>", "n3", "n1", "1")])
    colors = vm_colors(g.vms)
    assert {p.get("data-vm"): p.get("stroke") for p in paths} == colors
    # each arrow's marker exists; counts are drawn; nodes and legend are there
    ids = {m.get("id") for m in root.iter(f"{SVG}marker")}
    assert all(p.get("marker-end", "")[5:-1] in ids for p in paths)
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert texts.count("2") >= 1 and {"n1", "n2", "n3"} <= set(texts)
    legend = [str(x.get("data-vm")) for x in root.iter(f"{SVG}g")
              if x.get("class") == "legend-vm"]
    assert sorted(legend) == sorted(["v1", "v2", "<x&y>"])
    # two arrows between the same nodes do not overlap
    ds = [p.get("d") for p in paths if p.get("data-source") == "n1" and
          p.get("data-target") == "n2"]
    assert len(set(ds)) == 2


def test_svg_of_empty_and_single_node_graphs() -> None:
    for g in (build_graph([]), build_graph([], nodes=["solo"])):
        root = ET.fromstring(to_svg(g))
        assert root.tag == f"{SVG}svg"
        assert not [p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]
