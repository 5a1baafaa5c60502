"""`vmha demo --fake` end to end (no root): etcd with auth on, keyspace 2, the fake
hypervisor; the operator's writes are `vmha` commands with its certificate, its auth step
refuses, the drain and the crash leave every VM running once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_fake_demo_runs_with_auth_on(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vmha", "demo", "--fake", "--workdir",
                        str(tmp_path / "demo")], capture_output=True, text=True, timeout=180,
                       check=False)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "real etcd with auth on" in out
    refused = re.findall(r"^\s+(\S+)\s+(.+?)\s+-> permission denied \(revision (\d+) unchanged\)",
                         out, re.MULTILINE)
    assert [(who, what.split()[0]) for who, what, _ in refused] == [
        ("node-n1", "put"), ("node-n1", "put"), ("operator", "revoke")], out
    # The operator's writes are vmha commands, on keyspace 2's keys.
    added = re.findall(r"\$ vmha vm add (vm\d) --memory-mib \d+: vm/\1 added \(/vmha/spec/\1,",
                       out)
    assert added == [f"vm{i}" for i in range(6)], out
    assert "vmha node uncordon n1 as operator: node/n1 uncordoned" in out, out
    for needle in ("/vmha/n/n2/reg", "/vmha/place/web1", "live-migrated", "n1 stays cordoned: True",
                   "fence record: method=", "cold-booted", "VMs running: 6/6, running twice: 0",
                   "all processes stopped"):
        assert needle in out, (needle, out)
    assert "add user node-n3" in (tmp_path / "demo" / "auth-setup.log").read_text()
