"""`schemas.migration`: the plan of `vmha keyspace migrate` on keyspace-1 states held as
values, and the copy run to its end against a real etcd applying the plan's
transactions."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from schemas import migration as mig
from schemas.keys import Keyspace
from schemas.keys_v2 import KeyspaceV2
from schemas.models import ClusterConfig, Placement, VmSpec
from schemas.models_v2 import Assignment, release_at_least
from schemas.snapshot import ClusterSnapshot, RawKV
from schemas.snapshot_v2 import parse_kv
from schemas.txn import Cmp, Delete, Put, Txn
from store.etcd import EtcdStore
from tests.harness import EtcdCluster
from tests.unit.builders import (
    alive_value,
    boot,
    cordon_value,
    fence_value,
    leader_value,
    migrate,
    node_value,
    pending,
    placement_value,
    raw,
    running,
    spec_value,
    status_value,
)

KS1, KS2 = Keyspace(), KeyspaceV2()


class RealEtcd:
    """A real etcd holding the given keys (values as given, revisions etcd's own, no
    leases: none of these tests renews one); the plan's transactions are applied by it."""

    def __init__(self, store: EtcdStore, kvs: list[RawKV]) -> None:
        self.store = store
        for kv in kvs:
            store.put(kv.key, kv.value.decode())

    @property
    def kv(self) -> dict[str, RawKV]:
        return {kv.key: kv for kv in self.store.get_prefix(KS1.root)}

    @property
    def revision(self) -> int:
        return self.store.revision()

    def txn(self, t: Txn) -> bool:
        assert len(t.ops) <= 64
        return self.store.txn(list(t.compares), list(t.ops)).succeeded

    def items(self) -> list[RawKV]:
        kv = self.kv
        return [kv[k] for k in sorted(kv)]

    def owned(self) -> dict[str, RawKV]:
        return {k: kv for k, kv in self.kv.items() if mig.owned(KS2, k)}


MakeEtcd = Callable[[list[RawKV]], RealEtcd]


@pytest.fixture
def real(etcd: EtcdCluster) -> Iterator[MakeEtcd]:
    store = EtcdStore(etcd.endpoints)
    try:
        yield lambda kvs: RealEtcd(store, kvs)
    finally:
        store.close()


def v1_cluster() -> list[RawKV]:
    """Keyspace 1 with every kind of key, a few of them invalid."""
    reg = node_value("n1")
    reg["agent"]["version"] = "0.2.0"
    return [
        raw("/vmha/config", ClusterConfig().to_json(), 2),
        raw("/vmha/leader", {**leader_value(), "version": "0.2.0"}, 3, lease=7),
        raw("/vmha/nodes/n1", reg, 4, lease=8),
        raw("/vmha/alive/n1", alive_value("n1"), 5, lease=9),
        raw("/vmha/cordon/n2", cordon_value("n2"), 6),
        raw("/vmha/fence/n4", fence_value("n4"), 7),
        raw("/vmha/leaving/n3", {"schema": 1, "node": "n3", "lease_id": "aa",
                                 "reason": "drained: no VM runs here", "at": 1.0}, 8),
        raw("/vmha/vms/web1/spec", spec_value("web1"), 10),
        raw("/vmha/vms/web1/placement", placement_value("web1", boot("n1")), 11),
        raw("/vmha/vms/web1/status", status_value("web1", running("n1", "p1")), 12),
        raw("/vmha/vms/web1/move", {"schema": 1, "vm": "web1", "to": "n2", "by": "cli",
                                    "requested_at": 1.0}, 13),
        raw("/vmha/vms/web2/spec", spec_value("web2"), 14),
        raw("/vmha/vms/web2/placement", placement_value("web2", pending("no room")), 15),
        raw("/vmha/vms/gone/placement", placement_value("gone", boot("n2")), 16),
        raw("/vmha/vms/bad1/spec", "{not json", 17),
        raw("/vmha/vms/bad2/status", {"schema": 1, "vm": "bad2", "node": "n2",
                                      "state": "exploded"}, 18),
        raw("/vmha/vms/bad3/status", "[]", 19),
        raw("/vmha/vms/a/b/spec", spec_value("a"), 20),
        raw("/vmha/junk", "x", 21),
    ]


