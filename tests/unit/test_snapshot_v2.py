"""Keyspace 2 read for the planners (schemas.snapshot_v2): the current-status rule, the
agent's node view as a ClusterSnapshot, and that no key or value makes either raise.

The strongest check runs the agent plan's own table (tests/unit/test_agent_plan.py) on
keyspace 2: each keyspace-1 snapshot is copied as `vmha keyspace migrate` will copy it,
cut down to what the agent holds, and the plan must decide the same, except where the
design changes the answer on purpose."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.base import Domain
from nodeagent.plan import Report, plan
from schemas import snapshot_v2
from schemas.keys_v2 import KeyspaceV2
from schemas.models import VmStatus
from schemas.models_v2 import Assignment
from schemas.snapshot import ClusterSnapshot, Entry, RawKV
from schemas.snapshot_v2 import (
    NodeView,
    ParsedKV,
    RefusedKV,
    current_status,
    current_statuses,
    node_snapshot,
    parse_kv,
)
from tests.unit.builders import (
    boot,
    cluster,
    migrate,
    node_value,
    placement_value,
    raw,
    spec_value,
    status_value,
)
from tests.unit.test_agent_plan import NODES, NOW, SCENARIOS

KS = KeyspaceV2()


def st_entry(node: str, mod: int, vm: str = "web1", state: str = "running") -> Entry[VmStatus]:
    v = VmStatus(vm=vm, node=node, state=state, since=1.0)  # type: ignore[arg-type]
    return Entry(v, KS.status(node, vm), mod, mod)


# ---- the current-status rule -------------------------------------------------------------


def test_current_status_is_the_newest_key() -> None:
    n2, n3, n4 = st_entry("n2", 50, state="stopped"), st_entry("n3", 70), st_entry("n4", 10)
    got = current_status([n2, n3, n4])
    assert got.current == n3
    assert got.superseded == (n2, n4)  # newest first
    assert current_status([]).current is None and current_status([]).superseded == ()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["n1", "n2", "n3", "n10"]), st.integers(1, 30)),
                max_size=6, unique_by=lambda t: t[0]), st.randoms())
def test_current_status_never_depends_on_order(keys: list[tuple[str, int]], rnd: Any) -> None:
    entries = [st_entry(n, m) for n, m in keys]
    shuffled = list(entries)
    rnd.shuffle(shuffled)
    a, b = current_status(entries), current_status(shuffled)
    assert a == b
    if entries:
        assert a.current is not None
        assert a.current.mod_revision == max(m for _, m in keys)
        assert sorted([a.current, *a.superseded], key=lambda e: e.key) == sorted(
            entries, key=lambda e: e.key)


def test_current_statuses_grouped_by_vm() -> None:
    got = current_statuses([st_entry("n2", 5, "a"), st_entry("n3", 9, "a"),
                            st_entry("n2", 7, "b")])
    assert {vm: c.current.key for vm, c in got.items() if c.current} == {
        "a": "/vmha/n/n3/vm/a", "b": "/vmha/n/n2/vm/b"}


# ---- one key ------------------------------------------------------------------------------


def assignment_kv(node: str, vm: str, pdata: dict[str, Any], mod: int = 40,
                  spec_revision: int = 12) -> RawKV:
    a = {"schema": 1, "vm": vm, "spec_revision": spec_revision,
         "placement": placement_value(vm, pdata), "spec": spec_value(vm)}
    return raw(KS.assignment(node, vm), a, mod)


def status_kv(node: str, vm: str, state: str, mod: int, pid: str | None = "p1") -> RawKV:
    return raw(KS.status(node, vm), status_value(vm, {"node": node, "state": state,
                                                       "placement_id": pid}), mod)


@pytest.mark.parametrize(("kv", "kind", "name", "fragment"), [
    (replace(status_kv("n2", "web1", "running", 5), key=KS.status("n3", "web1")),
     "vm_status", "web1", "field 'node': is 'n2' but the key names 'n3'"),
    (assignment_kv("n2", "web1", boot("n3")), "vm_placement", "web1",
     "names ['n3'], not 'n2'"),
    (raw(KS.spec("web1"), spec_value("web2")), "vm_spec", "web1", "is 'web2'"),
    (raw(KS.reg("n1"), node_value("n2")), "node", "n1", "is 'n2'"),
    (raw(KS.place("web1"), "{"), "vm_placement", "web1", "not valid JSON"),
    (raw("/vmha/a/n1/Web1", "{}"), "vm_placement", "Web1", "invalid VM name"),
    (raw("/vmha/n/n1/vm/web1/x", "{}"), "unknown", "", "segment"),
    (raw(b"/vmha/n/n\xff/reg", "{}"), "node", "n\\xff", "invalid node name"),  # type: ignore[arg-type]
    (raw(KS.leader_event("01767229200310000-x-000001"),
         {"schema": 1, "id": "01767229200310000-x-000002", "at": 1.0, "kind": "boot",
          "actor": "x"}), "leader_event", "", "field 'id'"),
])
def test_refused_keys(kv: RawKV, kind: str, name: str, fragment: str) -> None:
    got = parse_kv(KS, kv)
    assert isinstance(got, RefusedKV)
    assert (got.invalid.kind, got.invalid.name) == (kind, name)
    assert fragment in got.invalid.message


def test_parsed_key_keeps_its_revisions() -> None:
    got = parse_kv(KS, raw(KS.reg("n1"), node_value("n1"), 9, create_revision=3, lease=77))
    assert isinstance(got, ParsedKV)
    assert (got.ref.kind, got.ref.node) == ("reg", "n1")
    assert (got.entry.key, got.entry.create_revision, got.entry.mod_revision,
            got.entry.lease) == ("/vmha/n/n1/reg", 3, 9, 77)
    assert parse_kv(KS, raw("/elsewhere/x", "{}")) is None


def test_an_unchanged_key_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent parses its keys at every cycle; most are unchanged since the last one.
    A key-value equal in every field gives the same result without parsing again; a
    new value, revision or lease, or another prefix, is parsed."""
    parsed: list[str] = []
    fresh = snapshot_v2.parse_kv_fresh

    def counting(ks: KeyspaceV2, kv: RawKV) -> ParsedKV | RefusedKV | None:
        parsed.append(kv.key)
        return fresh(ks, kv)

    monkeypatch.setattr(snapshot_v2, "parse_kv_fresh", counting)
    monkeypatch.setattr(snapshot_v2, "_memo", {})
    kv = raw(KS.spec("memo1"), spec_value("memo1"), 40)
    first = parse_kv(KS, kv)
    assert isinstance(first, ParsedKV)
    assert parse_kv(KS, replace(kv)) is first and len(parsed) == 1  # equal, not the same
    for changed in (replace(kv, mod_revision=41), replace(kv, lease=5),
                    replace(kv, value=json.dumps(spec_value("memo1", 2048)).encode())):
        got = parse_kv(KS, changed)
        assert isinstance(got, ParsedKV) and got.entry.mod_revision == changed.mod_revision
    assert len(parsed) == 4
    assert parse_kv(KeyspaceV2("/other"), raw("/other/spec/memo1", spec_value("memo1"), 40))
    assert len(parsed) == 5
    bad = raw(KS.spec("memo1"), "{", 42)
    assert isinstance(parse_kv(KS, bad), RefusedKV) and isinstance(parse_kv(KS, bad), RefusedKV)
    assert len(parsed) == 6, "a refused key is remembered too"


