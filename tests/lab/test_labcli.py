"""`vmha lab up|status|down` and `vmha demo` as an operator runs them: separate processes.

Root only; skipped without libvirtd / QEMU / unshare / etcd (same check as `vmha lab up`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lab.commands import missing_prerequisite
from lab.localcluster import wait_until
from tests.lab.procs import Lines, lab_down_on_failure, run_vmha

_REASON = missing_prerequisite()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_vmha(*args, timeout=timeout)


def state(lab: Path) -> dict[str, Any]:
    return dict(json.loads((lab / "lab.json").read_text()))


def procs_mentioning(path: Path) -> list[tuple[int, str]]:
    """Live processes whose command line mentions ``path`` (read-only scan)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            raw = cmdline.read_bytes()
            stat = (cmdline.parent / "stat").read_bytes()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X"):
            continue
        text = raw.replace(b"\0", b" ").decode(errors="replace")
        if str(path) in text:
            out.append((int(cmdline.parent.name), text))
    return out


def mounts_under(path: Path) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if str(path) in line]


def all_gone(lab: Path) -> bool:
    return not procs_mentioning(lab)


def test_up_status_idempotent_restart_down(lab_dir: Path) -> None:
    lab = lab_dir
    try:
        r = run("lab", "up", "--dir", str(lab), "--nodes", "2")
        assert r.returncode == 0, r.stdout + r.stderr
        st = state(lab)
        endpoints = st["etcd"]["endpoints"]
        assert endpoints in r.stdout and "etcdctl --endpoints" in r.stdout
        assert sorted(st["daemons"]) == ["agent:n1", "agent:n2", "orchestrator:o1",
                                         "orchestrator:o2"]
        r = run("-o", "json", "lab", "status", "--dir", str(lab))
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["up"] is True
        # the printed example works: a VM boots on a lab node
        r = run("--etcd", endpoints, "vm", "add", "web1", "--memory-mib", "32", "--xml",
                str(lab / "guests" / "web1.xml"))
        assert r.returncode == 0, r.stderr

        def web1_running() -> bool:
            out = run("--etcd", endpoints, "-o", "json", "vm", "list").stdout
            return any(v["name"] == "web1" and v["state"] == "running"
                       for v in json.loads(out))

        wait_until(web1_running, 30, 0.2, "web1 running")
        # a second `up` changes nothing (without --nodes it takes the lab as it is)
        r = run("lab", "up", "--dir", str(lab))
        assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr
        assert state(lab)["daemons"] == st["daemons"]
        # a different shape is refused
        r = run("lab", "up", "--dir", str(lab), "--nodes", "3")
        assert r.returncode == 2 and "lab down" in r.stderr, r.stderr
        # a dead agent makes status fail and is restarted by `up`
        agent = st["daemons"]["agent:n2"]["pid"]
        subprocess.run(["kill", "-9", str(agent)], check=True)
        wait_until(lambda: run("lab", "status", "--dir", str(lab)).returncode == 1, 10, 0.2,
                   "status reports the dead agent")
        r = run("lab", "up", "--dir", str(lab), "--nodes", "2")
        assert r.returncode == 0 and "restarted agent:n2" in r.stdout, r.stdout + r.stderr
        assert state(lab)["daemons"]["agent:n2"]["pid"] != agent
        r = run("lab", "status", "--dir", str(lab))
        assert r.returncode == 0, r.stdout
        assert "web1" in r.stdout
        assert procs_mentioning(lab)
    finally:
        r = run("lab", "down", "--dir", str(lab))
    assert r.returncode == 0, r.stdout + r.stderr
    wait_until(lambda: all_gone(lab), 10, 0.1, "every lab process gone")
    assert not lab.exists()
    assert mounts_under(lab) == []
    r = run("lab", "down", "--dir", str(lab))
    assert r.returncode == 0 and "no lab" in r.stdout
    r = run("lab", "status", "--dir", str(lab))
    assert r.returncode == 1 and "no lab" in r.stdout


#: Where `up` is interrupted: in the middle of starting (every libvirt node up, no agent
#: yet) and with every process started (before the cluster is ready).
@pytest.mark.parametrize("phase", ["nodes", "started"])
def test_ctrl_c_during_up_tears_everything_down(lab_dir: Path, phase: str) -> None:
    lab = lab_dir
    env = dict(os.environ, VMHA_LAB_HOLD_AT=phase)
    with lab_down_on_failure(str(lab)), Lines("lab", "up", "--dir", str(lab), env=env) as up:
        held = up.wait_for(f"holding at phase {phase}", timeout=180)
        assert held, up.finish()
        st = state(lab)  # what `up` had started when it was interrupted
        assert len(st["nodes"]) == 3 and len(st["etcd"]["members"]) == 1, st
        assert len(st["daemons"]) == (5 if phase == "started" else 0), st
        assert procs_mentioning(lab)
        up.proc.send_signal(signal.SIGINT)
        out = up.finish()
        assert up.proc.returncode == 130, out
        assert "interrupted" in out
        wait_until(lambda: all_gone(lab), 10, 0.1, "every lab process gone")
        assert not lab.exists()
        assert mounts_under(lab) == []


def test_demo_runs_on_the_lab_and_cleans_up() -> None:
    started = time.monotonic()
    r = run("demo", timeout=300)
    took = time.monotonic() - started
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    m = re.search(r"work dir (\S+)\)", out)
    assert m is not None, out
    wd = Path(m.group(1))
    assert not wd.exists()
    assert all_gone(wd)
    for needle in ("etcd with auth on", "node-n1   put /vmha/n/n2/reg", "permission denied",
                   "live-migrated linux1", "downtime", "the same kernel kept running",
                   "cold-booted", "fence record", "running on two nodes at once: 0  -> OK",
                   "`vmha vm add` with CN=operator", "vmha node uncordon",
                   "all processes stopped"):
        assert needle in out, (needle, out)
    # Its duration is reported, not asserted: speed targets live in benchmarks.
    print(f"\ndemo took {took:.1f} s")
