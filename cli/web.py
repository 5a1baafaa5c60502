"""`vmha graph` (the migration graph and node ranking) and `vmha web` (a read-only status
page)."""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from cli.cluster import Cluster, open_cluster
from cli.common import EXIT_FAIL, EXIT_INPUT, CliError, _out, _parse_time
from cli.graph import MigrationGraph, graph_from_events, graph_to_json, to_dot, to_svg


def _node_states(cluster: Cluster) -> dict[str, str]:
    from cli.webserver import node_rows

    return {r["name"]: r["state"] for r in node_rows(cluster.snapshot(), cluster.store)}


def render(g: MigrationGraph, fmt: str, renderer: str, node_states: dict[str, str]) -> str:
    dot = to_dot(g, node_states)
    if fmt == "dot":
        return dot
    if renderer == "builtin":
        return to_svg(g, node_states)
    exe = shutil.which("dot")
    if exe is None:
        raise CliError("--renderer graphviz: the `dot` program is not installed "
                       "(apt-get install graphviz), or use --renderer builtin", EXIT_FAIL)
    try:
        res = subprocess.run([exe, "-Tsvg"], input=dot, capture_output=True, text=True,
                             timeout=30, check=False)
    except subprocess.TimeoutExpired:
        raise CliError("graphviz dot took longer than 30 s", EXIT_FAIL) from None
    if res.returncode != 0:
        raise CliError(f"graphviz dot failed: {res.stderr.strip()[:500]}", EXIT_FAIL)
    return res.stdout


def cmd_graph(args: argparse.Namespace) -> int:
    output_mode = args.output
    out_file: str | None = args.file
    if out_file in ("json", "table"):  # `vmha graph -o json` means the output mode
        output_mode, out_file = out_file, None
    fmt = args.format
    if fmt is None and out_file:
        fmt = "dot" if Path(out_file).suffix.lower() in (".dot", ".gv") else "svg"
    since = _parse_time(args.since) if args.since else None
    until = _parse_time(args.until) if args.until else None
    if since is not None and until is not None and until <= since:
        raise CliError("--since must be before --until", EXIT_INPUT)
    cluster = open_cluster(args)
    states = _node_states(cluster)
    events, errors = cluster.events()
    g = graph_from_events(events, nodes=states, since=since, until=until)
    doc = render(g, fmt, args.renderer, states) if fmt else None
    if out_file and doc is not None:
        try:
            Path(out_file).write_text(doc)
        except OSError as exc:
            raise CliError(f"cannot write {out_file}: {exc}", EXIT_FAIL) from None
    for err in errors:
        print(f"invalid: {err}", file=sys.stderr)
    if output_mode == "json":
        data = graph_to_json(g)
        data["node_states"] = states
        data["dot"] = to_dot(g, states)
        if out_file:
            data["file"] = {"path": out_file, "format": fmt}
        _out(argparse.Namespace(output="json"), data, None)
        return 0
    if doc is not None and not out_file:
        sys.stdout.write(doc)  # `vmha graph --format dot | dot -Tpng > g.png`
        return 0
    if out_file:
        print(f"wrote {out_file} ({fmt}: {len(g.nodes)} nodes, {len(g.edges)} arrows, "
              f"{g.moves} moves)")
    rank_table: list[list[Any]] = [["#", "NODE", "STATE", "RANK", "IN", "OUT"]] + [
        [i + 1, r.node, states.get(r.node, "-"), f"{r.score:.4f}", r.moves_in, r.moves_out]
        for i, r in enumerate(g.ranking)]
    _out(argparse.Namespace(output="table"), None, rank_table)
    if not out_file:
        print()
        edge_table: list[list[Any]] = [["VM", "FROM", "TO", "MOVES", "LIVE", "COLD"]] + [
            [e.vm, e.source, e.target, e.count, e.live, e.cold] for e in g.edges]
        if g.edges:
            _out(argparse.Namespace(output="table"), None, edge_table)
        else:
            print("no migrations in the window")
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    from cli.webserver import StateSource, WebServer, is_loopback, parse_listen

    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_INPUT) from None
    since = _parse_time(args.since) if args.since else None
    cluster = open_cluster(args)
    try:
        server = WebServer((host, port), StateSource(cluster.store, since=since,
                                                     cluster=cluster))
    except OSError as exc:
        raise CliError(f"cannot listen on {args.listen}: {exc}", EXIT_FAIL) from None
    if not is_loopback(host):
        print(f"warning: serving the cluster state without authentication on {host}; "
              "anyone who can reach it can read it", file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="vmha-web", daemon=True)
    thread.start()
    print(f"vmha web: serving {server.url} (read-only; Ctrl-C to stop)", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        cluster.store.close()
    return 0


def register(groups: dict[str, Any]) -> None:
    root = groups["root"]
    p = root.add_parser("graph", help="migration graph (live and cold moves) and node ranking",
                        description="Moves from the event history: live migrations, and "
                        "boots elsewhere after a node was lost or fenced (cold moves). "
                        "Nodes are ranked by PageRank on the moves. Without -o/--format: "
                        "the ranking and the arrows as tables.")
    p.add_argument("--since", help="unix seconds, ISO 8601, or -30m/-2h/-7d (default: all)")
    p.add_argument("--until")
    p.add_argument("--format", choices=["svg", "dot"],
                   help="write the graph document (to -o FILE, else to stdout)")
    p.add_argument("-o", "--file", metavar="FILE",
                   help="write the graph to FILE (format from --format or the suffix: "
                        ".dot/.gv -> dot, else svg) and print the ranking; "
                        "`-o json` prints everything as JSON instead")
    p.add_argument("--renderer", choices=["builtin", "graphviz"], default="builtin",
                   help="SVG drawn in Python (default, nodes on a circle) or by Graphviz dot")
    p.set_defaults(fn=cmd_graph)
    w = root.add_parser("web", help="read-only status page: cluster state and migration graph")
    w.add_argument("--listen", default="127.0.0.1:8080",
                   help="HOST:PORT (default 127.0.0.1:8080, loopback only; port 0 picks one)")
    w.add_argument("--since", help="only moves since then in the graph (default: all)")
    w.set_defaults(fn=cmd_web)
