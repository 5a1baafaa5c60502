"""Hostile data in etcd: every shape a writer can put under the prefix becomes an invalid
key in the snapshot, never an exception (issue 11, "no data can end a daemon")."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas.keys import Keyspace, decode_key
from schemas.models import MAX_VALUE_BYTES, VmSpec
from schemas.snapshot import ClusterSnapshot, RawKV
from tests.unit.builders import KS, node_value, raw, snapshot, spec_value

DEEP = b"[" * 40_000 + b"]" * 40_000  # json.loads: RecursionError
DEEP_OBJ = b'{"a":' * 20_000 + b"1" + b"}" * 20_000
HUGE = json.dumps(spec_value("big") | {"domain_xml": "x" * (2 * 1024 * 1024)}).encode()

HOSTILE_VALUES: dict[str, bytes] = {
    "deep-list": DEEP,
    "deep-object": DEEP_OBJ,
    "non-utf8": b"\xff\xfe{}",
    "huge": HUGE,
    "list": b"[1, 2, 3]",
    "string": b'"spec"',
    "number": b"42",
    "null": b"null",
    "empty": b"",
    "nan": b'{"schema": NaN}',
    "schema-2": json.dumps(spec_value("v") | {"schema": 2}).encode(),
    "schema-list": json.dumps(spec_value("v") | {"schema": [1]}).encode(),
    "schema-dict": json.dumps(spec_value("v") | {"schema": {"a": 1}}).encode(),
    "wrong-types": json.dumps(spec_value("v") | {"memory_mib": "lots", "vcpus": [1]}).encode(),
    "lone-surrogate": b'{"schema": 1, "name": "\\ud800"}',
    "huge-int": b'{"schema": 1, "memory_mib": ' + b"9" * 5000 + b"}",
}

KEY_PATTERNS = [KS.config, KS.leader, KS.node("v"), KS.cordon("v"), KS.fence("v"), KS.alive("v"),
                KS.vm_spec("v"), KS.vm_placement("v"), KS.vm_status("v"), KS.vm_move("v")]


def _from(kvs: list[RawKV]) -> ClusterSnapshot:
    return ClusterSnapshot.from_kvs(KS, 100, kvs)


@pytest.mark.parametrize("key", KEY_PATTERNS)
@pytest.mark.parametrize("shape", sorted(HOSTILE_VALUES))
def test_hostile_value_is_an_invalid_key(key: str, shape: str) -> None:
    good = raw(KS.vm_spec("ok"), spec_value("ok"), 5)
    snap = _from([good, RawKV(key, HOSTILE_VALUES[shape], 7, 7)])
    assert [e.key for e in snap.errors] == [key]
    assert list(snap.specs) == ["ok"]  # the good key next to it still parses


def test_oversized_value_is_refused_before_json_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any, **__: Any) -> Any:
        raise AssertionError("json.loads called on an oversized value")

    monkeypatch.setattr("schemas.models.json.loads", boom)
    snap = _from([RawKV(KS.vm_spec("v"), b"{" + b" " * MAX_VALUE_BYTES + b"}", 3, 3)])
    assert len(snap.errors) == 1
    assert "exceeds" in snap.errors[0].message and str(MAX_VALUE_BYTES) in snap.errors[0].message


def test_size_limit_is_256_kib_and_a_value_at_the_limit_parses() -> None:
    assert MAX_VALUE_BYTES == 256 * 1024
    base = spec_value("v")
    pad = MAX_VALUE_BYTES - len(json.dumps(base | {"domain_xml": ""}).encode())
    xml = base["domain_xml"]
    value = json.dumps(base | {"domain_xml": xml + " " * (pad - len(xml))}).encode()
    assert len(value) == MAX_VALUE_BYTES
    snap = _from([RawKV(KS.vm_spec("v"), value, 3, 3)])
    assert snap.errors == () and list(snap.specs) == ["v"]


@pytest.mark.parametrize(
    "key",
    ["/vmha/vms/a/b/spec", "/vmha/vms/a\nb/spec", "/vmha/vms/\u00e9t\u00e9/spec",
     "/vmha/vms/\u202egnp.exe/spec", "/vmha/nodes/a/b", "/vmha/nodes/N1", "/vmha/nodes/",
     "/vmha/fence/\x00", "/vmha/cordon/a b", "/vmha/vms//spec", "/vmha/vms/v/console",
     "/vmha/\U0001f4a5", "/vmha/config/x"],
)
def test_bad_names_and_unknown_keys_are_reported(key: str) -> None:
    snap = _from([RawKV(key, b"{}", 3, 3)])
    assert [e.key for e in snap.errors] == [key]
    assert not snap.specs and not snap.nodes and not snap.fences and not snap.cordons


def test_valid_value_under_an_invalid_name_is_not_used() -> None:
    # The name in the value matches the key's, but the name itself is not a valid name.
    snap = _from([raw("/vmha/nodes/N1", node_value("N1"), 3)])
    assert not snap.nodes
    assert [e.key for e in snap.errors] == ["/vmha/nodes/N1"]


@pytest.mark.parametrize(
    ("raw_key", "shown"),
    [(b"/vmha/vms/\xff\xfe/spec", "/vmha/vms/\\xff\\xfe/spec"),
     (b"/vmha/\xc3", "/vmha/\\xc3"),
     (b"/vmha/vms/ok/spec", "/vmha/vms/ok/spec")],
)
def test_decode_key_never_raises(raw_key: bytes, shown: str) -> None:
    assert decode_key(raw_key) == shown


def test_non_utf8_key_is_an_invalid_key_entry() -> None:
    key = decode_key(b"/vmha/vms/\xff\xfe/spec")
    snap = _from([RawKV(key, b"{}", 3, 3), raw(KS.vm_spec("ok"), spec_value("ok"), 4)])
    assert [e.key for e in snap.errors] == [key]
    assert list(snap.specs) == ["ok"]


def test_bytes_key_in_rawkv_is_decoded_defensively() -> None:
    kv = RawKV(b"/vmha/vms/\xff/spec", b"{}", 3, 3)  # type: ignore[arg-type]
    snap = _from([kv])
    assert [e.key for e in snap.errors] == ["/vmha/vms/\\xff/spec"]


def test_every_key_pattern_with_every_shape_at_once() -> None:
    kvs = [RawKV(k, v, 3, 3) for k in KEY_PATTERNS for v in HOSTILE_VALUES.values()]
    snap = _from(kvs)
    assert len(snap.errors) == len(kvs)


def test_errors_carry_the_vm_or_node_they_belong_to() -> None:
    snap = _from([RawKV(KS.vm_placement("v1"), DEEP, 3, 3), RawKV(KS.node("n1"), b"[]", 4, 4),
                  RawKV("/vmha/vms/a/b/spec", b"{}", 5, 5)])
    assert snap.invalid_vms == frozenset({"v1"})
    assert snap.invalid_nodes == frozenset({"n1"})
    assert {e.key: e.mod_revision for e in snap.invalid} == {
        KS.vm_placement("v1"): 3, KS.node("n1"): 4, "/vmha/vms/a/b/spec": 5}


def test_model_from_json_refuses_oversized_and_deep_input() -> None:
    from schemas.errors import SchemaError

    with pytest.raises(SchemaError, match="exceeds"):
        VmSpec.from_json(HUGE)
    with pytest.raises(SchemaError, match="not valid JSON"):
        VmSpec.from_json(DEEP)
    with pytest.raises(SchemaError):
        VmSpec.from_json(b"\xff\xfe")


def test_prefix_keyspace_other_than_default() -> None:
    ks = Keyspace("/x/y")
    snap = ClusterSnapshot.from_kvs(ks, 1, [RawKV("/x/y/vms/a/b/spec", b"{}", 1, 1),
                                            RawKV("/vmha/vms/a/b/spec", b"{}", 1, 1)])
    assert [e.key for e in snap.errors] == ["/x/y/vms/a/b/spec"]


def test_snapshot_from_builders_still_clean() -> None:
    assert snapshot([raw(KS.vm_spec("a"), spec_value("a"))]).errors == ()


def test_a_bad_move_or_cordon_key_is_only_a_request_not_made() -> None:
    snap = _from([RawKV(KS.vm_move("v1"), DEEP, 3, 3), RawKV(KS.cordon("n1"), b"[]", 4, 4),
                  RawKV(KS.vm_status("v2"), b"[]", 5, 5), RawKV(KS.fence("n2"), b"[]", 6, 6)])
    assert len(snap.errors) == 4
    assert snap.invalid_vms == frozenset({"v2"})
    assert snap.invalid_nodes == frozenset({"n2"})
