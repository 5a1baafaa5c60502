"""Failures are visible and bounded (issue 11, item 4), on real etcd and the fake
hypervisor: a spec the hypervisor refuses shows its error in the status, is retried with
backoff a bounded number of times per node, relocated, then marked failed; history gets
one event per distinct error; the CLI refuses a second VM with the same domain UUID; a
guest that dies under its agent is a crash event, restarted in place, and an outage that
`vmha availability` counts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli.common import default_domain_xml
from hypervisor.base import HypervisorRefused
from hypervisor.fake import FakeHypervisor
from nodeagent.agent import AgentOptions, NodeAgent
from schemas import Keyspace, Placement, VmSpec, VmStatus
from schemas.events import Event
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG, make_fake_cluster, vmha
from tests.harness import EtcdCluster, FakeCluster, wait_until
from tests.integration.helpers import log_events
from tests.integration.helpers_v2 import Leader
from tests.integration.keyspaces import KEYSPACES, ClusterView, mark_keyspace

pytestmark = pytest.mark.integration
KS = Keyspace()
UUID = "6b1f2c4d-1111-4222-8333-444455556666"
CONFIG = TEST_CONFIG.model_copy(update={
    "max_boot_failures_per_node": 3, "max_restart": 1, "max_relocate": 1,
    "failure_backoff_initial_s": 0.3, "failure_backoff_max_s": 1.0})


def xml_with_uuid(name: str, uuid: str = UUID, dtype: str = "qemu") -> str:
    xml = default_domain_xml(name, 64, 1).replace("<domain type='qemu'>",
                                                  f"<domain type='{dtype}'>")
    return xml.replace(f"<name>{name}</name>", f"<name>{name}</name><uuid>{uuid}</uuid>", 1)


def spec(name: str, xml: str, **kw: object) -> VmSpec:
    return VmSpec(name=name, domain_xml=xml, memory_mib=64, vcpus=1, **kw)  # type: ignore[arg-type]


def status(store: ClusterView, vm: str) -> VmStatus | None:
    return store.status(vm)


def placement(store: ClusterView, vm: str) -> Placement | None:
    return store.placement(vm)


def add_spec(store: ClusterView, vm_spec: VmSpec) -> None:
    """Straight into etcd, past the CLI's checks (on the keyspace the marker names)."""
    assert store.cluster.add_spec(vm_spec).succeeded


def status_when(store: ClusterView, vm: str, pred: Callable[[VmStatus], bool],
                timeout: float, what: str) -> VmStatus:
    def probe() -> VmStatus | None:
        st = status(store, vm)
        return st if st is not None and pred(st) else None
    found = wait_until(probe, timeout, what=what)
    assert found is not None
    return found


def placement_when(store: ClusterView, vm: str, kind: str, timeout: float) -> Placement:
    def probe() -> Placement | None:
        p = placement(store, vm)
        return p if p is not None and p.kind == kind else None
    found = wait_until(probe, timeout, what=f"{vm} placement {kind}")
    assert found is not None
    return found


def events(store: ClusterView, vm: str, kind: str) -> list[Event]:
    out: list[Event] = store.events()
    return sorted((e for e in out if e.vm == vm and e.kind == kind), key=lambda e: e.id)


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_cli_refuses_a_second_vm_with_the_same_domain_uuid(etcd: EtcdCluster,
                                                             tmp_path: Path,
                                                             keyspace: int) -> None:
    mark_keyspace(etcd.endpoints, keyspace)
    for name in ("web1", "web2", "web3"):
        (tmp_path / f"{name}.xml").write_text(xml_with_uuid(name))
    ok = vmha(etcd, "vm", "add", "web1", "--memory-mib", "64", "--xml",
              str(tmp_path / "web1.xml"))
    assert ok.returncode == 0, ok.stderr
    dup = vmha(etcd, "vm", "add", "web2", "--memory-mib", "64", "--xml",
               str(tmp_path / "web2.xml"))
    assert dup.returncode == 2
    assert "web1" in dup.stderr and UUID in dup.stderr
    # edit: a VM whose new XML takes another VM's UUID is refused the same way
    other = tmp_path / "web3-own.xml"
    other.write_text(xml_with_uuid("web3", "6b1f2c4d-1111-4222-8333-000000000003"))
    assert vmha(etcd, "vm", "add", "web3", "--memory-mib", "64", "--xml",
                str(other)).returncode == 0
    edit = vmha(etcd, "vm", "edit", "web3", "--xml", str(tmp_path / "web3.xml"))
    assert edit.returncode == 2 and "web1" in edit.stderr
    # the VM's own UUID stays its own: editing web1 with its XML is fine
    assert vmha(etcd, "vm", "edit", "web1", "--xml",
                str(tmp_path / "web1.xml")).returncode == 0


