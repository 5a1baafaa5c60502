"""The guard outlives the agent, on the lab with real QEMU guests (issue 11, item 3).

Each lab node's guard runs as its own process (`vmha guard`, as vmha-guard.service
runs it) with the default cluster config, on the lab `vmha lab up` starts: etcd auth
on, keyspace 2, each guard logged in with its node's certificate (keyspace 1's guard
service is tests/integration/test_agent_restart.py's, on the fake hypervisor).  An
agent SIGKILLed and started again (as systemd's Restart= would), then restarted in
place with SIGUSR2: the same QEMU processes keep running on the node, nothing is booted
anywhere, no fence record.  An agent not started again: its guard destroys the domains
before the fence window ends, and the leader boots them elsewhere with no double run.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.test_e2e import (
    _REASON,
    KS,
    VMS,
    all_reported,
    events,
    log_mark,
    truth_poller,
    vms_on,
)

pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

from fencing.policy import fence_window  # noqa: E402
from lab import qemu_pids, tiny_guest_xml  # noqa: E402
from lab.cluster import LabCluster  # noqa: E402
from lab.labview import reader, vmha, wait_registered  # noqa: E402
from lab.localcluster import wait_until  # noqa: E402
from schemas import ClusterConfig  # noqa: E402
from store.etcd import EtcdStore  # noqa: E402

CFG = ClusterConfig()  # the defaults: what a restart meets in production


@pytest.fixture
def glab(tmp_path: Path, request: pytest.FixtureRequest
         ) -> Iterator[tuple[LabCluster, EtcdStore]]:
    lc = LabCluster(tmp_path / "lab", tmp_path / "logs", guard_service=True, auth=True,
                    guard_extra=getattr(request, "param", ()))
    try:
        lc.start(CFG.to_json())
        store = reader(lc)
        try:
            wait_registered(lc, store)  # the guests spread over every node
            for vm in VMS:
                xml = tmp_path / f"{vm}.xml"
                xml.write_text(tiny_guest_xml(vm))
                r = vmha(lc, "vm", "add", vm, "--memory-mib", "32", "--xml", str(xml))
                assert r.returncode == 0, r.stderr
            wait_until(lambda: all_reported(store, lc), 60, 0.1, "all VMs running and reported")
            yield lc, store
        finally:
            store.close()
    finally:
        lc.stop()


def _restart_keeps_vms(lc: LabCluster, store: EtcdStore, node: str, how: str) -> None:
    victims = vms_on(lc, node)
    assert victims
    before = qemu_pids(lc.nodes[node])
    marks = {n: log_mark(d) for n, d in lc.agents.items()}
    with truth_poller(lc).running() as poller:
        old = lc.agents[node]
        if how == "sigkill":
            old.kill()
        else:
            old.signal(signal.SIGUSR2)
            assert old.proc is not None and old.proc.wait(30) == 75
        lc.start_agent(node)
        wait_until(lambda: events(lc.agents[node], "registration_adopted", marks[node]), 20,
                   0.05, "restarted agent adopted its registration")
        # Past the old lease's TTL, the guard's timeout and the leader's fence window.
        time.sleep(fence_window(CFG) + 1.0)
        wait_until(lambda: all_reported(store, lc), 10, 0.1, "all VMs reported")
    assert poller.violations == [], poller.violations
    after = qemu_pids(lc.nodes[node])
    for vm in victims:
        assert after.get(vm) == before[vm], (how, vm, before, after)  # the same QEMU
        assert poller.seen(vm) == {node}, (vm, poller.seen(vm))
        for n, d in lc.agents.items():
            assert events(d, "boot", marks[n], vm) == [], f"{vm} booted on {n} ({how})"
    assert store.get(KS.fence(node)) is None
    assert lc.guards[node].alive() and '"guard_fired"' not in lc.guards[node].log_text()


def test_agent_sigkill_and_restart_in_place_keep_the_qemu_guests(
        glab: tuple[LabCluster, EtcdStore]) -> None:
    lc, store = glab
    _restart_keeps_vms(lc, store, "n3", "sigkill")
    _restart_keeps_vms(lc, store, "n3", "sigusr2")
    assert store.get(KS.cordon("n3")) is None  # never drained


# The guard holds the lease for a restarting agent up to its restart grace (20 s by
# default); 5 s here takes the same path sooner.
@pytest.mark.parametrize("glab", [("--restart-grace-s", "5")], indirect=True,
                         ids=["grace-5s"])
def test_agent_not_restarted_the_guard_destroys_the_guests(
        glab: tuple[LabCluster, EtcdStore]) -> None:
    lc, store = glab
    victims = vms_on(lc, "n2")
    assert victims
    with truth_poller(lc).running() as poller:
        lc.agents["n2"].kill()
        guard = lc.guards["n2"]
        wait_until(lambda: '"guard_fired"' in guard.log_text(), 30, 0.05, "guard fired")
        # It stays, destroying again, until n2's agent registers again.
        assert guard.alive() and lc.nodes["n2"].fenced_marker.exists()
        assert [v for v, s in lc.node_domains("n2").items() if s != "inactive"] == []
        wait_until(lambda: all(lc.ground_truth().get(v, []) not in ([], ["n2"])
                               for v in victims), 60, 0.1, "victims running elsewhere")
    assert poller.violations == [], poller.violations
    assert store.get(KS.fence("n2")) is not None