def test_the_parse_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot_v2, "_memo", {})
    monkeypatch.setattr(snapshot_v2, "_MEMO_MAX", 10)
    for i in range(25):
        parse_kv(KS, raw(KS.reg(f"n{i}"), node_value(f"n{i}"), 9))
        assert len(snapshot_v2._memo) <= 10


# ---- the node view ------------------------------------------------------------------------


def view(me: str, *kvs: RawKV, revision: int = 100) -> NodeView:
    return NodeView(me, revision, tuple(kvs))


def test_migration_source_sees_its_peer_and_the_newest_status() -> None:
    kvs = [raw(KS.config, {"schema": 1, "fence_margin_s": 1.5}, 3),
           raw(KS.reg("n2"), node_value("n2"), 5, create_revision=4, lease=1),
           raw(KS.reg("n3"), node_value("n3"), 6),
           raw(KS.reg("n4"), node_value("n4"), 7),  # named by no assignment: not held
           raw(KS.alive("n2"), {"schema": 1, "node": "n2", "lease_id": "2", "at": 1.0}, 8),
           raw(KS.cordon("n2"), {"schema": 1, "node": "n2", "reason": "r", "by": "b",
                                 "at": 1.0}, 9),
           raw(KS.cordon("n3"), {"schema": 1, "node": "n3", "reason": "r", "by": "b",
                                 "at": 1.0}, 10),
           assignment_kv("n2", "web1", migrate("n2", "n3"), mod=40, spec_revision=12),
           assignment_kv("n3", "web1", migrate("n2", "n3"), mod=40),  # n3's: not n2's
           status_kv("n2", "web1", "migrating", 50),
           status_kv("n3", "web1", "running", 51),
           status_kv("n4", "web1", "running", 99),  # n4 is no peer of web1
           raw(KS.place("web1"), placement_value("web1", boot("n4")), 98),  # assignment wins
           raw(KS.fence("n4"), {"schema": 1}, 11)]  # not the agent's: ignored, not reported
    snap = node_snapshot(KS, view("n2", *kvs))
    assert snap.revision == 100 and snap.config.fence_margin_s == 1.5
    assert set(snap.nodes) == {"n2", "n3"}
    assert snap.nodes["n2"].create_revision == 4 and snap.nodes["n2"].lease == 1
    assert set(snap.cordons) == {"n2"} and set(snap.alive) == {"n2"}
    p = snap.placements["web1"]
    assert (p.value.kind, p.value.node, p.value.from_node) == ("migrate", "n3", "n2")
    assert (p.key, p.mod_revision) == ("/vmha/a/n2/web1", 40)
    s = snap.specs["web1"]
    assert (s.key, s.mod_revision, s.value.name) == ("/vmha/spec/web1", 12, "web1")
    cur = snap.statuses["web1"]
    assert (cur.key, cur.value.node, cur.value.state) == ("/vmha/n/n3/vm/web1", "n3", "running")
    assert snap.invalid == () and snap.leader is None and not snap.fences and not snap.moves


