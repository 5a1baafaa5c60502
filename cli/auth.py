"""`vmha auth`: etcd authentication for keyspace 2 (docs/keyspace-v2.md, section 5).

    vmha auth setup [--nodes n1,n2] [--operators alice,bob] [--prune] [--root-cn-only]
                    [--dry-run]                 roles, users, root, then auth enable
    vmha auth check                             each role's grants and users; 1 on a difference
    vmha auth node add NAME                     role node-NAME and its user
    vmha auth node remove NAME [--i-know]       its users and role (not while it is in use)
    vmha auth node rotate NAME [--finish]       a new user for a compromised certificate

Run with etcd's root credential (a client certificate with CN `root`), or before auth is
enabled.  Each command reads first and writes only what differs, so a second run writes
nothing.  `setup` refuses unless the cluster is on keyspace 2: on keyspace 1 the daemons
write shared keys that no per-node role grants, and enabling auth would stop them.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from cli.authplan import (
    ROOT,
    Change,
    nested_prefixes,
    next_user,
    node_changes,
    node_of_role,
    node_users,
    role_report,
    setup_changes,
)
from cli.common import EXIT_FAIL, EXIT_INPUT, CliError, _out, _store
from schemas import SchemaError
from schemas.acl import name_prefix, node_ref, role_name
from schemas.keys import valid_name
from schemas.keys_v2 import KeyRefV2, KeyspaceV2
from schemas.migration import config_schema_2
from schemas.models_v2 import KeyspaceVersion
from store.auth import AuthState, EtcdAuth
from store.etcd import Cmp, EtcdStore, PermissionDenied, Put

KEYSPACE_1_REFUSAL = (
    "refusing to enable etcd authentication: {why}. The daemons of keyspace 1 write keys "
    "shared by every node, which no per-node role grants, so enabling auth now would stop "
    "every agent and the orchestrator. Migrate the cluster to keyspace 2 first "
    "(`vmha keyspace migrate`, docs/keyspace-v2.md section 6; a release without that "
    "command runs no daemon on keyspace 2), then run `vmha auth setup`; until then keep "
    "etcd's auth off (TLS with client certificates works without it)")


def _names(value: str | None, what: str) -> list[str]:
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    bad = [n for n in names if not valid_name(n)]
    if bad:
        raise CliError(f"invalid {what} name(s): {', '.join(bad)}", EXIT_INPUT)
    return names


def _state(auth: EtcdAuth, ks: KeyspaceV2) -> AuthState:
    np = name_prefix(ks)
    try:
        return auth.state(lambda n: n == ROOT or n.startswith(np) or n.endswith("orchestrator"))
    except PermissionDenied as exc:
        raise CliError("etcd's auth is enabled and this credential may not administer it: "
                       "run with etcd's root credential (--etcd-cert/--etcd-key of a "
                       f"certificate with CN {ROOT}) ({exc})", EXIT_FAIL) from None


def _registered(store: EtcdStore, ks: KeyspaceV2) -> set[str]:
    """Nodes with any key under `P/n/` (a registration, statuses)."""
    out = set()
    for page in store.list_pages(ks.node_dir, keys_only=True):
        for kv in page.kvs:
            ref = ks.parse(kv.key)
            if isinstance(ref, KeyRefV2) and ref.node:
                out.add(ref.node)
    return out


def _assigned(store: EtcdStore, ks: KeyspaceV2, node: str) -> int:
    return store.count_only(ks.assignments(node)).count


def _keyspace_2(store: EtcdStore, ks: KeyspaceV2) -> str | None:
    """Why the cluster is not on keyspace 2 (None: it is, migration done)."""
    kv = store.get(ks.version)
    if kv is None:
        return f"{ks.version} is absent, so the cluster runs keyspace 1"
    try:
        v = KeyspaceVersion.from_json(kv.value, key=ks.version)
    except SchemaError as exc:
        return f"{ks.version} is not a valid keyspace marker ({exc})"
    if v.state != "done":
        return f"the migration to keyspace 2 is not done ({ks.version} says {v.state!r})"
    return None


def _run(args: argparse.Namespace, auth: EtcdAuth, changes: list[Change],
         extra: dict[str, Any] | None = None, root_password: str | None = None) -> int:
    """Print the changes; apply them in order unless it is a dry run."""
    dry = bool(getattr(args, "dry_run", False))
    if not dry:
        for c in changes:
            c.apply(auth, root_password)
    data = {"dry_run": dry, "changes": [str(c) for c in changes], "writes": len(auth.writes),
            **(extra or {})}
    if args.output == "json":
        _out(args, data, None)
    elif not changes:
        print("unchanged: nothing to do")
    else:
        for c in changes:
            print(f"{'would ' if dry else ''}{c}")
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    ks = KeyspaceV2(args.prefix)
    given, operators = _names(args.nodes, "node"), _names(args.operators, "operator")
    store = _store(args)
    auth = EtcdAuth(store)
    state = _state(auth, ks)
    nested = nested_prefixes(ks, state)
    if nested:
        raise CliError(f"prefix {ks.prefix} nests with another vmha cluster's on this etcd: "
                       f"{', '.join(nested)}; each role of one would cover keys of the "
                       "other. Use prefixes where neither is a path under the other",
                       EXIT_FAIL)
    registered = _registered(store, ks)
    with_roles = {n for r in state.roles if (n := node_of_role(ks, r)) and valid_name(n)}
    nodes = set(given) | registered | (set() if args.prune else with_roles)
    keep = registered | {n for n in with_roles if _assigned(store, ks, n)}
    changes = setup_changes(ks, state, nodes, operators, prune=args.prune, keep_nodes=keep)
    config_absent = store.get(ks.config) is None
    config = ("would create" if args.dry_run else "created") if config_absent else "unchanged"
    refusal = _keyspace_2(store, ks)
    said = f"{config} {ks.config} with the default config"
    if config_absent and args.output != "json" and args.dry_run:
        print(said)
    if refusal is not None:
        # A dry run still shows what a run would do once the cluster is ready.
        if args.dry_run:
            _run(args, auth, changes, {"config": config})
        raise CliError(KEYSPACE_1_REFUSAL.format(why=refusal), EXIT_FAIL)
    password = None
    if any(c.op == "root_add" for c in changes) and not args.root_cn_only and not args.dry_run:
        password = _root_password()
    if config_absent and not args.dry_run:
        # Before auth is enabled (last): the orchestrator's role no longer writes it.
        # "schema": 2, as `vmha keyspace migrate` leaves it: keyspace 1's code refuses it.
        store.txn([Cmp(ks.config, "create", "==", 0)], [Put(ks.config, config_schema_2(None))])
        if args.output != "json":
            print(said)
    return _run(args, auth, changes, {"config": config}, password)


def _root_password() -> str:
    if not sys.stdin.isatty():
        raise CliError("etcd has no root user: give --root-cn-only (root logs in by its "
                       "client certificate only) or run on a terminal to type a password",
                       EXIT_INPUT)
    first = getpass.getpass("password for etcd's root user: ")
    if not first or first != getpass.getpass("again: "):
        raise CliError("the passwords are empty or differ; nothing written", EXIT_INPUT)
    return first


def cmd_check(args: argparse.Namespace) -> int:
    ks = KeyspaceV2(args.prefix)
    store = _store(args)
    state = _state(EtcdAuth(store), ks)
    nodes = _registered(store, ks) | {
        n for r in state.roles if (n := node_of_role(ks, r)) and valid_name(n)}
    rows = role_report(ks, state, nodes)
    diffs = setup_changes(ks, state, nodes, (), prune=True, keep_nodes=nodes)
    data = {"enabled": state.enabled, "roles": rows, "differences": [str(c) for c in diffs]}
    if args.output == "json":
        _out(args, data, None)
    else:
        table = [["ROLE", "STATE", "USERS", "DETAIL"]]
        for r in rows:
            detail = "; ".join([*(f"missing {g}" for g in r["missing"]),
                                *(f"extra {g}" for g in r["extra"])])
            state_s = "ok" if r["ok"] else "missing" if not r["exists"] else "differs"
            table.append([r["role"], state_s, ",".join(r["users"]) or "-", detail or "-"])
        _out(args, data, table)
        print(f"auth {'enabled' if state.enabled else 'NOT enabled'}; "
              f"{len(diffs)} difference(s)" + "".join(f"\n  {c}" for c in diffs))
    return EXIT_FAIL if diffs else 0


def cmd_node_add(args: argparse.Namespace) -> int:
    ks = KeyspaceV2(args.prefix)
    _names(args.name, "node")
    auth = EtcdAuth(_store(args))
    return _run(args, auth, node_changes(ks, args.name, _state(auth, ks), prune=False))


def cmd_node_remove(args: argparse.Namespace) -> int:
    ks = KeyspaceV2(args.prefix)
    _names(args.name, "node")
    store = _store(args)
    if not args.i_know:
        reg, assigned = store.get(ks.reg(args.name)), _assigned(store, ks, args.name)
        if reg is not None or assigned:
            raise CliError(
                f"node {args.name} is in use ({'registered' if reg else 'not registered'}, "
                f"{assigned} assignment(s)): without its credential its agent can write "
                "nothing, and its VMs would be fenced and moved. Drain it and stop its agent "
                "first, or give --i-know", EXIT_FAIL)
    auth = EtcdAuth(store)
    state = _state(auth, ks)
    rname = role_name(ks, node_ref(args.name))
    changes = [Change("user_delete", user=u) for u in node_users(ks, args.name, state)]
    if rname in state.roles:
        changes.append(Change("role_delete", role=rname))
    return _run(args, auth, changes)


def cmd_node_rotate(args: argparse.Namespace) -> int:
    ks = KeyspaceV2(args.prefix)
    _names(args.name, "node")
    auth = EtcdAuth(_store(args))
    state = _state(auth, ks)
    users = node_users(ks, args.name, state)
    rname = role_name(ks, node_ref(args.name))
    if not users:
        raise CliError(f"node {args.name} has no user (role {rname}): run "
                       f"`vmha auth node add {args.name}`", EXIT_FAIL)
    if args.finish:
        if len(users) == 1:
            print(f"node {args.name} has one user, {users[0]}: no rotation to finish")
            return 0
        # The newest generation stays; every older certificate is refused from now on.
        return _run(args, auth, [Change("user_delete", user=u) for u in users[:-1]],
                    {"kept": users[-1]})
    if len(users) > 1:
        print(f"a rotation of node {args.name} is under way (users {', '.join(users)}): "
              f"install the certificate of {users[-1]}, restart the agent in place, then run "
              f"`vmha auth node rotate {args.name} --finish`; nothing written")
        return 0
    new = next_user(ks, args.name, state)
    code = _run(args, auth, [Change("user_add", user=new),
                             Change("user_grant_role", user=new, role=rname)], {"new_user": new})
    if args.output != "json":
        print(f"next: issue a client certificate with CN {new}, install it on {args.name}, "
              "restart vmha-agent there (in place: registration and VMs are kept), then run "
              f"`vmha auth node rotate {args.name} --finish` to refuse {users[0]}")
    return code


def register(groups: dict[str, Any]) -> None:
    auth = groups["root"].add_parser(
        "auth", help="etcd authentication: roles, users, certificates (keyspace 2)"
    ).add_subparsers(dest="authcmd", required=True)
    groups["auth"] = auth
    s = auth.add_parser("setup", help="create vmha's roles and users in etcd, then enable auth")
    s.add_argument("--nodes", help="nodes to make roles for, comma separated (besides the "
                   "registered ones and those with a role)")
    s.add_argument("--operators", help="per-person operator users (operator-NAME), comma "
                   "separated")
    s.add_argument("--prune", action="store_true", help="also revoke grants vmha's roles "
                   "should not have and delete roles of nodes not given, registered or assigned")
    s.add_argument("--root-cn-only", action="store_true", help="create etcd's root user "
                   "without a known password (it logs in by its client certificate only)")
    s.add_argument("--dry-run", action="store_true", help="print what would change; write "
                   "nothing")
    s.set_defaults(fn=cmd_setup)
    auth.add_parser("check", help="compare vmha's roles in etcd with the design; exit 1 on "
                    "a difference").set_defaults(fn=cmd_check)
    node = auth.add_parser("node", help="one node's role and users").add_subparsers(
        dest="authnodecmd", required=True)
    a = node.add_parser("add", help="role node-NAME and user node-NAME")
    a.add_argument("name")
    a.set_defaults(fn=cmd_node_add)
    r = node.add_parser("remove", help="delete node-NAME's users and role")
    r.add_argument("name")
    r.add_argument("--i-know", action="store_true", help="even while the node is registered "
                   "or assigned VMs")
    r.set_defaults(fn=cmd_node_remove)
    t = node.add_parser("rotate", help="a new user for a new certificate (compromise); "
                        "--finish deletes the old one")
    t.add_argument("name")
    t.add_argument("--finish", action="store_true", help="delete every user of the node "
                   "but the newest")
    t.set_defaults(fn=cmd_node_rotate)
