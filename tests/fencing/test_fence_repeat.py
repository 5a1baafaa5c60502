"""A fence is not one pass: the agent's self-fence and the guard write the fenced marker
before their first destroy and destroy again until the node holds a registration again.

A hypervisor whose first list fails and whose first destroy of a domain fails ("cannot
acquire state change lock"), and a domain that starts after the first pass (a create
sent just before the agent lost its lease, an incoming migration): at the end nothing
runs, every destroy happened while the marker existed, and the marker goes only when
the agent holds a registration again (the fake's hook emulation is switched off for
the late start: these passes are the line behind it).  The guests' host is a process
of their own (not the guard), so a destroy that does not happen leaves them running."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fencing.guard_server import GuardServer
from hypervisor.base import Domain, HypervisorRefused, HypervisorUnavailable
from hypervisor.fake import FakeHypervisor
from schemas import Keyspace
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.fencing.procs import popen as _popen
from tests.harness import EtcdCluster, wait_until
from tests.integration.helpers import active, spec, start_agent
from tests.integration.keyspaces import KEYSPACES, mark_keyspace, place_boot

KS = Keyspace()
XML = "<domain><name>{0}</name></domain>"


class FlakyFake(FakeHypervisor):
    """The fake hypervisor with failures on demand, noting for every destroy whether
    the host's fenced marker (<host dir>/fenced) existed at that moment.  Lists fail
    only once the host is fenced (the marker exists): the failure hits a fence's pass,
    never the agent's ordinary cycle."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fail_lists = 0
        self.fail_destroys: dict[str, int] = {}
        self.failed: list[str] = []
        self.marker_at_destroy: list[bool] = []
        self._lock = threading.Lock()

    def list_domains(self) -> dict[str, Domain]:
        with self._lock:
            if self.fail_lists > 0 and (self.dir / "fenced").exists():
                self.fail_lists -= 1
                self.failed.append("list")
                raise HypervisorUnavailable("cannot recv data: Connection reset by peer")
        return super().list_domains()

    def destroy(self, name: str) -> None:
        with self._lock:
            self.marker_at_destroy.append((self.dir / "fenced").exists())
            if self.fail_destroys.get(name, 0) > 0:
                self.fail_destroys[name] -= 1
                self.failed.append(f"destroy {name}")
                raise HypervisorRefused("Timed out during operation: cannot acquire state "
                                        "change lock (held by monitor=remoteDispatchDomainCreate)")
        super().destroy(name)


def test_guard_service_destroys_again_until_the_node_registers_again(tmp_path: Path) -> None:
    guests = _popen(["sleep", "120"])  # the guests' own host process
    host = FakeHypervisor(tmp_path, "n1", host_pid=guests.pid)
    for vm in ("vm1", "vm2"):
        host.boot(vm, XML.format(vm))
    server = GuardServer(str(tmp_path / "guard.sock"), host.uri)
    flaky = FlakyFake(tmp_path, "n1", claim=False)
    flaky.fail_lists, flaky.fail_destroys = 1, {"vm2": 1}
    server.hv = flaky
    marker = tmp_path / "n1" / "fenced"
    result: list[int] = []
    server.fire()  # the first pass: its list fails
    t = threading.Thread(target=lambda: result.append(server.run()), daemon=True)
    t.start()
    try:
        wait_until(lambda: active(host) == [], 30, what="domains destroyed by a later pass")
        (tmp_path / "n1" / "no-hook").touch()  # a late start the hook did not refuse
        host.boot("late", XML.format("late"))  # e.g. an incoming migration that landed
        wait_until(lambda: active(host) == [], 30, what="late domain destroyed")
        assert flaky.failed == ["list", "destroy vm2"]
        assert marker.exists() and flaky.marker_at_destroy and all(flaky.marker_at_destroy)
        assert t.is_alive(), "the guard stays while the node is fenced"
        server.request_stop()
        assert t.is_alive(), "a stop waits while the node is fenced"
    finally:
        marker.unlink(missing_ok=True)  # what the agent does once it registered again
        t.join(30)
    # unfenced: serving on, unarmed, so the stop requested above ends it cleanly
    assert result == [0] and not server.fenced