def test_domain_without_assignment_uses_targeted_reads() -> None:
    kvs = [raw(KS.reg("n2"), node_value("n2"), 5),
           raw(KS.place("web9"), placement_value("web9", boot("n4")), 20),
           raw(KS.spec("web9"), spec_value("web9"), 21),
           status_kv("n2", "web9", "running", 22, pid=None)]
    snap = node_snapshot(KS, view("n2", *kvs))
    assert snap.placements["web9"].key == "/vmha/place/web9"
    assert snap.specs["web9"].mod_revision == 21
    assert snap.statuses["web9"].value.node == "n2"
    # ... and the plan stops a domain placed elsewhere, as keyspace 1 did.
    acts = plan("n2", snap, {"web9": Domain("web9", "running")}, now=NOW)
    assert [type(a).__name__ for a in acts] == ["Destroy"]


def test_a_refused_key_leaves_its_vm_alone() -> None:
    bad_assignment = raw(KS.assignment("n2", "web1"), {"schema": 1, "vm": "web1"}, 40)
    foreign = assignment_kv("n2", "web2", boot("n5"))  # names n5, held by n2
    bad_peer = raw(KS.status("n3", "web3"), "{", 60)
    kvs = [bad_assignment, foreign, assignment_kv("n2", "web3", migrate("n2", "n3")),
           bad_peer, raw(KS.status("n9", "web3"), "{", 61),  # no peer: not held, not told
           raw(KS.reg("n2"), "[]", 5)]
    snap = node_snapshot(KS, view("n2", *kvs))
    assert snap.invalid_vms == {"web1", "web2", "web3"}
    assert snap.invalid_nodes == {"n2"}
    assert {i.key for i in snap.invalid} == {bad_assignment.key, foreign.key, bad_peer.key,
                                            KS.reg("n2")}
    assert len(snap.errors) == 4
    assert plan("n2", snap, {"web1": Domain("web1", "running")}, now=NOW) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(
    st.one_of(st.sampled_from([KS.reg("n2"), KS.assignment("n2", "web1"), KS.status("n2", "web1"),
                               KS.status("n3", "web1"), KS.config, KS.cordon("n2"),
                               KS.place("web1"), KS.spec("web1"), KS.version]),
              st.text(max_size=30).map(lambda t: "/vmha/" + t),
              st.binary(max_size=30).map(lambda b: b"/vmha/n/" + b)),
    st.one_of(st.binary(max_size=60), st.sampled_from([
        b"{}", b'{"schema": 1}', b"[" * 5000, b"\xff",
        json.dumps(placement_value("web1", boot("n2"))).encode(),
        json.dumps(node_value("n2")).encode()])),
    st.integers(-5, 10**20)), max_size=12))
