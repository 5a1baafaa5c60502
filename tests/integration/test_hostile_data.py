"""Hostile values on a running cluster (issue 11), on both keyspaces: every daemon
survives, no VM is stopped, moved or restarted, nothing is written because of a bad
value, each bad key is reported (the `invalid_key_ignored` log event, once per key and
revision) by the daemons that read it, and `vmha status -o json` lists every bad key.
Real etcd, 3 agents on the fake hypervisor, 2 orchestrators, 6 running VMs.

Which daemon reports which key:

* **Keyspace 1.** Every agent reads the whole prefix: each reports every bad key under
  `/vmha/`, as does the orchestrator that leads (a follower reads only whether the leader
  key exists).
* **Keyspace 2** (docs/keyspace-v2.md, section 3). Agent N reads only its own keys:
  `/vmha/config`, `/vmha/version`, `/vmha/cordon/N` and everything under `/vmha/a/N/` and
  `/vmha/n/N/` (also, not exercised here: the registration and status of a peer its
  assignments name, and the placement and spec of a managed domain with no assignment
  key).  Agent N reports exactly the bad keys among those, so a key whose node name is
  invalid belongs to no agent.  The leader watches all of `/vmha/` and reports every bad
  key there; a bad leader key deposes it, and it is reported by the leader it deposes.
  No daemon reads the history (`/vmha-history/`; the leader's prune reads its keys only
  and skips any that is not an event's): `vmha history` reports its bad records.
  `/vmha/version` is the documented exception (docs/keyspace.md, "Keyspace version 2": a
  marker that does not parse freezes every daemon): each agent reports it and writes
  nothing; the leader reports it, resigns (its lease revoked) and its process waits,
  naming the marker, as does any orchestrator elected meanwhile, so no orchestrator
  leads (failover is frozen); `vmha` commands exit 1.  All of it ends when the marker is
  fixed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.fake import fake_ground_truth
from schemas import Keyspace
from schemas.keys_v2 import KeyspaceV2
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG, make_fake_cluster, vmha
from tests.harness import EtcdCluster, FakeCluster, start_etcd, wait_until
from tests.integration.helpers import domain_record, log_events
from tests.integration.keyspaces import KEYSPACES, ClusterView, mark_keyspace

pytestmark = pytest.mark.integration

KS = Keyspace()
KS2 = KeyspaceV2()
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
def cluster3(big_etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> Iterator[FakeCluster]:
    fc = make_fake_cluster(big_etcd, tmp_path, keyspace=keyspace)
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


def _dead(fc: FakeCluster) -> dict[str, tuple[int | None, str]]:
    """Each daemon that ended: its exit code and the end of its log (which has its
    stderr), so a failure says why."""
    return {d.name: (d.proc.returncode if d.proc else None, d.log_text()[-1500:])
            for d in [*fc.agents.values(), *fc.orchestrators.values()] if not d.alive()}


def _status_keys(etcd: EtcdCluster) -> set[str]:
    r = vmha(etcd, "-o", "json", "status")
    assert r.returncode == 0, r.stderr
    return {i["key"] for i in json.loads(r.stdout)["invalid"]}


def _repaired(etcd: EtcdCluster, fc: FakeCluster,
              before: dict[str, tuple[tuple[str, ...], float]]
              ) -> dict[str, tuple[tuple[str, ...], float]]:
    """The bad keys are gone: nothing is reported invalid, a VM added now runs, none
    of the VMs of `before` was booted again, and every daemon lives.  The VMs now."""
    wait_until(lambda: not _status_keys(etcd), 10, what="no invalid key left")
    r = vmha(etcd, "vm", "add", "after", "--memory-mib", "256")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: "after" in fake_ground_truth(fc.fake_root), 20, what="a new VM runs")
    after = _booted(fc)
    assert {vm: after[vm] for vm in before} == before
    assert all(_alive(fc).values()), _dead(fc)
    return after


def _text(key: bytes) -> str:
    """A key as the daemons and `vmha` name it (`schemas.keys.decode_key`)."""
    return key.decode("utf-8", "backslashreplace")


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_hostile_values_end_no_daemon_and_move_no_vm(big_etcd: EtcdCluster,
                                                    cluster3: FakeCluster,
                                                    keyspace: int) -> None:
    if keyspace == 2:
        _hostile_values_on_keyspace_2(big_etcd, cluster3)
        return
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
    shown = {_text(k) for k in FOREIGN} | set(live)
    # The daemons run on with it for more than a fence window (lease TTL + margin).
    time.sleep(8)
    assert all(_alive(fc).values()), _dead(fc)
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
    after = _repaired(big_etcd, fc, before)
    assert {vm: after[vm][0][0] for vm in before} == vm_node
    store.close()


def _big_xml(path: Path, name: str) -> str:
    path.write_text(f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory>"
                    "<vcpu>1</vcpu><description>" + "x" * (300 * 1024) + "</description>"
                    "<os><type>hvm</type></os></domain>")
    return str(path)


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_cli_refuses_oversized_values(etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    mark_keyspace(etcd.endpoints, keyspace)
    r = vmha(etcd, "vm", "add", "big", "--memory-mib", "64", "--xml",
             _big_xml(tmp_path / "big.xml", "big"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "over the limit of 262144 bytes" in r.stderr
    assert vmha(etcd, "vm", "add", "small", "--memory-mib", "64", "--stopped").returncode == 0
    r = vmha(etcd, "vm", "edit", "small", "--xml", _big_xml(tmp_path / "s.xml", "small"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "over the limit of 262144 bytes" in r.stderr
    with ClusterView(etcd.endpoints) as view:
        assert view.keyspace == keyspace
        specs = view.snapshot().specs
        assert "big" not in specs
        assert len(specs["small"].value.domain_xml) < 10_000
    cfg = tmp_path / "cluster.json"
    cfg.write_text(json.dumps({"schema": 1, "fence_devices": {
        f"n{i}": {"agent": ["fence_x"], "params": {"p": "y" * 1024}} for i in range(300)}}))
    r = vmha(etcd, "config", "apply", "--file", str(cfg))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "262144 bytes" in r.stderr


# ---- keyspace 2 ---------------------------------------------------------------------------

FENCE_WINDOW_S = TEST_CONFIG.lease_ttl_s + TEST_CONFIG.fence_margin_s

# Keys no agent reads (the leader only): other names, invalid names, unknown kinds.
FOREIGN_V2: dict[bytes, bytes] = {
    b"/vmha/spec/evil": DEEP,
    b"/vmha/spec/\xff\xfe": b"{}",
    b"/vmha/spec/big": TWO_MIB,
    b"/vmha/place/evil2": b"\xff\xfe\xfd",
    b"/vmha/spec/a/b": b"{}",
    b"/vmha/move/evil3": b'{"schema": 99, "vm": "evil3"}',
    b"/vmha/fence/ghost": b'{"schema": 1, "node": ["ghost"]}',
    b"/vmha/cordon/ghost": b"null",
    b"/vmha/confirm-off/ghost": b'{"schema": 1, "node": "ghost"}',
    b"/vmha/a/ghost/evil": b'"x"',
    b"/vmha/n/ghost/alive": b"[]",
    b"/vmha/n/n\n9/reg": b"{}",
    "/vmha/n/\u00e9t\u00e9/vm/vm0".encode(): b"{}",
    b"/vmha/vms/vm0/spec": b"{}",  # keyspace 1's keys are unknown kinds on keyspace 2
    b"/vmha/nodes/n1": b"{}",
    b"/vmha/junk": b"1",
    b"/vmha/config/x": b"{}",
}
# Unknown kinds and invalid VM names inside one agent's own prefixes.
OWN_V2: dict[bytes, bytes] = {
    b"/vmha/n/n1/junk": b"{}",
    b"/vmha/a/n1/a/b": b"{}",
    b"/vmha/n/n2/vm/Bad!": b"{}",
    b"/vmha/a/n3/UPPER": b"{}",
}


def _history_v2() -> dict[bytes, bytes]:
    """Bad history records (an event id of now: no prune deletes it meanwhile)."""
    eid = f"{int(time.time() * 1e6):017d}-test-000001"
    return {b"/vmha-history/n/n1/not-an-id": b"{}", f"/vmha-history/o/{eid}".encode(): DEEP,
            f"/vmha-history/n/N!/{eid}".encode(): b"{}", b"/vmha-history/x/y/z": b"{}"}


def _live_v2(node_of: dict[str, str]) -> dict[str, bytes]:
    """Bad values over live keys of every kind: a running VM's spec, placement,
    assignment, status and move request; a live node's registration, liveness key,
    leave marker, cordon, fence record and confirm-off; the config.  Some parse but
    name another VM or node than their key: taken at their word, they would stop vm3,
    move vm5, fence n2."""
    other = next(n for n in ("n1", "n2", "n3") if n != node_of["vm3"])
    status = {"schema": 1, "vm": "vm3", "node": other, "state": "stopped", "since": 1.0}
    move = {"schema": 1, "vm": "vm5", "to": node_of["vm4"], "by": "x", "requested_at": 1.0}
    off = {"schema": 1, "node": "n2", "by": "x", "reason": "r", "at": 1.0}
    return {KS2.spec("vm0"): DEEP, KS2.place("vm1"): b'{"schema": 1, "vm": 5}',
            KS2.assignment(node_of["vm2"], "vm2"): b'{"schema": 1, "vm": "vm2"}',
            KS2.status(node_of["vm3"], "vm3"): json.dumps(status).encode(),
            KS2.move("vm4"): json.dumps(move).encode(),
            KS2.reg("n1"): b"\xff\xfe", KS2.alive("n2"): b"{}", KS2.leaving("n3"): b"[]",
            KS2.cordon("n2"): b"[" * 5000, KS2.fence("n3"): b'"x"',
            KS2.confirm_off("n1"): json.dumps(off).encode(),
            KS2.config: b'{"schema": 1, "lease_ttl_s": "five"}'}


def _agents_reading(key: str, agents: list[str]) -> set[str]:
    """The agents that read `key` (the module docstring's rule)."""
    if key in (KS2.config, KS2.version):
        return set(agents)
    return {n for n in agents if key == KS2.cordon(n)
            or key.startswith((KS2.assignments(n), KS2.node_root(n)))}


def _versions(store: EtcdStore) -> dict[bytes, int]:
    """mod_revision of every key under `/vmha/` and `/vmha-history/`."""
    return {raw: kv.mod_revision for page in store.list_pages(KS2.prefix, keys_only=True)
            for raw, kv in zip(page.raw_keys, page.kvs, strict=True)}


def _changed(old: dict[bytes, int], new: dict[bytes, int]) -> list[bytes]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _reported(fc: FakeCluster) -> dict[str, set[str]]:
    return {name: {e["key"] for e in log_events(d, "invalid_key_ignored")}
            for name, d in [*fc.agents.items(), *fc.orchestrators.items()]}


def _hostile_values_on_keyspace_2(etcd: EtcdCluster, fc: FakeCluster) -> None:
    store, view = EtcdStore(etcd.endpoints), ClusterView(etcd.endpoints)
    agents = sorted(fc.agents)
    # Settled: every VM's status says running (the domains run before their reports).
    wait_until(lambda: all(getattr(view.status(f"vm{i}"), "state", "") == "running"
                           for i in range(6)), 10, what="6 statuses running")
    before = _booted(fc)
    node_of = {vm: nodes[0] for vm, (nodes, _) in before.items()}
    leader = view.leader_id()
    assert leader in fc.orchestrators
    live, history = _live_v2(node_of), _history_v2()
    saved = {k: store.get(k) for k in live}
    bad = {**FOREIGN_V2, **OWN_V2, **{k.encode(): v for k, v in live.items()}}
    for key, value in [*bad.items(), *history.items()]:
        store.client.put(key, value)
    written = _versions(store)
    time.sleep(FENCE_WINDOW_S + 1)
    assert all(_alive(fc).values()), _dead(fc)
    assert _booted(fc) == before, "no VM stopped, moved or restarted"
    changed = _changed(written, _versions(store))
    assert not changed, [(k, store.client.get(k)[0]) for k in changed]  # nothing written
    shown = {_text(k) for k in bad}
    assert _status_keys(etcd) == shown
    reported = _reported(fc)
    assert reported[leader] == shown
    assert all(not reported[o] for o in fc.orchestrators if o != leader), reported
    for n in agents:
        assert reported[n] == {k for k in shown if n in _agents_reading(k, agents)}, n
    r = vmha(etcd, "history")
    assert r.returncode == 0, r.stderr
    assert {_text(k) for k in history} <= {
        line.split(": ")[1] for line in r.stderr.splitlines() if line.startswith("invalid: ")}

    # The leader key: the leader reports it and steps down (no election can replace a key
    # that exists: an operator deletes it).
    store.client.put(KS2.leader, b"[]")
    old = fc.orchestrators[leader]
    wait_until(lambda: KS2.leader in _reported(fc)[leader] and log_events(old, "deposed"), 10,
               what="the leader deposed by its bad key, reported")

    # The marker: every daemon freezes (an election under it resigns at its first cycle).
    marker = store.get(KS2.version)
    assert marker is not None
    store.client.put(KS2.version, b'{"schema": 1, "keyspace": "two"}')
    store.delete(KS2.leader)
    wait_until(lambda: all(KS2.version in _reported(fc)[n] for n in agents) and all(
        any(e["marker"] == "invalid" for e in log_events(fc.agents[n], "keyspace_frozen"))
        for n in agents), 10, what="every agent frozen by the bad marker, and reporting it")
    wait_until(lambda: all(any(KS2.version in e["reason"] for e in log_events(
        d, "waiting_for_keyspace")) for d in fc.orchestrators.values()), 15,
               what="both orchestrators waiting for a marker that parses")
    # Each was elected once the key was gone, reported the marker at its first cycle and
    # resigned with its lease revoked (the key gone at once, not a lease TTL later).
    assert store.get(KS2.leader) is None, "no orchestrator leads while the marker is bad"
    for name, d in fc.orchestrators.items():
        assert KS2.version in _reported(fc)[name], name
        assert {e["state"] for e in log_events(d, "keyspace_changed")} == {"invalid"}, name
    time.sleep(1)
    assert store.get(KS2.leader) is None
    # Since the bad values: the test's own writes and the elections, nothing else.
    for key in _changed(written, _versions(store)):
        if key.startswith(KS2.leader_history.encode()):
            kv = store.client.get(key)[0]
            assert json.loads(kv)["kind"] == "leader_elected", kv
        else:
            assert key in (KS2.leader.encode(), KS2.version.encode()), key
    r = vmha(etcd, "status")
    assert r.returncode == 1 and KS2.version in r.stderr, (r.stdout, r.stderr)
    assert all(_alive(fc).values()), _dead(fc)
    assert _booted(fc) == before

    # Fixed by hand: keyspace 2 runs again, and nothing moved.
    store.client.put(KS2.version, marker.value)
    for key, kv in saved.items():
        if kv is None:
            store.delete(key)
        else:
            store.client.put(key, kv.value, lease=kv.lease or None)
    for key in [*FOREIGN_V2, *OWN_V2, *history]:
        store.client.delete(key)
    wait_until(lambda: view.leader_id() is not None, 15, what="a leader again")
    _repaired(etcd, fc, before)
    for name, d in [*fc.agents.items(), *fc.orchestrators.items()]:
        assert not log_events(d, "cycle_failed"), name
        recs = [(e["key"], e["key_revision"]) for e in log_events(d, "invalid_key_ignored")]
        assert len(recs) == len(set(recs)), name  # once per key and revision
    view.close()
    store.close()
