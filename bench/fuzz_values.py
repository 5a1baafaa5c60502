"""Hypothesis strategies of hostile keys and values for `bench.fuzz`.

Every value drawn here is invalid for every model of `schemas.models` by construction
(so a write can never be a real decision, only data a daemon must survive): deep
nesting, values over `MAX_VALUE_BYTES`, bytes that are not UTF-8, the wrong top-level
type, an unknown schema version, a well-formed object with a wrong field type, or
random JSON objects that always carry a key no model has (models forbid extra keys).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from schemas.keys import Keyspace

#: Key patterns of the keyspace (schemas.keys), as the fuzz counts them.
PATTERNS = ("config", "leader", "nodes", "cordon", "fence", "alive", "vm_spec",
            "vm_placement", "vm_status", "vm_move", "history")
#: Patterns whose key names a node or a VM.
NAMED = ("nodes", "cordon", "fence", "alive", "vm_spec", "vm_placement", "vm_status", "vm_move")

#: Patterns whose key names a node.
NODE_PATTERNS = ("nodes", "cordon", "fence", "alive")

_JUNK_KEY = "\u0000fuzz"  # no model has it: every object below is refused


def key_for(ks: Keyspace, pattern: str, name: bytes) -> bytes:
    """The key of `pattern` for a raw (possibly hostile) name; config and leader take
    the name as a suffix (``/vmha/config<name>``), history as the event id."""
    pre = ks.prefix.encode()
    if pattern in ("config", "leader"):
        return pre + b"/" + pattern.encode() + name
    if pattern == "history":
        return ks.history.encode() + name
    if pattern in NODE_PATTERNS:
        return pre + b"/" + pattern.encode() + b"/" + name
    return pre + b"/vms/" + name + b"/" + pattern[3:].encode()


def live_key(ks: Keyspace, pattern: str, name: str) -> str:
    """The real key of a live node or VM (or the config or leader key)."""
    table: dict[str, Callable[[], str]] = {
        "config": lambda: ks.config, "leader": lambda: ks.leader,
        "nodes": lambda: ks.node(name), "cordon": lambda: ks.cordon(name),
        "fence": lambda: ks.fence(name), "alive": lambda: ks.alive(name),
        "vm_spec": lambda: ks.vm_spec(name),
        "vm_placement": lambda: ks.vm_placement(name),
        "vm_status": lambda: ks.vm_status(name), "vm_move": lambda: ks.vm_move(name)}
    return table[pattern]()


def hostile_names() -> st.SearchStrategy[bytes]:
    """Names a daemon does not own: valid fuzz names, and names with slashes, newlines,
    unicode, upper case, NUL, bytes that are not UTF-8, empty, or far too long."""
    valid = st.integers(0, 10**6).map(lambda i: f"fz-{i}".encode())
    text = st.text(min_size=1, max_size=20).map(lambda s: ("fz" + s).encode("utf-8",
                                                                              "surrogatepass"))
    fixed = st.sampled_from([b"fz/a", b"fz/a/b", b"fz\nx", b"fz\r\n", "fz-\u00e9t\u00e9".encode(),
                             "\u202efz".encode(), b"FZ", b"fz\x00", b"\xff\xfe", b"fz\xc3",
                             b"", b"..", b"fz" + b"x" * 300, b"fz a", "\U0001f4a5".encode()])
    raw = st.binary(min_size=1, max_size=12).map(lambda b: b"fz" + b)
    return st.one_of(valid, text, fixed, raw)


def _deep(depth: int, obj: bool) -> bytes:
    if obj:
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b"[" * depth + b"]" * depth


def _model_like(pattern: str) -> dict[str, Any]:
    """Roughly the shape of the pattern's model (so the wrong field is the only fault)."""
    return {"schema": 1, "name": "fz", "vm": "fz", "node": "fz", "id": "fz", "kind": "boot",
            "state": "running", "memory_mib": 512, "vcpus": 1, "epoch": 1, "reason": "fuzz",
            "lease_id": "1", "at": 0.0, "pattern": pattern}


def hostile_values(pattern: str, max_big: int) -> st.SearchStrategy[tuple[str, bytes]]:
    """(shape, value) pairs; `max_big` bounds the size of the oversized ones."""
    json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                          st.text(max_size=30))
    json_any = st.recursive(json_leaf, lambda c: st.one_of(
        st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
        max_leaves=20)
    shapes: list[st.SearchStrategy[tuple[str, bytes]]] = [
        st.tuples(st.just("deep_nesting"), st.builds(
            _deep, st.integers(1_000, 60_000), st.booleans())),
        st.tuples(st.just("oversized"), st.integers(256 * 1024 + 1, max_big).map(
            lambda n: b'{"schema": 1, "x": "' + b"x" * n + b'"}')),
        st.tuples(st.just("not_utf8"), st.binary(min_size=1, max_size=64).map(
            lambda b: b"\xff" + b)),
        st.tuples(st.just("wrong_top_type"), st.one_of(
            st.lists(json_any, max_size=3), json_leaf).map(lambda v: json.dumps(v).encode())),
        st.tuples(st.just("unknown_schema"), st.sampled_from(
            [0, 2, 99, "1", 1.5, None, [1], {"v": 1}, True, -1, 2**70]).map(
            lambda v: json.dumps(_model_like(pattern) | {"schema": v}).encode())),
        st.tuples(st.just("wrong_types"), st.sampled_from(
            ["name", "vm", "node", "memory_mib", "epoch", "state", "kind"]).flatmap(
            lambda f: json_any.filter(lambda v: not isinstance(v, str)).map(
                lambda v: json.dumps(_model_like(pattern) | {f: v, _JUNK_KEY: 1}).encode()))),
        st.tuples(st.just("random_json"), st.dictionaries(
            st.text(max_size=8), json_any, max_size=5).map(
            lambda d: json.dumps(d | {_JUNK_KEY: True}).encode())),
        st.tuples(st.just("empty"), st.just(b"")),
    ]
    return st.one_of(shapes)
