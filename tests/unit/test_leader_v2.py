"""The leader on keyspace 2, pure parts: its model (orchestrator.model_v2) and its writes
(orchestrator.txn_v2), held against schemas.writes_v2 and the orchestrator's role
(schemas.acl).  The planner's decisions on keyspace 2 are checked by the scenarios
(tests/scenarios, `-ks2`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import planner, txn_v2
from orchestrator.model_v2 import LeaderModel, ParseCache, leader_model
from schemas.acl import ORCHESTRATOR, role
from schemas.keys_v2 import KeyspaceV2
from schemas.models import FenceRecord, Placement
from schemas.snapshot import RawKV
from schemas.txn import Cmp, Delete, Put
from schemas.writes_v2 import Write
from tests.unit.builders import (
    boot,
    fence_value,
    leader_value,
    migrate,
    node_value,
    pending,
    placement_value,
    raw,
    spec_value,
    status_value,
)

KS = KeyspaceV2()
EPOCH = 7


def assignment(node: str, vm: str, p: dict[str, Any], mod: int, spec_rev: int = 20,
               spec: dict[str, Any] | None = None, ks: KeyspaceV2 = KS) -> RawKV:
    return raw(ks.assignment(node, vm), {"schema": 1, "vm": vm, "spec_revision": spec_rev,
                                         "placement": placement_value(vm, p),
                                         "spec": spec or spec_value(vm)}, mod)


def status_kv(node: str, vm: str, state: str, mod: int, ks: KeyspaceV2 = KS) -> RawKV:
    return raw(ks.status(node, vm), status_value(vm, {"node": node, "state": state}), mod)


def confirm_kv(node: str, mod: int = 60, ks: KeyspaceV2 = KS) -> RawKV:
    return raw(ks.confirm_off(node), {"schema": 1, "node": node, "by": "operator:alice",
                                      "reason": "powered off by hand", "at": 5.0}, mod)


def base(ks: KeyspaceV2 = KS) -> list[RawKV]:
    """n2 and n3 registered; web1 migrating n2 -> n3, its assignments up to date; n2's
    status is the older key (superseded), n3's the current one."""
    mig = migrate("n2", "n3")
    return [raw(ks.leader, leader_value(), EPOCH, create_revision=EPOCH),
            raw(ks.reg("n2"), node_value("n2"), 11), raw(ks.reg("n3"), node_value("n3"), 12),
            raw(ks.spec("web1"), spec_value("web1"), 20),
            raw(ks.place("web1"), placement_value("web1", mig), 30),
            assignment("n2", "web1", mig, 30, ks=ks), assignment("n3", "web1", mig, 30, ks=ks),
            status_kv("n2", "web1", "migrating", 40, ks), status_kv("n3", "web1", "running", 41,
                                                                    ks)]


def model(*kvs: RawKV, drop: tuple[str, ...] = (), ks: KeyspaceV2 = KS) -> LeaderModel:
    out = {kv.key: kv for kv in base(ks) if kv.key not in drop}
    out.update({kv.key: kv for kv in kvs})
    return leader_model(ks, 100, sorted(out.values(), key=lambda kv: str(kv.key)))


def ops(w: Write) -> list[tuple[str, str]]:
    return [("put" if isinstance(o, Put) else "delete", o.key) for o in w.txn.ops]


# ---- the model -------------------------------------------------------------------------------


def test_model_reads_keyspace_2_as_the_planner_reads_keyspace_1() -> None:
    m = model(raw(KS.version, {"schema": 1, "keyspace": 2, "state": "done", "started_at": 1.0,
                               "by": "root", "tool_version": "0.2.0"}, 3),
              confirm_kv("n4"), raw("/elsewhere/x", "{"))
    snap = m.snapshot
    assert (snap.revision, snap.leader and snap.leader.create_revision) == (100, EPOCH)
    assert set(snap.nodes) == {"n2", "n3"}
    assert snap.placements["web1"].mod_revision == 30
    assert snap.placements["web1"].key == KS.place("web1")  # never an assignment
    assert snap.statuses["web1"].value.node == "n3"  # the newest status key
    assert [e.value.node for e in m.superseded["web1"]] == ["n2"]
    assert m.status_keys == {"web1": {"n2": 40, "n3": 41}}
    assert m.assignments_seen("web1") == {"n2": 30, "n3": 30}
    assert set(m.confirm_offs) == {"n4"} and m.version is not None
    assert snap.errors == () and snap.config_entry is None


