"""What `vmha auth …` changes in etcd, worked out from what etcd holds (`AuthState`) and
the roles of `schemas.acl` (docs/keyspace-v2.md, section 5).  Pure: the commands read
the state, plan here, then print or apply the plan, so a dry run and a real run list the
same changes and a run over a matching state plans none.

Names.  Every role and user vmha makes gets `schemas.acl.name_prefix` in front (empty for
`/vmha`).  A node's users are the users that hold its role: `node-N` at first, then
`node-N.g2`, `node-N.g3`… after compromise rotations.  A node's user is made only while
the node has none, so a setup run after a rotation never brings back a retired user.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from schemas.acl import (
    MONITORING,
    OPERATOR,
    ORCHESTRATOR,
    KeyRange,
    Role,
    RoleRef,
    name_prefix,
    node_ref,
    role,
    role_name,
)
from schemas.keys_v2 import KeyspaceV2
from store.auth import AuthState, EtcdAuth, Grant

ROOT = "root"  # etcd's own user and role: never prefixed

ChangeOp = Literal["role_add", "grant", "revoke", "role_delete", "user_add", "user_grant_role",
                   "user_delete", "root_add", "auth_enable"]


@dataclass(frozen=True)
class Change:
    """One request that writes etcd's auth state."""

    op: ChangeOp
    role: str = ""
    user: str = ""
    grant: Grant | None = None
    keys: KeyRange | None = None

    def __str__(self) -> str:
        match self.op:
            case "role_add":
                return f"add role {self.role}"
            case "grant":
                return f"grant {self.role} {self.grant}"
            case "revoke":
                return f"revoke {self.role} {self.keys}"
            case "role_delete":
                return f"delete role {self.role}"
            case "user_add":
                return f"add user {self.user} (client certificate CN={self.user})"
            case "user_grant_role":
                return f"grant role {self.role} to user {self.user}"
            case "user_delete":
                return f"delete user {self.user}"
            case "root_add":
                return f"add user {ROOT} with role {ROOT}"
            case _:
                return "enable authentication"

    def apply(self, auth: EtcdAuth, root_password: str | None) -> None:
        match self.op:
            case "role_add":
                auth.role_add(self.role)
            case "grant":
                assert self.grant is not None
                auth.grant(self.role, self.grant)
            case "revoke":
                assert self.keys is not None
                auth.revoke(self.role, self.keys)
            case "role_delete":
                auth.role_delete(self.role)
            case "user_add":
                auth.user_add(self.user)
            case "user_grant_role":
                auth.user_grant_role(self.user, self.role)
            case "user_delete":
                auth.user_delete(self.user)
            case "root_add":
                if root_password is None:
                    auth.user_add(ROOT)  # CN-only: a random password nobody knows
                else:
                    auth.user_add_with_password(ROOT, root_password)
                auth.user_grant_role(ROOT, ROOT)
            case "auth_enable":
                auth.auth_enable()


def grants(r: Role) -> frozenset[Grant]:
    """A role of `schemas.acl` as etcd stores its permissions."""
    return frozenset({*(Grant("readwrite", k) for k in r.readwrite),
                      *(Grant("read", k) for k in r.read)})


def user_name(ks: KeyspaceV2, base: str) -> str:
    return name_prefix(ks) + base


def fixed_users(ks: KeyspaceV2, operators: Iterable[str]) -> dict[str, RoleRef]:
    """The users that are not a node's: user -> role."""
    out = {user_name(ks, "orchestrator"): ORCHESTRATOR, user_name(ks, "operator"): OPERATOR,
           user_name(ks, "monitoring"): MONITORING}
    out.update({user_name(ks, f"operator-{o}"): OPERATOR for o in sorted(set(operators))})
    return out


def node_of_role(ks: KeyspaceV2, name: str) -> str | None:
    """The node whose role `name` is (None: not a node role of this prefix)."""
    head = name_prefix(ks) + "node-"
    return name[len(head):] if name.startswith(head) and len(name) > len(head) else None


def node_users(ks: KeyspaceV2, node: str, state: AuthState) -> list[str]:
    """The users of `node`, oldest generation first (the base user is generation 1; a
    user holding the role under another name sorts first, as the oldest)."""
    rname = role_name(ks, node_ref(node))
    users = {u for u, rs in state.users.items() if rname in rs}
    return sorted(users, key=lambda u: generation(ks, node, u))


def generation(ks: KeyspaceV2, node: str, user: str) -> int:
    base = user_name(ks, f"node-{node}")
    if user == base:
        return 1
    m = re.fullmatch(re.escape(base) + r"\.g([0-9]{1,6})", user)
    return int(m.group(1)) if m else 0


def next_user(ks: KeyspaceV2, node: str, state: AuthState) -> str:
    """The user of `node`'s next certificate after a compromise: a generation above every
    one it has, and a name no user has (`node-n1.g2` may be node `n1.g2`'s own)."""
    gen = max([generation(ks, node, u) for u in node_users(ks, node, state)] + [1]) + 1
    base = user_name(ks, f"node-{node}")
    while f"{base}.g{gen}" in state.users:
        gen += 1
    return f"{base}.g{gen}"


