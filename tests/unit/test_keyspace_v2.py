"""Keyspace 2's key layout (schemas.keys_v2): every key round-trips through `parse`, for
any prefix, and no input makes `parse` raise or mistake one key for another."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import event_id
from schemas.keys import NAME_RE
from schemas.keys_v2 import KeyRefV2, KeyspaceV2, UnknownKey, valid_event_id

PREFIXES = ["/vmha", "/lab", "/a/b.c", "/x-y", "/vmha/n"]
EID = "01767229200310000-agent_n2-000004"

names = st.from_regex(NAME_RE, fullmatch=True)
event_ids = st.builds(event_id, st.floats(0, 4e9), st.text(max_size=30),
                      st.integers(0, 10**8))


def layout(ks: KeyspaceV2, node: str, vm: str, eid: str) -> list[tuple[str, KeyRefV2]]:
    """Every key kind of the design's layout table, built with the builders, and what
    `parse` must say about it."""
    return [
        (ks.version, KeyRefV2("version")),
        (ks.config, KeyRefV2("config")),
        (ks.leader, KeyRefV2("leader")),
        (ks.spec(vm), KeyRefV2("spec", vm=vm)),
        (ks.move(vm), KeyRefV2("move", vm=vm)),
        (ks.place(vm), KeyRefV2("place", vm=vm)),
        (ks.confirm_off(node), KeyRefV2("confirm_off", node=node)),
        (ks.cordon(node), KeyRefV2("cordon", node=node)),
        (ks.fence(node), KeyRefV2("fence", node=node)),
        (ks.assignment(node, vm), KeyRefV2("assignment", node=node, vm=vm)),
        (ks.reg(node), KeyRefV2("reg", node=node)),
        (ks.alive(node), KeyRefV2("alive", node=node)),
        (ks.leaving(node), KeyRefV2("leaving", node=node)),
        (ks.status(node, vm), KeyRefV2("status", node=node, vm=vm)),
        (ks.node_event(node, eid), KeyRefV2("node_event", node=node, event_id=eid)),
        (ks.leader_event(eid), KeyRefV2("leader_event", event_id=eid)),
        (ks.history + eid, KeyRefV2("event_v1", event_id=eid)),
    ]


def test_layout_matches_the_design_table() -> None:
    ks = KeyspaceV2()
    keys = [k for k, _ in layout(ks, "n2", "web1", EID)]
    assert keys == [
        "/vmha/version", "/vmha/config", "/vmha/leader", "/vmha/spec/web1",
        "/vmha/move/web1", "/vmha/place/web1", "/vmha/confirm-off/n2", "/vmha/cordon/n2",
        "/vmha/fence/n2", "/vmha/a/n2/web1", "/vmha/n/n2/reg", "/vmha/n/n2/alive",
        "/vmha/n/n2/leaving", "/vmha/n/n2/vm/web1", f"/vmha-history/n/n2/{EID}",
        f"/vmha-history/o/{EID}", f"/vmha-history/{EID}"]
    assert (ks.assignments("n2"), ks.node_root("n2"), ks.statuses("n2"),
            ks.node_history("n2"), ks.leader_history) == (
        "/vmha/a/n2/", "/vmha/n/n2/", "/vmha/n/n2/vm/", "/vmha-history/n/n2/",
        "/vmha-history/o/")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_key_kind_round_trips(prefix: str) -> None:
    ks = KeyspaceV2(prefix)
    rows = layout(ks, "n1", "web-1.a", EID)
    assert len({ref.kind for _, ref in rows}) == 17  # every kind, once
    for key, ref in rows:
        assert key.startswith((prefix + "/", prefix + "-history/"))
        assert ks.parse(key) == ref
        assert ks.parse(key.encode()) == ref  # as etcd returns it
        assert ks.key(ref) == key


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(PREFIXES), names, names, event_ids)
def test_round_trip_for_generated_names(prefix: str, node: str, vm: str, eid: str) -> None:
    ks = KeyspaceV2(prefix)
    assert valid_event_id(eid)  # every id the history writer makes is a valid one
    for key, ref in layout(ks, node, vm, eid):
        assert ks.parse(key) == ref
        assert ks.key(ref) == key


@pytest.mark.parametrize("prefix", ["vmha", "/vmha/", "", "/"])
def test_bad_prefix_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        KeyspaceV2(prefix)


UNKNOWN: list[Any] = [
    # (key, reason fragment, would-be kind, node, vm)
    ("/vmha/spec/web1/extra", "segment", "", "", ""),
    ("/vmha/spec/", "invalid VM name ''", "spec", "", ""),
    ("/vmha/spec", "segment", "", "", ""),
    ("/vmha/", "segment", "", "", ""),
    ("/vmha/n/n1", "segment", "", "", ""),
    ("/vmha/n/n1/", "segment", "", "", ""),
    ("/vmha/n/n1/vm/", "invalid VM name ''", "status", "n1", ""),
    ("/vmha/n/n1/vm/web1/x", "segment", "", "", ""),
    ("/vmha/n/n1/status", "segment", "", "", ""),
    ("/vmha/n/N1/reg", "invalid node name 'N1'", "reg", "N1", ""),
    ("/vmha/n//reg", "invalid node name ''", "reg", "", ""),
    ("/vmha/a/n1/", "invalid VM name ''", "assignment", "n1", ""),
    ("/vmha/a/n1", "segment", "", "", ""),
    ("/vmha/a/-n1/web1", "invalid node name '-n1'", "assignment", "-n1", "web1"),
    ("/vmha/a/n1/web1/", "segment", "", "", ""),
    ("/vmha/cordon/n1 ", "invalid node name", "cordon", "n1 ", ""),
    ("/vmha/fence/n1\n", "invalid node name", "fence", "n1\n", ""),
    ("/vmha/confirm-off/" + "n" * 64, "invalid node name", "confirm_off", "n" * 64, ""),
    ("/vmha/place/wéb", "invalid VM name", "place", "", "wéb"),
    ("/vmha/config/x", "segment", "", "", ""),
    ("/vmha/Config", "segment", "", "", ""),
    # keyspace 1's keys mean nothing in keyspace 2
    ("/vmha/vms/web1/spec", "segment", "", "", ""),
    ("/vmha/nodes/n1", "segment", "", "", ""),
    ("/vmha/alive/n1", "segment", "", "", ""),
    ("/vmha/leaving/n1", "segment", "", "", ""),
    ("/vmha-history/n/n1", "history", "", "", ""),
    ("/vmha-history/n/n1/", "invalid event id", "node_event", "n1", ""),
    ("/vmha-history/n/n1/x/" + EID, "history", "", "", ""),
    ("/vmha-history/o/" + EID + "/", "history", "", "", ""),
    ("/vmha-history/o/not-an-id", "invalid event id", "leader_event", "", ""),
    ("/vmha-history/" + EID + "\n", "invalid event id", "event_v1", "", ""),
    ("/vmha-history/", "invalid event id", "event_v1", "", ""),
    ("/vmha-history/n/BAD/" + EID, "invalid node name 'BAD'", "node_event", "BAD", ""),
]


@pytest.mark.parametrize(("key", "reason", "kind", "node", "vm"), UNKNOWN)
def test_unknown_keys_say_why(key: str, reason: str, kind: str, node: str, vm: str) -> None:
    ref = KeyspaceV2().parse(key)
    assert isinstance(ref, UnknownKey)
    assert reason in ref.reason
    assert (ref.key, ref.kind, ref.node, ref.vm, ref.owned) == (key, kind, node, vm, True)


@pytest.mark.parametrize("key", ["/vmhax/config", "/vmha", "/vmha-history", "vmha/config",
                                 "/other/n/n1/reg", "", "/vmha-histor/o/" + EID])
def test_keys_outside_the_prefix_are_not_ours(key: str) -> None:
    ref = KeyspaceV2().parse(key)
    assert isinstance(ref, UnknownKey) and not ref.owned


def test_bytes_that_are_not_utf8_never_name_anything() -> None:
    ks = KeyspaceV2()
    for raw in (b"/vmha/n/n1\xff/reg", b"/vmha/spec/\xc3", b"/vmha/conf\xffig",
                b"/vmha-history/o/" + EID.encode() + b"\x80", b"\xff\xfe"):
        ref = ks.parse(raw)
        assert isinstance(ref, UnknownKey)
        assert "\\x" in ref.key or not ref.owned  # shown escaped, never decoded as a name
    assert ks.parse(bytearray(b"/vmha/n/n1/reg")) == KeyRefV2("reg", node="n1")


@pytest.mark.parametrize("junk", [None, 12, 1.5, ["/vmha/config"], object()])
def test_non_keys_are_unknown(junk: Any) -> None:
    ref = KeyspaceV2().parse(junk)
    assert isinstance(ref, UnknownKey) and not ref.owned


def _exact(ks: KeyspaceV2, key: str | bytes) -> None:
    """Whatever `key` is, parse answers without raising, and a key it accepts is exactly
    the key its builders make from the names it found (so it names nothing else)."""
    ref = ks.parse(key)
    if isinstance(ref, KeyRefV2):
        text = key.decode() if isinstance(key, bytes) else key
        assert ks.key(ref) == text
    else:
        assert isinstance(ref, UnknownKey) and ref.reason


SEGMENTS = st.sampled_from(["", "n", "a", "vm", "o", "reg", "alive", "leaving", "spec",
                            "move", "place", "cordon", "fence", "confirm-off", "config",
                            "version", "leader", "n1", "web1", "N1", "n1.", EID, "..",
                            "\x00", "é", "\\xff"])


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(PREFIXES), st.sampled_from(["/", "-history/"]),
       st.lists(st.one_of(SEGMENTS, st.text(max_size=8)), max_size=6))
def test_garbage_text_keys_never_raise(prefix: str, sep: str, parts: list[str]) -> None:
    _exact(KeyspaceV2(prefix), prefix + sep + "/".join(parts))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PREFIXES), st.binary(max_size=40))
def test_garbage_bytes_keys_never_raise(prefix: str, tail: bytes) -> None:
    ks = KeyspaceV2(prefix)
    for raw in (tail, prefix.encode() + b"/" + tail, prefix.encode() + b"-history/" + tail):
        _exact(ks, raw)
