"""How the agent tells a restart from a stop, and the order of a self-fence."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from hypervisor.fake import FakeHypervisor
from nodeagent.context import AgentContext, AgentOptions
from nodeagent.lifecycle import RESTART_JOBS, job_type_from, unit_from_cgroup
from nodeagent.membership import Membership


def test_unit_from_cgroup_v2_and_v1() -> None:
    assert unit_from_cgroup("0::/system.slice/vmha-agent.service\n") == "vmha-agent.service"
    v1 = "12:pids:/system.slice/vmha-agent.service\n1:name=systemd:/system.slice/vmha-agent.service"
    assert unit_from_cgroup(v1) == "vmha-agent.service"
    assert unit_from_cgroup("0::/user.slice/user-0.slice/session-3.scope\n") is None
    assert unit_from_cgroup("0::/\n") is None  # not under systemd: a SIGTERM drains


def test_job_type_of_the_agent_unit() -> None:
    out = ("118 vmha-orchestrator.service stop running\n"
           "119 vmha-agent.service restart running\n")
    assert job_type_from(out, "vmha-agent.service") == "restart"
    assert job_type_from(out, "vmha-orchestrator.service") == "stop"
    assert job_type_from("", "vmha-agent.service") is None
    assert "restart" in RESTART_JOBS and "stop" not in RESTART_JOBS


class _History:
    """Records, for each event, which domains were still running when it was written."""

    def __init__(self, hv: FakeHypervisor) -> None:
        self.hv = hv
        self.seen: list[list[str]] = []

    def record(self, kind: str, **fields: Any) -> None:
        self.seen.append(sorted(n for n, d in self.hv.list_domains().items() if d.active))
        time.sleep(0.05)  # an etcd write that takes a while (etcd is what failed)


def test_self_fence_destroys_every_domain_before_recording_any(tmp_path: Path) -> None:
    """With guard_enabled = false the agent's own self-fence is all there is: a history
    write waiting on etcd must not delay the last destroy past the fence window."""
    hv = FakeHypervisor(tmp_path, "n1")
    for i in range(4):
        hv.boot(f"vm{i}", f"<domain><name>vm{i}</name></domain>")
    hist = _History(hv)
    ctx = AgentContext(store=None, hv=hv, opts=AgentOptions(name="n1"),  # type: ignore[arg-type]
                       clock=time.monotonic, wake=threading.Event(),
                       stopped=threading.Event(), history=hist,  # type: ignore[arg-type]
                       log=__import__("structlog").get_logger("test"))
    Membership(ctx).self_fence()
    # The records are written off the fencing thread (nodeagent.selffence).
    deadline = time.monotonic() + 10
    while len(hist.seen) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(hist.seen) == 4
    assert hist.seen == [[]] * 4  # every event written after the last destroy