def refusals(fc: FakeCluster, nodes: tuple[str, ...], at_least: int) -> list[dict[str, Any]]:
    """The agents' `boot_refused` log events, once there are `at_least`: an agent logs
    each after its status write, which the leader may act on first."""
    def probe() -> list[dict[str, Any]] | None:
        out = [e for n in nodes for e in log_events(fc.agents[n], "boot_refused")]
        return out if len(out) >= at_least else None
    found = wait_until(probe, 10, what=f"{at_least} boot_refused events logged")
    assert found is not None
    return found


def _cluster(etcd: EtcdCluster, tmp_path: Path, nodes: tuple[str, ...],
             keyspace: int) -> FakeCluster:
    fc = make_fake_cluster(etcd, tmp_path, CONFIG, keyspace)
    for n in nodes:
        fc.start_agent(n)
    fc.start_orchestrator("o1")
    return fc


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_shared_uuid_written_into_etcd_errors_backs_off_then_fails(
        etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    fc = _cluster(etcd, tmp_path, ("n1",), keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        add_spec(store, spec("web1", xml_with_uuid("web1")))
        status_when(store, "web1", lambda s: s.state == "running", 20, "web1 running")
        # Straight into etcd, past the CLI's check: n1's hypervisor refuses it.
        add_spec(store, spec("web2", xml_with_uuid("web2")))
        st = status_when(store, "web2", lambda s: bool(s.error), 20,
                         "the refusal in web2's status")
        assert "already defined with uuid" in (st.error or "") and "web1" in (st.error or "")
        assert st.node == "n1" and st.state == "stopped" and st.boot_failures >= 1
        # bounded: n1 gives up after 3 refusals; no other node, so the leader marks it failed
        p = placement_when(store, "web2", "failed", 30)
        assert "3 boot failures on n1" in p.reason and "already defined" in p.reason
        refused = refusals(fc, ("n1",), 3)
        assert len(refused) == 3
        # backed off: each retry waited longer than the one before (as the status said)
        waits = [r["retry_in_s"] for r in refused]
        assert waits == sorted(waits) and waits[0] < waits[-1]
        assert len(events(store, "web2", "boot_failed")) == 1  # one distinct error
        assert events(store, "web2", "boot") == []
        assert status(store, "web1").state == "running"  # type: ignore[union-attr]
        shown = vmha(etcd, "vm", "list")
        assert "already defined with uuid" in shown.stdout and "failed" in shown.stdout
        # What the operator sees of the given-up VM (docs/failure-semantics.md) stays.
        time.sleep(1.0)  # a clean-up pass of n1's (poll 0.2 s) would have run
        final = status(store, "web2")
        assert final is not None and final.boot_failures == 3
    finally:
        fc.stop()
        store.close()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_xml_the_hypervisor_rejects_is_relocated_once_then_failed(
        etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    fc = _cluster(etcd, tmp_path, ("n1", "n2"), keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        add_spec(store, spec("bad", xml_with_uuid("bad", dtype="bogus")))
        p = placement_when(store, "bad", "failed", 40)
        assert sorted(p.failed_nodes) == ["n1", "n2"]
        assert "max_relocate 1" in p.reason and "bogus" in p.reason
        refused = refusals(fc, ("n1", "n2"), 6)
        assert len(refused) == 6  # 3 per node, then given up
        failed_events = len(events(store, "bad", "boot_failed"))
        # vm start re-arms it (the spec changed): it is placed again
        assert vmha(etcd, "vm", "start", "bad").returncode == 0
        placement_when(store, "bad", "boot", 20)
        assert failed_events == 1  # the same error on both nodes: one event
    finally:
        fc.stop()
        store.close()


def _kill_guest(root: Path, node: str, vm: str) -> None:
    """What `kill -9` of its QEMU does to a fake guest: the domain shows as crashed."""
    path = root / node / "domains" / f"{vm}.json"
    rec = json.loads(path.read_text())
    rec["state"] = "crashed"
    path.write_text(json.dumps(rec))


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_guest_killed_under_running_agent_is_a_crash_and_an_outage(
        etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    fc = _cluster(etcd, tmp_path, ("n1", "n2"), keyspace)
    store = ClusterView(etcd.endpoints)
    try:
        add_spec(store, spec("g", default_domain_xml("g", 64, 1)))
        first = status_when(store, "g", lambda s: s.state == "running", 20, "g running")
        node = first.node
        _kill_guest(fc.fake_root, node, "g")
        wait_until(lambda: events(store, "g", "crash"), 20, what="a crash event")
        again = status_when(store, "g", lambda s: s.state == "running" and s.crashes == 1,
                            20, "restarted in place")
        assert again.node == node and again.since > first.since
        out = vmha(etcd, "--output", "json", "availability")
        row = next(r for r in json.loads(out.stdout)["vms"] if r["vm"] == "g")
        assert row["outages"] == 1 and row["availability"] < 1.0
        # a second crash on that node exceeds max_restart 1: relocated to the other node
        _kill_guest(fc.fake_root, node, "g")
        moved = status_when(store, "g", lambda s: s.state == "running" and s.node != node,
                            30, "relocated")
        p = placement(store, "g")
        assert p is not None and p.failed_nodes == [node] and "max_restart 1" in p.reason
        assert len(events(store, "g", "crash")) == 2 and moved.crashes == 0
    finally:
        fc.stop()
        store.close()


class _LockedFake(FakeHypervisor):
    """A fake host whose hypervisor refuses to destroy one domain (as libvirt refuses
    while a domain's job lock is held)."""

    def __init__(self, root: Path, node: str, locked: str) -> None:
        super().__init__(root, node)
        self.locked = locked
        self.destroy_calls: list[float] = []

    def destroy(self, name: str) -> None:
        if name == self.locked:
            self.destroy_calls.append(time.monotonic())
            raise HypervisorRefused(f"Timed out during operation: cannot acquire state "
                                    f"change lock for {name}")
        super().destroy(name)


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_refused_destroy_backs_off_is_reported_once_and_blocks_no_other_vm(
        etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    mark_keyspace(etcd.endpoints, keyspace)
    store = EtcdStore(etcd.endpoints)
    view = ClusterView(etcd.endpoints)
    store.put(KS.config, CONFIG.to_json())
    hv = _LockedFake(tmp_path, "n1", locked="old")
    xml = default_domain_xml("old", 64, 1)
    hv.boot("old", xml)  # runs here; its spec is then removed: the agent must destroy it
    if keyspace == 2:  # the leader's placement of "new" on n1 (its spec added first)
        Leader(store).place("new", "n1")
    else:
        store.put(KS.vm_spec("new"), spec("new", default_domain_xml("new", 64, 1)).to_json())
        store.put(KS.vm_placement("new"), Placement(id="p1", vm="new", node="n1", kind="boot",
                                                    epoch=1, reason="test",
                                                    decided_at=time.time()).to_json())
    agent = NodeAgent(store, hv, AgentOptions(name="n1", poll_interval_s=0.1))
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        # A refusal must not end the cycle for the other VMs: "new" boots.
        status_when(view, "new", lambda s: s.state == "running", 20, "new running")
        wait_until(lambda: len(hv.destroy_calls) >= 4, 20, what="four destroy attempts")
        gaps = [b - a for a, b in zip(hv.destroy_calls, hv.destroy_calls[1:], strict=False)]
        # backoff 0.3, 0.6, 1.0 s (capped) between attempts, at a 0.1 s poll
        assert gaps[0] >= 0.25 and gaps[1] >= 0.55 and gaps[2] >= 0.95, gaps
        assert len(events(view, "old", "stop_failed")) == 1
        assert hv.list_domains()["old"].state == "running"  # refused, still there
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(5)
        store.close()
        view.close()
