"""Prometheus' own linter on vmha's /metrics: `promtool check metrics` finds no problem.

An agent pair and an orchestrator on the fake hypervisor serve --metrics-listen on
loopback; a VM boots and live-migrates once (so the migration histograms hold a sample),
then both outputs go through promtool (Debian package `prometheus`, installed by
scripts/setup.sh).  On keyspace 1 and 2 (tests/integration/keyspaces.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.fake import fake_ground_truth
from lab.localcluster import free_ports
from tests.conftest import make_fake_cluster, vmha
from tests.harness import EtcdCluster, FakeCluster, wait_until
from tests.integration.keyspaces import KEYSPACES

PROMTOOL = shutil.which("promtool")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: run `bash scripts/setup.sh` "
                                                "(Debian package prometheus)"),
]


@pytest.fixture
def fake_cluster(etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> Iterator[FakeCluster]:
    fc = make_fake_cluster(etcd, tmp_path, keyspace=keyspace)
    try:
        yield fc
    finally:
        fc.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def promtool_problems(text: str) -> str:
    """What `promtool check metrics` says about ``text`` (empty: nothing)."""
    assert PROMTOOL is not None
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60, check=False)
    return (r.stdout + r.stderr).strip() if r.returncode != 0 or r.stdout.strip() else ""


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_promtool_accepts_agent_and_orchestrator_metrics(etcd: EtcdCluster,
                                                         fake_cluster: FakeCluster) -> None:
    fc = fake_cluster
    p_orch, p_n1, p_n2 = free_ports(3)
    fc.start_agent("n1", extra=("--metrics-listen", f"127.0.0.1:{p_n1}"))
    fc.start_agent("n2", extra=("--metrics-listen", f"127.0.0.1:{p_n2}"))
    fc.start_orchestrator("o1", extra=("--metrics-listen", f"127.0.0.1:{p_orch}"))
    assert vmha(etcd, "vm", "add", "m1", "--memory-mib", "64").returncode == 0
    first = str(wait_until(lambda: "".join(fake_ground_truth(fc.fake_root).get("m1", [])[:1]),
                           15, what="m1 running"))
    # A drain moves m1 by live migration: the target's migration histograms get a sample.
    r = vmha(etcd, "node", "drain", first, "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    target, port = ("n2", p_n2) if first == "n1" else ("n1", p_n1)
    wait_until(lambda: fake_ground_truth(fc.fake_root).get("m1") == [target], 15,
               what="m1 migrated")
    wait_until(lambda: re.search(r"^vmha_migration_downtime_seconds_count 1\.0$",
                                 scrape(port), re.M), 15, what="migration observed")
    agent, orch = scrape(port), scrape(p_orch)
    # values in seconds: the fake hypervisor reports 1 ms downtime
    total = re.search(r"^vmha_migration_downtime_seconds_sum (\S+)$", agent, re.M)
    assert total is not None and float(total.group(1)) == pytest.approx(0.001), agent
    assert "milliseconds" not in agent + orch
    assert promtool_problems(agent) == "", json.dumps(promtool_problems(agent))
    assert promtool_problems(orch) == "", json.dumps(promtool_problems(orch))
