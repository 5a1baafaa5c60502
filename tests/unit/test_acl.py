"""Keyspace 2's etcd roles (schemas.acl): the exact ranges of the design's table, etcd's
prefix-range arithmetic, and the confinement they give: no node role covers another
node's keys, whatever the two names."""

from __future__ import annotations

from itertools import permutations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.acl import (
    FROM_KEY,
    MONITORING,
    OPERATOR,
    ORCHESTRATOR,
    KeyRange,
    Role,
    node_ref,
    prefix_range_end,
    role,
    role_name,
    roles,
)
from schemas.errors import SchemaError
from schemas.keys import NAME_RE
from schemas.keys_v2 import KeyspaceV2
from schemas.txn import Cmp, Delete, Put, Txn

KS = KeyspaceV2()
EID = "01767229200310000-agent_n2-000004"
EDGE_NAMES = ["n1", "n10", "n1-x", "n1.x", "n1_x", "n", "n1a"]
names = st.from_regex(NAME_RE, fullmatch=True)


def P(prefix: str) -> str:  # noqa: N802 - the table's notation
    return f"[{prefix}, {prefix[:-1]}0)"


# The design's table (docs/keyspace-v2.md, "Roles and their exact ranges"), verbatim.
TABLE = {
    "orchestrator": (
        ["key /vmha/leader", P("/vmha/place/"), P("/vmha/a/"), P("/vmha/fence/"),
         P("/vmha/move/"), P("/vmha/confirm-off/"), P("/vmha-history/")],
        [P("/vmha/")]),
    "node-n1": (
        [P("/vmha/n/n1/"), "key /vmha/cordon/n1", P("/vmha-history/n/n1/")],
        [P("/vmha/a/n1/"), P("/vmha/n/"), P("/vmha/place/"), P("/vmha/spec/"),
         "key /vmha/config", "key /vmha/version"]),
    "operator": (
        [P("/vmha/spec/"), P("/vmha/move/"), P("/vmha/cordon/"), P("/vmha/confirm-off/"),
         "key /vmha/config"],
        [P("/vmha/"), P("/vmha-history/")]),
    "monitoring": ([], [P("/vmha/"), P("/vmha-history/")]),
}


def table_of(r: Role) -> tuple[list[str], list[str]]:
    return [str(x) for x in r.readwrite], [str(x) for x in r.read]


def test_roles_are_the_design_table() -> None:
    got = {r.name: table_of(r) for r in roles(KS, ["n1"])}
    assert got == TABLE
    assert str(role(KS, node_ref("n1")).readwrite[0]) == "[/vmha/n/n1/, /vmha/n/n10)"


def test_other_prefix_names_and_ranges() -> None:
    ks = KeyspaceV2("/lab/x")
    assert [r.name for r in roles(ks, ["n2", "n1", "n1"])] == [
        "lab.x.orchestrator", "lab.x.operator", "lab.x.monitoring", "lab.x.node-n1",
        "lab.x.node-n2"]
    assert role_name(KeyspaceV2("/vmha2"), node_ref("n1")) == "vmha2.node-n1"
    assert role_name(KS, ORCHESTRATOR) == "orchestrator"
    # The same table with the prefix substituted, `P-history` for `/vmha-history`.
    for r in roles(ks, ["n1"]):
        base = r.name.removeprefix("lab.x.")
        want = tuple([s.replace("/vmha-history", "/lab/x-history").replace("/vmha", "/lab/x")
                      for s in col] for col in TABLE[base])
        assert table_of(r) == want, r.name


@pytest.mark.parametrize(("prefix", "end"), [
    (b"/vmha/n/n1/", b"/vmha/n/n10"),
    (b"/vmha/", b"/vmha0"),
    (b"/vmha-history/", b"/vmha-history0"),
    (b"/vmha/n/n1", b"/vmha/n/n2"),
    (b"a\xff", b"b"),
    (b"a\xff\xff", b"b"),
    (b"\xff", FROM_KEY),
    (b"\xff\xff", FROM_KEY),
    (b"", FROM_KEY),
    ("/é/".encode(), "/é0".encode()),
])
def test_prefix_range_end_as_etcd(prefix: bytes, end: bytes) -> None:
    assert prefix_range_end(prefix) == end


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=12), st.binary(max_size=12))
def test_prefix_range_is_exactly_the_keys_with_the_prefix(prefix: bytes, rest: bytes) -> None:
    r = KeyRange.prefix(prefix)
    assert r.contains(prefix + rest)
    other = rest + prefix  # a key with the prefix only if it starts with it
    assert r.contains(other) == other.startswith(prefix)


def test_key_grant_is_the_key_alone() -> None:
    r = KeyRange.key("/vmha/config")
    assert r.contains("/vmha/config")
    assert not r.contains("/vmha/config/x") and not r.contains("/vmha/confi")
    assert not r.contains("/vmha/config\0")


