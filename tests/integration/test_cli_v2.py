"""The operator's `vmha` commands on keyspace 2 with etcd auth on, as the operator
certificate alone (docs/keyspace-v2.md, sections 1, 2 and 5): two agents (node-n1,
node-n2 certificates) and the leader (orchestrator certificate) in this process on the
fake hypervisor.

The config applied, VMs added, listed, migrated on request, stopped, edited, started and
removed, a node drained (keyspace 2: a cordon; the VMs move live) and uncordoned, a lost
node confirmed off (the leader writes the record), the history of the agents and the
leader read back; the lease revoke of `node drain --revoke` is root's and is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.fake import FakeHypervisor
from nodeagent.agent import NodeAgent
from orchestrator.leader_v2 import OrchestratorV2, orchestrator_for
from schemas.keys_v2 import KeyspaceV2
from tests.authetcd import TlsEtcd
from tests.conftest import TEST_CONFIG
from tests.harness import wait_until
from tests.integration.helpers import active, start_agent

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")]

KS = KeyspaceV2()
NODES = ("n1", "n2")


class Operator:
    """`vmha` as a process (the daemons of this process log to its stdout) with the
    operator's certificate."""

    def __init__(self, etcd: TlsEtcd) -> None:
        self.etcd = etcd

    def run(self, *args: str) -> tuple[int, str, str]:
        p = subprocess.run([sys.executable, "-m", "vmha", *self.etcd.cli_args("operator"),
                            *args], capture_output=True, text=True, timeout=120, check=False)
        return p.returncode, p.stdout, p.stderr

    def ok(self, *args: str) -> str:
        code, out, err = self.run(*args)
        assert code == 0, (args, code, out, err)
        return out

    def json(self, *args: str) -> Any:
        return json.loads(self.ok("-o", "json", *args))

    def vms(self) -> dict[str, dict[str, Any]]:
        return {v["name"]: v for v in self.json("vm", "list")}


@pytest.fixture
def cluster(etcd_auth: TlsEtcd, tmp_path: Path) -> Iterator[dict[str, FakeHypervisor]]:
    """The agents and the leader, each with its own certificate, once the operator has
    applied the test config (the agents read it when they register)."""
    cfg = tmp_path / "cluster.json"
    cfg.write_text(TEST_CONFIG.to_json())
    Operator(etcd_auth).ok("config", "apply", "--file", str(cfg))
    hvs = {n: FakeHypervisor(tmp_path, n) for n in NODES}
    agents: list[tuple[NodeAgent, threading.Thread]] = [
        start_agent(etcd_auth.store(f"node-{n}"), hvs[n], n) for n in NODES]
    leader = orchestrator_for(etcd_auth.store("orchestrator"), "o1", threading.Event(),
                              poll_interval_s=0.2)
    assert isinstance(leader, OrchestratorV2)
    t = threading.Thread(target=leader.run, daemon=True)
    t.start()
    try:
        yield hvs
    finally:
        leader.stopped.set()
        leader.wake.set()
        t.join(10)
        leader.step_down("test over")
        for agent, at in agents:
            agent.stopped.set()
            agent.wake.set()
            at.join(10)


def test_operator_commands_on_keyspace_2_with_auth(
        etcd_auth: TlsEtcd, cluster: dict[str, FakeHypervisor]) -> None:
    op, hvs, root = Operator(etcd_auth), cluster, etcd_auth.root
    assert op.json("config", "show")["lease_ttl_s"] == TEST_CONFIG.lease_ttl_s
    wait_until(lambda: all(n["registered"] for n in op.json("node", "list"))
               and len(op.json("node", "list")) == 2, 15, what="n1 and n2 registered")
    for vm in ("web1", "web2"):
        assert f"{KS.spec(vm)}" in op.ok("vm", "add", vm, "--memory-mib", "64")
    wait_until(lambda: all(v["state"] == "running" for v in op.vms().values()), 20,
               what="both VMs running")
    status = op.json("status")
    assert status["leader"]["id"] and len(status["vms"]) == 2 and status["invalid"] == []

    # A move on request, through /vmha/move/web1.
    src = op.vms()["web1"]["node"]
    dst = next(n for n in NODES if n != src)
    op.ok("vm", "migrate", "web1", "--to", dst, "--wait", "--timeout", "30")
    assert active(hvs[dst]).count("web1") == 1 and "web1" not in active(hvs[src])
    wait_until(lambda: root.get(KS.move("web1")) is None, 10, what="move request cleared")

    # A drain is a cordon on keyspace 2: the VMs move live, the node stays registered.
    drained = op.json("node", "drain", dst, "--wait", "--timeout", "30")
    assert drained["remaining"] == [] and "web1" in drained["vms"]
    assert active(hvs[dst]) == [] and sorted(active(hvs[src])) == ["web1", "web2"]
    shown = op.json("node", "show", dst)
    assert shown["cordon"]["reason"] == "drain" and shown["registration"]["name"] == dst
    assert op.json("node", "list")[NODES.index(dst)]["cordoned"]
    op.ok("node", "uncordon", dst)
    assert root.get(KS.cordon(dst)) is None
    # The revoke is root's: refused for the operator, nothing written.
    before = root.revision()
    code, _, err = op.run("node", "drain", src, "--revoke")
    assert code == 1 and "permission denied" in err, err
    assert root.revision() == before and root.get(KS.reg(src)) is not None

    # stop, edit, start: the spec, by compare on the version read.
    op.ok("vm", "stop", "web2")
    wait_until(lambda: "web2" not in active(hvs["n1"]) + active(hvs["n2"]), 15,
               what="web2 stopped")
    op.ok("vm", "edit", "web2", "--memory-mib", "96")
    op.ok("vm", "start", "web2")
    wait_until(lambda: op.vms()["web2"]["state"] == "running", 15, what="web2 running")
    assert op.json("vm", "show", "web2")["spec"]["memory_mib"] == 96

    # A lost node confirmed off: the request, then the leader's manual record.
    out = op.ok("node", "confirm-off", "n9", "--reason", "powered off at the PDU")
    assert KS.confirm_off("n9") in out and "recorded manual fence" in out
    (fence,) = op.json("fence", "list")
    assert (fence["node"], fence["method"], fence["outcome"]) == ("n9", "manual", "success")
    assert fence["device"].startswith("operator:") and root.get(KS.confirm_off("n9")) is None
    code, _, err = op.run("node", "confirm-off", src)
    assert code == 1 and "registered" in err and root.get(KS.confirm_off(src)) is None

    # remove: the leader then deletes the placement and its assignments.
    op.ok("vm", "remove", "web1")
    wait_until(lambda: root.get(KS.place("web1")) is None
               and "web1" not in active(hvs["n1"]) + active(hvs["n2"]), 15,
               what="web1 removed")
    assert sorted(op.vms()) == ["web2"]

    # The history: the agents' (n/NODE/) and the leader's (o/) events, merged.
    events = op.json("history")
    actors = {e["actor"].split(":")[0] for e in events}
    assert actors == {"agent", "leader"}, actors
    assert [e for e in events if e["kind"] == "migration" and e["vm"] == "web1"]
    assert [e["node"] for e in op.json("history", "--kind", "fence")] == ["n9"]
    assert {e["vm"] for e in op.json("history", "--node", src, "--kind", "boot")} <= {
        "web1", "web2"}