@pytest.mark.parametrize(("kv", "vms", "nodes"), [
    (raw(KS.assignment("n2", "web1"), "{"), {"web1"}, set()),
    (raw(KS.status("n4", "web1"), status_value("web1", {"node": "n2", "state": "running"})),
     {"web1"}, set()),
    (raw(KS.reg("n3"), node_value("n9")), set(), {"n3"}),
    (raw(KS.confirm_off("n4"), "[]"), set(), set()),
])
def test_an_invalid_key_freezes_what_it_belongs_to(kv: RawKV, vms: set[str],
                                                   nodes: set[str]) -> None:
    snap = model(kv).snapshot
    assert len(snap.invalid) == 1
    assert (set(snap.invalid_vms), set(snap.invalid_nodes)) == (vms, nodes)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(
    st.one_of(st.sampled_from([KS.reg("n2"), KS.assignment("n2", "web1"), KS.status("n2", "web1"),
                               KS.status("n4", "web1"), KS.config, KS.confirm_off("n2"),
                               KS.place("web1"), KS.spec("web1"), KS.version, KS.leader]),
              st.text(max_size=30).map(lambda t: "/vmha/" + t),
              st.binary(max_size=30).map(lambda b: b"/vmha/a/" + b)),
    st.one_of(st.binary(max_size=60), st.sampled_from([
        b"{}", b"[" * 5000, b"\xff", json.dumps(placement_value("web1", boot("n2"))).encode(),
        json.dumps(node_value("n2")).encode()])),
    st.integers(-5, 10**20)), max_size=10))
def test_no_data_makes_the_model_or_the_upkeep_raise(items: list[tuple[Any, bytes, int]]) -> None:
    m = model(*[RawKV(k, v, r, r) for k, v, r in items])
    assert len(m.snapshot.errors) == len(m.snapshot.invalid)
    planner.plan(m.snapshot, epoch=EPOCH, now=1.0, wall_time=2.0, lost_since={})
    txn_v2.assignment_upkeep(KS, m, EPOCH)
    txn_v2.confirm_offs(KS, m, EPOCH, 2.0)


# ---- the planner's writes ---------------------------------------------------------------------


def test_placement_moves_the_assignments_with_it() -> None:
    m = model()
    p = Placement.model_validate(placement_value("web1", boot("n3", id="p2")))
    w = txn_v2.placement(KS, m, planner.WritePlacement(p, 30), EPOCH)
    assert w.txn.compares == (Cmp(KS.leader, "create", "==", EPOCH),
                              Cmp(KS.place("web1"), "mod", "==", 30),
                              Cmp(KS.assignment("n2", "web1"), "mod", "==", 30),
                              Cmp(KS.assignment("n3", "web1"), "mod", "==", 30))
    assert ops(w) == [("put", KS.place("web1")), ("delete", KS.assignment("n2", "web1")),
                      ("put", KS.assignment("n3", "web1"))]


def test_placement_on_a_status_compares_every_status_key_and_fenced_holders() -> None:
    m = model()
    p = Placement.model_validate(placement_value("web1", boot("n4", id="p2")))
    w = txn_v2.placement(KS, m, planner.WritePlacement(p, 30, (("n5", 0),), 41), EPOCH)
    cmps = set(w.txn.compares)
    assert {Cmp(KS.status("n2", "web1"), "mod", "==", 40),
            Cmp(KS.status("n3", "web1"), "mod", "==", 41),
            Cmp(KS.reg("n5"), "create", "==", 0), Cmp(KS.fence("n5"), "mod", "==", 0)} <= cmps


def test_fence_and_clear_writes() -> None:
    rec = FenceRecord.model_validate(fence_value("n5"))
    w = txn_v2.self_fence(KS, planner.FenceNode("n5", "1a2b", "lost", expect_mod_revision=3),
                          rec, EPOCH)
    assert Cmp(KS.fence("n5"), "mod", "==", 3) in w.txn.compares
    with pytest.raises(ValueError, match="not a self-fence"):
        txn_v2.self_fence(KS, planner.FenceNode("n6", "x", "lost"), rec, EPOCH)
    assert ops(txn_v2.clear_move(KS, planner.ClearMove("web1", 9, "done"), EPOCH)) == [
        ("delete", KS.move("web1"))]
    assert ops(txn_v2.clear_fence(KS, planner.ClearFence("n5", 9, "back"), EPOCH)) == [
        ("delete", KS.fence("n5"))]


# ---- upkeep: only on change ------------------------------------------------------------------


def test_steady_state_needs_no_write() -> None:
    assert txn_v2.assignment_upkeep(KS, model(), EPOCH) == []
    assert txn_v2.confirm_offs(KS, model(), EPOCH, 2.0) == []
    m = model(raw(KS.place("web1"), placement_value("web1", pending("full")), 30),
              drop=(KS.assignment("n2", "web1"), KS.assignment("n3", "web1")))
    assert txn_v2.assignment_upkeep(KS, m, EPOCH) == []


