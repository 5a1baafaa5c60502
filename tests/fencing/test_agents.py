"""External fence agents, ClusterLabs convention, with the built-in fake/libvirt fencer."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fencing.agents import ExternalFencer, FenceResult, fence_off, run_action
from hypervisor.fake import FakeHypervisor, fake_ground_truth
from schemas.models import FenceDevice


# A device's timeout covers a Python start of the fake agent: generous, so that a loaded
# machine slows the tests that expect success without failing them (the hang test sets
# its own).
def device(tmp: Path, mode: str, timeout: float = 10.0, verify: bool = True) -> FenceDevice:
    (tmp / "mode").write_text(mode)
    return FenceDevice(agent=[sys.executable, "-m", "bench.fence_fault"],
                       params={"uri": "fake://" + str(tmp) + "/{node}",
                               "mode_file": str(tmp / "mode")}, timeout_s=timeout,
                       verify=verify)


def running_vm(tmp: Path) -> None:
    hv = FakeHypervisor(tmp, "n1")  # host = this test process
    hv.boot("vm1", "<domain><name>vm1</name></domain>")
    assert fake_ground_truth(tmp) == {"vm1": ["n1"]}


def test_off_destroys_and_status_verifies(tmp_path: Path) -> None:
    running_vm(tmp_path)
    dev = device(tmp_path, "ok")
    assert run_action(dev, "n1", "", "status")[0] == 0  # on
    r = fence_off(dev, "n1", "")
    assert r.ok and "verified" in r.detail, r
    assert fake_ground_truth(tmp_path) == {}
    assert run_action(dev, "n1", "", "status")[0] == 2  # off


def test_failing_agent_is_a_failed_fence(tmp_path: Path) -> None:
    running_vm(tmp_path)
    r = fence_off(device(tmp_path, "fail"), "n1", "")
    assert not r.ok and "exited 1" in r.detail and "injected failure" in r.detail
    assert fake_ground_truth(tmp_path) == {"vm1": ["n1"]}


def test_hanging_agent_times_out_and_is_killed(tmp_path: Path) -> None:
    running_vm(tmp_path)
    t0 = time.monotonic()
    r = fence_off(device(tmp_path, "hang", timeout=0.8), "n1", "")
    assert not r.ok and "timed out after 0.8 s" in r.detail
    assert time.monotonic() - t0 < 3


def test_missing_binary_is_a_failed_fence(tmp_path: Path) -> None:
    r = fence_off(FenceDevice(agent=["/nonexistent/fence_ipmilan"]), "n1", "")
    assert not r.ok and "cannot run" in r.detail


def test_status_still_on_after_off_is_a_failure(tmp_path: Path) -> None:
    # An agent that claims success for off but whose status still says "on".
    script = tmp_path / "liar.py"
    script.write_text("import sys\nsys.stdin.read()\nsys.exit(0)\n")
    r = fence_off(FenceDevice(agent=[sys.executable, str(script)]), "n1", "")
    assert not r.ok and "need 2 = off" in r.detail


def test_fencer_runs_one_job_per_node_off_the_caller(tmp_path: Path) -> None:
    running_vm(tmp_path)
    f = ExternalFencer()
    dev = device(tmp_path, "ok")
    assert f.start("n1", dev, "", tag=(7, 12.5)) and not f.start("n1", dev, "")
    deadline = time.monotonic() + 10
    done: list[tuple[str, FenceResult, object]] = []
    while not done and time.monotonic() < deadline:
        done = f.collect()
        time.sleep(0.05)
    # The tag comes back: the leader drops results of an earlier term or loss episode.
    assert done and done[0][0] == "n1" and done[0][1].ok and done[0][2] == (7, 12.5)
    f.shutdown()