def role_changes(r: Role, state: AuthState, *, prune: bool) -> list[Change]:
    """Make role `r` exist with its grants (and, pruning, only those)."""
    have = state.roles.get(r.name)
    want = grants(r)
    out = [] if have is not None else [Change("role_add", role=r.name)]
    out += [Change("grant", role=r.name, grant=g)
            for g in sorted(want - (have or frozenset()), key=str)]
    if prune and have is not None:
        wanted_keys = {g.keys for g in want}
        # A grant of the right keys with another kind was re-granted above (etcd
        # replaces the kind of a permission on the same range); only other ranges go.
        out += [Change("revoke", role=r.name, keys=k)
                for k in sorted({g.keys for g in have} - wanted_keys, key=str)]
    return out


def user_changes(user: str, rname: str, state: AuthState) -> list[Change]:
    have = state.users.get(user)
    out = [] if have is not None else [Change("user_add", user=user)]
    if have is None or rname not in have:
        out.append(Change("user_grant_role", user=user, role=rname))
    return out


def node_changes(ks: KeyspaceV2, node: str, state: AuthState, *, prune: bool) -> list[Change]:
    """Role `node-N` with its grants, and its user unless the node has one."""
    r = role(ks, node_ref(node))
    out = role_changes(r, state, prune=prune)
    if not node_users(ks, node, state):
        out += user_changes(user_name(ks, f"node-{node}"), r.name, state)
    return out


def setup_changes(ks: KeyspaceV2, state: AuthState, nodes: Iterable[str],
                  operators: Iterable[str], *, prune: bool, keep_nodes: Iterable[str] = (),
                  enable: bool = True) -> list[Change]:
    """Every change of `vmha auth setup` but the config, in the order of section 5:
    roles, users, root, then enabling auth, last, so that a failure before it leaves
    etcd open to its clients as it was.  Pruning, the roles (and their users) of nodes
    neither in `nodes` nor in `keep_nodes` (nodes with keys in etcd) are deleted."""
    nodes = sorted(set(nodes))
    out: list[Change] = []
    for ref in (ORCHESTRATOR, OPERATOR, MONITORING):
        out += role_changes(role(ks, ref), state, prune=prune)
    for n in nodes:
        out += role_changes(role(ks, node_ref(n)), state, prune=prune)
    for user, ref in fixed_users(ks, operators).items():
        out += user_changes(user, role_name(ks, ref), state)
    for n in nodes:
        if not node_users(ks, n, state):
            out += user_changes(user_name(ks, f"node-{n}"), role_name(ks, node_ref(n)), state)
    if prune:
        keep = set(nodes) | set(keep_nodes)
        for rname in sorted(state.roles):
            node = node_of_role(ks, rname)
            if node is not None and node not in keep:
                out += [Change("user_delete", user=u) for u in node_users(ks, node, state)]
                out.append(Change("role_delete", role=rname))
    if ROOT not in state.users:
        out.append(Change("root_add"))
    elif ROOT not in state.users[ROOT]:
        out.append(Change("user_grant_role", user=ROOT, role=ROOT))
    if enable and not state.enabled:
        out.append(Change("auth_enable"))
    return out


def nested_prefixes(ks: KeyspaceV2, state: AuthState) -> list[str]:
    """Prefixes of other vmha clusters on this etcd that nest with `ks`'s (one inside the
    other): their roles would grant keys of ours, or ours theirs (section 8).  Found by
    the key `P/leader` every orchestrator role is granted."""
    mine = role_name(ks, ORCHESTRATOR)
    out = []
    for rname, gs in sorted(state.roles.items()):
        if rname == mine or not rname.endswith("orchestrator"):
            continue
        for g in gs:
            key = g.keys.start.decode("utf-8", "replace")
            if g.keys.end or not key.endswith("/leader"):
                continue
            other = key[:-len("/leader")]
            if other != ks.prefix and (other.startswith(ks.prefix + "/")
                                       or ks.prefix.startswith(other + "/")):
                out.append(f"{other} (role {rname})")
    return out


def role_report(ks: KeyspaceV2, state: AuthState, nodes: Iterable[str]) -> list[dict[str, Any]]:
    """Each role vmha needs with its grants as etcd holds them and what differs."""
    rows: list[dict[str, Any]] = []
    refs = [ORCHESTRATOR, OPERATOR, MONITORING, *(node_ref(n) for n in sorted(set(nodes)))]
    for ref in refs:
        r = role(ks, ref)
        have = state.roles.get(r.name)
        want = grants(r)
        missing = sorted(str(g) for g in want - (have or frozenset()))
        extra = sorted(str(g) for g in (have or frozenset()) - want)
        users = (node_users(ks, ref.node, state) if ref.kind == "node" else
                 sorted(u for u, rs in state.users.items() if r.name in rs))
        rows.append({"role": r.name, "exists": have is not None, "users": users,
                     "grants": sorted(str(g) for g in have or ()), "missing": missing,
                     "extra": extra,
                     "ok": have is not None and not missing and not extra and bool(users)})
    return rows
