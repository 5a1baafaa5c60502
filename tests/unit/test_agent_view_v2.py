"""The agent's keyspace-2 view chooses its keys (nodeagent.view_v2): its own ranges, the
peers an assignment names, the orphan domains' targeted reads, and that these are
enough: the agent plan's table, run through what the agent watches and reads, decides
as it does on keyspace 1 (but for the two cases keyspace 2 changes on purpose)."""

from __future__ import annotations

from typing import Any

import pytest

from hypervisor.base import Domain
from nodeagent.plan import plan
from nodeagent.view_v2 import (
    assignments_of,
    failure_records,
    orphans,
    own_ranges,
    peer_ranges,
    record_ranges,
)
from schemas.acl import node_ref, role
from schemas.keys_v2 import KeyspaceV2
from schemas.snapshot import RawKV
from schemas.snapshot_v2 import NodeView, node_snapshot
from store.paging import KeyRange
from tests.unit.builders import boot, cluster, migrate, placement_value, raw, status_value
from tests.unit.test_agent_plan import NODES, NOW, SCENARIOS
from tests.unit.test_snapshot_v2 import DIFFERENT, assignment_kv, status_kv, to_v2

KS = KeyspaceV2()


def within(ranges: Any, key: str) -> bool:
    return any(r.contains(key.encode()) for r in ranges)


def test_own_ranges_are_disjoint_and_cover_no_other_node() -> None:
    ranges = own_ranges(KS, "n1")
    for i, a in enumerate(ranges):
        for b in ranges[i + 1:]:
            assert not a.overlaps(b), (a, b)
    mine = [KS.assignment("n1", "web1"), KS.reg("n1"), KS.alive("n1"), KS.leaving("n1"),
            KS.status("n1", "web1"), KS.cordon("n1"), KS.config, KS.version]
    assert all(within(ranges, k) for k in mine)
    others = [KS.assignment(n, "web1") for n in ("n10", "n1-x", "n1.x", "n1_x", "n")]
    others += [KS.reg("n10"), KS.status("n1a", "web1"), KS.cordon("n10"), KS.leader,
               KS.place("web1"), KS.spec("web1"), KS.fence("n1"), KS.node_event("n1", "1" * 17
                                                                              + "-a-000001")]
    assert not any(within(ranges, k) for k in others)


def test_peers_follow_the_assignments() -> None:
    kvs = [assignment_kv("n1", "web1", migrate("n2", "n1")),   # n1 the target: n2 the peer
           assignment_kv("n1", "web2", migrate("n1", "n3")),   # n1 the source: n3
           assignment_kv("n1", "web3", boot("n1")),            # no peer
           assignment_kv("n1", "web4", migrate("n2", "n1")),   # n2 again: one reg key
           assignment_kv("n2", "web5", migrate("n2", "n4")),   # not n1's
           raw(KS.assignment("n1", "web6"), "{", 9)]           # invalid: no peer
    assert set(assignments_of(KS, "n1", kvs)) == {"web1", "web2", "web3", "web4"}
    assert peer_ranges(KS, "n1", kvs) == {
        KeyRange.key(k) for k in (KS.reg("n2"), KS.status("n2", "web1"), KS.reg("n3"),
                                  KS.status("n3", "web2"), KS.status("n2", "web4"))}
    assert peer_ranges(KS, "n1", kvs[2:3]) == frozenset()


def failed_status(node: str, vm: str, mod: int, **counts: Any) -> RawKV:
    return raw(KS.status(node, vm), status_value(vm, {
        "node": node, "state": "stopped", "placement_id": "p1", "error": f"refused on {node}",
        **(counts or {"boot_failures": 3})}), mod)


def test_the_nodes_given_up_on_are_read_for_their_status_alone() -> None:
    """The relocation's node reads the status of each node its placement gave up on,
    not their registrations (no migration peer); an assignment whose placement names a
    node that cannot be one does not parse, and is read for nothing."""
    kvs = [assignment_kv("n2", "bad", boot("n2", "p2", failed_nodes=["n1", "n2"])),
           assignment_kv("n2", "web", migrate("n3", "n2", failed_nodes=["n3"]))]
    assert peer_ranges(KS, "n2", kvs) == {KeyRange.key(k) for k in (
        KS.status("n1", "bad"), KS.reg("n3"), KS.status("n3", "web"))}
    hostile = assignment_kv("n2", "odd", boot("n2", "p3", failed_nodes=["n1", "../x"]))
    assert peer_ranges(KS, "n2", [hostile]) == frozenset()
    # What it holds: the newest of its own and their statuses is the VM's current one,
    # the error keyspace 1's single key showed it; another node's is not held.
    n1 = failed_status("n1", "bad", 50)
    n3 = failed_status("n3", "bad", 55)
    mine = held("n2", [*kvs, n1, n3], {})
    assert n1 in mine and n3 not in mine
    snap = node_snapshot(KS, NodeView("n2", 60, tuple(mine)))
    assert snap.statuses["bad"].value.error == "refused on n1"
    own = failed_status("n2", "bad", 58)
    snap = node_snapshot(KS, NodeView("n2", 60, tuple(held("n2", [*kvs, n1, own], {}))))
    assert snap.statuses["bad"].value.node == "n2"


