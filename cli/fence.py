"""Fencing commands:

    vmha node confirm-off NAME [--reason TEXT]   record a manual fence (method manual)
    vmha fence list                              fence records: method, outcome, attempts

On keyspace 2 the operator does not write fence records (its role cannot): confirm-off
writes the request `/vmha/confirm-off/NAME` and waits for the leader to turn it into the
`manual` record (docs/keyspace-v2.md, sections 1 and 2).
"""

from __future__ import annotations

import argparse
import getpass
import time
from typing import Any

from cli.cluster import Cluster, open_cluster
from cli.common import EXIT_FAIL, EXIT_INPUT, CliError, _out
from schemas import FenceRecord
from schemas.keys import valid_name
from schemas.models_v2 import ConfirmOff
from schemas.snapshot import ClusterSnapshot
from store.etcd import Cmp, Put


def cmd_confirm_off(args: argparse.Namespace) -> int:
    if not valid_name(args.name):
        raise CliError(f"invalid node name {args.name!r}", EXIT_INPUT)
    cluster = open_cluster(args)
    if cluster.version == 2:
        return _confirm_off_v2(args, cluster)
    # The leader rewrites a failed record at each retry of the fence device (every
    # fence_retry_max_s at most): a write that lost that race is tried again on a fresh
    # read; each try still requires the node unregistered and the record unchanged.
    for _ in range(4):
        if _confirm_off_once(args, cluster, last=False):
            return 0
    _confirm_off_once(args, cluster, last=True)
    return 0


def _needed(args: argparse.Namespace, snap: ClusterSnapshot) -> bool:
    """False if the node is fenced already; CliError if it is registered."""
    if args.name in snap.nodes:
        raise CliError(f"node {args.name} is registered (its agent holds a lease): it is not "
                       "lost; drain it instead", EXIT_FAIL)
    prev = snap.fences.get(args.name)
    if prev is not None and prev.value.outcome == "success":
        print(f"node {args.name} is already fenced (method {prev.value.method})")
        return False
    return True


def _confirm_off_once(args: argparse.Namespace, cluster: Cluster, *, last: bool) -> bool:
    store, ks = cluster.store, cluster.ks
    snap = cluster.snapshot()
    if not _needed(args, snap):
        return True
    prev = snap.fences.get(args.name)
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


def _confirm_off_v2(args: argparse.Namespace, cluster: Cluster) -> int:
    """Write the request; the leader writes the record (epoch-fenced, only while the node
    is unregistered) and deletes the request in one transaction."""
    from cli.cluster_v2 import ClusterV2

    assert isinstance(cluster, ClusterV2)
    if not _needed(args, cluster.snapshot()):
        return 0
    req = ConfirmOff(node=args.name, by=f"operator:{getpass.getuser()}", reason=args.reason,
                     at=time.time())
    rev = cluster.confirm_off(req)
    print(f"confirm-off of {args.name} requested ({cluster.confirm_off_key(args.name)}, "
          f"revision {rev}); waiting for the leader to record the manual fence ...")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        model = cluster.model()  # the record and the request at one revision
        fence = model.snapshot.fences.get(args.name)
        if fence is not None and fence.mod_revision > rev and fence.value.outcome == "success":
            print(f"recorded manual fence of {args.name} (revision {fence.mod_revision}): its "
                  "VMs may now boot elsewhere. You confirmed that nothing runs on it any more.")
            return 0
        if args.name not in model.confirm_offs:
            raise CliError(f"the leader dropped the confirm-off of {args.name} without a "
                           "fence record (the node registered again, or is fenced already)",
                           EXIT_FAIL)
        time.sleep(0.2)
    raise CliError(f"no leader recorded the fence of {args.name} within {args.timeout} s; the "
                   f"request stays in {cluster.confirm_off_key(args.name)} for the next "
                   "leader (delete it to withdraw it)", EXIT_FAIL)


def cmd_fence_list(args: argparse.Namespace) -> int:
    snap = open_cluster(args).snapshot()
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
    p.add_argument("--timeout", type=float, default=30.0,
                   help="keyspace 2: how long to wait for the leader's fence record")
    p.set_defaults(fn=cmd_confirm_off)
    fence = groups["root"].add_parser("fence", help="fence records").add_subparsers(
        dest="fencecmd", required=True)
    fence.add_parser("list", help="every fence record").set_defaults(fn=cmd_fence_list)