def test_spec_edit_refreshes_the_assignments() -> None:
    m = model(raw(KS.spec("web1"), spec_value("web1", memory_mib=2048), 50))
    (up,) = txn_v2.assignment_upkeep(KS, m, EPOCH)
    assert (up.event, up.vm, up.write.what) == ("spec_refreshed", "web1", "spec refresh")
    assert Cmp(KS.spec("web1"), "mod", "==", 50) in up.write.txn.compares
    assert txn_v2.assignment_upkeep(KS, m, EPOCH, skip=frozenset({"web1"})) == []


@pytest.mark.parametrize(("kvs", "drop", "event", "expect_ops"), [
    # A leftover assignment of a node the placement no longer names.
    ([assignment("n4", "web1", boot("n4"), 31)], (), "assignments_repaired",
     [("put", KS.place("web1")), ("put", KS.assignment("n2", "web1")),
      ("put", KS.assignment("n3", "web1")), ("delete", KS.assignment("n4", "web1"))]),
    # An assignment missing.
    ([], (KS.assignment("n2", "web1"),), "assignments_repaired",
     [("put", KS.place("web1")), ("put", KS.assignment("n2", "web1")),
      ("put", KS.assignment("n3", "web1"))]),
    # A pending placement that still has assignments.
    ([raw(KS.place("web1"), placement_value("web1", pending("full")), 33)], (),
     "assignments_repaired", [("put", KS.place("web1")), ("delete", KS.assignment("n2", "web1")),
                              ("delete", KS.assignment("n3", "web1"))]),
    # `vm remove`.
    ([], (KS.spec("web1"),), "placement_removed",
     [("delete", KS.place("web1")), ("delete", KS.assignment("n2", "web1")),
      ("delete", KS.assignment("n3", "web1"))]),
])
def test_assignment_invariant_restored(kvs: list[RawKV], drop: tuple[str, ...], event: str,
                                       expect_ops: list[tuple[str, str]]) -> None:
    (up,) = txn_v2.assignment_upkeep(KS, model(*kvs, drop=drop), EPOCH)
    assert up.event == event
    assert ops(up.write) == expect_ops


def test_invalid_vm_is_not_repaired() -> None:
    m = model(raw(KS.spec("web1"), "{", 50), drop=(KS.assignment("n2", "web1"),))
    assert txn_v2.assignment_upkeep(KS, m, EPOCH) == []


# ---- confirm-off -------------------------------------------------------------------------------


def test_confirm_off_becomes_a_manual_fence_in_one_txn() -> None:
    m = model(confirm_kv("n4", 60), raw(KS.fence("n4"), {**fence_value("n4"),
                                                         "outcome": "failed"}, 55))
    (up,) = txn_v2.confirm_offs(KS, m, EPOCH, 9.0)
    assert set(up.write.txn.compares) == {
        Cmp(KS.leader, "create", "==", EPOCH), Cmp(KS.reg("n4"), "create", "==", 0),
        Cmp(KS.fence("n4"), "mod", "==", 55), Cmp(KS.confirm_off("n4"), "mod", "==", 60)}
    assert ops(up.write) == [("put", KS.fence("n4")), ("delete", KS.confirm_off("n4"))]
    put = up.write.txn.ops[0]
    assert isinstance(put, Put)
    rec = FenceRecord.model_validate_json(put.value)
    assert (rec.method, rec.outcome, rec.attempts, rec.device, rec.fenced_at) == (
        "manual", "success", 2, "operator:alice", 9.0)


@pytest.mark.parametrize(("extra", "why"), [
    ([confirm_kv("n2")], "registered"),
    ([confirm_kv("n4"), raw(KS.fence("n4"), fence_value("n4"), 55)], "already fenced"),
])
def test_confirm_off_not_applicable_is_dropped(extra: list[RawKV], why: str) -> None:
    (up,) = txn_v2.confirm_offs(KS, model(*extra), EPOCH, 9.0)
    assert up.event == "confirm_off_refused" and why in up.reason
    assert up.write.txn.ops == (Delete(up.write.txn.ops[0].key),)
    assert up.write.txn.compares[1] == Cmp(up.write.txn.ops[0].key, "mod", "==", 60)


# ---- every write within the orchestrator's role -----------------------------------------------


