"""Keyspace 2's new models (schemas.models_v2): the JSON conventions of every model
(sorted keys, `"schema": 1`) and what each refuses, with the existing error type."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas import Assignment, ConfirmOff, KeyspaceVersion
from schemas.errors import SchemaError
from schemas.models import MAX_VALUE_BYTES, Placement, VmSpec
from schemas.models_v2 import ASSIGNMENT_MAX_BYTES
from tests.unit.builders import migrate, placement_value, spec_value


def assignment_value(vm: str = "web1", placement: dict[str, Any] | None = None,
                     spec: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return {"schema": 1, "vm": vm, "spec_revision": 1180,
            "placement": placement or placement_value(vm, migrate("n2", "n3")),
            "spec": spec or spec_value(vm), **kw}


VERSION = {"schema": 1, "keyspace": 2, "state": "done", "started_at": 1767229200.0,
           "by": "operator:alice", "tool_version": "0.2.0"}
CONFIRM = {"schema": 1, "node": "n4", "by": "operator:alice", "reason": "powered off at the PDU",
           "at": 1767229300.0}


@pytest.mark.parametrize(("model", "value"), [
    (Assignment, assignment_value()),
    (KeyspaceVersion, VERSION),
    (ConfirmOff, CONFIRM),
])
def test_round_trip_sorted_with_schema(model: Any, value: dict[str, Any]) -> None:
    parsed = model.from_json(json.dumps(value))
    text = parsed.to_json()
    assert json.loads(text)["schema"] == 1
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert text == json.dumps(json.loads(text), sort_keys=True)
    assert model.from_json(text) == parsed
    assert model.from_json(text.encode()) == parsed


def test_assignment_holds_the_placement_and_spec_exactly() -> None:
    a = Assignment.from_json(json.dumps(assignment_value()))
    assert a.placement == Placement.from_json(json.dumps(placement_value("web1",
                                                                         migrate("n2", "n3"))))
    assert a.spec == VmSpec.from_json(json.dumps(spec_value("web1")))
    assert a.nodes == ("n3", "n2")
    assert a.peers("n2") == ("n3",) and a.peers("n3") == ("n2",)
    boot = Assignment.from_json(json.dumps(assignment_value(
        placement=placement_value("web1", {"kind": "boot", "node": "n2", "id": "p1"}))))
    assert boot.nodes == ("n2",) and boot.peers("n2") == ()


def _refused(model: Any, value: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(SchemaError) as exc:
        model.from_json(json.dumps(value), key="/vmha/x")
    assert exc.value.key == "/vmha/x"
    assert exc.value.field == field, str(exc.value)
    assert fragment in exc.value.message, str(exc.value)


@pytest.mark.parametrize(("value", "field", "fragment"), [
    (assignment_value(vm="web2", placement=placement_value("web1", migrate("n2", "n3")),
                      spec=spec_value("web2")), "", "holds the placement of 'web1'"),
    (assignment_value(spec=spec_value("web2")), "", "the spec of 'web2'"),
    (assignment_value(placement=placement_value("web1", {"kind": "pending", "node": None,
                                                          "id": "p1"})),
     "", "pending placement names no node"),
    (assignment_value(placement=placement_value("web1", {"kind": "failed", "node": None,
                                                          "id": "p1"})),
     "", "failed placement names no node"),
    (assignment_value(placement=placement_value("web1", migrate("n2/x", "n3"))),
     "", "node name 'n2/x'"),
    (assignment_value(placement=placement_value("web1", {"kind": "boot", "node": "N3",
                                                          "id": "p1"})),
     "", "node name 'N3'"),
    (assignment_value(vm="Web1", placement=placement_value("Web1", migrate("n2", "n3")),
                      spec=spec_value("Web1")), "vm", "VM name 'Web1'"),
    (assignment_value(spec_revision=0), "spec_revision", "greater than or equal to 1"),
    (assignment_value(spec_revision="1180x"), "spec_revision", "integer"),
    (assignment_value(extra=1), "extra", "Extra inputs"),
    (assignment_value(schema=2), "schema", "unsupported schema version 2"),
    ({k: v for k, v in assignment_value().items() if k != "spec"}, "spec", "Field required"),
])
def test_assignment_refusals(value: dict[str, Any], field: str, fragment: str) -> None:
    _refused(Assignment, value, field, fragment)


def test_assignment_size_limit_allows_a_spec_at_its_own_limit() -> None:
    # A spec value just under MAX_VALUE_BYTES is valid on its own key; its assignment
    # embeds it and the placement, so it must still be read.
    pad = "x" * (MAX_VALUE_BYTES - 300)
    xml = f"<domain type='kvm'><name>web1</name><description>{pad}</description></domain>"
    spec = {**spec_value("web1"), "domain_xml": xml}
    assert len(json.dumps(spec)) < MAX_VALUE_BYTES
    VmSpec.from_json(json.dumps(spec))
    text = json.dumps(assignment_value(spec=spec))
    assert len(text) > MAX_VALUE_BYTES
    assert Assignment.from_json(text).spec.domain_xml == xml
    huge = " " * (ASSIGNMENT_MAX_BYTES + 1 - len(text)) + text
    _refused_raw(Assignment, huge, "exceeds the limit")
    # Every other model keeps its limit.
    _refused_raw(VmSpec, " " * MAX_VALUE_BYTES + json.dumps(spec_value("web1")),
                 f"limit of {MAX_VALUE_BYTES} bytes")


def _refused_raw(model: Any, raw: str, fragment: str) -> None:
    with pytest.raises(SchemaError, match=fragment):
        model.from_json(raw)


@pytest.mark.parametrize("state", ["migrating", "switching", "done"])
def test_keyspace_version_states(state: str) -> None:
    assert KeyspaceVersion.from_json(json.dumps({**VERSION, "state": state})).state == state


@pytest.mark.parametrize(("changes", "field", "fragment"), [
    ({"keyspace": 1}, "keyspace", "Input should be 2"),
    ({"keyspace": 3}, "keyspace", "Input should be 2"),
    ({"keyspace": 2.0}, "keyspace", "integer 2"),
    ({"keyspace": "2"}, "keyspace", "integer 2"),
    ({"keyspace": True}, "keyspace", "integer 2"),
    ({"keyspace": None}, "keyspace", "integer 2"),
    ({"state": "frozen"}, "state", "'migrating', 'switching', 'cleaning' or 'done'"),
    ({"started_at": "yesterday"}, "started_at", "number"),
    ({"schema": 2}, "schema", "unsupported schema version"),
    ({"frozen_at": 1.0}, "frozen_at", "Extra inputs"),
])
def test_keyspace_version_refusals(changes: dict[str, Any], field: str, fragment: str) -> None:
    _refused(KeyspaceVersion, {**VERSION, **changes}, field, fragment)


def test_keyspace_version_fields_required() -> None:
    for missing in ("keyspace", "state", "started_at", "by", "tool_version"):
        _refused(KeyspaceVersion, {k: v for k, v in VERSION.items() if k != missing},
                 missing, "Field required")


@pytest.mark.parametrize(("changes", "field", "fragment"), [
    ({"node": "N4"}, "node", "node name 'N4'"),
    ({"node": "n4/../n5"}, "node", "node name"),
    ({"node": ""}, "node", "node name ''"),
    ({"at": "now"}, "at", "number"),
    ({"extra": 1}, "extra", "Extra inputs"),
    ({"schema": "1"}, "schema", "unsupported schema version"),
])
def test_confirm_off_refusals(changes: dict[str, Any], field: str, fragment: str) -> None:
    _refused(ConfirmOff, {**CONFIRM, **changes}, field, fragment)


def test_confirm_off_fields_required() -> None:
    for missing in ("node", "by", "reason", "at"):
        _refused(ConfirmOff, {k: v for k, v in CONFIRM.items() if k != missing},
                 missing, "Field required")


@pytest.mark.parametrize("raw", ["", "[]", "null", "{", "\xff", "[" * 100_000, b"\xff\xfe"])
def test_not_json_objects_refused(raw: Any) -> None:
    for model in (Assignment, KeyspaceVersion, ConfirmOff):
        with pytest.raises(SchemaError):
            model.from_json(raw)
