"""`vmha node`: list and inspect nodes, cordon and uncordon them, drain one (keyspace 1:
a lease revoke, as `etcdctl lease revoke` does; keyspace 2: a cordon, the operator's
role cannot revoke leases, or with `--revoke` the lease revoke, root's credential).
`vmha node confirm-off` is a fence command (cli.fence)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from cli.cluster import open_cluster
from cli.common import (
    EXIT_FAIL,
    EXIT_INPUT,
    CliError,
    _node_rows,
    _out,
    _ts,
    node_state,
)
from schemas import CordonMarker
from schemas.models import DRAIN_REASON


def _vms_on(snap: Any, node: str) -> list[str]:
    out = set()
    for vm, se in snap.statuses.items():
        if se.value.node == node and se.value.state in ("running", "paused", "migrating"):
            out.add(vm)
    for vm, pe in snap.placements.items():
        if pe.value.node == node and vm in snap.specs and snap.specs[vm].value.state == "running":
            st = snap.statuses.get(vm)
            if st is None or st.value.node == node:
                out.add(vm)
    return sorted(out)


def cmd_node_list(args: argparse.Namespace) -> int:
    cluster = open_cluster(args)
    rows = _node_rows(cluster.snapshot(), cluster.store)
    table = [["NAME", "STATE", "LEASE", "TTL", "FREE MEM", "VCPU"]] + [
        [r["name"], node_state(r),
         r["lease_id"] or "-", r["lease_ttl_s"] if r["lease_ttl_s"] is not None else "-",
         f"{r['free_memory_mib']}/{r['memory_mib']}" if r["registered"] else "-",
         r["vcpus"] or "-"] for r in rows]
    _out(args, rows, table)
    return 0


def cmd_node_uncordon(args: argparse.Namespace) -> int:
    cluster = open_cluster(args)
    if cluster.store.get(cluster.cordon_key(args.name)) is None:
        if cluster.store.get(cluster.reg_key(args.name)) is None:
            raise CliError(f"unknown node {args.name!r}", EXIT_INPUT)
        print(f"node/{args.name} is not cordoned")
        return 0
    cluster.uncordon(args.name)
    print(f"node/{args.name} uncordoned")
    return 0


def cmd_node_show(args: argparse.Namespace) -> int:
    cluster = open_cluster(args)
    store = cluster.store
    snap = cluster.snapshot()
    reg = snap.nodes.get(args.name)
    if reg is None and args.name not in snap.cordons and args.name not in snap.fences:
        raise CliError(f"unknown node {args.name!r}", EXIT_INPUT)
    data = {
        "name": args.name,
        "registration": reg.value.model_dump(by_alias=True, mode="json") if reg else None,
        "lease_ttl_s": store.lease_ttl(int(reg.value.lease_id, 16)) if reg else None,
        "cordon": (snap.cordons[args.name].value.model_dump(by_alias=True, mode="json")
                   if args.name in snap.cordons else None),
        "fence": (snap.fences[args.name].value.model_dump(by_alias=True, mode="json")
                  if args.name in snap.fences else None),
        "vms": _vms_on(snap, args.name),
    }
    if args.output == "json":
        _out(args, data, None)
        return 0
    state = node_state({"fenced": data["fence"], "registered": reg is not None,
                        "cordoned": data["cordon"]})
    print(f"node/{args.name}: {state}")
    if reg:
        r = reg.value
        print(f"  lease      {r.lease_id} (ttl {data['lease_ttl_s']} s)")
        print(f"  libvirt    {r.libvirt_uri}   migration address {r.migration_address}")
        print(f"  capacity   {r.capacity.memory_mib} MiB, {r.capacity.vcpus} vCPUs; "
              f"cpu {r.cpu.model or '-'}")
        print(f"  agent      pid {r.agent.pid} on {r.agent.hostname}, since "
              f"{_ts(r.registered_at)}")
    if data["cordon"]:
        print(f"  cordoned   {data['cordon']['reason']} (by {data['cordon']['by']})")
    if data["fence"]:
        print(f"  fenced     {data['fence']['method']}/{data['fence']['outcome']}: "
              f"{data['fence']['reason']}")
    print(f"  vms        {', '.join(data['vms']) or '-'}")
    return 0


def cmd_node_cordon(args: argparse.Namespace) -> int:
    cluster = open_cluster(args)
    if cluster.store.get(cluster.reg_key(args.name)) is None:
        raise CliError(f"unknown node {args.name!r} (not registered)", EXIT_INPUT)
    cluster.cordon(CordonMarker(node=args.name, reason=args.reason, by="cli", at=time.time()))
    print(f"node/{args.name} cordoned (its VMs live-migrate away)")
    return 0


def _progress(done: int, total: int, width: int = 30) -> str:
    frac = 1.0 if total == 0 else done / total
    return "[" + "#" * int(frac * width) + "." * (width - int(frac * width)) + f"] {done}/{total}"


def cmd_node_drain(args: argparse.Namespace) -> int:
    """Keyspace 1, or `--revoke`: revoke the node's lease, exactly what `etcdctl lease
    revoke` does.  Keyspace 2: cordon it (docs/keyspace-v2.md, section 5); the leader
    live-migrates its VMs away as from any cordoned node."""
    cluster = open_cluster(args)
    store = cluster.store
    kv = store.get(cluster.reg_key(args.name))
    if kv is None:
        raise CliError(f"node {args.name!r} is not registered (nothing to drain)", EXIT_INPUT)
    lease = json.loads(kv.value)["lease_id"]
    before = _vms_on(cluster.snapshot(), args.name)
    if cluster.version == 1 or args.revoke:
        store.revoke_lease(int(lease, 16))
        how = f"lease {lease} revoked"
    else:
        cluster.cordon(CordonMarker(node=args.name, reason=DRAIN_REASON, by="cli",
                                     at=time.time()))
        how = f"cordoned ({cluster.cordon_key(args.name)})"
    if args.output != "json":
        print(f"node/{args.name}: {how}; draining {len(before)} VM(s)")
    if not args.wait:
        if args.output == "json":
            _out(args, {"node": args.name, "lease_id": lease, "vms": before}, None)
        return 0
    deadline = time.monotonic() + args.timeout
    left = before
    while time.monotonic() < deadline:
        left = _vms_on(cluster.snapshot(), args.name)
        if args.output != "json" and sys.stdout.isatty():
            print("\r  " + _progress(len(before) - len(left), len(before)), end="", flush=True)
        if not left:
            break
        time.sleep(0.25)
    if args.output != "json":
        print(("\r  " if sys.stdout.isatty() else "  ")
              + _progress(len(before) - len(left), len(before)))
    if args.output == "json":
        _out(args, {"node": args.name, "lease_id": lease, "vms": before, "remaining": left},
             None)
    if left:
        print(f"timed out after {args.timeout} s; still on {args.name}: {', '.join(left)}",
              file=sys.stderr)
        return EXIT_FAIL
    if args.output != "json":
        print(f"node/{args.name} drained and cordoned")
    return 0


def register(groups: dict[str, Any]) -> None:
    node = groups["root"].add_parser("node", help="inspect and cordon nodes").add_subparsers(
        dest="nodecmd", required=True)
    groups["node"] = node
    node.add_parser("list").set_defaults(fn=cmd_node_list)
    unc = node.add_parser("uncordon")
    unc.add_argument("name")
    unc.set_defaults(fn=cmd_node_uncordon)
    p = node.add_parser("show", help="one node in detail")
    p.add_argument("name")
    p.set_defaults(fn=cmd_node_show)
    p = node.add_parser("cordon", help="mark a node unschedulable (its VMs move away)")
    p.add_argument("name")
    p.add_argument("--reason", default="cordoned by operator")
    p.set_defaults(fn=cmd_node_cordon)
    p = node.add_parser("drain", help="move every VM off the node (keyspace 1: revoke its "
                        "lease, as etcdctl lease revoke does; keyspace 2: cordon it)")
    p.add_argument("name")
    p.add_argument("--revoke", action="store_true",
                   help="keyspace 2: revoke the node's lease instead (root's credential)")
    p.add_argument("--wait", action="store_true", help="show progress until the node is empty")
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(fn=cmd_node_drain)