def test_each_key_of_keyspace_1_goes_where_section_6_says() -> None:
    v1 = mig.read_v1(KS1, 30, v1_cluster())
    assert {s.key: s.dest for s in v1.sources} == {
        "/vmha/leaving/n3": "/vmha/n/n3/leaving",
        "/vmha/vms/web1/spec": "/vmha/spec/web1",
        "/vmha/vms/web1/placement": "/vmha/place/web1",
        "/vmha/vms/web1/status": "/vmha/n/n1/vm/web1",
        "/vmha/vms/web1/move": "/vmha/move/web1",
        "/vmha/vms/web2/spec": "/vmha/spec/web2",
        "/vmha/vms/web2/placement": "/vmha/place/web2",
        "/vmha/vms/gone/placement": "/vmha/place/gone",
        "/vmha/vms/bad1/spec": "/vmha/spec/bad1",
        "/vmha/vms/bad2/status": "/vmha/n/n2/vm/bad2",
    }
    assert all(s.value == kv.value for s in v1.sources for kv in v1_cluster()
               if kv.key == s.key), "copied verbatim"
    # Invalid values are copied as they are (and stay invalid); keys that have no place
    # in keyspace 2 stay where they are.
    assert v1.invalid == ("/vmha/vms/bad1/spec", "/vmha/vms/bad2/status")
    assert [x.key for x in v1.left] == ["/vmha/junk", "/vmha/vms/a/b/spec",
                                        "/vmha/vms/bad3/status"]
    assert sorted(v1.registrations) == ["n1"]
    # config, cordons, fences, the leader and the liveness key keep their paths.
    assert not {s.key for s in v1.sources} & {"/vmha/config", "/vmha/cordon/n2",
                                               "/vmha/fence/n4", "/vmha/leader",
                                               "/vmha/alive/n1", "/vmha/nodes/n1"}


def _converge(etcd: RealEtcd) -> tuple[int, int]:
    """Copy passes until nothing is left to do: (passes, transactions)."""
    txns = 0
    for passes in range(1, 6):
        v1 = mig.read_v1(KS1, etcd.revision, etcd.items())
        have = etcd.owned()
        specs = {k[len(KS2.spec_dir):]: kv for k, kv in have.items() if k.startswith(KS2.spec_dir)}
        want, waiting = mig.want_v2(KS2, v1, specs)
        d = mig.diff(want, have)
        if d.empty and not waiting:
            return passes, txns
        for t in mig.sync_txns(d):
            assert etcd.txn(t)
            txns += 1
    raise AssertionError("the copy does not settle")


@pytest.mark.integration
def test_the_copy_settles_with_assignments_as_the_leader_writes_them(real: MakeEtcd) -> None:
    etcd = real(v1_cluster())
    passes, _ = _converge(etcd)
    assert passes == 3  # specs and the rest, then the assignments, then nothing to do
    spec_kv = etcd.kv["/vmha/spec/web1"]
    got = Assignment.from_json(etcd.kv["/vmha/a/n1/web1"].value)
    p = Placement.from_json(json.dumps(placement_value("web1", boot("n1"))))
    assert got == Assignment(vm="web1", spec_revision=spec_kv.mod_revision, placement=p,
                             spec=VmSpec.from_json(json.dumps(spec_value("web1"))))
    # No assignment for a pending placement, nor for a placement without a spec.
    assert sorted(k for k in etcd.kv if k.startswith(KS2.assignment_dir)) == ["/vmha/a/n1/web1"]
    # Keyspace 2 reads every copied key as keyspace 1 did: valid ones parse, invalid
    # ones are still reported.
    for s in mig.read_v1(KS1, etcd.revision, etcd.items()).sources:
        parsed = parse_kv(KS2, etcd.kv[s.dest])
        assert (type(parsed).__name__ == "RefusedKV") == (s.key in ("/vmha/vms/bad1/spec",
                                                                    "/vmha/vms/bad2/status"))


@pytest.mark.integration
def test_a_migrate_placement_is_assigned_to_both_nodes(real: MakeEtcd) -> None:
    kvs = [raw("/vmha/vms/db/spec", spec_value("db"), 3),
           raw("/vmha/vms/db/placement", placement_value("db", migrate("n1", "n2")), 4)]
    etcd = real(kvs)
    _converge(etcd)
    assert sorted(k for k in etcd.kv if k.startswith(KS2.assignment_dir)) == [
        "/vmha/a/n1/db", "/vmha/a/n2/db"]
    refusals = mig.check(mig.read_v1(KS1, 9, kvs), None, None, mig.Diff(), started=False)
    assert refusals.in_flight == ("db",) and "in flight" in refusals.messages[0]