def node_keys(ks: KeyspaceV2, node: str) -> list[str]:
    """Every key that belongs to `node` (written by it or about it)."""
    return [ks.reg(node), ks.alive(node), ks.leaving(node), ks.status(node, "x"),
            ks.status(node, "web1"), ks.assignment(node, "x"), ks.cordon(node),
            ks.node_event(node, EID), ks.node_root(node), ks.assignments(node),
            ks.node_history(node)]


def _confined(ks: KeyspaceV2, a: str, b: str) -> None:
    ra = role(ks, node_ref(a))
    for key in node_keys(ks, b):
        assert not ra.can_write(key), f"node-{a} may write {key}"
    for key in (ks.assignment(b, "x"), ks.assignments(b)):
        assert not ra.can_read(key), f"node-{a} may read {key}"
    for key in (ks.reg(a), ks.alive(a), ks.leaving(a), ks.status(a, "x"), ks.cordon(a),
                ks.node_event(a, EID)):
        assert ra.can_write(key), f"node-{a} may not write its own {key}"


@pytest.mark.parametrize("prefix", ["/vmha", "/lab/x"])
def test_edge_names_never_cover_each_other(prefix: str) -> None:
    ks = KeyspaceV2(prefix)
    for a, b in permutations(EDGE_NAMES, 2):
        _confined(ks, a, b)


@settings(max_examples=300, deadline=None)
@given(st.lists(names, min_size=2, max_size=6, unique=True),
       st.sampled_from(["/vmha", "/lab/x", "/v"]))
def test_no_node_range_covers_another_node(generated: list[str], prefix: str) -> None:
    ks = KeyspaceV2(prefix)
    pool = generated + EDGE_NAMES
    for a, b in permutations(dict.fromkeys(pool), 2):
        _confined(ks, a, b)


def test_grant_without_the_slash_would_cover_n10() -> None:
    """Why every prefix ends in `/`: without it, n1's grant reaches n10 and n1-x."""
    loose = KeyRange.prefix("/vmha/n/n1")
    assert loose.contains(KS.reg("n10")) and loose.contains(KS.reg("n1-x"))
    assert not KeyRange.prefix(KS.node_root("n1")).contains(KS.reg("n10"))


def test_assignment_range_does_not_reach_alive() -> None:
    orch = role(KS, ORCHESTRATOR)
    a_range = KeyRange.prefix(KS.assignment_dir)
    assert str(a_range) == "[/vmha/a/, /vmha/a0)"
    for key in ("/vmha/alive", "/vmha/alive/n1", KS.alive("n1")):
        assert not a_range.contains(key)
        assert not orch.can_write(key)
    assert not KeyRange.prefix(KS.assignments("n1")).contains("/vmha/alive/n1")


def test_history_lies_before_the_state() -> None:
    assert KeyRange.prefix(KS.history).end <= KS.root.encode()
    assert not KeyRange.prefix(KS.root).contains(KS.leader_event(EID))


def test_orchestrator_writes_decisions_not_registrations_or_statuses() -> None:
    orch = role(KS, ORCHESTRATOR)
    for key in (KS.leader, KS.place("web1"), KS.assignment("n1", "web1"), KS.fence("n1"),
                KS.move("web1"), KS.confirm_off("n1"), KS.leader_event(EID),
                KS.node_event("n1", EID), KS.history + EID):
        assert orch.can_write(key), key
    for key in (KS.reg("n1"), KS.alive("n1"), KS.leaving("n1"), KS.status("n1", "web1"),
                KS.spec("web1"), KS.config, KS.version, KS.cordon("n1")):
        assert not orch.can_write(key), key
        assert orch.can_read(key), key


def all_keys(ks: KeyspaceV2) -> list[str]:
    return [ks.version, ks.config, ks.leader, ks.spec("w"), ks.move("w"), ks.place("w"),
            ks.confirm_off("n1"), ks.cordon("n1"), ks.fence("n1"), ks.leader_event(EID),
            ks.history + EID, *node_keys(ks, "n1"), *node_keys(ks, "n2")]


def test_monitoring_reads_everything_and_writes_nothing() -> None:
    mon = role(KS, MONITORING)
    for key in all_keys(KS):
        assert mon.can_read(key) and not mon.can_write(key), key
    assert mon.can_read_range(KS.root, prefix_range_end(KS.root))
    assert mon.can_read_range(KS.history, prefix_range_end(KS.history))


def test_operator_writes_intent_only() -> None:
    op = role(KS, OPERATOR)
    writable = {KS.spec("w"), KS.move("w"), KS.cordon("n1"), KS.cordon("n2"),
                KS.confirm_off("n1"), KS.config}
    for key in all_keys(KS):
        assert op.can_read(key), key
        assert op.can_write(key) == (key in writable), key


