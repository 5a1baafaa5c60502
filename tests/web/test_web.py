"""`vmha web` and `vmha graph` against a real etcd and a fake cluster, the page rendered
by Debian's headless Chromium (its JavaScript polls /api/state and draws the graph).

Chromium runs as `--dump-dom` and `--screenshot` one-shots; the live update (no reload)
is checked through chromedriver's W3C WebDriver HTTP API, spoken with urllib."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.fake import fake_ground_truth
from schemas import Keyspace
from store.etcd import EtcdStore
from store.history import EventFilter, read_events
from tests.conftest import vmha
from tests.harness import EtcdCluster, FakeCluster, free_ports, wait_until

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
KS = Keyspace()
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-quic", "--no-first-run", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage"]


def run_group(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run in its own process group; on timeout kill the whole group (Chromium forks)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[0]} timed out after {timeout} s: {err[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def http(url: str, method: str = "GET", host: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method)
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def drained(etcd: EtcdCluster, fake_cluster: FakeCluster) -> tuple[FakeCluster, list[str]]:
    """3 agents, 1 orchestrator, 4 VMs; then n1 drained by `etcdctl lease revoke`."""
    fc = fake_cluster
    for n in ("n1", "n2", "n3"):
        fc.start_agent(n)
    fc.start_orchestrator("o1")
    for i in range(4):
        r = vmha(etcd, "vm", "add", f"vm{i}", "--memory-mib", "512")
        assert r.returncode == 0, r.stderr
    wait_until(lambda: len(fake_ground_truth(fc.fake_root)) == 4, 20, what="4 VMs running")
    victims = sorted(v for v, ns in fake_ground_truth(fc.fake_root).items() if "n1" in ns)
    assert victims, "4 VMs over 3 nodes: n1 has at least one"
    store = EtcdStore(etcd.endpoints)
    try:
        reg = store.get(KS.node("n1"))
        assert reg is not None
        lease = json.loads(reg.value)["lease_id"]
        r2 = subprocess.run(["etcdctl", "--endpoints", etcd.endpoints, "lease", "revoke", lease],
                            capture_output=True, text=True, timeout=10,
                            env=dict(os.environ, ETCDCTL_API="3"))
        assert r2.returncode == 0, r2.stderr

        def migrated() -> bool:
            evs, _ = read_events(store, EventFilter(kind="migration"))
            return sorted(e.vm or "" for e in evs if e.from_node == "n1") == victims

        try:
            wait_until(migrated, 30, what="n1's VMs live-migrated away")
        except TimeoutError as exc:
            # Seen once in a fresh run, not since: say what the cluster did.
            evs, _ = read_events(store, EventFilter())
            log = (fc.workdir / "agent-n1.log").read_text(errors="replace").splitlines()
            raise AssertionError(
                f"{exc}\nvictims {victims}; where now {fake_ground_truth(fc.fake_root)}\n"
                f"events: {[(e.kind, e.vm, e.from_node, e.node) for e in evs]}\n"
                "n1's log, last 40 lines:\n" + "\n".join(log[-40:])) from exc
    finally:
        store.close()
    return fc, victims


@pytest.fixture
def web(etcd: EtcdCluster, tmp_path: Path) -> Iterator[str]:
    """`vmha web` on a free loopback port (port 0: it prints the URL it got)."""
    log = tmp_path / "web.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vmha", "--etcd", etcd.endpoints,
                                 "web", "--listen", "127.0.0.1:0"], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        m = wait_until(lambda: re.search(r"serving (http://127\.0\.0\.1:\d+/)",
                                         log.read_text()) or proc.poll() is not None,
                       15, what="vmha web to listen")
        assert isinstance(m, re.Match), log.read_text()
        yield m.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()


def test_graph_cli_and_web_page_in_chromium(etcd: EtcdCluster, drained: tuple[FakeCluster,
                                            list[str]], web: str, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it: "
                    "apt-get install --no-install-recommends chromium)")
    fc, victims = drained
    started = time.monotonic()

    # ---- vmha graph: JSON, DOT and SVG ----
    r = vmha(etcd, "graph", "-o", "json")
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)
    assert {"n1", "n2", "n3"} <= set(g["nodes"])
    moved = {(e["vm"], e["source"]) for e in g["edges"] if e["live"]}
    assert {(v, "n1") for v in victims} <= moved
    assert sum(x["score"] for x in g["ranking"]) == pytest.approx(1.0, abs=1e-4)
    assert g["ranking"][-1]["node"] == "n1"  # it only gave VMs away
    assert g["node_states"]["n1"] == "cordoned" and '"n1" -> ' in g["dot"]
    svg_path = tmp_path / "g.svg"
    r = vmha(etcd, "graph", "-o", str(svg_path))
    assert r.returncode == 0 and "RANK" in r.stdout, r.stderr
    root = ET.parse(svg_path).getroot()
    assert {p.get("data-vm") for p in root.iter("{http://www.w3.org/2000/svg}path")
            if p.get("class") == "edge"} >= set(victims)
    r = vmha(etcd, "graph", "--format", "dot", "--since=-10m")
    assert r.returncode == 0 and r.stdout.startswith("digraph"), r.stderr
    r = vmha(etcd, "graph", "--since", "tomorrow-ish")
    assert r.returncode == 2 and r.stderr.startswith("error:")

    # ---- the HTTP API: read-only, loopback Host only ----
    status, body = http(web + "api/state")
    assert status == 200
    state = json.loads(body)
    assert state["leader"]["id"] == "o1" and state["leader"]["epoch"] > 0
    assert {n["name"]: n["state"] for n in state["nodes"]}["n1"] == "cordoned"
    status, body = http(web + "api/graph.svg")
    assert status == 200 and body.startswith(b"<svg")
    assert http(web + "api/state", method="POST")[0] == 405
    assert http(web + "api/state", method="DELETE")[0] == 405
    assert http(web + "api/state", host="evil.example:80")[0] == 421
    page = http(web)[1].decode()
    assert "http://" not in page.replace('xmlns="http://www.w3.org', "") and "https://" not in page

    # ---- Chromium: the DOM after the page's JavaScript ran ----
    udd = tmp_path / "chromium"
    dump = run_group([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={udd}",
                      "--virtual-time-budget=3000", "--dump-dom", web], timeout=30)
    assert dump.returncode == 0, dump.stderr[-2000:]
    dom = dump.stdout
    for n in ("n1", "n2", "n3"):
        assert f"<td>{n}</td>" in dom, dom  # rows the script built from /api/state
    assert "leader: o1 (epoch" in dom
    for vm in victims:
        assert f'data-vm="{vm}" data-source="n1"' in dom  # its arrow in the inlined SVG
        assert f"<td>{vm}</td>" in dom
    assert 'class="edge"' in dom and 'class="state state-cordoned"' in dom
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web.png"
    shot.unlink(missing_ok=True)
    res = run_group([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={udd}",
                     "--virtual-time-budget=3000", "--hide-scrollbars",
                     f"--screenshot={shot}", "--window-size=1280,900", web], timeout=30)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert time.monotonic() - started < 45


def test_page_updates_without_reload(etcd: EtcdCluster, drained: tuple[FakeCluster, list[str]],
                                     web: str, tmp_path: Path) -> None:
    """A VM added while the page is open shows up running, and after a crash the cold
    moves show up in the graph, with no navigation."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium/chromedriver not installed (apt-get install "
                    "--no-install-recommends chromium chromium-driver)")
    fc, _ = drained
    (port,) = free_ports(1)
    drv = subprocess.Popen([CHROMEDRIVER, f"--port={port}", "--allowed-ips="],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def call(method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["value"]

    try:
        wait_until(lambda: _up(base + "/status"), 10, what="chromedriver")
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'wd'}",
                     "--window-size=1280,900"]}}}}
        sid = call("POST", "/session", caps)["sessionId"]
        try:
            call("POST", f"/session/{sid}/url", {"url": web})

            def text(selector: str) -> str:
                return str(call("POST", f"/session/{sid}/execute/sync", {
                    "script": "const e = document.querySelector(arguments[0]);"
                              "return e ? e.textContent : '';", "args": [selector]}))

            wait_until(lambda: "n2" in text("#nodes"), 10, what="first render")
            call("POST", f"/session/{sid}/execute/sync",
                 {"script": "window.__noReload = 1; return 1;", "args": []})
            r = vmha(etcd, "vm", "add", "late1", "--memory-mib", "256")
            assert r.returncode == 0, r.stderr
            def row(vm: str) -> list[str] | None:
                cells: list[str] | None = call("POST", f"/session/{sid}/execute/sync", {
                    "script": "for (const tr of document.querySelectorAll('#vms tbody tr'))"
                              " if (tr.cells[0].textContent === arguments[0])"
                              "  return Array.from(tr.cells).map(c => c.textContent);"
                              "return null;", "args": [vm]})
                return cells

            wait_until(lambda: (r := row("late1")) is not None and r[3] == "running", 20,
                       what="late1 running on the open page")
            # A crash: n2's VMs cold-boot elsewhere; their (dashed) arrows appear.
            lost = sorted(v for v, ns in fake_ground_truth(fc.fake_root).items() if "n2" in ns)
            assert lost
            fc.agents["n2"].kill()

            def cold_arrows() -> list[str]:
                got: list[str] = call("POST", f"/session/{sid}/execute/sync", {
                    "script": "return Array.from(document.querySelectorAll("
                              "'#graph path.edge[data-source=\"n2\"][stroke-dasharray]'))"
                              ".map(p => p.dataset.vm).sort();", "args": []})
                return got

            wait_until(lambda: cold_arrows() == lost, 25, what="cold-move arrows on the page")
            assert call("POST", f"/session/{sid}/execute/sync",
                        {"script": "return window.__noReload || 0;", "args": []}) == 1
            png = base64.b64decode(call("GET", f"/session/{sid}/screenshot"))
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "web-live.png").write_bytes(png)
        finally:
            call("DELETE", f"/session/{sid}")
    finally:
        os.killpg(drv.pid, signal.SIGTERM)
        drv.wait(10)


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False

