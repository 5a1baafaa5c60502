"""Fencing commands:

    vmha node confirm-off NAME [--reason TEXT]   record a manual fence (method manual)
    vmha fence list                              fence records: method, outcome, attempts
"""

from __future__ import annotations

import argparse
import getpass
import time
from typing import Any

from cli.common import EXIT_FAIL, EXIT_INPUT, CliError, _out, _store, _store_v1
from schemas import FenceRecord
from schemas.keys import valid_name
from store.etcd import Cmp, EtcdStore, Put


def cmd_confirm_off(args: argparse.Namespace) -> int:
    if not valid_name(args.name):
        raise CliError(f"invalid node name {args.name!r}", EXIT_INPUT)
    store = _store_v1(args, "node confirm-off")
    # The leader rewrites a failed record at each retry of the fence device (every
    # fence_retry_max_s at most): a write that lost that race is tried again on a fresh
    # read; each try still requires the node unregistered and the record unchanged.
    for _ in range(4):
        if _confirm_off_once(args, store, last=False):
            return 0
    _confirm_off_once(args, store, last=True)
    return 0


def _confirm_off_once(args: argparse.Namespace, store: EtcdStore, *, last: bool) -> bool:
    ks = store.keyspace
    snap = store.snapshot()
    if args.name in snap.nodes:
        raise CliError(f"node {args.name} is registered (its agent holds a lease): it is not "
                       "lost; drain it instead", EXIT_FAIL)
    prev = snap.fences.get(args.name)
    if prev is not None and prev.value.outcome == "success":
        print(f"node {args.name} is already fenced (method {prev.value.method})")
        return True
    who = f"operator:{getpass.getuser()}"
    rec = FenceRecord(node=args.name, lease_id="manual", method="manual", outcome="success",
                      reason=args.reason, epoch=snap.leader.create_revision if snap.leader else 0,
                      duration_s=0.0, fenced_at=time.time(),
                      attempts=prev.value.attempts + 1 if prev else 1, device=who)
    res = store.txn([Cmp(ks.node(args.name), "create", "==", 0),
                     Cmp(ks.fence(args.name), "mod", "==", prev.mod_revision if prev else 0)],
                    [Put(ks.fence(args.name), rec.to_json())])
    if not res.succeeded:
        if not last:
            return False
        raise CliError(f"node {args.name} registered again or its fence record changed "
                       "meanwhile; nothing written", EXIT_FAIL)
    print(f"recorded manual fence of {args.name} (revision {res.revision}): its VMs may now "
          "boot elsewhere. You confirmed that nothing runs on it any more.")
    return True


def cmd_fence_list(args: argparse.Namespace) -> int:
    snap = _store(args).snapshot()
    data: list[dict[str, Any]] = [e.value.model_dump(mode="json") for _, e in
                                  sorted(snap.fences.items())]
    table = [["NODE", "METHOD", "OUTCOME", "ATTEMPTS", "DURATION", "REASON"]]
    for r in data:
        table.append([r["node"], r["method"], r["outcome"], r["attempts"],
                      f"{r['duration_s']:.2f}s", r["reason"][:80]])
    _out(args, data, table if data else None)
    return 0


def register(groups: dict[str, Any]) -> None:
    p = groups["node"].add_parser(
        "confirm-off", help="record that a lost node is powered off (manual fence)")
    p.add_argument("name")
    p.add_argument("--reason", default="confirmed off by an operator")
    p.set_defaults(fn=cmd_confirm_off)
    fence = groups["root"].add_parser("fence", help="fence records").add_subparsers(
        dest="fencecmd", required=True)
    fence.add_parser("list", help="every fence record").set_defaults(fn=cmd_fence_list)