@pytest.mark.parametrize("prefix", ["/vmha", "/lab/x"])
def test_every_leader_write_fits_the_orchestrator_role(prefix: str) -> None:
    ks = KeyspaceV2(prefix)
    orch = role(ks, ORCHESTRATOR)
    writes: list[Write] = []
    for kvs, drop in [([], ()), ([raw(ks.spec("web1"), spec_value("web1", 2048), 50)], ()),
                      ([assignment("n4", "web1", boot("n4"), 31, ks=ks)], ()),
                      ([], (ks.spec("web1"),)),
                      ([confirm_kv("n4", ks=ks), confirm_kv("n2", ks=ks)], ())]:
        m = model(*kvs, drop=drop, ks=ks)
        writes += [u.write for u in txn_v2.assignment_upkeep(ks, m, EPOCH)]
        writes += [u.write for u in txn_v2.confirm_offs(ks, m, EPOCH, 1.0)]
    m = model(ks=ks)
    p = Placement.model_validate(placement_value("web1", boot("n4")))
    writes.append(txn_v2.placement(ks, m, planner.WritePlacement(p, 30, (("n5", 0),), 41),
                                   EPOCH))
    rec = FenceRecord.model_validate(fence_value("n5"))
    writes += [txn_v2.fence(ks, rec, 0, EPOCH),
               txn_v2.clear_move(ks, planner.ClearMove("web1", 9, "done"), EPOCH),
               txn_v2.clear_fence(ks, planner.ClearFence("n5", 9, "back"), EPOCH)]
    assert {w.what for w in writes} == {
        "spec refresh", "placement", "placement removed", "fence record (manual)",
        "confirm-off dropped", "fence record (self)", "clear move", "clear fence"}
    for w in writes:
        assert orch.denials(w.txn) == [], w.what


# ---- history ------------------------------------------------------------------------------


def test_history_prune_by_age_and_count_across_layouts() -> None:
    now = 1_767_229_300.0
    def eid(at: float, actor: str, seq: int) -> str:
        return f"{int(at * 1_000_000):017d}-{actor}-{seq:06d}"
    old = [KS.leader_event(eid(now - 500, "leader_o1", 1)),
           KS.node_event("n2", eid(now - 400, "agent_n2", 1)).encode(),
           KS.history + eid(now - 300, "cli", 1)]  # keyspace 1's layout
    new = [KS.leader_event(eid(now - 10 + i, "leader_o1", i)) for i in range(70)]
    keys = [*old, *new, KS.history + "junk", KS.history + "n/n2/junk"]
    (w,) = txn_v2.history_prune(KS, keys, now, retention_s=200, max_events=1000)
    assert w.txn.compares == () and len(w.txn.ops) == 3
    assert {o.key for o in w.txn.ops} == {k if isinstance(k, str) else k.decode() for k in old}
    batches = txn_v2.history_prune(KS, keys, now, retention_s=200, max_events=2)
    assert [len(b.txn.ops) for b in batches] == [64, 7]  # all but the newest 2, in batches
    doomed = {o.key for b in batches for o in b.txn.ops}
    assert doomed.isdisjoint(new[-2:]) and role(KS, ORCHESTRATOR).denials(batches[0].txn) == []
    assert txn_v2.history_prune(KS, new, now, retention_s=200, max_events=1000) == []


def test_parse_cache_parses_only_changed_keys() -> None:
    cache = ParseCache()
    kvs = base()
    first = leader_model(KS, 100, kvs, cache)
    assert cache.parsed == len(kvs)
    edited = raw(KS.spec("web1"), spec_value("web1", memory_mib=2048), 50)
    again = leader_model(KS, 101, [edited if kv.key == edited.key else kv for kv in kvs], cache)
    assert cache.parsed == len(kvs) + 1
    assert again.snapshot.specs["web1"].value.memory_mib == 2048
    assert again.snapshot.nodes["n2"] is first.snapshot.nodes["n2"]  # reused, not re-parsed
    assert again == leader_model(KS, 101, [edited if kv.key == edited.key else kv for kv in kvs])


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["boot", "migrate", "pending", "failed"]),
       node=st.one_of(st.none(), st.sampled_from(["n2", "n3", "N2", "n2/x", "", "a" * 70]),
                      st.text(max_size=8)),
       from_node=st.one_of(st.none(), st.sampled_from(["n2", "n3", "", "-n"]),
                           st.text(max_size=8)),
       with_assignment=st.booleans())
def test_no_placement_value_makes_the_upkeep_raise(kind: str, node: str | None,
                                                   from_node: str | None,
                                                   with_assignment: bool) -> None:
    """A hand-written placement the leader could not assign (a bad node name, a pending
    one naming a source) freezes its VM: the upkeep never raises on it, so one value
    cannot stop every decision."""
    place = raw(KS.place("web1"), placement_value("web1", {
        "kind": kind, "node": node, "from_node": from_node, "id": "p9"}), 30)
    drop = () if with_assignment else (KS.assignment("n2", "web1"), KS.assignment("n3", "web1"))
    m = model(place, drop=drop)
    for up in txn_v2.assignment_upkeep(KS, m, EPOCH):
        assert role(KS, ORCHESTRATOR).denials(up.write.txn) == []
    if "web1" not in m.snapshot.invalid_vms:
        p = m.snapshot.placements["web1"].value
        txn_v2.placement(KS, m, planner.WritePlacement(p, 30), EPOCH)
