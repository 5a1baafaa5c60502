"""libvirt's lockd lock manager in the lab (``start_node(..., lockd=True)``).

A second line of defence below fencing: with lockd on, a disk that a guest
on node A holds cannot be opened by a guest on node B (both nodes' QEMU
drivers lease it in the lockspace ``<lab root>/lockspace``).  On by default;
with ``lockd=False`` only QEMU's own image locking remains.  Needs root, ``unshare``,
``libvirtd``, ``virtlockd`` and ``qemu-system-x86_64``; skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import libvirt
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("libvirt-python is not installed", allow_module_level=True)

from lab import destroy_lab, node_pids, pid_alive, start_node  # noqa: E402
from lab.guests import disk_guest_xml  # noqa: E402
from lab.nodeconf import LOCKSPACE_DIR, LabNode  # noqa: E402


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (they start libvirtd in mount namespaces)"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    for tool in ("unshare", "libvirtd", "qemu-system-x86_64", "mount"):
        if shutil.which(tool, path=path) is None:
            return f"lab tests need {tool} (see lab/APT_PACKAGES.txt)"
    if shutil.which("virtlockd", path=path) is None:
        return "lockd lab test needs virtlockd (Debian package libvirt-daemon)"
    return None


_REASON = _skip_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

#: libvirt's lockd refusal, raised before QEMU is even started
_LOCKD_WORDS = ("resource busy", "failed to acquire lock", "lockspace")
#: QEMU's own image locking (OFD locks on the image file, one host only)
_QEMU_LOCK = 'failed to get "write" lock'


@pytest.fixture
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("lockd")
    seen: set[int] = set()
    try:
        yield root
    finally:
        for node_dir in root.glob("*/libvirtd.pid"):
            seen.update(node_pids(LabNode("x", node_dir.parent, "", (0, 0), None)))
        destroy_lab(root)
        shutil.rmtree(root / "shared", ignore_errors=True)
        alive = [pid for pid in seen if pid_alive(pid)]
        assert not alive, f"lab processes left behind: {alive}"
        assert not any(root.glob("*/virtlockd.pid")), "node directories left behind"


def _start(uri: str, xml: str) -> libvirt.virDomain:
    conn = libvirt.open(uri)
    try:
        dom = conn.defineXML(xml)
        dom.create()
        return dom
    finally:
        conn.close()


def test_lockd_refuses_second_writer_of_a_disk(lab_root: Path) -> None:
    a = start_node(lab_root, "a", 0, lockd=True)
    b = start_node(lab_root, "b", 1, lockd=True)
    for node in (a, b):
        vl = node.virtlockd_pid_file.read_text().strip()
        assert pid_alive(int(vl)), f"virtlockd of node {node.name} is not running"
        assert (node.dir / "run" / "virtlockd-sock").is_socket()
        assert 'lock_manager = "lockd"' in (node.dir / "etc" / "qemu.conf").read_text()
    disk = lab_root / "shared" / "disk-g1.img"
    # share_rw: QEMU's own image locks (one kernel for all lab nodes) would
    # otherwise refuse node b's guest before lockd is asked
    xml_a = disk_guest_xml("g1", disk, share_rw=True)
    xml_b = disk_guest_xml("g1-copy", disk, uuid=str(uuid.uuid4()), share_rw=True)

    conn_a = libvirt.open(a.uri)
    conn_b = libvirt.open(b.uri)
    try:
        dom_a = conn_a.defineXML(xml_a)
        dom_a.create()
        assert dom_a.isActive()
        assert any((lab_root / LOCKSPACE_DIR).iterdir()), "no lease in the shared lockspace"

        dom_b = conn_b.defineXML(xml_b)
        with pytest.raises(libvirt.libvirtError) as err:
            dom_b.create()
        message = str(err.value).lower()
        # lockd refused it, not QEMU's own image locking (all lab nodes share
        # one kernel, so that would refuse too, but only later and per host)
        assert any(word in message for word in _LOCKD_WORDS), message
        assert _QEMU_LOCK not in message, message
        assert not dom_b.isActive()
        print(f"node b refused: {err.value}")

        dom_a.destroy()
        dom_b.create()  # the lease is free again
        assert dom_b.isActive()
        dom_b.destroy()
    finally:
        conn_a.close()
        conn_b.close()


def test_lockd_on_by_default_and_off_on_request(lab_root: Path) -> None:
    on = start_node(lab_root, "default", 1)
    assert 'lock_manager = "lockd"' in (on.dir / "etc" / "qemu.conf").read_text()
    assert pid_alive(int(on.virtlockd_pid_file.read_text().strip()))
    node = start_node(lab_root, "plain", 0, lockd=False)
    assert 'lock_manager = "nop"' in (node.dir / "etc" / "qemu.conf").read_text()
    assert not (node.dir / "etc" / "qemu-lockd.conf").exists()
    assert not node.virtlockd_pid_file.exists()
    disk = lab_root / "shared" / "disk-g2.img"
    dom = _start(node.uri, disk_guest_xml("g2", disk))
    assert dom.isActive()
    # without lockd only QEMU's own (single-host) image locking objects to a
    # second guest on the same disk; no lockd lease is involved
    with pytest.raises(libvirt.libvirtError) as err:
        _start(node.uri, disk_guest_xml("g2-copy", disk))
    message = str(err.value).lower()
    assert _QEMU_LOCK in message, message
    assert not any(word in message for word in _LOCKD_WORDS), message
    dom.destroy()
    # and with QEMU's locks relaxed nothing at all stops a second writer: the
    # refusal in the lockd test above comes from lockd
    first = _start(node.uri, disk_guest_xml("g3", disk, share_rw=True))
    second = _start(node.uri, disk_guest_xml("g3-copy", disk, share_rw=True))
    assert first.isActive() and second.isActive()
    second.destroy()
    first.destroy()
