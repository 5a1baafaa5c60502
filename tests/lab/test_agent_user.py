"""The agent's least privilege (deploy/systemd/vmha-agent.service): a user that is not
root, with libvirt's socket group as a supplementary group, manages qemu:///system
domains through vmha's libvirt adapter; the same user without the group cannot.

The lab's libvirtd gives its socket to group root with mode 0770 (lab/nodeconf.py),
where Debian's gives it to the `libvirt` group: same mechanism, another group name.
Needs root, ``unshare``, ``libvirtd`` and ``qemu-system-x86_64``; skipped otherwise.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lab import destroy_lab, start_node, tiny_guest_xml

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
# What the agent does with a node's domains: define and boot, list, destroy, undefine.
AS_AGENT = """\
import sys
from hypervisor.libvirt_adapter import LibvirtHypervisor
hv = LibvirtHypervisor(sys.argv[1])
hv.boot("user-probe", sys.argv[2])
print("listed", sorted(hv.list_domains()))
hv.destroy("user-probe")
hv.undefine("user-probe")
print("done")
"""


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (starts libvirtd in a mount namespace, runs as another user)"
    for tool in ("unshare", "libvirtd", "qemu-system-x86_64"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"needs {tool} (see lab/APT_PACKAGES.txt)"
    # The other user runs this checkout's Python and code: every directory above them
    # must let others through (a clone under /root or in a `mktemp -d` does not).
    for path in (Path(sys.executable), ROOT):
        for d in path.parents:
            mode = os.stat(d).st_mode
            if not mode & stat.S_IXOTH:
                return (f"{d} is closed to other users (mode {stat.S_IMODE(mode):o}): the test "
                        "runs this checkout as nobody")
    return None


pytestmark = [pytest.mark.lab, pytest.mark.skipif(_skip_reason() is not None,
                                                  reason=_skip_reason() or "")]


def test_a_user_in_the_socket_group_manages_domains_without_root() -> None:
    root = Path(tempfile.mkdtemp(prefix="vmha-lab-user-"))
    root.chmod(0o755)  # the other user must reach the node's socket
    try:
        node = start_node(root, "u1", 9)
        sock_gid = os.stat(node.socket_path).st_gid

        def as_user(groups: list[int]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-c", AS_AGENT, node.uri, tiny_guest_xml("user-probe")],
                user=NOBODY, group=grp.getgrnam("nogroup").gr_gid, extra_groups=groups,
                cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
                capture_output=True, text=True, timeout=120)

        r = as_user([sock_gid])
        assert r.returncode == 0, r.stderr
        assert "listed ['user-probe']" in r.stdout and "done" in r.stdout
        denied = as_user([])
        assert denied.returncode != 0
        assert "Permission denied" in denied.stderr, denied.stderr[-2000:]
    finally:
        destroy_lab(root)
        shutil.rmtree(root, ignore_errors=True)
