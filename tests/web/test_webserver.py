"""The web server in-process: listen parsing, Host check, read-only methods, and an
etcd that does not answer (503, the page shows the error).  Real etcd where one is used."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator

import pytest

from cli.webserver import StateSource, WebServer, is_loopback, node_state, parse_listen
from store.etcd import EtcdStore
from tests.harness import EtcdCluster, free_ports


def test_parse_listen_and_loopback() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen(":9000") == ("127.0.0.1", 9000)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    for bad in ("8080", "host:", "host:http", "1.2.3.4:70000", "[::1]"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.4.5", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "example.com", "", "::"))
    row = {"fenced": False, "registered": True, "cordoned": True}
    assert node_state(row) == "cordoned"
    assert node_state({**row, "registered": False, "cordoned": False}) == "lost"
    assert node_state({**row, "fenced": True}) == "fenced"


def serve(store: EtcdStore) -> Iterator[tuple[WebServer, str]]:
    server = WebServer(("127.0.0.1", 0), StateSource(store, max_age=0.0))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server, f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        store.close()


def request(addr: str, method: str, path: str, host: str | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection(addr, timeout=15)
    try:
        c.putrequest(method, path, skip_host=host is not None)
        if host is not None:
            c.putheader("Host", host)
        c.endheaders()
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


@pytest.fixture
def live(etcd: EtcdCluster) -> Iterator[tuple[WebServer, str]]:
    yield from serve(EtcdStore(etcd.endpoints))


@pytest.mark.integration
def test_empty_cluster_pages_and_headers(live: tuple[WebServer, str]) -> None:
    server, addr = live
    assert server.url == f"http://{addr}/"
    status, headers, body = request(addr, "GET", "/api/state")
    assert status == 200 and headers["Content-Type"] == "application/json"
    state = json.loads(body)
    assert state["leader"] is None and state["nodes"] == [] and state["vms"] == []
    assert state["graph"]["moves"] == 0
    status, headers, body = request(addr, "GET", "/")
    assert status == 200 and b'<script src="/app.js"' in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["Cache-Control"] == "no-store"
    for path in ("/app.js", "/app.css", "/api/graph.svg", "/api/graph.dot", "/healthz"):
        assert request(addr, "GET", path)[0] == 200, path
    status, headers, body = request(addr, "HEAD", "/api/graph.svg")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert request(addr, "GET", "/../pyproject.toml")[0] == 404
    assert request(addr, "GET", "/static/app.js")[0] == 404
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        status, headers, _ = request(addr, method, "/api/state")
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
    port = addr.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert request(addr, "GET", "/healthz", host=host)[0] == 200, host
    for host in (f"attacker.example:{port}", "10.1.2.3", ""):
        assert request(addr, "GET", "/api/state", host=host)[0] == 421, host


def test_etcd_down_is_503_with_the_reason() -> None:
    (port,) = free_ports(1)
    for _, addr in serve(EtcdStore(f"127.0.0.1:{port}", retry_budget=0.3)):
        status, _, body = request(addr, "GET", "/api/state")
        assert status == 503 and "error" in json.loads(body)
        assert request(addr, "GET", "/")[0] == 200  # the page itself still loads
