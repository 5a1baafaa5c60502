"""Hostile values on a running cluster (issue 11): every daemon survives, no VM is stopped or
moved, and `vmha status -o json` lists every bad key.  Real etcd, 3 agents on the fake
hypervisor, 2 orchestrators, 6 running VMs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.fake import fake_ground_truth
from schemas import Keyspace
from store.etcd import EtcdStore
from tests.conftest import make_fake_cluster, vmha
from tests.harness import EtcdCluster, FakeCluster, start_etcd, wait_until
from tests.integration.helpers import domain_record, log_events

pytestmark = pytest.mark.integration

KS = Keyspace()
DEEP = b"[" * 40_000 + b"]" * 40_000
TWO_MIB = b'{"schema": 1, "name": "big", "domain_xml": "' + b"x" * (2 * 1024 * 1024) + b'"}'

# Keys no daemon owns (other names), each with a hostile value.
FOREIGN: dict[bytes, bytes] = {
    b"/vmha/vms/evil/spec": DEEP,
    b"/vmha/vms/\xff\xfe/spec": b"{}",
    b"/vmha/vms/big/spec": TWO_MIB,
    b"/vmha/vms/evil2/placement": b"\xff\xfe\xfd",
    b"/vmha/vms/a/b/spec": b"{}",
    b"/vmha/nodes/n\n9": b"{}",
    "/vmha/vms/\u00e9t\u00e9/status".encode(): b"{}",
    b"/vmha/vms/evil3/move": b'{"schema": 99, "vm": "evil3"}',
    b"/vmha/fence/ghost": b'{"schema": 1, "node": ["ghost"]}',
    b"/vmha/cordon/ghost": b"null",
    b"/vmha/alive/ghost": b"[]",
}


@pytest.fixture
def big_etcd(monkeypatch: pytest.MonkeyPatch) -> Iterator[EtcdCluster]:
    # etcd refuses requests over 1.5 MiB by default; allow the 2 MiB value of the issue.
    monkeypatch.setenv("ETCD_MAX_REQUEST_BYTES", str(8 * 1024 * 1024))
    cluster = start_etcd(1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster3(big_etcd: EtcdCluster, tmp_path: Path) -> Iterator[FakeCluster]:
    fc = make_fake_cluster(big_etcd, tmp_path)
    try:
        for n in ("n1", "n2", "n3"):
            fc.start_agent(n)
        fc.start_orchestrator("o1")
        fc.start_orchestrator("o2")
        for i in range(6):
            r = vmha(big_etcd, "vm", "add", f"vm{i}", "--memory-mib", "512")
            assert r.returncode == 0, r.stderr
        wait_until(lambda: len(fake_ground_truth(fc.fake_root)) == 6, 30, what="6 VMs running")
        yield fc
    finally:
        fc.stop()


def _booted(fc: FakeCluster) -> dict[str, tuple[tuple[str, ...], float]]:
    out = {}
    for vm, nodes in fake_ground_truth(fc.fake_root).items():
        rec = domain_record(fc.fake_root, nodes[0], vm) or {}
        out[vm] = (tuple(nodes), float(rec.get("booted_at", 0.0)))
    return out


def _alive(fc: FakeCluster) -> dict[str, bool]:
    return {d.name: d.alive() for d in [*fc.agents.values(), *fc.orchestrators.values()]}


def _status_keys(etcd: EtcdCluster) -> set[str]:
    r = vmha(etcd, "-o", "json", "status")
    assert r.returncode == 0, r.stderr
    return {i["key"] for i in json.loads(r.stdout)["invalid"]}


def test_hostile_values_end_no_daemon_and_move_no_vm(big_etcd: EtcdCluster,
                                                    cluster3: FakeCluster) -> None:
    fc = cluster3
    store = EtcdStore(big_etcd.endpoints)
    before = _booted(fc)
    vm_node = {vm: nodes[0] for vm, (nodes, _) in before.items()}
    # Overwritten live keys: a running VM's spec, placement and status, a node's
    # registration, the cordon and fence keys of live nodes, the leader key, the config.
    live = {KS.vm_spec("vm0"): DEEP, KS.vm_placement("vm1"): b'{"schema": 1, "vm": 5}',
            KS.vm_status("vm2"): b'{"schema": 2}', KS.node("n1"): b"\xff\xfe",
            KS.cordon("n2"): b"[" * 5000, KS.fence("n3"): b'"x"', KS.alive("n2"): b"{}",
            KS.leader: b"[]",
            KS.config: b'{"schema": 1, "lease_ttl_s": "five"}'}
    saved = {k: store.get(k) for k in live}
    for key, value in FOREIGN.items():
        store.client.put(key, value)
    for key, value in live.items():
        store.client.put(key, value)
    shown = {k.decode("utf-8", "backslashreplace") for k in FOREIGN} | set(live)
    # The daemons run on with it for more than a fence window (lease TTL + margin).
    time.sleep(8)
    assert all(_alive(fc).values()), _alive(fc)
    assert _booted(fc) == before, "no VM stopped, moved or restarted"
    assert shown <= _status_keys(big_etcd)
    # Every agent reads the keyspace, and the orchestrator that led (a follower reads
    # only the leader key): each logged the bad keys and no failed cycle.
    readers = [*fc.agents.items(), *fc.orchestrators.items()]
    assert sum(1 for _, d in fc.orchestrators.items()
               if log_events(d, "invalid_key_ignored")) >= 1
    for name, d in readers:
        if name in fc.agents:
            assert {e["key"] for e in log_events(d, "invalid_key_ignored")} >= shown, name
        assert not log_events(d, "cycle_failed"), name
        # Once per key and revision, not once per cycle.
        recs = [(e["key"], e["key_revision"]) for e in log_events(d, "invalid_key_ignored")]
        assert len(recs) == len(set(recs)), name
    # Restore the live keys (the leader key's lease is gone with its stepped-down
    # owner: delete it, a new election follows) and remove the foreign ones.
    for key, kv in saved.items():
        if kv is None or key == KS.leader:
            store.delete(key)
        else:
            store.client.put(key, kv.value, lease=kv.lease or None)
    for key in FOREIGN:
        store.client.delete(key)
    wait_until(lambda: not _status_keys(big_etcd), 10, what="no invalid key left")
    r = vmha(big_etcd, "vm", "add", "after", "--memory-mib", "256")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: "after" in fake_ground_truth(fc.fake_root), 20, what="a new VM runs")
    after = _booted(fc)
    assert {vm: after[vm] for vm in before} == before
    assert {vm: after[vm][0][0] for vm in before} == vm_node
    assert all(_alive(fc).values()), _alive(fc)
    store.close()


def _big_xml(path: Path, name: str) -> str:
    path.write_text(f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory>"
                    "<vcpu>1</vcpu><description>" + "x" * (300 * 1024) + "</description>"
                    "<os><type>hvm</type></os></domain>")
    return str(path)


def test_cli_refuses_oversized_values(etcd: EtcdCluster, tmp_path: Path) -> None:
    r = vmha(etcd, "vm", "add", "big", "--memory-mib", "64", "--xml",
             _big_xml(tmp_path / "big.xml", "big"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "over the limit of 262144 bytes" in r.stderr
    assert vmha(etcd, "vm", "add", "small", "--memory-mib", "64", "--stopped").returncode == 0
    r = vmha(etcd, "vm", "edit", "small", "--xml", _big_xml(tmp_path / "s.xml", "small"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "over the limit of 262144 bytes" in r.stderr
    store = EtcdStore(etcd.endpoints)
    assert store.get(KS.vm_spec("big")) is None
    assert len(store.get(KS.vm_spec("small")).value) < 10_000  # type: ignore[union-attr]
    store.close()
    cfg = tmp_path / "cluster.json"
    cfg.write_text(json.dumps({"schema": 1, "fence_devices": {
        f"n{i}": {"agent": ["fence_x"], "params": {"p": "y" * 1024}} for i in range(300)}}))
    r = vmha(etcd, "config", "apply", "--file", str(cfg))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "262144 bytes" in r.stderr
