"""`vmha history` (the event history, filtered) and `vmha availability` (per-VM
outages, MTTR and availability over a window, from that history)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from cli.cluster import open_cluster
from cli.common import EXIT_INPUT, CliError, _out, _parse_time, _ts
from schemas.events import EVENT_KINDS, Event
from store.history import EventFilter


def _filter(args: argparse.Namespace) -> EventFilter:
    if args.kind and args.kind not in EVENT_KINDS:
        raise CliError(f"unknown event kind {args.kind!r}; one of {', '.join(EVENT_KINDS)}",
                       EXIT_INPUT)
    return EventFilter(vm=args.vm, node=args.node, kind=args.kind,
                       since=_parse_time(args.since) if args.since else None,
                       until=_parse_time(args.until) if args.until else None)


def cmd_history(args: argparse.Namespace) -> int:
    flt = _filter(args)  # bad input is refused before etcd is asked anything
    events, errors = open_cluster(args).events(flt)
    if args.limit:
        events = events[-args.limit:]
    rows = [e.model_dump(by_alias=True, mode="json") for e in events]
    table = [["TIME", "KIND", "VM", "NODE", "FROM", "EPOCH", "ACTOR", "REASON"]] + [
        [_ts(e.at), e.kind, e.vm or "-", e.node or "-", e.from_node or "-",
         e.epoch if e.epoch is not None else "-", e.actor,
         e.reason + (f" (downtime {e.downtime_ms} ms)" if e.downtime_ms is not None else "")]
        for e in events]
    _out(args, rows, table)
    for err in errors:
        print(f"invalid: {err}", file=sys.stderr)
    return 0


def outages(events: list[Event], window_start: float, window_end: float) -> dict[str, list[
        tuple[float, float, str]]]:
    """Per VM, the intervals it was down inside the window, from the event history.

    A VM is down from the moment its node is lost (or it is self-fenced or destroyed, or
    its guest crashed under its agent) until its next boot; a live migration counts its
    measured downtime."""
    where: dict[str, str] = {}
    down_since: dict[str, tuple[float, str]] = {}
    out: dict[str, list[tuple[float, float, str]]] = {}
    for e in sorted(events, key=lambda x: x.id):
        if e.kind in ("boot", "migration", "placement") and e.vm and e.node:
            if e.kind == "placement" and e.vm in where:
                continue  # a decision, not a location
            where[e.vm] = e.node
        if e.kind == "migration" and e.vm and e.downtime_ms:
            end = e.at
            out.setdefault(e.vm, []).append((end - e.downtime_ms / 1000.0, end, "migration"))
        if e.kind == "node_lost" and e.node:
            for vm, node in where.items():
                if node == e.node and vm not in down_since:
                    down_since[vm] = (e.at, f"node {e.node} lost")
        if e.kind == "node_back" and e.node:
            # Back before any fence (a drain's lease revoke, a short partition): its VMs
            # never stopped.
            for vm in [v for v, (_, why) in down_since.items() if why == f"node {e.node} lost"]:
                del down_since[vm]
        if e.kind in ("self_fence", "destroy", "crash") and e.vm and e.vm not in down_since:
            down_since[e.vm] = (e.at, e.kind)
        if e.kind == "boot" and e.vm and e.vm in down_since:
            start, why = down_since.pop(e.vm)
            out.setdefault(e.vm, []).append((start, e.at, why))
    for vm, (start, why) in down_since.items():
        out.setdefault(vm, []).append((start, window_end, why + " (still down)"))
    clipped: dict[str, list[tuple[float, float, str]]] = {}
    for vm, ivs in out.items():
        kept = [(max(a, window_start), min(b, window_end), w) for a, b, w in ivs
                if b > window_start and a < window_end]
        if kept:
            clipped[vm] = kept
    return clipped


NINES = [(0.9, "one nine (36.5 days/year)"), (0.99, "two nines (3.65 days/year)"),
         (0.999, "three nines (8.76 hours/year)"), (0.9999, "four nines (52.6 min/year)"),
         (0.99999, "five nines (5.26 min/year)"), (0.999999, "six nines (31.5 s/year)")]


def nines_label(a: float) -> str:
    label = "below one nine"
    for threshold, name in NINES:
        if a >= threshold:
            label = name
    return label


def cmd_availability(args: argparse.Namespace) -> int:
    cluster = open_cluster(args)
    end = _parse_time(args.until) if args.until else time.time()
    start = _parse_time(args.since) if args.since else end - 86400.0
    if end <= start:
        raise CliError("--since must be before --until", EXIT_INPUT)
    events, _ = cluster.events()
    snap = cluster.snapshot()
    downs = outages(events, start, end)
    window = end - start
    rows: list[dict[str, Any]] = []
    for vm in sorted(snap.specs):  # declared VMs only: a removed VM has no availability
        ivs = downs.get(vm, [])
        downtime = sum(b - a for a, b, _ in ivs)
        n = len(ivs)
        mttr = downtime / n if n else 0.0
        mtbf = (window - downtime) / n if n else float("inf")
        # Availability = MTBF / (MTBF + MTTR), which over one window is uptime / window.
        avail = 1.0 if n == 0 else mtbf / (mtbf + mttr)
        rows.append({"vm": vm, "outages": n, "downtime_s": round(downtime, 3),
                     "mttr_s": round(mttr, 3), "mtbf_s": None if n == 0 else round(mtbf, 1),
                     "availability": avail,
                     "nines": round(-math.log10(1 - avail), 2) if avail < 1 else None,
                     "class": nines_label(avail)})
    table = [["VM", "OUTAGES", "DOWNTIME", "MTTR", "AVAILABILITY", "CLASS"]] + [
        [r["vm"], r["outages"], f"{r['downtime_s']:.3f}s", f"{r['mttr_s']:.3f}s",
         f"{r['availability'] * 100:.5f}%", r["class"]] for r in rows]
    if args.output == "json":
        _out(args, {"window": {"since": start, "until": end}, "vms": rows}, None)
    else:
        print(f"window {_ts(start)} .. {_ts(end)} ({window / 3600:.2f} h)")
        _out(args, rows, table)
    return 0


def register(groups: dict[str, Any]) -> None:
    root = groups["root"]
    for name, fn in (("history", cmd_history), ("availability", cmd_availability)):
        p = root.add_parser(name, help="event history" if name == "history"
                            else "per-VM outages, MTTR and availability over a window")
        p.add_argument("--since", help="unix seconds, ISO 8601, or -30m/-2h/-7d "
                                       "(availability default: -1d)")
        p.add_argument("--until")
        if name == "history":
            p.add_argument("--vm")
            p.add_argument("--node")
            p.add_argument("--kind", help=", ".join(EVENT_KINDS))
            p.add_argument("--limit", type=int, default=0)
        p.set_defaults(fn=fn)