def test_batches_hold_at_most_64_ops_each_compared() -> None:
    kvs = [raw(f"/vmha/vms/vm{i}/spec", spec_value(f"vm{i}"), 10 + i) for i in range(150)]
    v1 = mig.read_v1(KS1, 200, kvs)
    want, _ = mig.want_v2(KS2, v1, {})
    txns = mig.sync_txns(mig.diff(want, {}))
    assert [len(t.ops) for t in txns] == [64, 64, 22]
    for t in txns:
        assert [c.key for c in t.compares] == [o.key for o in t.ops]
        assert all(c == Cmp(c.key, "create", "==", 0) for c in t.compares)
    clean = mig.clean_txns(v1)
    assert sum(len(t.ops) for t in clean) == 150
    assert all(isinstance(o, Delete) for t in clean for o in t.ops)
    assert {(c.key, c.value) for t in clean for c in t.compares} == {
        (kv.key, kv.mod_revision) for kv in kvs}


@pytest.mark.integration
def test_a_changed_key_is_overwritten_and_an_extra_one_deleted_on_the_version_seen(
        real: MakeEtcd) -> None:
    etcd = real(v1_cluster())
    _converge(etcd)
    # A late write of keyspace 1 (an agent that had not yet seen the marker) and a
    # stray key in keyspace 2.
    etcd.txn(Txn((), (Put("/vmha/vms/web1/status",
                          json.dumps(status_value("web1", running("n1", "p2")))),
                      Put("/vmha/a/n9/web1", "{}"))))
    v1 = mig.read_v1(KS1, etcd.revision, etcd.items())
    have = etcd.owned()
    d = mig.diff(mig.want_v2(KS2, v1, {k[len(KS2.spec_dir):]: kv for k, kv in have.items()
                                       if k.startswith(KS2.spec_dir)})[0], have)
    assert [k for k, _, _ in d.update] == ["/vmha/n/n1/vm/web1"]
    assert [k for k, _ in d.extra] == ["/vmha/a/n9/web1"]
    assert d.conflicts == ["/vmha/a/n9/web1", "/vmha/n/n1/vm/web1"]
    [t] = mig.sync_txns(d)
    assert {(c.key, c.target) for c in t.compares} == {("/vmha/n/n1/vm/web1", "mod"),
                                                       ("/vmha/a/n9/web1", "mod")}
    _converge(etcd)
    assert "/vmha/a/n9/web1" not in etcd.kv
    assert b'"p2"' in etcd.kv["/vmha/n/n1/vm/web1"].value


@pytest.mark.integration
def test_clean_then_rollback_delete_exactly_what_the_copy_wrote(real: MakeEtcd) -> None:
    etcd = real(v1_cluster())
    before = {kv.key for kv in etcd.items()}
    _converge(etcd)
    copied = set(etcd.owned())
    for t in mig.rollback_txns(etcd.owned()):
        assert etcd.txn(t)
    assert {kv.key for kv in etcd.items()} == before
    _converge(etcd)
    assert set(etcd.owned()) == copied
    for t in mig.clean_txns(mig.read_v1(KS1, etcd.revision, etcd.items())):
        assert etcd.txn(t)
    assert sorted(k for k in etcd.kv if k.startswith(("/vmha/vms/", "/vmha/leaving/"))) == [
        "/vmha/vms/a/b/spec", "/vmha/vms/bad3/status"]  # left in place, still reported