def test_node_writes_its_own_keys_only() -> None:
    n1 = role(KS, node_ref("n1"))
    for key in (KS.reg("n1"), KS.alive("n1"), KS.leaving("n1"), KS.status("n1", "web1"),
                KS.cordon("n1"), KS.node_event("n1", EID)):
        assert n1.can_write(key), key
    for key in (KS.reg("n2"), KS.alive("n2"), KS.leaving("n2"), KS.status("n2", "web1"),
                KS.cordon("n2"), KS.node_event("n2", EID), KS.place("web1"),
                KS.assignment("n1", "web1"), KS.assignment("n2", "web1"), KS.fence("n1"),
                KS.spec("web1"), KS.config, KS.version, KS.leader, KS.move("web1"),
                KS.confirm_off("n1"), KS.leader_event(EID), KS.history + EID):
        assert not n1.can_write(key), key
    # It reads what its guards compare and its plan needs, and no other node's orders.
    for key in (KS.assignment("n1", "web1"), KS.reg("n2"), KS.status("n2", "web1"),
                KS.place("web1"), KS.spec("web1"), KS.config, KS.version):
        assert n1.can_read(key), key
    for key in (KS.assignment("n2", "web1"), KS.fence("n1"), KS.leader, KS.move("web1"),
                KS.cordon("n2"), KS.confirm_off("n1"), KS.node_event("n2", EID)):
        assert not n1.can_read(key), key


def test_range_reads_need_full_cover() -> None:
    orch, n1 = role(KS, ORCHESTRATOR), role(KS, node_ref("n1"))
    # The leader's two watch ranges, and the agent's list of its own prefixes.
    assert orch.can_read_range(KS.root, KS.assignment_dir)
    assert orch.can_read_range(prefix_range_end(KS.assignment_dir), prefix_range_end(KS.root))
    assert not orch.can_read_range(KS.root, None)  # up to the end of the keyspace: no
    for prefix in (KS.assignments("n1"), KS.node_root("n1"), KS.node_dir, KS.place_dir,
                   KS.spec_dir, KS.node_history("n1")):
        assert n1.can_read_range(prefix, prefix_range_end(prefix)), prefix
    for prefix in (KS.assignment_dir, KS.root, KS.assignments("n10"), KS.fence_dir,
                   KS.history):
        assert not n1.can_read_range(prefix, prefix_range_end(prefix)), prefix
    # Adjacent grants together cover a range neither covers alone.
    joined = Role("t", (KeyRange(b"a", b"c"), KeyRange(b"c", b"e")))
    assert joined.can_read_range("b", "d") and not joined.can_read_range("b", "f")
    assert not Role("t", (KeyRange(b"a", b"c"), KeyRange(b"d", b"e"))).can_read_range("b", "d")
    assert Role("t", (KeyRange(b"a", FROM_KEY),)).can_read_range("b", None)


def test_an_empty_range_end_is_the_one_key_as_etcd_reads_it() -> None:
    n1 = role(KS, node_ref("n1"))
    assert n1.can_read_range(KS.reg("n1"), "") and n1.can_read_range(KS.reg("n1"), b"")
    assert not n1.can_read_range(KS.fence("n2"), "")
    assert not Role("t", (KeyRange(b"a", b"c"),)).can_read_range("x", "")


def test_txn_denials_as_etcd_checks() -> None:
    n1 = role(KS, node_ref("n1"))
    ok = Txn((Cmp(KS.reg("n1"), "create", "==", 5), Cmp(KS.status("n2", "w"), "mod", "==", 3)),
             (Put(KS.status("n1", "w"), "{}"),))
    assert n1.denials(ok) == []
    bad = Txn((Cmp(KS.fence("n2"), "mod", "==", 0),),
              (Put(KS.status("n2", "w"), "{}"), Delete(KS.place("w"))))
    assert n1.denials(bad) == [
        "compare on /vmha/fence/n2 needs read permission",
        "put of /vmha/n/n2/vm/w needs write permission",
        "delete of /vmha/place/w needs write permission"]


@pytest.mark.parametrize("name", ["", "N1", "n1/", "n1/x", "-n1", "n" * 64])
def test_node_role_refuses_invalid_names(name: str) -> None:
    with pytest.raises(SchemaError, match="invalid node name"):
        role(KS, node_ref(name))
    with pytest.raises(SchemaError):
        roles(KS, ["n1", name])


def test_only_node_roles_name_a_node() -> None:
    from schemas.acl import RoleRef
    with pytest.raises(SchemaError, match="only a node role"):
        role(KS, RoleRef("operator", "n1"))
