"""Placement commands: `vmha snapshot`, `vmha simulate` (the planner offline on a
snapshot) and `vmha explain`.  (`vmha vm add`'s placement options and admission control
are in cli.vm.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cli.cluster import open_cluster
from cli.common import EXIT_INPUT, CliError, _out
from orchestrator import planner, simulate
from orchestrator.placement import Placer, node_group

# ---- snapshot ----------------------------------------------------------------------------


def cmd_snapshot(args: argparse.Namespace) -> int:
    snap = open_cluster(args).snapshot_to_export()
    print(json.dumps(simulate.export_snapshot(snap, args.prefix), indent=1, sort_keys=True))
    return 0


# ---- simulate ----------------------------------------------------------------------------


def _load(path: str) -> Any:
    try:
        raw = sys.stdin.read() if path == "-" else Path(path).read_text()
        snap = simulate.load_snapshot(json.loads(raw))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read snapshot {path}: {exc}", EXIT_INPUT) from None
    return snap


def cmd_simulate(args: argparse.Namespace) -> int:
    snap = _load(args.snapshot)
    for node in [*args.fail, *args.drain]:
        if node not in snap.nodes:
            raise CliError(f"unknown or unregistered node {node!r} in the snapshot", EXIT_INPUT)
    overrides: dict[str, Any] = {}
    if args.max_moves is not None:
        overrides["rebalance_max_moves"] = args.max_moves
    before = simulate.node_usage(snap)
    started = time.perf_counter()
    res = simulate.simulate(snap, fail=args.fail, drain=args.drain, rebalance=args.rebalance,
                            max_cycles=args.max_cycles, clock=time.perf_counter,
                            overrides=overrides)
    report = res.report(before)
    report["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 2)
    report["input"] = {"fail": args.fail, "drain": args.drain, "rebalance": args.rebalance,
                       "revision": snap.revision, "nodes": len(snap.nodes),
                       "vms": len(snap.specs)}
    if args.output == "json":
        print(json.dumps(report, indent=1, sort_keys=True))
        return 0
    print(f"simulated: fail={','.join(args.fail) or '-'} drain={','.join(args.drain) or '-'} "
          f"rebalance={'on' if args.rebalance else 'off'}; {report['cycles']} cycle(s), "
          f"{report['migrations']} migration(s), {report['boots']} boot(s), "
          f"{len(report['pending'])} pending, {len(report['waiting'])} waiting"
          + ("" if report["converged"] else " (did not converge)"))
    for kind, rows in (("migrate", report["moves"]), ("boot", report["booted"])):
        for r in rows:
            src = f"{r['from_node']} -> " if r["from_node"] else ""
            print(f"  {kind:8} {r['vm']:20} {src}{r['node']}  [wave {r['cycle'] + 1}] "
                  f"{r['reason']}")
    for r in report["pending"]:
        print(f"  pending  {r['vm']:20} {r['reason']}")
    for r in report["waiting"]:
        print(f"  waiting  {r['vm']:20} {r['reason']}")
    b, b0 = report["balance"], report["balance_before"]
    print(f"memory utilisation: mean {b['mean']:.1%} stddev {b['stddev']:.3f} max "
          f"{b['max']:.1%} (before: stddev {b0['stddev']:.3f} max {b0['max']:.1%})")
    table = [["NODE", "GROUP", "SCHED", "VMS", "MEM USED/CAP", "VCPU", "UTIL"]] + [
        [r["node"], r["group"], "yes" if r["schedulable"] else "no", r["vms"],
         f"{r['used_memory_mib']}/{r['memory_mib']}", f"{r['used_vcpus']}/{r['vcpus']}",
         f"{r['memory_util']:.1%}"] for r in report["nodes"]]
    _out(args, report, table)
    for v in report["violations"]:
        print(f"VIOLATION: {v}")
    return 0


# ---- explain -----------------------------------------------------------------------------


def explain_data(snap: Any, vm: str) -> dict[str, Any]:
    """Everything behind one VM's placement: the stored decision, and what the planner
    decides now on this snapshot (with every node's verdict)."""
    if vm not in snap.specs:
        raise CliError(f"no VM named {vm!r}", EXIT_INPUT)
    spec = snap.specs[vm].value
    pe = snap.placements.get(vm)
    se = snap.statuses.get(vm)
    result = planner.plan(snap, epoch=0, now=0.0, wall_time=time.time(), lost_since={})
    now: dict[str, Any] = {"action": "none", "reason": "steady state: nothing to change"}
    for a in result.actions:
        if isinstance(a, planner.WritePlacement) and a.placement.vm == vm:
            p = a.placement
            now = {"action": p.kind, "node": p.node, "from_node": p.from_node,
                   "reason": p.reason, "scores": p.scores}
        elif isinstance(a, planner.Wait) and a.vm == vm:
            now = {"action": "wait", "reason": a.reason}
    placer = Placer.from_snapshot(snap)
    placed_on = pe.value.node if pe else None
    placer.charge(vm, spec, placed_on, -1)
    source = se.value.node if se and se.value.state in ("running", "paused", "migrating") \
        else None
    live_from = source if source in snap.nodes and not snap.schedulable(source) else None
    rows = placer.table(spec, {live_from} if live_from else set(), live_from=live_from)
    return {
        "vm": vm,
        "spec": {k: v for k, v in spec.model_dump().items() if k not in ("domain_xml", "schema_")},
        "placement": pe.value.model_dump(by_alias=True, mode="json") if pe else None,
        "status": se.value.model_dump(by_alias=True, mode="json") if se else None,
        "planner_now": now,
        "live_migration_group": (node_group(snap.nodes[live_from].value)
                                 if live_from else None),
        "candidates": rows,
    }


def cmd_explain(args: argparse.Namespace) -> int:
    data = explain_data(open_cluster(args).snapshot(), args.vm)
    if args.output == "json":
        print(json.dumps(data, indent=1, sort_keys=True))
        return 0
    spec, p, s, now = data["spec"], data["placement"], data["status"], data["planner_now"]
    print(f"vm/{args.vm}: {spec['memory_mib']} MiB, {spec['vcpus']} vCPUs, desired "
          f"{spec['state']}, priority {spec['priority']}")
    for k in ("anti_affinity", "soft_anti_affinity", "affinity", "soft_affinity",
              "allowed_nodes", "node_preferences"):
        if spec[k]:
            print(f"  {k}: {spec[k]}")
    if p:
        src = f"{p['from_node']} -> " if p.get("from_node") else ""
        print(f"placement: {p['kind']} {src}{p['node'] or '-'} (id {p['id']}, epoch "
              f"{p['epoch']})\n  reason: {p['reason']}")
        if p["scores"]:
            print("  scores (free MiB after placing): " + ", ".join(
                f"{n}={v:g}" for n, v in sorted(p["scores"].items(), key=lambda kv: -kv[1])))
    else:
        print("placement: none")
    print(f"status: {s['state']} on {s['node']}" if s else "status: none")
    print(f"planner now: {now['action']}"
          + (f" {now.get('from_node') + ' -> ' if now.get('from_node') else ''}"
             f"{now.get('node') or ''}" if now["action"] not in ("none", "wait") else "")
          + f"\n  reason: {now['reason']}")
    table = [["NODE", "GROUP", "OK", "RULED OUT", "SOFT", "UTIL AFTER", "FREE MiB AFTER"]] + [
        [r["node"], r["group"], "yes" if r["eligible"] else "no", r["ruled_out"] or "-",
         f"{r['soft_score']:g}", f"{r['memory_util_after']:.1%}"
         if r["memory_util_after"] is not None else "-", r["free_memory_mib_after"]]
        for r in data["candidates"]]
    _out(args, data, table)
    return 0


# ---- registration ------------------------------------------------------------------------


def _output_option(p: argparse.ArgumentParser) -> None:
    # `vmha simulate ... -o json` as well as `vmha -o json simulate ...`.
    p.add_argument("-o", "--output", choices=["table", "json"], default=argparse.SUPPRESS)


def register(groups: dict[str, Any]) -> None:
    root = groups["root"]
    p = root.add_parser("snapshot", help="export the whole cluster state as JSON "
                                         "(docs/snapshot-format.md)")
    p.set_defaults(fn=cmd_snapshot)
    p = root.add_parser("simulate", help="run the planner offline on a snapshot file")
    p.add_argument("--snapshot", required=True, help="file written by `vmha snapshot` ('-': "
                                                     "standard input)")
    p.add_argument("--fail", nargs="+", action="extend", default=[], metavar="NODE",
                   help="the node is lost and fenced")
    p.add_argument("--drain", nargs="+", action="extend", default=[], metavar="NODE",
                   help="the node is cordoned")
    p.add_argument("--rebalance", action="store_true", help="enable the rebalancer")
    p.add_argument("--max-moves", type=int, help="rebalance moves per interval (override)")
    p.add_argument("--max-cycles", type=int, default=200)
    _output_option(p)
    p.set_defaults(fn=cmd_simulate)
    p = root.add_parser("explain", help="why a VM is where it is, and what the planner "
                                        "would do now")
    p.add_argument("vm")
    _output_option(p)
    p.set_defaults(fn=cmd_explain)
