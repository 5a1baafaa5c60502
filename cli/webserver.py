"""`vmha web`: a read-only status page.

A stdlib HTTP server (one thread per request) that serves

    /                the page (orchestrator/static/index.html, app.js, app.css)
    /api/state       JSON: leader and epoch, nodes (state, lease, free memory), VMs,
                     the graph's version and ranking; the page polls it every second
    /api/graph.svg   the migration graph (cli.graph.to_svg)
    /api/graph.dot   the same as DOT text
    /healthz         "ok"

Read-only by construction: it holds an EtcdStore but only reads the state and the
history (`cli.cluster`, on the keyspace the marker names) and calls lease_ttl(); every
method but GET/HEAD is answered 405.  The page
loads nothing from outside (a Content-Security-Policy says so).  When it listens on a
loopback address it answers only requests whose Host header names a loopback address,
so a web page elsewhere cannot read the cluster state through DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import structlog

from cli.cluster import Cluster
from cli.common import _node_rows, node_state
from cli.graph import MigrationGraph, graph_from_events, graph_to_json, to_dot, to_svg
from store.etcd import EtcdStore

log = structlog.get_logger("vmha.web")

STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def parse_listen(spec: str) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' (loopback) -> (host, port)."""
    spec = spec.strip()
    if spec.startswith("["):
        host, sep, port = spec[1:].partition("]:")
    else:
        host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {spec!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_rows(snap: Any, store: EtcdStore) -> list[dict[str, Any]]:
    """`vmha node list`'s rows plus the nodes VMs still point at although they are gone
    (crashed, not fenced yet), each with its `state`."""
    rows: list[dict[str, Any]] = _node_rows(snap, store)
    known = {r["name"] for r in rows}
    referenced = {p.value.node for p in snap.placements.values() if p.value.node}
    referenced |= {s.value.node for s in snap.statuses.values()
                   if s.value.state in ("running", "paused", "migrating")}
    for name in sorted(referenced - known):
        rows.append({"name": name, "registered": False, "lease_id": None,
                     "lease_ttl_s": None, "cordoned": False, "cordon_reason": None,
                     "fenced": False, "memory_mib": None, "free_memory_mib": None,
                     "vcpus": None, "libvirt_uri": None})
    rows.sort(key=lambda r: r["name"])
    for r in rows:
        r["state"] = node_state(r)
    return rows


@dataclass
class Cached:
    at: float
    state: dict[str, Any]
    graph: MigrationGraph
    node_states: dict[str, str]


class StateSource:
    """Reads the cluster (one snapshot + the history) at most every `max_age` seconds,
    however many browsers poll."""

    def __init__(self, store: EtcdStore, since: float | None = None, max_age: float = 0.5,
                 clock: Callable[[], float] = time.monotonic,
                 cluster: Cluster | None = None) -> None:
        """`cluster`: the keyspace to read (`cli.cluster.open_cluster`; default: keyspace 1
        of `store`)."""
        self.store = store
        self.cluster = cluster or Cluster(store)
        self.since = since
        self.max_age = max_age
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: Cached | None = None

    def get(self) -> Cached:
        with self._lock:
            now = self.clock()
            if self._cached is None or now - self._cached.at >= self.max_age:
                self._cached = self._read(now)
            return self._cached

    def _read(self, now: float) -> Cached:
        snap = self.cluster.snapshot()
        rows = node_rows(snap, self.store)
        node_states = {r["name"]: r["state"] for r in rows}
        vms = []
        for name in sorted(snap.specs):
            p = snap.placements[name].value if name in snap.placements else None
            s = snap.statuses[name].value if name in snap.statuses else None
            vms.append({"name": name, "desired": snap.specs[name].value.state,
                        "memory_mib": snap.specs[name].value.memory_mib,
                        "node": s.node if s else None, "state": s.state if s else None,
                        "since": s.since if s else None, "placed_on": p.node if p else None,
                        "placement": p.kind if p else None,
                        "from_node": p.from_node if p else None,
                        "error": s.error if s else None})
        events, _ = self.cluster.events()
        graph = graph_from_events(events, nodes=node_states, since=self.since)
        leader = snap.leader
        gj = graph_to_json(graph)
        state = {
            "at": time.time(),
            "revision": snap.revision,
            "leader": ({"id": leader.value.id, "epoch": leader.create_revision,
                        "since": leader.value.elected_at} if leader else None),
            "nodes": rows,
            "vms": vms,
            "graph": {"version": gj["version"], "moves": gj["moves"], "edges": gj["edges"],
                      "ranking": gj["ranking"]},
            "recent": [e.model_dump(mode="json") for e in events[-12:]][::-1],
            "invalid_keys": [str(e) for e in snap.errors],
        }
        return Cached(now, state, graph, node_states)


class WebServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], source: StateSource) -> None:
        self.source = source
        self.check_host = is_loopback(addr[0])
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        h = str(host)
        return f"http://{'[' + h + ']' if ':' in h else h}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: WebServer
    server_version = "vmha-web"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        pass  # one line per poll would drown the log; errors are logged below

    def _send(self, status: int, body: bytes, ctype: str, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _host_ok(self) -> bool:
        if not self.server.check_host:
            return True
        host = self.headers.get("Host", "")
        name = urlsplit("//" + host).hostname or ""
        return is_loopback(name)

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self._get(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._get(head=False)

    def _get(self, head: bool) -> None:
        if not self._host_ok():
            self._send(HTTPStatus.MISDIRECTED_REQUEST, b"unexpected Host header\n",
                       "text/plain; charset=utf-8", head)
            return
        path = urlsplit(self.path).path
        try:
            if path in STATIC:
                fname, ctype = STATIC[path]
                body = resources.files("cli").joinpath("static", fname).read_bytes()
                self._send(HTTPStatus.OK, body, ctype, head)
            elif path == "/healthz":
                self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8", head)
            elif path == "/api/state":
                c = self.server.source.get()
                self._send(HTTPStatus.OK, json.dumps(c.state).encode(),
                           "application/json", head)
            elif path == "/api/graph.svg":
                c = self.server.source.get()
                self._send(HTTPStatus.OK, to_svg(c.graph, c.node_states).encode(),
                           "image/svg+xml; charset=utf-8", head)
            elif path == "/api/graph.dot":
                c = self.server.source.get()
                self._send(HTTPStatus.OK, to_dot(c.graph, c.node_states).encode(),
                           "text/vnd.graphviz; charset=utf-8", head)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8",
                           head)
        except Exception as exc:  # noqa: BLE001 - etcd down etc.: the page shows it
            log.warning("web_request_failed", path=path, error=str(exc))
            body = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, body, "application/json", head)

    def _read_only(self) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _read_only  # noqa: N815


def serve(store: EtcdStore, host: str, port: int, since: float | None = None) -> WebServer:
    """Bind and start serving in a daemon thread; `shutdown()` stops it."""
    server = WebServer((host, port), StateSource(store, since=since))
    threading.Thread(target=server.serve_forever, name="vmha-web", daemon=True).start()
    return server