def test_no_view_makes_the_adapter_raise(items: list[tuple[Any, bytes, int]]) -> None:
    kvs = [RawKV(k, v, m, m) for k, v, m in items]
    kvs.append(assignment_kv("n2", "web1", migrate("n2", "n3")))
    snap = node_snapshot(KS, view("n2", *kvs))
    assert isinstance(snap, ClusterSnapshot)
    assert len(snap.errors) == len(snap.invalid)
    plan("n2", snap, {"web1": Domain("web1", "running")}, now=NOW)


# ---- the agent plan's table, on keyspace 2 ------------------------------------------------


def to_v2(v1: ClusterSnapshot) -> list[RawKV]:
    """Every key of a keyspace-1 snapshot as section 6 copies it (same values and
    revisions; an assignment per node a placement names, in its txn: same revision)."""
    out: list[RawKV] = []
    if v1.config_entry:
        e = v1.config_entry
        out.append(RawKV(KS.config, e.value.to_json().encode(), e.create_revision,
                         e.mod_revision))
    for n, e in v1.nodes.items():
        out.append(RawKV(KS.reg(n), e.value.to_json().encode(), e.create_revision,
                         e.mod_revision, e.lease))
    for n, e in v1.cordons.items():
        out.append(RawKV(KS.cordon(n), e.value.to_json().encode(), e.create_revision,
                         e.mod_revision))
    for vm, e in v1.specs.items():
        out.append(RawKV(KS.spec(vm), e.value.to_json().encode(), e.create_revision,
                         e.mod_revision))
    for vm, pe in v1.placements.items():
        p = pe.value
        out.append(RawKV(KS.place(vm), p.to_json().encode(), pe.create_revision,
                         pe.mod_revision))
        se = v1.specs.get(vm)
        for node in {n for n in (p.node, p.from_node) if n}:
            if se is not None:
                a = Assignment(vm=vm, spec_revision=se.mod_revision, placement=p,
                               spec=se.value)
                out.append(RawKV(KS.assignment(node, vm), a.to_json().encode(),
                                 pe.create_revision, pe.mod_revision))
    for vm, e in v1.statuses.items():
        out.append(RawKV(KS.status(e.value.node, vm), e.value.to_json().encode(),
                         e.create_revision, e.mod_revision))
    return out


def held_by(me: str, kvs: list[RawKV], domains: dict[str, Domain]) -> list[RawKV]:
    """What agent `me` holds: everything of its own and the peers' keys the adapter
    picks itself, but `place/VM` and `spec/VM` only for a managed domain without an
    assignment (its targeted reads)."""
    assigned = {KS.parse(kv.key).vm for kv in kvs  # type: ignore[union-attr]
                if kv.key.startswith(KS.assignments(me))}
    orphans = {d for d, dom in domains.items() if dom.managed} - assigned
    targeted = {KS.place(vm) for vm in orphans} | {KS.spec(vm) for vm in orphans}
    return [kv for kv in kvs if not kv.key.startswith((KS.place_dir, KS.spec_dir))
            or kv.key in targeted]


# Where keyspace 2 decides otherwise, on purpose (docs/keyspace-v2.md, section 1):
DIFFERENT = {
    # Another node's status of a VM placed here is no peer's: the own key is compared,
    # and it is absent (0), where keyspace 1 compared the single key (70).
    "report-over-other-nodes-status": lambda acts: acts == [
        Report("vm1", "running", "p1", 0, "runs here as placed")],
    # A stale claim for a VM with neither assignment nor domain here is not reported
    # stopped by the plan: the agent rewrites such claims before registering and
    # deletes its own status once it has neither (section 1, "Clean-up").
    "status-migrating-here-but-not-reported-stopped": lambda acts: acts == [],
}


@pytest.mark.parametrize(("me", "snap_args", "domains", "expected"), SCENARIOS)
def test_agent_plan_table_on_keyspace_2(request: pytest.FixtureRequest, me: str,
                                        snap_args: dict[str, Any], domains: list[Domain],
                                        expected: list[Any]) -> None:
    by_name = {d.name: d for d in domains}
    v1 = cluster(**{"nodes": NODES, **snap_args})
    v1_acts = plan(me, v1, by_name, now=NOW)
    assert v1_acts == expected  # the table still holds on keyspace 1
    snap = node_snapshot(KS, NodeView(me, v1.revision, tuple(held_by(me, to_v2(v1), by_name))))
    assert snap.invalid == ()
    v2_acts = plan(me, snap, by_name, now=NOW)
    case = request.node.callspec.id
    if case in DIFFERENT:
        assert v2_acts != v1_acts and DIFFERENT[case](v2_acts), v2_acts
    else:
        assert v2_acts == v1_acts
