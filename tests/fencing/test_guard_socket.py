"""The guard's socket: its own user, plus the agent's group when `socket_group` is set
(the agent runs as a user of its own in vmha-agent.service)."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fencing.guard_server import listen

CONNECT = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"
# The system's Python (the stdlib is all CONNECT needs): the checkout's venv may sit in a
# directory other users cannot enter, such as /root.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def test_socket_mode_without_and_with_a_group(tmp_path: Path) -> None:
    srv = listen(str(tmp_path / "a.sock"))
    srv.close()
    assert stat.S_IMODE(os.stat(tmp_path / "a.sock").st_mode) == 0o600
    group = grp.getgrgid(os.getgid()).gr_name
    srv = listen(str(tmp_path / "b.sock"), group)
    srv.close()
    st = os.stat(tmp_path / "b.sock")
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
def test_only_members_of_the_socket_group_attach() -> None:
    nobody, nogroup = 65534, grp.getgrnam("nogroup").gr_gid
    d = Path(tempfile.mkdtemp(prefix="vmha-guard-sock-"))
    try:
        d.chmod(0o755)
        path = d / "guard.sock"
        srv = listen(str(path), "nogroup")  # chowned: root is not a member of nogroup
        try:
            assert os.stat(path).st_gid == nogroup

            def connect_as(groups: list[int]) -> subprocess.CompletedProcess[str]:
                # The socket's group as a supplementary group: membership counts
                # however the process holds it.
                return subprocess.run([PYTHON, "-c", CONNECT, str(path)], user=nobody,
                                      group=grp.getgrnam("daemon").gr_gid,
                                      extra_groups=groups, capture_output=True, text=True,
                                      timeout=30)

            assert connect_as([nogroup]).returncode == 0
            other = connect_as([])
            assert other.returncode != 0 and "Permission denied" in other.stderr
        finally:
            srv.close()
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