def test_a_node_follows_the_placement_of_each_failure_it_records() -> None:
    """An own status counting failures, with neither an assignment nor a managed domain
    here, has its VM's placement watched (the agent keeps it while that placement names
    the node among those given up on); no other status does."""
    kvs = [failed_status("n1", "bad", 50),
           failed_status("n1", "crashy", 51, crashes=2),
           status_kv("n1", "moved", "stopped", 52),                # no failure: not kept
           failed_status("n1", "here", 53), assignment_kv("n1", "here", boot("n1")),
           failed_status("n1", "defined", 54),                     # a domain here
           raw(KS.status("n1", "junk"), "{", 55),                  # does not parse
           failed_status("n2", "other", 56)]                       # not n1's
    assert sorted(failure_records(KS, "n1", kvs, ["defined"])) == ["bad", "crashy"]
    assert record_ranges(KS, "n1", kvs, ["defined"]) == {KeyRange.key(KS.place("bad")),
                                                         KeyRange.key(KS.place("crashy"))}
    # Each key followed (single keys) is one the node's role may read, not write.
    followed = {("n1", r) for r in record_ranges(KS, "n1", kvs, ["defined"])}
    followed |= {("n2", r) for r in peer_ranges(KS, "n2", [
        assignment_kv("n2", "bad", boot("n2", "p2", failed_nodes=["n1"]))])}
    assert len(followed) == 3 and all(r.end == b"" for _, r in followed)
    assert all(role(KS, node_ref(n)).can_read(r.start)
               and not role(KS, node_ref(n)).can_write(r.start) for n, r in followed)
    place = raw(KS.place("bad"), placement_value("bad", {"kind": "failed", "node": None,
                                                         "id": "p2", "failed_nodes": ["n1"]}))
    mine = held("n1", [*kvs, place], {})
    assert place in mine
    snap = node_snapshot(KS, NodeView("n1", 60, tuple(mine)))
    assert snap.invalid_vms == {"junk"} and "bad" not in snap.specs
    assert snap.placements["bad"].value.failed_nodes == ["n1"]


def test_orphans_are_managed_domains_without_any_assignment_key() -> None:
    kvs = [assignment_kv("n1", "web1", boot("n1")), raw(KS.assignment("n1", "web2"), "{", 9),
           assignment_kv("n2", "web3", boot("n2"))]
    assert orphans(KS, "n1", kvs, ["web1", "web2", "web3", "web4"]) == ["web3", "web4"]


def held(me: str, kvs: list[RawKV], domains: dict[str, Domain]) -> list[RawKV]:
    """What the agent holds by view_v2's choice: the watched ranges, then the targeted
    reads of its orphan domains."""
    watched = [kv for kv in kvs if within(own_ranges(KS, me), kv.key)]
    managed = [d for d, dom in domains.items() if dom.managed]
    followed = peer_ranges(KS, me, watched) | record_ranges(KS, me, watched, managed)
    watched += [kv for kv in kvs if within(followed, kv.key)]
    targeted = {k for vm in orphans(KS, me, watched, managed)
                for k in (KS.place(vm), KS.spec(vm))}
    return watched + [kv for kv in kvs if kv.key in targeted]


@pytest.mark.parametrize(("me", "snap_args", "domains", "expected"), SCENARIOS)
def test_agent_plan_table_through_the_watched_view(
        request: pytest.FixtureRequest, me: str, snap_args: dict[str, Any],
        domains: list[Domain], expected: list[Any]) -> None:
    by_name = {d.name: d for d in domains}
    v1 = cluster(**{"nodes": NODES, **snap_args})
    assert plan(me, v1, by_name, now=NOW) == expected
    # Another node's keys besides: none of them may be held.
    noise = [status_kv("zz", "vm1", "running", 10**6), assignment_kv("zz", "vm1", boot("zz"))]
    kvs = to_v2(v1) + noise
    mine = held(me, kvs, by_name)
    assert not any(kv in mine for kv in noise)
    snap = node_snapshot(KS, NodeView(me, v1.revision, tuple(mine)))
    assert snap.invalid == ()
    acts = plan(me, snap, by_name, now=NOW)
    case = request.node.callspec.id
    if case in DIFFERENT:
        assert DIFFERENT[case](acts), acts
    else:
        assert acts == expected