def test_check_refuses_old_daemons_a_bad_config_and_conflicts() -> None:
    kvs = v1_cluster()
    v1 = mig.read_v1(KS1, 30, kvs)
    leader = next(kv for kv in kvs if kv.key == "/vmha/leader")
    config = next(kv for kv in kvs if kv.key == "/vmha/config")
    assert mig.check(v1, leader, config, mig.Diff(), started=False).messages == []
    old = node_value("n7")  # agent.version 0.1.0
    v1_old = mig.read_v1(KS1, 30, [*kvs, raw("/vmha/nodes/n7", old, 40, lease=3)])
    r = mig.check(v1_old, raw("/vmha/leader", leader_value(), 3), raw("/vmha/config", "{", 2),
                  mig.Diff(extra=(("/vmha/spec/x", 5),)), started=False)
    text = "\n".join(r.messages)
    assert r.old_agents == ("n7 (0.1.0)",)
    assert "leader leader-1 on h1 (pid 99)" in text and "no version" in text
    assert "config does not parse" in text and "/vmha/spec/x" in text
    # Once the marker is there the copy owns keyspace 2's keys, and the leader has
    # stopped: neither is a refusal any more.
    r = mig.check(v1, raw("/vmha/leader", leader_value(), 3), config,
                  mig.Diff(extra=(("/vmha/spec/x", 5),)), started=True)
    assert r.messages == []


@pytest.mark.parametrize(("version", "ok"), [("0.2.0", True), ("0.10.0", True),
                                              ("1.0", True), ("0.1.9", False), ("", False),
                                              ("dev", False)])
def test_release_comparison(version: str, ok: bool) -> None:
    assert release_at_least(version) is ok


def test_the_agent_switch_moves_both_keys_in_one_compared_txn() -> None:
    t = mig.switch_txn(KS1, "n1", to=2, token=40, reg_value="R", reg_lease=8,
                       alive_value="A", alive_lease=9)
    assert t.compares == (Cmp("/vmha/nodes/n1", "create", "==", 40),
                          Cmp("/vmha/n/n1/reg", "create", "==", 0))
    assert t.ops == (Put("/vmha/n/n1/reg", "R", 8), Put("/vmha/n/n1/alive", "A", 9),
                     Delete("/vmha/nodes/n1"), Delete("/vmha/alive/n1"))
    back = mig.switch_txn(KS1, "n1", to=1, token=77, reg_value="R", reg_lease=8,
                          alive_value="A", alive_lease=0)
    assert back.compares == (Cmp("/vmha/n/n1/reg", "create", "==", 77),
                             Cmp("/vmha/nodes/n1", "create", "==", 0))
    assert back.ops == (Put("/vmha/nodes/n1", "R", 8), Delete("/vmha/n/n1/reg"),
                        Delete("/vmha/n/n1/alive"))


def test_steps_left_by_marker() -> None:
    assert mig.steps_left(None) == mig.STEPS
    assert mig.steps_left("migrating")[0] == "freeze"
    assert mig.steps_left("switching") == ("switch", "clean", "done")
    assert mig.steps_left("cleaning") == ("clean", "done")
    assert mig.steps_left("done") == ()


def test_config_schema_2_is_read_by_keyspace_2_and_refused_by_keyspace_1() -> None:
    cfg = ClusterConfig(lease_ttl_s=9)
    v2 = mig.config_schema_2(cfg.to_json().encode())
    data: dict[str, Any] = json.loads(v2)
    assert data["schema"] == 2 and data["lease_ttl_s"] == 9
    assert data["placement"]["schema"] == 1  # nested objects keep theirs
    assert ClusterConfig.from_json(v2).lease_ttl_s == 9
    assert json.loads(mig.config_schema_2(None))["schema"] == 2
    snap = ClusterSnapshot.from_kvs(KS1, 5, [raw("/vmha/config", v2, 4)])
    [err] = snap.errors
    assert "vmha keyspace migrate" in str(err) and snap.config == ClusterConfig()
    parsed = parse_kv(KS2, raw("/vmha/config", v2, 4))
    assert type(parsed).__name__ == "ParsedKV"
    # Only the config has a second schema.
    with pytest.raises(Exception, match="unsupported schema version 2"):
        VmSpec.from_json(json.dumps({**spec_value("x"), "schema": 2}))


def test_the_marker_is_a_key_of_keyspace_1_that_freezes() -> None:
    marker = mig.marker_json("migrating", "operator:t", "0.2.0", 1.0)
    snap = ClusterSnapshot.from_kvs(KS1, 5, [raw("/vmha/version", marker, 4)])
    assert snap.keyspace_marked and snap.keyspace_marker is not None
    assert snap.keyspace_marker.value.state == "migrating" and not snap.errors
    bad = ClusterSnapshot.from_kvs(KS1, 5, [raw("/vmha/version", "{", 4)])
    assert bad.keyspace_marked and bad.keyspace_marker is None
    assert not ClusterSnapshot.from_kvs(KS1, 5, []).keyspace_marked
