"""Names are checked with a full match and sizes have upper bounds (schemas.models): a
value past them is refused by validation, so the CLI exits 2 and a daemon that reads it
from etcd reports an invalid key and leaves it alone."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from schemas import SchemaError
from schemas.models import (
    MAX_MEMORY_MIB,
    MAX_PRIORITY,
    MAX_VCPUS,
    MIN_PRIORITY,
    Capacity,
    MoveRequest,
    NodeRegistration,
    VmSpec,
)
from schemas.snapshot import ClusterSnapshot
from tests.unit.builders import KS, node_value, raw, spec_value


def _spec(**kw: Any) -> VmSpec:
    return VmSpec.parse_dict({**spec_value("v"), **kw})


def test_documented_limits() -> None:
    assert MAX_MEMORY_MIB == 16 * 1024 * 1024  # 16 TiB
    assert MAX_VCPUS == 4096
    assert (MIN_PRIORITY, MAX_PRIORITY) == (-1_000_000, 1_000_000)


@pytest.mark.parametrize(("field", "ok", "bad"), [
    ("memory_mib", MAX_MEMORY_MIB, MAX_MEMORY_MIB + 1),
    ("memory_mib", MAX_MEMORY_MIB, 10**30),
    ("vcpus", MAX_VCPUS, MAX_VCPUS + 1),
    ("priority", MAX_PRIORITY, MAX_PRIORITY + 1),
    ("priority", MIN_PRIORITY, MIN_PRIORITY - 1),
])
def test_vm_sizes_and_priority_are_bounded(field: str, ok: int, bad: int) -> None:
    assert getattr(_spec(**{field: ok}), field) == ok
    with pytest.raises(SchemaError, match=field):
        _spec(**{field: bad})


@pytest.mark.parametrize("capacity", [{"memory_mib": 10**30, "vcpus": 8},
                                      {"memory_mib": MAX_MEMORY_MIB + 1, "vcpus": 8},
                                      {"memory_mib": 8192, "vcpus": MAX_VCPUS + 1}])
def test_node_capacity_is_bounded(capacity: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        Capacity(**capacity)
    with pytest.raises(SchemaError, match="capacity"):
        NodeRegistration.parse_dict({**node_value("n1"), "capacity": capacity})


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), 1e7])
def test_node_preference_weights_are_finite_and_bounded(weight: float) -> None:
    with pytest.raises(SchemaError, match="node_preferences"):
        _spec(node_preferences={"n1": weight})


@pytest.mark.parametrize("bad", ["web\n", "web\r\n", "\nweb", "we\nb", "web "])
def test_names_are_matched_in_full(bad: str) -> None:
    with pytest.raises(SchemaError):
        VmSpec.parse_dict({**spec_value("web"), "name": bad})
    with pytest.raises(SchemaError):
        NodeRegistration.parse_dict({**node_value("n1"), "name": bad})


@pytest.mark.parametrize(("field", "value"), [
    ("allowed_nodes", ["n1\n"]), ("node_preferences", {"n1\n": 1.0}),
    ("anti_affinity", ["db\n"]), ("soft_anti_affinity", ["db\n"]), ("affinity", ["a\nb"]),
    ("soft_affinity", ["x\n"]),
])
def test_names_a_spec_refers_to_are_matched_in_full(field: str, value: Any) -> None:
    with pytest.raises(SchemaError, match=field):
        _spec(**{field: value})


def test_move_request_names_are_matched_in_full() -> None:
    with pytest.raises(SchemaError):
        MoveRequest.parse_dict({"vm": "v", "to": "n1\n", "by": "cli", "requested_at": 1.0})
    with pytest.raises(SchemaError):
        MoveRequest.parse_dict({"vm": "v\n", "to": "n1", "by": "cli", "requested_at": 1.0})


def test_out_of_bound_values_in_etcd_are_invalid_keys_not_used() -> None:
    snap = ClusterSnapshot.from_kvs(KS, 100, [
        raw(KS.node("big"), {**node_value("big"), "capacity": {"memory_mib": 10**30,
                                                                "vcpus": 8}}, 5, lease=0x1A2B),
        raw(KS.node("n1"), node_value("n1"), 6, lease=0x1A2B),
        raw(KS.vm_spec("huge"), {**spec_value("huge"), "memory_mib": 10**30}, 7),
        raw(KS.vm_spec("first"), {**spec_value("first"), "priority": 10**18}, 8),
        raw(KS.vm_spec("ok"), spec_value("ok"), 9),
    ])
    assert sorted(snap.nodes) == ["n1"] and sorted(snap.specs) == ["ok"]
    invalid = {i.key: str(i.error) for i in snap.invalid}
    assert set(invalid) == {KS.node("big"), KS.vm_spec("huge"), KS.vm_spec("first")}
    assert "capacity" in invalid[KS.node("big")]
    assert "memory_mib" in invalid[KS.vm_spec("huge")]
    assert "priority" in invalid[KS.vm_spec("first")]
