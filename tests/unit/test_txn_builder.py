"""The leader's writes as values: each planner action -> the exact compares and ops.

No etcd here: the builder is pure.  That these compares really protect the writes
against etcd is tested in tests/integration (test_cluster, test_leader_writes)."""

from __future__ import annotations

import pytest

from orchestrator import planner, txn_builder
from schemas.keys import Keyspace
from schemas.models import FenceRecord, Placement
from schemas.txn import Cmp, Delete, Put, Txn

KS = Keyspace()
EPOCH = 41
TOKEN = Cmp("/vmha/leader", "create", "==", EPOCH)


def placement(**kw: object) -> Placement:
    fields: dict[str, object] = dict(id="p1", vm="web", node="n2", kind="boot", epoch=EPOCH,
                                     reason="test", decided_at=1.0)
    fields.update(kw)
    return Placement(**fields)  # type: ignore[arg-type]


def fence(node: str = "n1", method: str = "self") -> FenceRecord:
    return FenceRecord(node=node, lease_id="abc", method=method,  # type: ignore[arg-type]
                       outcome="success", reason="lost", epoch=EPOCH, duration_s=1.0,
                       fenced_at=2.0)


def test_epoch_compare_is_the_leader_keys_create_revision() -> None:
    assert txn_builder.epoch_compare(KS, EPOCH) == TOKEN
    assert txn_builder.epoch_compare(Keyspace("/other"), 3) == Cmp("/other/leader", "create",
                                                                   "==", 3)


def test_new_placement_requires_the_key_absent() -> None:
    p = placement()
    txn = txn_builder.placement(KS, planner.WritePlacement(p, 0), EPOCH)
    assert txn == Txn((TOKEN, Cmp("/vmha/vms/web/placement", "mod", "==", 0)),
                      (Put("/vmha/vms/web/placement", p.to_json()),))


def test_placement_update_compares_its_revision_and_every_fenced_holder() -> None:
    p = placement(kind="boot", node="n3")
    action = planner.WritePlacement(p, 17, fenced_holders=(("n1", 30), ("n2", 31)))
    txn = txn_builder.placement(KS, action, EPOCH)
    assert txn.compares == (
        TOKEN,
        Cmp("/vmha/vms/web/placement", "mod", "==", 17),
        Cmp("/vmha/nodes/n1", "create", "==", 0),
        Cmp("/vmha/fence/n1", "mod", "==", 30),
        Cmp("/vmha/nodes/n2", "create", "==", 0),
        Cmp("/vmha/fence/n2", "mod", "==", 31),
    )
    assert txn.ops == (Put("/vmha/vms/web/placement", p.to_json()),)
    assert all(isinstance(o, Put) and o.lease == 0 for o in txn.ops)  # never leased


def test_self_fence_requires_the_node_unregistered_and_its_record_as_seen() -> None:
    rec = fence("n1")
    action = planner.FenceNode("n1", "abc", "lost", expect_mod_revision=12)
    txn = txn_builder.self_fence(KS, action, rec, EPOCH)
    assert txn == Txn((TOKEN, Cmp("/vmha/nodes/n1", "create", "==", 0),
                       Cmp("/vmha/fence/n1", "mod", "==", 12)),
                      (Put("/vmha/fence/n1", rec.to_json()),))


def test_first_self_fence_requires_no_record() -> None:
    txn = txn_builder.self_fence(KS, planner.FenceNode("n1", "abc", "lost"), fence("n1"), EPOCH)
    assert txn.compares[-1] == Cmp("/vmha/fence/n1", "mod", "==", 0)


def test_self_fence_refuses_a_record_for_another_node_or_an_external_action() -> None:
    with pytest.raises(ValueError):
        txn_builder.self_fence(KS, planner.FenceNode("n1", "abc", "lost"), fence("n2"), EPOCH)
    with pytest.raises(ValueError):
        txn_builder.self_fence(KS, planner.FenceNode("n1", "abc", "lost", method="external"),
                               fence("n1"), EPOCH)


def test_external_fence_result_has_the_same_compares_as_a_self_fence() -> None:
    rec = fence("n4", method="external")
    txn = txn_builder.fence_record(KS, rec, 9, EPOCH)
    assert txn == Txn((TOKEN, Cmp("/vmha/nodes/n4", "create", "==", 0),
                       Cmp("/vmha/fence/n4", "mod", "==", 9)),
                      (Put("/vmha/fence/n4", rec.to_json()),))


def test_clear_move_deletes_only_the_request_it_saw() -> None:
    txn = txn_builder.clear_move(KS, planner.ClearMove("web", 55, "done"), EPOCH)
    assert txn == Txn((TOKEN, Cmp("/vmha/vms/web/move", "mod", "==", 55)),
                      (Delete("/vmha/vms/web/move"),))


def test_clear_fence_deletes_only_the_record_it_saw() -> None:
    txn = txn_builder.clear_fence(KS, planner.ClearFence("n1", 66, "back"), EPOCH)
    assert txn == Txn((TOKEN, Cmp("/vmha/fence/n1", "mod", "==", 66)),
                      (Delete("/vmha/fence/n1"),))


def test_clears_share_one_shape() -> None:
    assert txn_builder.clear_move(KS, planner.ClearMove("web", 5, "x"), EPOCH) == \
        txn_builder.delete_unchanged(KS, KS.vm_move("web"), 5, EPOCH)
    assert txn_builder.clear_fence(KS, planner.ClearFence("n1", 6, "x"), EPOCH) == \
        txn_builder.delete_unchanged(KS, KS.fence("n1"), 6, EPOCH)


@pytest.mark.parametrize("build", [
    lambda e: txn_builder.placement(KS, planner.WritePlacement(placement(), 0), e),
    lambda e: txn_builder.self_fence(KS, planner.FenceNode("n1", "a", "r"), fence("n1"), e),
    lambda e: txn_builder.fence_record(KS, fence("n1", "external"), 0, e),
    lambda e: txn_builder.clear_move(KS, planner.ClearMove("web", 1, "r"), e),
    lambda e: txn_builder.clear_fence(KS, planner.ClearFence("n1", 1, "r"), e),
])
def test_every_write_starts_with_the_epoch_compare(build: object) -> None:
    for epoch in (1, 7, 10 ** 6):
        txn = build(epoch)  # type: ignore[operator]
        assert txn.compares[0] == Cmp("/vmha/leader", "create", "==", epoch)
