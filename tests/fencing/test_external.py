"""fence_policy=external: VMs of a lost node wait (visibly) until a fence succeeds; a
failing fence device is retried with backoff; `vmha node confirm-off` is the way out."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.campaign import Campaign
from fencing.policy import fence_window
from schemas import FenceRecord
from tests.harness import wait_until
from tests.integration.keyspaces import KEYSPACES, ClusterView

pytestmark = pytest.mark.integration


def vmha(c: Campaign, *args: str) -> subprocess.CompletedProcess[str]:
    assert c.etcd is not None
    return subprocess.run([sys.executable, "-m", "vmha", "--etcd", c.etcd.endpoints,
                           *args], capture_output=True, text=True, timeout=60)


def fence(c: Campaign, node: str) -> FenceRecord | None:
    """The node's fence record, on the keyspace the campaign runs."""
    assert c.etcd is not None
    with ClusterView(c.etcd.endpoints) as view:
        return view.fence(node)


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_failed_external_fence_blocks_recovery_until_manual_confirm(tmp_path: Path,
                                                                   keyspace: int) -> None:
    c = Campaign(9, tmp_path, fence_policy="external", verbose=False, keyspace=keyspace)
    try:
        c.start()
        node = max(c.nodes, key=lambda n: len(c.vms_on(n)))
        victims = c.vms_on(node)
        assert victims
        c.mode_file.write_text("fail")
        c.held.add(node)
        c.agents[node].kill()
        killed = time.monotonic()
        wait_until(lambda: (f := fence(c, node)) is not None and f.attempts >= 2, 20,
                   what="two failed fence attempts")
        f = fence(c, node)
        assert f is not None and f.outcome == "failed" and f.method == "external"
        assert "injected failure" in f.reason
        # Long past the self-fence window, the VMs still do not run anywhere.
        time.sleep(max(0.0, killed + c.config().lease_ttl_s + fence_window(c.config()) + 1
                       - time.monotonic()))
        truth = c.truth()
        assert all(vm not in truth for vm in victims), truth
        r = vmha(c, "-o", "json", "fence", "list")
        assert r.returncode == 0, r.stderr
        shown = json.loads(r.stdout)
        assert shown[0]["node"] == node and shown[0]["outcome"] == "failed"
        assert c.sampler is not None and c.sampler.violations == []
        # A registered node cannot be "confirmed off".
        other = next(n for n in c.nodes if n != node)
        r = vmha(c, "node", "confirm-off", other)
        assert r.returncode == 1 and "is registered" in r.stderr
        r = vmha(c, "node", "confirm-off", node, "--reason", "pulled the plug")
        assert r.returncode == 0, r.stderr
        f = fence(c, node)
        assert f is not None and f.method == "manual" and f.outcome == "success"
        wait_until(lambda: all(len(c.truth().get(vm, [])) == 1 for vm in victims), 20,
                   what="victims running elsewhere after the manual fence")
        assert all(c.truth()[vm] != [node] for vm in victims)
        assert c.sampler.violations == [] and c.history is not None
        assert c.history.caught_up() and c.history.violations == []
    finally:
        c.mode_file.write_text("ok")
        c.stop()