def start_pipe_guard(tmp: Path, agent_pid: int) -> subprocess.Popen[bytes]:
    g = _popen([sys.executable, "-m", "fencing.guard", "--agent-pid", str(agent_pid),
                "--uri", f"fake://{tmp / 'n1'}"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: (tmp / "n1" / "host.pid").exists()
               and (tmp / "n1" / "host.pid").read_text() == str(g.pid), 30, what="guard up")
    return g


def test_guard_destroys_a_domain_started_after_it_fired(tmp_path: Path) -> None:
    agent = _popen(["sleep", "120"])
    g = start_pipe_guard(tmp_path, agent.pid)
    guests = _popen(["sleep", "120"])
    hv = FakeHypervisor(tmp_path, "n1", host_pid=guests.pid, claim=False)
    hv.boot("vm1", XML.format("vm1"))
    assert g.stdin is not None
    g.stdin.write(f"pet {time.monotonic() + 0.3} 30\n".encode())
    g.stdin.flush()
    wait_until(lambda: active(hv) == [], 30, what="guard fired")
    assert agent.wait(30) == -9
    (tmp_path / "n1" / "no-hook").touch()  # a late start the hook did not refuse
    hv.boot("late", XML.format("late"))  # a create libvirtd accepted after the first pass
    wait_until(lambda: active(hv) == [], 30, what="late domain destroyed")
    marker = tmp_path / "n1" / "fenced"
    assert g.poll() is None and marker.exists()
    marker.unlink()
    assert g.wait(30) == 3
    err = g.stderr.read().decode() if g.stderr else ""
    assert '"guard_fired"' in err and '"guard_fence_pass"' in err and '"late"' in err


@pytest.mark.integration
@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_self_fence_retries_a_failed_list_and_destroy_until_registered_again(
        etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    mark_keyspace(etcd.endpoints, keyspace)
    store = EtcdStore(etcd.endpoints)
    hv = FlakyFake(tmp_path, "n1")
    marker = tmp_path / "n1" / "fenced"
    store.put(KS.config, TEST_CONFIG.to_json())
    place_boot(store, keyspace, "app", "n1", "p1")
    agent, t = start_agent(EtcdStore(etcd.endpoints, retry_budget=0.3, timeout=0.3), hv, "n1")
    try:
        wait_until(lambda: active(hv) == ["app"], 30, what="app booted")
        hv.fail_lists, hv.fail_destroys = 1, {"app": 1}
        etcd.kill_member(etcd.members[0])
        wait_until(lambda: active(hv) == [], 30, what="app destroyed by a later pass")
        # A boot libvirtd accepted before the agent lost its lease, landing now.
        (tmp_path / "n1" / "no-hook").touch()  # a late start the hook did not refuse
        FakeHypervisor(tmp_path, "n1", claim=False).boot("late", spec("late").domain_xml)
        wait_until(lambda: "late" in hv.list_domains() and active(hv) == [], 30,
                   what="late domain destroyed")
        assert hv.failed == ["list", "destroy app"]
        assert all(hv.marker_at_destroy) and len(hv.marker_at_destroy) >= 3
        assert marker.exists() and agent.membership.flags.fenced
        etcd.start_member(etcd.members[0])
        etcd.wait_ready()
        # Registered again (or the lease turned out valid): the marker goes, and the VM
        # placed here boots again, no later pass destroys it.
        wait_until(lambda: not marker.exists(), 30, what="marker removed")
        assert agent.membership.reg is not None and not agent.membership.flags.fenced
        wait_until(lambda: "app" in active(hv), 30, what="app booted again")
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(5)
        store.close()
