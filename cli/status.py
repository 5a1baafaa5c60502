"""`vmha status`: one screen with the leader and its epoch, the nodes, the VMs and any
invalid keys; in JSON also the superseded statuses (keyspace 2: a VM's status keys that
the current-status rule passed over, e.g. the source's after a migration; keyspace 1
has none, the list is empty).

Invalid keys are shown as data, never interpreted: a key or message may hold newlines,
control characters or bytes that were not UTF-8 (escaped as `\\xNN` by the store), so
the text output escapes them and the JSON output is plain ASCII."""

from __future__ import annotations

import argparse
from typing import Any

from cli.cluster import open_cluster
from cli.common import _node_rows, _out
from cli.node import cmd_node_list
from cli.vm import cmd_vm_list


def cmd_status(args: argparse.Namespace) -> int:
    cluster = open_cluster(args)
    snap = cluster.snapshot()
    leader = snap.leader
    data: dict[str, Any] = {
        "revision": snap.revision,
        "leader": ({"id": leader.value.id, "epoch": leader.create_revision,
                    "since": leader.value.elected_at} if leader else None),
        "nodes": _node_rows(snap, cluster.store),
        "invalid_keys": [str(i.error) for i in snap.invalid],
        "invalid": [{"key": i.key, "key_revision": i.mod_revision, "kind": i.kind,
                     "name": i.name or None, "error": i.error.message}
                    for i in snap.invalid],
    }
    vms = []
    for name in sorted(snap.specs):
        p = snap.placements[name].value if name in snap.placements else None
        s = snap.statuses[name].value if name in snap.statuses else None
        vms.append({"name": name, "desired": snap.specs[name].value.state,
                    "node": s.node if s else None, "state": s.state if s else None,
                    "since": s.since if s else None, "placed_on": p.node if p else None,
                    "reason": p.reason if p else None})
    data["vms"] = vms
    data["superseded"] = [{"vm": vm, "node": e.value.node, "state": e.value.state,
                           "since": e.value.since, "key": e.key,
                           "key_revision": e.mod_revision}
                          for vm, entries in sorted(cluster.superseded().items())
                          for e in entries]
    if args.output == "json":
        _out(args, data, None)  # json.dumps escapes control and non-ASCII characters
        return 0
    print(f"leader: {leader.value.id} (epoch {leader.create_revision})" if leader
          else "leader: none")
    args_copy = argparse.Namespace(**vars(args))
    cmd_node_list(args_copy)
    print()
    cmd_vm_list(args_copy)
    for e in data["invalid_keys"]:
        print(f"invalid: {_printable(e)}")
    return 0


def _printable(text: str) -> str:
    """`text` with control characters and lone surrogates escaped: one line, any
    terminal, any output encoding."""
    return "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF
                   else repr(c)[1:-1] for c in text)


def register(groups: dict[str, Any]) -> None:
    groups["root"].add_parser("status", help="one screen: leader, nodes, VMs").set_defaults(
        fn=cmd_status)
