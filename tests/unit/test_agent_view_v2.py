"""The agent's keyspace-2 view chooses its keys (nodeagent.view_v2): its own ranges, the
peers an assignment names, the orphan domains' targeted reads, and that these are
enough: the agent plan's table, run through what the agent watches and reads, decides
as it does on keyspace 1 (but for the two cases keyspace 2 changes on purpose)."""

from __future__ import annotations

from typing import Any

import pytest

from hypervisor.base import Domain
from nodeagent.plan import plan
from nodeagent.view_v2 import assignments_of, orphans, own_ranges, peer_ranges
from schemas.keys_v2 import KeyspaceV2
from schemas.snapshot import RawKV
from schemas.snapshot_v2 import NodeView, node_snapshot
from store.paging import KeyRange
from tests.unit.builders import boot, cluster, migrate, raw
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


def test_orphans_are_managed_domains_without_any_assignment_key() -> None:
    kvs = [assignment_kv("n1", "web1", boot("n1")), raw(KS.assignment("n1", "web2"), "{", 9),
           assignment_kv("n2", "web3", boot("n2"))]
    assert orphans(KS, "n1", kvs, ["web1", "web2", "web3", "web4"]) == ["web3", "web4"]


def held(me: str, kvs: list[RawKV], domains: dict[str, Domain]) -> list[RawKV]:
    """What the agent holds by view_v2's choice: the watched ranges, then the targeted
    reads of its orphan domains."""
    watched = [kv for kv in kvs if within(own_ranges(KS, me), kv.key)]
    peers = peer_ranges(KS, me, watched)
    watched += [kv for kv in kvs if within(peers, kv.key)]
    managed = [d for d, dom in domains.items() if dom.managed]
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
