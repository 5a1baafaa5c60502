"""`vmha auth`'s plan (cli.authplan) on etcd auth states held as values: what setup adds,
in which order, that a state it produced plans nothing more, that a rotated node keeps
only its new user, and the nested-prefix refusal.  The same plans against a real etcd:
tests/integration/test_auth.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.authplan import (
    Change,
    generation,
    grants,
    nested_prefixes,
    next_user,
    node_changes,
    node_users,
    role_report,
    setup_changes,
)
from schemas.acl import ORCHESTRATOR, KeyRange, node_ref, role
from schemas.keys import NAME_RE
from schemas.keys_v2 import KeyspaceV2
from store.auth import AuthState, Grant

KS = KeyspaceV2()
EMPTY = AuthState(enabled=False)


def applied(state: AuthState, changes: list[Change]) -> AuthState:
    """`state` after etcd applied `changes` (as etcd 3.4 does: a grant on the same range
    replaces the kind; a deleted role leaves its users)."""
    roles = dict(state.roles)
    users = dict(state.users)
    enabled = state.enabled
    for c in changes:
        match c.op:
            case "role_add":
                roles[c.role] = frozenset()
            case "grant":
                assert c.grant is not None
                roles[c.role] = frozenset({g for g in roles[c.role] if g.keys != c.grant.keys}
                                          | {c.grant})
            case "revoke":
                roles[c.role] = frozenset(g for g in roles[c.role] if g.keys != c.keys)
            case "role_delete":
                del roles[c.role]
                users = {u: rs - {c.role} for u, rs in users.items()}
            case "user_add":
                users[c.user] = frozenset()
            case "user_grant_role":
                users[c.user] = users[c.user] | {c.role}
            case "user_delete":
                del users[c.user]
            case "root_add":
                users["root"] = frozenset({"root"})
            case "auth_enable":
                assert "root" in users, "etcd refuses to enable auth without root"
                enabled = True
    return AuthState(enabled, roles, users)


def test_setup_from_nothing_creates_every_role_and_user_then_enables() -> None:
    changes = setup_changes(KS, EMPTY, ["n2", "n1"], ["alice"], prune=False)
    assert changes[0] == Change("role_add", role="orchestrator")
    assert [c.op for c in changes[-2:]] == ["root_add", "auth_enable"]
    state = applied(EMPTY, changes)
    for ref in (ORCHESTRATOR, node_ref("n1"), node_ref("n2")):
        r = role(KS, ref)
        assert state.roles[r.name] == grants(r)
    assert state.users == {
        "orchestrator": {"orchestrator"}, "operator": {"operator"},
        "operator-alice": {"operator"}, "monitoring": {"monitoring"},
        "node-n1": {"node-n1"}, "node-n2": {"node-n2"}, "root": {"root"}}
    assert state.enabled
    assert setup_changes(KS, state, ["n1", "n2"], ["alice"], prune=True) == []
    assert all(r["ok"] for r in role_report(KS, state, ["n1", "n2"]))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.from_regex(NAME_RE, fullmatch=True), max_size=6),
       st.sampled_from(["/vmha", "/lab/a"]))
def test_a_second_setup_plans_nothing(nodes: list[str], prefix: str) -> None:
    ks = KeyspaceV2(prefix)
    state = applied(EMPTY, setup_changes(ks, EMPTY, nodes, [], prune=False))
    assert setup_changes(ks, state, nodes, [], prune=False) == []
    assert setup_changes(ks, state, nodes, [], prune=True) == []


def test_other_prefixes_get_their_names() -> None:
    ks = KeyspaceV2("/lab/a")
    state = applied(EMPTY, setup_changes(ks, EMPTY, ["n1"], [], prune=False))
    assert "lab.a.node-n1" in state.roles and state.users["lab.a.node-n1"] == {"lab.a.node-n1"}
    assert state.users["root"] == {"root"}, "etcd's root is never prefixed"


def test_a_changed_grant_is_granted_again_and_pruning_revokes_extras() -> None:
    state = applied(EMPTY, setup_changes(KS, EMPTY, ["n1"], [], prune=False))
    n1 = role(KS, node_ref("n1"))
    # etcd holds one permission per range: a widened one replaces the read grant.
    place = Grant("read", KeyRange.prefix(KS.place_dir))
    widened = Grant("readwrite", KeyRange.prefix(KS.place_dir))
    stray = Grant("readwrite", KeyRange.prefix(KS.fence_dir))
    roles = dict(state.roles)
    roles[n1.name] = (roles[n1.name] - {place}) | {widened, stray}
    drifted = replace(state, roles=roles)
    # Granting the right kind again narrows it, with or without --prune.
    assert setup_changes(KS, drifted, ["n1"], [], prune=False) == [
        Change("grant", role="node-n1", grant=place)]
    fixed = setup_changes(KS, drifted, ["n1"], [], prune=True)
    assert fixed == [Change("grant", role="node-n1", grant=place),
                     Change("revoke", role="node-n1", keys=stray.keys)]
    assert applied(drifted, fixed) == state


def test_pruning_deletes_only_roles_of_nodes_not_kept() -> None:
    state = applied(EMPTY, setup_changes(KS, EMPTY, ["n1", "n2", "n3"], [], prune=False))
    changes = setup_changes(KS, state, ["n1"], [], prune=True, keep_nodes=["n2"])
    assert changes == [Change("user_delete", user="node-n3"), Change("role_delete", role="node-n3")]
    assert setup_changes(KS, state, ["n1", "n2", "n3"], [], prune=False) == []


def test_rotation_generations_and_setup_after_one() -> None:
    state = applied(EMPTY, setup_changes(KS, EMPTY, ["n1", "n1.g2"], [], prune=False))
    # User node-n1.g2 is node n1.g2's own: n1's next user skips the name.
    assert next_user(KS, "n1", state) == "node-n1.g3"
    rotated = applied(state, [Change("user_add", user="node-n1.g3"),
                              Change("user_grant_role", user="node-n1.g3", role="node-n1")])
    assert node_users(KS, "n1", rotated) == ["node-n1", "node-n1.g3"]
    assert next_user(KS, "n1", rotated) == "node-n1.g4"
    finished = applied(rotated, [Change("user_delete", user="node-n1")])
    assert node_users(KS, "n1", finished) == ["node-n1.g3"]
    # The retired user is never made again, by setup or by node add.
    assert setup_changes(KS, finished, ["n1", "n1.g2"], [], prune=True) == []
    assert node_changes(KS, "n1", finished, prune=False) == []
    assert [generation(KS, "n1", u) for u in ("node-n1", "node-n1.g12", "node-n1.gx")] == [
        1, 12, 0]


def test_node_add_on_its_own() -> None:
    changes = node_changes(KS, "n7", EMPTY, prune=False)
    state = applied(EMPTY, changes)
    assert state.roles == {"node-n7": grants(role(KS, node_ref("n7")))}
    assert state.users == {"node-n7": {"node-n7"}}
    assert not state.enabled


@pytest.mark.parametrize(("mine", "other", "nested"), [
    ("/vmha", "/vmha/n", True), ("/vmha/n", "/vmha", True), ("/vmha", "/vmha2", False),
    ("/lab/a", "/lab/b", False), ("/lab", "/lab/b/c", True)])
def test_nested_prefixes_are_found(mine: str, other: str, nested: bool) -> None:
    theirs = KeyspaceV2(other)
    orch = role(theirs, ORCHESTRATOR)
    state = AuthState(True, {orch.name: grants(orch)})
    found = nested_prefixes(KeyspaceV2(mine), state)
    assert bool(found) == nested
    if nested:
        assert found == [f"{other} (role {orch.name})"]
