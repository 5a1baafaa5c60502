"""A fenced lab node refuses new work by itself: vmha's libvirt qemu hook (installed into
every lab node's /etc/libvirt/hooks by lab.nodeconf) refuses an incoming migration and a
boot while the node's fenced marker exists.

Node b's guard (the real `python -m fencing.guard` on b's libvirt URI) fires: it
SIGKILLs b's stand-in agent and writes b's marker.  Node a has not seen b as lost (its
registration would live until the lease expires) and migrates a QEMU guest to b: b's
libvirtd refuses it through the hook, and the guest keeps running on a, the same QEMU
process.  Once the marker is gone (b's agent registered again) the guard exits and the
same migration goes through.  Needs root, unshare, libvirtd and QEMU; skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import libvirt  # noqa: F401
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("libvirt-python is not installed", allow_module_level=True)

from hypervisor.base import HypervisorError  # noqa: E402
from hypervisor.libvirt_adapter import LibvirtHypervisor  # noqa: E402
from lab import destroy_lab, node_pids, pid_alive, qemu_pids, start_node, tiny_guest_xml  # noqa: E402
from lab.localcluster import wait_until  # noqa: E402
from lab.nodeconf import LabNode  # noqa: E402
from tests.fencing.procs import popen, stop_started  # noqa: E402


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (they start libvirtd in mount namespaces)"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    for tool in ("unshare", "libvirtd", "virtlockd", "qemu-system-x86_64", "mount"):
        if shutil.which(tool, path=path) is None:
            return f"lab tests need {tool} (see lab/APT_PACKAGES.txt)"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("hook")
    seen: set[int] = set()
    try:
        yield root
    finally:
        stop_started()
        for pid_file in root.glob("*/libvirtd.pid"):
            seen.update(node_pids(LabNode("x", pid_file.parent, "", (0, 0), None)))
        destroy_lab(root)
        alive = [pid for pid in seen if pid_alive(pid)]
        assert not alive, f"lab processes left behind: {alive}"


def active(hv: LibvirtHypervisor) -> list[str]:
    return sorted(n for n, d in hv.list_domains().items() if d.active)


def test_a_node_whose_guard_fired_refuses_an_incoming_migration(lab_root: Path) -> None:
    a = start_node(lab_root, "a", 0)
    b = start_node(lab_root, "b", 1)
    for node in (a, b):  # the operator guide's install step, done by the lab
        assert os.access(node.dir / "etc" / "hooks" / "qemu", os.X_OK)
        assert str(node.fenced_marker) in (node.dir / "etc" / "hooks" / "vmha-hook.conf") \
            .read_text()
    hv_a, hv_b = LibvirtHypervisor(a.uri), LibvirtHypervisor(b.uri)
    hv_a.boot("g1", tiny_guest_xml("g1"))
    qemu_before = qemu_pids(a)["g1"]

    agent_b = popen(["sleep", "120"])  # b's agent, frozen or cut off: it stops petting
    guard_b = popen([sys.executable, "-m", "fencing.guard", "--agent-pid", str(agent_b.pid),
                     "--uri", b.uri, "--fenced-marker", str(b.fenced_marker)],
                    stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert guard_b.stdin is not None
    guard_b.stdin.write(f"pet {time.monotonic() + 0.5} 30\n".encode())
    guard_b.stdin.flush()
    assert agent_b.wait(20) == -9
    wait_until(b.fenced_marker.exists, 10, what="b's marker written by its guard")

    # a migrates g1 to b (a has not seen b as lost): b's hook refuses it
    with pytest.raises(HypervisorError) as err:
        hv_a.migrate("g1", b.uri, "127.0.0.1")
    message = str(err.value)
    assert "fenced" in message and "migrate domain g1" in message, message
    assert active(hv_a) == ["g1"] and qemu_pids(a)["g1"] == qemu_before
    assert active(hv_b) == []
    # and a boot on b is refused the same way
    with pytest.raises(HypervisorError) as err:
        hv_b.boot("g2", tiny_guest_xml("g2"))
    assert "fenced" in str(err.value), err.value
    assert active(hv_b) == [] and guard_b.poll() is None

    # b's agent registered again: the marker goes, the guard exits, the same migration
    # goes through (the refusal above was the hook's, not a broken migration)
    b.fenced_marker.unlink()
    assert guard_b.wait(20) == 3
    err_text = guard_b.stderr.read().decode() if guard_b.stderr else ""
    assert '"guard_fired"' in err_text and '"guard_exit"' in err_text
    hv_a.migrate("g1", b.uri, "127.0.0.1")
    assert active(hv_b) == ["g1"] and active(hv_a) == []
    hv_b.destroy("g1")
    hv_a.close()
    hv_b.close()
