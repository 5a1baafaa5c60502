"""The lab itself: nodes, guests, live migration, crash and teardown.

Needs root, ``unshare``, ``libvirtd`` and ``qemu-system-x86_64``; skipped
otherwise.  Kernel guest artifacts (fetched by ``VMHA_LAB=1 bash scripts/setup.sh``)
and QEMU capability probes are cached in ``$VMHA_LAB_CACHE`` (default
``/var/cache/vmha-lab``).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import libvirt
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("libvirt-python is not installed", allow_module_level=True)

from hypervisor.libvirt_adapter import LibvirtHypervisor  # noqa: E402
from lab import (  # noqa: E402
    DEFAULT_CACHE,
    LabNode,
    crash_node,
    destroy_lab,
    guest_uptime,
    kernel_guest_xml,
    lab_nodes,
    migrate_live,
    node_pids,
    pid_alive,
    qemu_pids,
    restart_node,
    start_node,
    stop_node,
    tiny_guest_xml,
    wait_guest_uptime,
)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (they start libvirtd in mount namespaces)"
    for tool in ("unshare", "libvirtd", "qemu-system-x86_64", "mount"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"lab tests need {tool} (see lab/APT_PACKAGES.txt)"
    return None


_REASON = _skip_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

NODE_NAMES = ("a", "b", "c")
MAX_DOWNTIME_MS = 5000.0


class Lab:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: dict[str, LabNode] = {}
        self.seen_pids: set[int] = set()

    def start(self) -> None:
        for index, name in enumerate(NODE_NAMES):
            self.nodes[name] = start_node(self.root, name, index)
        self.record()

    def record(self) -> None:
        for node in self.nodes.values():
            self.seen_pids.update(node_pids(node))

    def conn(self, name: str) -> libvirt.virConnect:
        return libvirt.open(self.nodes[name].uri)


def _domains(conn: libvirt.virConnect) -> dict[str, libvirt.virDomain]:
    return {dom.name(): dom for dom in conn.listAllDomains()}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lab")
    the_lab = Lab(root)
    try:
        the_lab.start()
        yield the_lab
    finally:
        the_lab.record()
        destroy_lab(root)
        alive = [pid for pid in the_lab.seen_pids if pid_alive(pid)]
        assert not alive, f"lab processes left behind: {alive}"
        assert not any(root.glob("*/libvirtd.pid")), "node directories left behind"


@pytest.fixture(scope="module")
def cache() -> Path:
    return DEFAULT_CACHE


def test_nodes_are_independent_and_start_is_idempotent(lab: Lab) -> None:
    node = lab.nodes["a"]
    again = start_node(lab.root, "a", 0)
    assert again.pid == node.pid
    assert again.uri == node.uri
    uuids = set()
    hostnames = set()
    ranges = set()
    for name, n in lab.nodes.items():
        conn = lab.conn(name)
        try:
            caps = conn.getCapabilities()
            match = re.search(r"<uuid>([0-9a-f-]+)</uuid>", caps)
            assert match is not None
            uuids.add(match.group(1))
            hostnames.add(conn.getHostname())
        finally:
            conn.close()
        ranges.add(n.migration_port_range)
        assert n.socket_path.is_socket()
    assert len(uuids) == len(NODE_NAMES)
    assert len(hostnames) == len(NODE_NAMES)
    assert len(ranges) == len(NODE_NAMES)


def test_tiny_guest_live_migration(lab: Lab) -> None:
    a, b = lab.conn("a"), lab.conn("b")
    try:
        dom = a.defineXML(tiny_guest_xml("tiny-mig"))
        dom.create()
        lab.record()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING

        # peer-to-peer: libvirtd of a connects to b's socket itself
        stats = migrate_live(lab.nodes["a"].uri, lab.nodes["b"].uri, "tiny-mig")
        lab.record()
        assert "tiny-mig" not in _domains(a)
        on_b = _domains(b)["tiny-mig"]
        assert on_b.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert on_b.isPersistent()
        assert stats["downtime_ms"] is not None
        assert 0 <= stats["downtime_ms"] < MAX_DOWNTIME_MS
        assert stats["total_ms"] is not None and stats["total_ms"] > 0
        assert qemu_pids(lab.nodes["b"]).keys() == {"tiny-mig"}
        assert "tiny-mig" not in qemu_pids(lab.nodes["a"])

        # and back, client-driven (no PEER2PEER)
        stats = migrate_live(
            lab.nodes["b"].uri, lab.nodes["a"].uri, "tiny-mig", peer2peer=False
        )
        lab.record()
        assert "tiny-mig" not in _domains(b)
        assert _domains(a)["tiny-mig"].state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert stats["downtime_ms"] is not None
        _domains(a)["tiny-mig"].destroy()
        _domains(a)["tiny-mig"].undefine()
    finally:
        a.close()
        b.close()


def test_kernel_guest_keeps_running_across_migration(lab: Lab, cache: Path) -> None:
    console = lab.root / "console-kvm1.log"
    xml = kernel_guest_xml("kernel-mig", cache, console)
    a, c = lab.conn("a"), lab.conn("c")
    try:
        dom = a.defineXML(xml)
        dom.create()
        lab.record()
        wait_guest_uptime(console, minimum=1.0, timeout=90.0)
        before = guest_uptime(console)
        assert before is not None

        # What vmha's agent on the destination sees meanwhile: the domain counts as
        # incoming until libvirt has finished the migration job, so an "arrived" report
        # always finds the completed job's statistics (downtime).  Throttled to 16 MiB/s
        # so that the copy takes a few seconds.
        dom.migrateSetMaxSpeed(16, 0)
        seen: list[tuple[bool, bool]] = []
        done = threading.Event()

        def watch() -> None:
            hv = LibvirtHypervisor(lab.nodes["c"].uri)
            try:
                while not done.is_set():
                    d = hv.list_domains().get("kernel-mig")
                    if d is not None:
                        seen.append((d.incoming, d.incoming or hv.incoming_stats(
                            "kernel-mig") is not None))
                    time.sleep(0.005)
            finally:
                hv.close()

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            stats = migrate_live(lab.nodes["a"].uri, lab.nodes["c"].uri, "kernel-mig")
            time.sleep(0.2)
        finally:
            done.set()
            watcher.join(10)
        lab.record()
        assert any(incoming for incoming, _ in seen), seen[:5]
        assert all(ok for _, ok in seen), [s for s in seen if not s[1]]
        assert "kernel-mig" not in _domains(a)
        assert _domains(c)["kernel-mig"].state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert stats["downtime_ms"] is not None and stats["downtime_ms"] < MAX_DOWNTIME_MS

        after = wait_guest_uptime(console, minimum=before + 2.0, timeout=30.0)
        assert after > before
        text = console.read_text(errors="replace")
        assert text.count("VMHA-BOOT") == 1, "guest rebooted during migration"
        values = [float(v) for v in re.findall(r"VMHA-UPTIME (\d+(?:\.\d+)?)", text)]
        assert values == sorted(values), "guest uptime went backwards"
        _domains(c)["kernel-mig"].destroy()
        _domains(c)["kernel-mig"].undefine()
    finally:
        a.close()
        c.close()


def test_guest_uptime_parsing(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert guest_uptime(log) is None
    log.write_text("VMHA-BOOT\r\n[    1.0] noise\r\nVMHA-UPTIME 3.50\r\nVMHA-UPTIME 4.51\r\n")
    assert guest_uptime(log) == pytest.approx(4.51)
    log.write_text("no uptime yet\n")
    assert guest_uptime(log) is None


def test_crashed_node_keeps_domain_defined_but_not_running(lab: Lab) -> None:
    node = lab.nodes["c"]
    conn = lab.conn("c")
    try:
        conn.defineXML(tiny_guest_xml("tiny-crash")).create()
    finally:
        conn.close()
    lab.record()
    qemu = qemu_pids(node)["tiny-crash"]
    libvirtd = node.pid
    assert libvirtd is not None

    crash_node(node)
    assert not pid_alive(libvirtd)
    assert not pid_alive(qemu)

    restarted = restart_node(node)
    lab.nodes["c"] = restarted
    lab.record()
    assert restarted.pid is not None and restarted.pid != libvirtd
    conn = lab.conn("c")
    try:
        dom = _domains(conn)["tiny-crash"]
        state, reason = dom.state()
        assert state == libvirt.VIR_DOMAIN_SHUTOFF
        assert reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED
        assert dom.isPersistent()
        assert not dom.isActive()
        dom.undefine()
    finally:
        conn.close()


def test_stop_and_restart_node(lab: Lab) -> None:
    node = lab.nodes["b"]
    conn = lab.conn("b")
    try:
        conn.defineXML(tiny_guest_xml("tiny-stop")).create()
    finally:
        conn.close()
    lab.record()
    pids = node_pids(node)
    assert len(pids) == 4  # libvirtd, qemu, reaper, virtlockd (lockd is on by default)
    stop_node(node)
    assert not any(pid_alive(p) for p in pids)
    assert node.dir.is_dir()
    restarted = restart_node(node)
    lab.nodes["b"] = restarted
    lab.record()
    conn = lab.conn("b")
    try:
        dom = _domains(conn)["tiny-stop"]
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
        dom.undefine()
    finally:
        conn.close()


def test_destroy_lab_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "lab2"
    try:
        nodes = [start_node(root, name, 10 + i) for i, name in enumerate(("x", "y"))]
        conn = libvirt.open(nodes[0].uri)
        try:
            conn.defineXML(tiny_guest_xml("tiny-teardown")).create()
        finally:
            conn.close()
        pids = [pid for node in nodes for pid in node_pids(node)]
        assert len(pids) == 7  # 2 x (libvirtd, virtlockd, reaper) + 1 qemu
        assert len(lab_nodes(root)) == 2
        destroy_lab(root)
        assert not any(pid_alive(p) for p in pids)
        assert not root.exists()
    finally:
        destroy_lab(root)  # a no-op after the test's own one; a failure leaves nothing
