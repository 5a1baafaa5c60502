"""Keyspace 2's writes (schemas.writes_v2) against its roles (schemas.acl): the contract
the leader and the agent on keyspace 2 build their transactions against.

Every write of the design's section 2 table is built here with KeyspaceV2; etcd would
accept each from its writer's role (every compare readable, every put and delete
writable) and refuse it from every other role, but for a short list of reviewed
exceptions.  The exact compares and ops of each row are checked too."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import writes_v2 as w
from schemas.acl import MONITORING, OPERATOR, ORCHESTRATOR, Role, node_ref, role
from schemas.events import Event
from schemas.keys import NAME_RE
from schemas.keys_v2 import KeyspaceV2
from schemas.models import (
    ClusterConfig,
    CordonMarker,
    FenceRecord,
    LeaderRecord,
    MoveRequest,
    Placement,
    VmSpec,
    VmStatus,
)
from schemas.models_v2 import Assignment, ConfirmOff
from schemas.txn import Cmp, Delete, Put
from tests.unit.builders import domain_xml

KS = KeyspaceV2()
EPOCH, TOKEN = 7, 21
EID = "01767229200310000-agent_n2-000004"


def spec(vm: str = "web1") -> VmSpec:
    return VmSpec(name=vm, domain_xml=domain_xml(vm), memory_mib=512, vcpus=1)


def placement(vm: str = "web1", kind: str = "migrate", node: str | None = "n3",
              from_node: str | None = "n2") -> Placement:
    return Placement(id="p1", vm=vm, node=node, kind=kind,  # type: ignore[arg-type]
                     from_node=from_node, epoch=EPOCH, reason="test", decided_at=1.0)


def status(node: str, vm: str = "web1", state: str = "stopped") -> VmStatus:
    return VmStatus(vm=vm, node=node, state=state, since=1.0)  # type: ignore[arg-type]


def fence(node: str, method: str = "self") -> FenceRecord:
    return FenceRecord(node=node, lease_id="ab", method=method,  # type: ignore[arg-type]
                       outcome="success", reason="lost", epoch=EPOCH, duration_s=1.0,
                       fenced_at=2.0)


def event(actor: str) -> Event:
    return Event(id=EID, at=1.0, kind="boot", actor=actor)


def table(ks: KeyspaceV2, me: str, peer: str, third: str) -> list[w.Write]:
    """One write of each row of the design's table, `me` the agent, `peer` the other
    node of a migration, `third` a lost node."""
    p = placement(node=peer, from_node=me)
    return [
        w.election(ks, LeaderRecord(id="l1", host="h", pid=1, lease_id="ff", elected_at=1.0),
                   lease=99),
        w.placement(ks, p, epoch=EPOCH, place_mod=30, spec=spec(), spec_revision=12,
                    assignments_seen={me: 40, third: 41}, fenced_holders={third: 5},
                    statuses_seen={me: 50, third: 51}),
        w.remove_placement(ks, "web1", epoch=EPOCH, place_mod=30,
                           assignments_seen={me: 40, peer: 42}),
        w.spec_refresh(ks, p, spec(), epoch=EPOCH, spec_revision=13,
                       assignments_seen={me: 40, peer: 42}),
        w.fence_record(ks, fence(third), epoch=EPOCH, fence_mod=0),
        w.fence_record(ks, fence(third, "manual"), epoch=EPOCH, fence_mod=3,
                       confirm_off_mod=60),
        w.clear_fence(ks, third, 4, epoch=EPOCH),
        w.clear_move(ks, "web1", 8, epoch=EPOCH),
        w.leader_event(ks, event("leader:l1")),
        w.prune_events(ks, [ks.leader_event(EID), ks.node_event(me, EID), ks.history + EID]),
        w.registration(ks, me, "{}", 1, "{}", 2),
        w.registration(ks, me, "{}", 1, "{}", 2, adopt_token=TOKEN),
        w.own_put(ks, me, TOKEN, ks.reg(me), "{}", 1),
        w.own_put(ks, me, TOKEN, ks.alive(me), "{}", 2),
        w.own_put(ks, me, TOKEN, ks.leaving(me), "{}"),
        w.agent_cordon(ks, me, CordonMarker(node=me, reason="drain", by="agent", at=1.0)),
        w.status_report(ks, me, TOKEN, status(me), own_mod=50, assignment_mod=40,
                        peer=(peer, 52)),
        w.status_report(ks, me, TOKEN, status(me, "orphan"), own_mod=0, assignment_mod=0),
        w.status_cleanup(ks, me, TOKEN, "web1", own_mod=50),
        *w.stale_claims(ks, me, [status(me, f"vm{i}") for i in range(3)]),
        w.node_event(ks, me, event(f"agent:{me}")),
        w.vm_add(ks, spec()),
        w.vm_edit(ks, spec(), 12),
        w.vm_remove(ks, "web1", 12),
        w.request_move(ks, MoveRequest(vm="web1", to=peer, by="op", requested_at=1.0)),
        w.cordon(ks, CordonMarker(node=third, reason="maintenance", by="op", at=1.0)),
        w.uncordon(ks, third),
        w.confirm_off(ks, ConfirmOff(node=third, by="op", reason="off", at=1.0)),
        w.set_config(ks, ClusterConfig()),
    ]


ROWS = {"election", "placement", "placement removed", "spec refresh", "fence record (self)",
        "fence record (manual)", "clear fence", "clear move", "history (leader)",
        "history prune", "registration", "adoption", "own key", "own cordon",
        "status report", "status clean-up", "stale claims", "history (agent)", "vm add",
        "vm edit", "vm remove", "move request", "cordon", "uncordon", "confirm off", "config"}

# Besides its writer, the roles etcd would also let send a write (all reviewed: none
# lets a node act for the leader or for another node).  The orchestrator may write
# move requests and confirm-offs (it deletes them) and any history (it prunes); the
# operator may delete a move request, and write a node's cordon, both its intent.
ALSO_ALLOWED = {
    "clear move": {"operator"},
    "own cordon": {"operator"},
    "history (agent)": {"orchestrator"},
    "move request": {"orchestrator"},
    "confirm off": {"orchestrator"},
}


def _roles(ks: KeyspaceV2, me: str, peer: str) -> dict[str, Role]:
    return {"orchestrator": role(ks, ORCHESTRATOR), "operator": role(ks, OPERATOR),
            "monitoring": role(ks, MONITORING), "node-me": role(ks, node_ref(me)),
            "node-peer": role(ks, node_ref(peer))}


def _check_contract(ks: KeyspaceV2, me: str, peer: str, third: str) -> None:
    roles = _roles(ks, me, peer)
    writes = table(ks, me, peer, third)
    assert {x.what for x in writes} == ROWS
    for x in writes:
        writer = "node-me" if x.writer == node_ref(me) else x.writer.kind
        assert roles[writer].denials(x.txn) == [], x.what
        allowed = {name for name, r in roles.items() if not r.denials(x.txn)}
        assert allowed == {writer} | ALSO_ALLOWED.get(x.what, set()), x.what


@pytest.mark.parametrize("prefix", ["/vmha", "/lab/x", "/vmha/n"])
@pytest.mark.parametrize(("me", "peer", "third"), [("n2", "n3", "n4"), ("n1", "n10", "n1-x"),
                                                  ("n1", "n1.x", "n1a"), ("n", "n1_x", "n1")])
def test_every_write_fits_its_writers_role_only(prefix: str, me: str, peer: str,
                                                third: str) -> None:
    _check_contract(KeyspaceV2(prefix), me, peer, third)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.from_regex(NAME_RE, fullmatch=True), min_size=3, max_size=3, unique=True))
def test_every_write_fits_for_generated_names(nodes: list[str]) -> None:
    _check_contract(KS, *nodes)


def test_roles_are_checked_for_real() -> None:
    """The check above is not vacuous: a txn that strays out of the role is refused."""
    n2 = role(KS, node_ref("n2"))
    x = w.status_report(KS, "n3", TOKEN, status("n3"), own_mod=1, assignment_mod=1)
    assert n2.denials(x.txn) == [
        "compare on /vmha/a/n3/web1 needs read permission",
        "put of /vmha/n/n3/vm/web1 needs write permission"]


# ---- the exact compares and ops of each row ------------------------------------------


def cmp(key: str, target: str, value: int) -> Cmp:
    return Cmp(key, target, "==", value)  # type: ignore[arg-type]


EPOCH_CMP = cmp("/vmha/leader", "create", EPOCH)


def test_placement_of_a_migration() -> None:
    p = placement(node="n3", from_node="n2")
    x = w.placement(KS, p, epoch=EPOCH, place_mod=30, spec=spec(), spec_revision=12,
                    assignments_seen={"n2": 40, "n4": 41}, fenced_holders={"n5": 5},
                    statuses_seen={"n2": 50, "n3": 51})
    assert x.writer == ORCHESTRATOR
    assert x.txn.compares == (
        EPOCH_CMP, cmp("/vmha/place/web1", "mod", 30),
        cmp("/vmha/a/n2/web1", "mod", 40), cmp("/vmha/a/n3/web1", "mod", 0),
        cmp("/vmha/a/n4/web1", "mod", 41),
        cmp("/vmha/n/n5/reg", "create", 0), cmp("/vmha/fence/n5", "mod", 5),
        cmp("/vmha/n/n2/vm/web1", "mod", 50), cmp("/vmha/n/n3/vm/web1", "mod", 51))
    a = Assignment(vm="web1", spec_revision=12, placement=p, spec=spec()).to_json()
    assert x.txn.ops == (Put("/vmha/place/web1", p.to_json()), Put("/vmha/a/n2/web1", a),
                         Put("/vmha/a/n3/web1", a), Delete("/vmha/a/n4/web1"))
    assert Assignment.from_json(a).placement == p  # each node sees the other's name


def test_pending_placement_deletes_every_assignment() -> None:
    p = placement(kind="pending", node=None, from_node=None)
    x = w.placement(KS, p, epoch=EPOCH, place_mod=30, spec=None, spec_revision=12,
                    assignments_seen={"n2": 40})
    assert x.txn.compares == (EPOCH_CMP, cmp("/vmha/place/web1", "mod", 30),
                              cmp("/vmha/a/n2/web1", "mod", 40))
    assert x.txn.ops == (Put("/vmha/place/web1", p.to_json()), Delete("/vmha/a/n2/web1"))
    with pytest.raises(ValueError, match="needs the spec"):
        w.placement(KS, placement(kind="boot", from_node=None), epoch=EPOCH, place_mod=0,
                    spec=None, spec_revision=1, assignments_seen={})


def test_removed_vm_drops_placement_and_assignments() -> None:
    x = w.remove_placement(KS, "web1", epoch=EPOCH, place_mod=30, assignments_seen={"n2": 40})
    assert x.txn.compares == (EPOCH_CMP, cmp("/vmha/spec/web1", "create", 0),
                              cmp("/vmha/place/web1", "mod", 30),
                              cmp("/vmha/a/n2/web1", "mod", 40))
    assert x.txn.ops == (Delete("/vmha/place/web1"), Delete("/vmha/a/n2/web1"))


def test_spec_refresh() -> None:
    p = placement(kind="boot", node="n2", from_node=None)
    x = w.spec_refresh(KS, p, spec(), epoch=EPOCH, spec_revision=13, assignments_seen={"n2": 40})
    a = Assignment(vm="web1", spec_revision=13, placement=p, spec=spec()).to_json()
    assert x.txn.compares == (EPOCH_CMP, cmp("/vmha/spec/web1", "mod", 13),
                              cmp("/vmha/a/n2/web1", "mod", 40))
    assert x.txn.ops == (Put("/vmha/a/n2/web1", a),)
    with pytest.raises(ValueError, match="no assignment"):
        w.spec_refresh(KS, placement(kind="pending", node=None, from_node=None), spec(),
                       epoch=EPOCH, spec_revision=13, assignments_seen={})


def test_manual_fence_consumes_the_confirm_off() -> None:
    rec = fence("n4", "manual")
    x = w.fence_record(KS, rec, epoch=EPOCH, fence_mod=3, confirm_off_mod=60)
    assert x.txn.compares == (EPOCH_CMP, cmp("/vmha/n/n4/reg", "create", 0),
                              cmp("/vmha/fence/n4", "mod", 3),
                              cmp("/vmha/confirm-off/n4", "mod", 60))
    assert x.txn.ops == (Put("/vmha/fence/n4", rec.to_json()), Delete("/vmha/confirm-off/n4"))
    with pytest.raises(ValueError):
        w.fence_record(KS, rec, epoch=EPOCH, fence_mod=3)
    with pytest.raises(ValueError):
        w.fence_record(KS, fence("n4"), epoch=EPOCH, fence_mod=3, confirm_off_mod=60)


def test_registration_and_adoption() -> None:
    new = w.registration(KS, "n2", "R", 1, "A", 2)
    assert new.txn.compares == (cmp("/vmha/n/n2/reg", "create", 0),)
    assert new.txn.ops == (Put("/vmha/n/n2/reg", "R", 1), Put("/vmha/n/n2/alive", "A", 2),
                           Delete("/vmha/n/n2/leaving"))
    adopt = w.registration(KS, "n2", "R", 1, "A", 2, adopt_token=TOKEN)
    assert adopt.txn.compares == (cmp("/vmha/n/n2/reg", "create", TOKEN),)
    assert adopt.txn.ops == new.txn.ops and adopt.writer == node_ref("n2")


def test_own_put_only_for_own_keys() -> None:
    x = w.own_put(KS, "n2", TOKEN, KS.leaving("n2"), "L")
    assert x.txn.compares == (cmp("/vmha/n/n2/reg", "create", TOKEN),)
    assert x.txn.ops == (Put("/vmha/n/n2/leaving", "L"),)
    for key in (KS.reg("n3"), KS.status("n2", "web1"), KS.cordon("n2")):
        with pytest.raises(ValueError):
            w.own_put(KS, "n2", TOKEN, key, "x")


def test_status_report_compares_and_refusals() -> None:
    s = status("n2")
    x = w.status_report(KS, "n2", TOKEN, s, own_mod=50, assignment_mod=40, peer=("n3", 52))
    assert x.txn.compares == (cmp("/vmha/n/n2/reg", "create", TOKEN),
                              cmp("/vmha/n/n2/vm/web1", "mod", 50),
                              cmp("/vmha/a/n2/web1", "mod", 40),
                              cmp("/vmha/n/n3/vm/web1", "mod", 52))
    assert x.txn.ops == (Put("/vmha/n/n2/vm/web1", s.to_json()),)
    with pytest.raises(ValueError, match="not 'n2'"):
        w.status_report(KS, "n2", TOKEN, status("n3"), own_mod=0, assignment_mod=0)
    with pytest.raises(ValueError):
        w.agent_cordon(KS, "n2", CordonMarker(node="n3", reason="r", by="b", at=1.0))


def test_status_cleanup() -> None:
    x = w.status_cleanup(KS, "n2", TOKEN, "web1", own_mod=50)
    assert x.txn.compares == (cmp("/vmha/n/n2/reg", "create", TOKEN),
                              cmp("/vmha/n/n2/vm/web1", "mod", 50),
                              cmp("/vmha/a/n2/web1", "create", 0))
    assert x.txn.ops == (Delete("/vmha/n/n2/vm/web1"),)


@pytest.mark.parametrize(("count", "sizes"), [(0, []), (1, [1]), (64, [64]), (65, [64, 1]),
                                              (130, [64, 64, 2])])
def test_stale_claims_in_batches_while_unregistered(count: int, sizes: Sequence[int]) -> None:
    writes = w.stale_claims(KS, "n2", [status("n2", f"vm{i}") for i in range(count)])
    assert [len(x.txn.ops) for x in writes] == sizes
    assert all(x.txn.compares == (cmp("/vmha/n/n2/reg", "create", 0),) for x in writes)
    keys = [op.key for x in writes for op in x.txn.ops]
    assert keys == [f"/vmha/n/n2/vm/vm{i}" for i in range(count)]
    with pytest.raises(ValueError):
        w.stale_claims(KS, "n2", [status("n3")])


def test_operator_spec_writes() -> None:
    assert w.vm_add(KS, spec()).txn.compares == (cmp("/vmha/spec/web1", "create", 0),)
    assert w.vm_edit(KS, spec(), 12).txn.compares == (cmp("/vmha/spec/web1", "mod", 12),)
    assert w.vm_edit(KS, spec(), 12).txn.ops == (Put("/vmha/spec/web1", spec().to_json()),)
    assert w.vm_remove(KS, "web1", 12).txn.compares == (cmp("/vmha/spec/web1", "mod", 12),)
    assert w.vm_remove(KS, "web1", 12).txn.ops == (Delete("/vmha/spec/web1"),)
