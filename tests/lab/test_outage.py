"""`vmha bench outage --short` on the lab: one graceful failure per probe rate.

Runs the command as an operator would (its own network namespace, a network-reachable
kernel guest, vmha's real agents, raw-libvirt baseline) and checks that the measurement
worked: probes were sent, every failure happened and moved the guest, the guest
answered again from its new node, and the report was written.  Not a speed target.
It runs on the lab ``vmha lab up`` starts (etcd auth on, keyspace 2), the benchmark's
default; its ``--no-auth`` lab (keyspace 1, the measured results' lab) is not run here.

Root only; skipped without libvirtd / QEMU / unshare / ip / gcc.  ~2-3 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bench.outage import STREAMS
from tests.lab.procs import run_vmha


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the outage bench needs root (network namespace, libvirtd in mount namespaces)"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    for tool in ("unshare", "libvirtd", "qemu-system-x86_64", "etcd", "etcdctl", "ip", "gcc"):
        if shutil.which(tool, path=path) is None:
            return f"the outage bench needs {tool} (see lab/APT_PACKAGES.txt)"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def test_short_outage_bench_measures_one_failure_per_rate(tmp_path: Path) -> None:
    out = tmp_path / "outage"
    # past its time it gets a Ctrl-C, so that it tears its lab and namespace down
    proc = run_vmha("bench", "outage", "--short", "--crashes", "0", "--reference-seconds", "2",
                    "--raw-trials", "1", "--max-minutes", "6", "--out", str(out), timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "outage.json").read_text())
    trials = data["trials"]

    refs = [t for t in trials if t["phase"] == "reference"]
    assert refs and refs[0]["probe"]["sent"] > 0 and refs[0]["probe"]["answered"] > 0

    raw = [t for t in trials if t["phase"] == "raw"]
    assert len(raw) == 1, raw
    assert raw[0]["src"] != raw[0]["dst"] and raw[0]["downtime_ms"] is not None

    vmha = [t for t in trials if t["phase"] == "vmha"]
    assert sorted(t["stream"] for t in vmha) == sorted(s.key for s in STREAMS)
    assert {t["kind"] for t in vmha} == {"revoke", "sigterm"}
    for t in vmha:
        p = t["probe"]
        assert p["sent"] > 0, t
        assert t["src"] != t["dst"], t  # the failure happened: the guest moved
        assert t["running_s"] is not None and t["repaired_s"] >= t["running_s"], t
        assert t["migration"].get("source") == t["src"], t
        assert t["migration"].get("target") == t["dst"], t
        # the guest answered again from its new node: answers arrived after it ran there
        stream = json.loads((out / "raw" / t["probe_file"]).read_text())
        back = t["t_fail"] + t["running_s"]
        assert any(arrival > back for _seq, arrival, _count in stream["answers"]), t
        if t["stream"] != "icmp100":
            # the guest's own count: every probe it got was answered or lost on the way back
            assert p["lost_to_guest"] is not None and p["lost_to_guest"] >= 0, p
        if t["kind"] == "sigterm":
            assert t["agent_rc"] == 0, t
    # the lab ran as `vmha lab up` starts it: its marker read from etcd says keyspace 2
    assert data["meta"]["etcd_auth"] is True and data["meta"]["keyspace"] == 2, data["meta"]
    # probes went nowhere but into the benchmark's own namespace
    assert data["meta"]["netns"].startswith("vmha-bench-")
    assert (out / "outage.md").read_text().count("|") > 20
    assert (out / "loss_per_rate.png").stat().st_size > 0
