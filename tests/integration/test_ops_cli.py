"""Operator commands against a real etcd and a running fake cluster (-o json parsed), on
keyspace 1 and 2 (tests/integration/keyspaces.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.fake import fake_ground_truth
from tests.conftest import TEST_CONFIG, make_fake_cluster, vmha
from tests.harness import EtcdCluster, FakeCluster, wait_until
from tests.integration.keyspaces import KEYSPACES, ClusterView
from tests.integration.test_cluster import boot_cluster, vms_on

pytestmark = pytest.mark.integration


@pytest.fixture
def fake_cluster(etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> Iterator[FakeCluster]:
    """The fake cluster on `keyspace` (each test below runs on keyspace 1 and 2)."""
    fc = make_fake_cluster(etcd, tmp_path, keyspace=keyspace)
    try:
        yield fc
    finally:
        fc.stop()


def j(etcd: EtcdCluster, *args: str) -> Any:
    r = vmha(etcd, "-o", "json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_drain_wait_history_availability_and_vm_commands(
        etcd: EtcdCluster, fake_cluster: FakeCluster) -> None:
    fc = fake_cluster
    boot_cluster(fc, etcd, vms=4)
    victims = vms_on(fc, "n1")
    assert victims
    shown = j(etcd, "node", "show", "n1")
    assert shown["registration"]["name"] == "n1" and sorted(shown["vms"]) == victims
    # drain --wait: the same lease revoke as etcdctl, then wait for the node to empty.
    out = j(etcd, "node", "drain", "n1", "--wait", "--timeout", "30")
    assert out["remaining"] == [] and sorted(out["vms"]) == victims
    assert not vms_on(fc, "n1")
    assert j(etcd, "node", "show", "n1")["cordon"] is not None
    # The history has the drain and one migration per VM, with downtime.
    migrations = j(etcd, "history", "--kind", "migration")
    assert sorted(e["vm"] for e in migrations) == victims
    assert all(e["from_node"] == "n1" and e["downtime_ms"] is not None for e in migrations)
    assert j(etcd, "history", "--kind", "leader_elected")
    # The drain itself, once (keyspace 2: n1's agent records the operator's cordon).
    assert len(j(etcd, "history", "--kind", "drain", "--node", "n1")) == 1
    # A crash: lost node, fence, cold boots, and the outages show in availability.
    crashed = vms_on(fc, "n2")
    fc.agents["n2"].kill()
    # Its guests live on until n2's guard fences them (at the agent's deadline).
    wait_until(lambda: all("n2" not in fake_ground_truth(fc.fake_root).get(v, ["n2"])
                           for v in crashed), 20, what="crash recovery")
    kinds = {e["kind"] for e in j(etcd, "history", "--node", "n2")}
    assert {"node_lost", "fence"} <= kinds
    avail = {r["vm"]: r for r in j(etcd, "availability", "--since=-10m")["vms"]}
    for vm in crashed:
        assert avail[vm]["outages"] >= 1
        assert avail[vm]["downtime_s"] >= 1.0  # at least the fence window's share
        assert avail[vm]["availability"] < 1.0
    for vm in victims:  # live-migrated only: a few ms of downtime at most
        if vm not in crashed:
            assert avail[vm]["downtime_s"] < 0.5, j(etcd, "history", "--vm", vm)
    # vm stop / start / edit / show
    vm = sorted(fake_ground_truth(fc.fake_root))[0]
    assert vmha(etcd, "vm", "stop", vm).returncode == 0
    wait_until(lambda: vm not in fake_ground_truth(fc.fake_root), 15, what="stopped")
    assert vmha(etcd, "vm", "edit", vm, "--memory-mib", "384").returncode == 0
    assert vmha(etcd, "vm", "start", vm).returncode == 0
    wait_until(lambda: vm in fake_ground_truth(fc.fake_root), 15, what="started")
    show = j(etcd, "vm", "show", vm)
    assert show["spec"]["memory_mib"] == 384 and show["spec"]["state"] == "running"
    assert any(e["kind"] == "boot" for e in show["events"])
    # Bad input: clear errors, exit code 2.
    for args in (("vm", "edit", vm, "--memory-mib", "0"), ("vm", "show", "ghost"),
                 ("node", "drain", "ghost"), ("history", "--kind", "nonsense"),
                 ("history", "--since", "yesterday-ish")):
        r = vmha(etcd, *args)
        assert r.returncode == 2 and r.stderr.startswith("error:"), (args, r.stderr)


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_vm_migrate_to_node_by_request(etcd: EtcdCluster, fake_cluster: FakeCluster) -> None:
    fc = fake_cluster
    boot_cluster(fc, etcd, vms=2)
    vm = sorted(fake_ground_truth(fc.fake_root))[0]
    (src,) = fake_ground_truth(fc.fake_root)[vm]
    dst = next(n for n in ("n1", "n2", "n3") if n != src)
    r = vmha(etcd, "vm", "migrate", vm, "--to", dst, "--wait", "--timeout", "30")
    assert r.returncode == 0, r.stderr
    assert fake_ground_truth(fc.fake_root)[vm] == [dst]
    events = j(etcd, "history", "--vm", vm, "--kind", "migration")
    assert events and events[-1]["from_node"] == src and events[-1]["node"] == dst
    placement = j(etcd, "vm", "show", vm)["placement"]
    # Once the VM has arrived the leader rewrites the migration as a boot on the target
    # (its source released); the operator's reason stays.
    assert placement["kind"] in ("migrate", "boot") and placement["node"] == dst
    assert "operator request" in placement["reason"]
    with ClusterView(etcd.endpoints) as view:
        wait_until(lambda: view.store.get(view.cluster.move_key(vm)) is None, 10,
                   what="request cleared")
    # Bad requests: clear errors, nothing written.
    for args in (("vm", "migrate", vm, "--to", "ghost"), ("vm", "migrate", "ghost", "--to",
                                                          dst)):
        r = vmha(etcd, *args)
        assert r.returncode == 2 and r.stderr.startswith("error:"), r.stderr


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_every_listing_parses_as_json(etcd: EtcdCluster, fake_cluster: FakeCluster) -> None:
    boot_cluster(fake_cluster, etcd, vms=2)
    nodes = j(etcd, "node", "list")
    assert sorted(n["name"] for n in nodes) == ["n1", "n2", "n3"]
    assert all(n["registered"] and n["lease_ttl_s"] is not None for n in nodes)
    vms = j(etcd, "vm", "list")
    assert sorted(v["name"] for v in vms) == ["vm0", "vm1"]
    assert all(v["state"] == "running" for v in vms)
    status = j(etcd, "status")
    assert status["leader"]["epoch"] > 0 and len(status["vms"]) == 2
    assert j(etcd, "config", "show")["lease_ttl_s"] == TEST_CONFIG.lease_ttl_s
    assert j(etcd, "fence", "list") == []  # no node was ever lost here
    assert isinstance(j(etcd, "history"), list)
