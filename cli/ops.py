"""Operator commands: node show/drain/cordon, vm show/start/stop/edit, history,
availability.  Registered into `vmha` through cli.main.EXTENSIONS."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cli.common import EXIT_FAIL, EXIT_INPUT, CliError, _out, _store
from schemas import CordonMarker, SchemaError, VmSpec
from schemas.events import EVENT_KINDS, Event
from schemas.models import MoveRequest
from store.etcd import Cmp, Put
from store.history import EventFilter, read_events

# ---- helpers -----------------------------------------------------------------------------


def _ts(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse_time(s: str) -> float:
    """Unix seconds, ISO 8601, or a relative '-10m' / '-2h' / '-3d'."""
    s = s.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if s.startswith("-") and s[-1:] in units and s[1:-1].replace(".", "", 1).isdigit():
        return time.time() - float(s[1:-1]) * units[s[-1]]
    try:
        return float(s)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"cannot read time {s!r} (use unix seconds, ISO 8601 or -10m)",
                       EXIT_INPUT) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


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


# ---- node --------------------------------------------------------------------------------


def cmd_node_show(args: argparse.Namespace) -> int:
    store = _store(args)
    snap = store.snapshot()
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
    state = ("fenced" if data["fence"] else "lost" if reg is None
             else "cordoned" if data["cordon"] else "ready")
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
    store = _store(args)
    if store.get(store.keyspace.node(args.name)) is None:
        raise CliError(f"unknown node {args.name!r} (not registered)", EXIT_INPUT)
    marker = CordonMarker(node=args.name, reason=args.reason, by="cli", at=time.time())
    store.put(store.keyspace.cordon(args.name), marker.to_json())
    print(f"node/{args.name} cordoned (its VMs live-migrate away)")
    return 0


def _progress(done: int, total: int, width: int = 30) -> str:
    frac = 1.0 if total == 0 else done / total
    return "[" + "#" * int(frac * width) + "." * (width - int(frac * width)) + f"] {done}/{total}"


def cmd_node_drain(args: argparse.Namespace) -> int:
    """Revoke the node's lease, exactly what `etcdctl lease revoke` does."""
    store = _store(args)
    kv = store.get(store.keyspace.node(args.name))
    if kv is None:
        raise CliError(f"node {args.name!r} is not registered (nothing to drain)", EXIT_INPUT)
    lease = json.loads(kv.value)["lease_id"]
    before = _vms_on(store.snapshot(), args.name)
    store.revoke_lease(int(lease, 16))
    if args.output != "json":
        print(f"node/{args.name}: lease {lease} revoked; draining {len(before)} VM(s)")
    if not args.wait:
        if args.output == "json":
            _out(args, {"node": args.name, "lease_id": lease, "vms": before}, None)
        return 0
    deadline = time.monotonic() + args.timeout
    left = before
    while time.monotonic() < deadline:
        left = _vms_on(store.snapshot(), args.name)
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


# ---- vm ----------------------------------------------------------------------------------


def _update_spec(args: argparse.Namespace, change: Callable[[VmSpec], VmSpec]) -> VmSpec:
    store = _store(args)
    key = store.keyspace.vm_spec(args.name)
    kv = store.get(key)
    if kv is None:
        raise CliError(f"no VM named {args.name!r}", EXIT_INPUT)
    try:
        old = VmSpec.from_json(kv.value, key=key)
        new = change(old)
        new = VmSpec.parse_dict(new.model_dump(by_alias=True), key=key)  # re-validate
    except (SchemaError, ValueError) as exc:
        raise CliError(str(exc), EXIT_INPUT) from None
    res = store.txn([Cmp(key, "mod", "==", kv.mod_revision)], [Put(key, new.to_json())])
    if not res.succeeded:
        raise CliError(f"{key} changed while editing; try again", EXIT_FAIL)
    return new


def cmd_vm_start(args: argparse.Namespace) -> int:
    _update_spec(args, lambda s: s.model_copy(update={"state": "running"}))
    print(f"vm/{args.name}: desired state running")
    return 0


def cmd_vm_stop(args: argparse.Namespace) -> int:
    _update_spec(args, lambda s: s.model_copy(update={"state": "stopped"}))
    print(f"vm/{args.name}: desired state stopped (ACPI shutdown, then power off after "
          "stop_timeout_s)")
    return 0


def cmd_vm_migrate(args: argparse.Namespace) -> int:
    """Ask the leader to live-migrate a running VM to a node (a request, not a command:
    the leader checks capacity, constraints, migration group and slots)."""
    store = _store(args)
    ks = store.keyspace
    snap = store.snapshot()
    if args.name not in snap.specs:
        raise CliError(f"no VM named {args.name!r}", EXIT_INPUT)
    if args.to not in snap.nodes:
        raise CliError(f"unknown node {args.to!r} (not registered)", EXIT_INPUT)
    if snap.is_cordoned(args.to):
        raise CliError(f"node {args.to!r} is cordoned", EXIT_INPUT)
    st = snap.statuses.get(args.name)
    if st is None or st.value.state != "running":
        raise CliError(f"VM {args.name!r} is not running; only a running VM can be "
                       "live-migrated", EXIT_INPUT)
    if st.value.node == args.to:
        print(f"vm/{args.name} already runs on {args.to}")
        return 0
    req = MoveRequest(vm=args.name, to=args.to, by="cli", requested_at=time.time())
    store.put(ks.vm_move(args.name), req.to_json())
    print(f"vm/{args.name}: move {st.value.node} -> {args.to} requested ({ks.vm_move(args.name)})")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        snap = store.snapshot()
        st = snap.statuses.get(args.name)
        if st is not None and st.value.node == args.to and st.value.state == "running":
            m = st.value.migration
            print(f"vm/{args.name} runs on {args.to}"
                  + (f" (downtime {m.downtime_ms} ms)" if m and m.downtime_ms is not None
                     else ""))
            return 0
        time.sleep(0.2)
    print(f"timed out after {args.timeout} s; see `vmha explain {args.name}`", file=sys.stderr)
    return EXIT_FAIL


def cmd_vm_edit(args: argparse.Namespace) -> int:
    upd: dict[str, Any] = {}
    if args.memory_mib is not None:
        upd["memory_mib"] = args.memory_mib
    if args.vcpus is not None:
        upd["vcpus"] = args.vcpus
    if args.xml:
        upd["domain_xml"] = Path(args.xml).read_text()
    if not upd:
        raise CliError("nothing to change (give --memory-mib, --vcpus or --xml)", EXIT_INPUT)
    new = _update_spec(args, lambda s: s.model_copy(update=upd))
    print(f"vm/{args.name} updated: memory {new.memory_mib} MiB, {new.vcpus} vCPUs "
          "(takes effect at its next boot)")
    return 0


def cmd_vm_show(args: argparse.Namespace) -> int:
    store = _store(args)
    snap = store.snapshot()
    ks = store.keyspace
    if args.name not in snap.specs:
        bad = [str(e) for e in snap.errors if e.key == ks.vm_spec(args.name)]
        raise CliError(bad[0] if bad else f"no VM named {args.name!r}", EXIT_INPUT)
    spec = snap.specs[args.name].value
    p = snap.placements.get(args.name)
    s = snap.statuses.get(args.name)
    events, _ = read_events(store, EventFilter(vm=args.name))
    data = {
        "spec": spec.model_dump(by_alias=True, mode="json", exclude={"domain_xml"}),
        "placement": p.value.model_dump(by_alias=True, mode="json") if p else None,
        "status": s.value.model_dump(by_alias=True, mode="json") if s else None,
        "events": [e.model_dump(by_alias=True, mode="json") for e in events[-10:]],
    }
    if args.output == "json":
        _out(args, data, None)
        return 0
    print(f"vm/{args.name}: desired {spec.state}, {spec.memory_mib} MiB, {spec.vcpus} vCPUs")
    if s:
        st = s.value
        print(f"  runs       {st.state} on {st.node} since {_ts(st.since)}"
              + (f"  error: {st.error}" if st.error else ""))
        if st.migration:
            print(f"  migrated   {st.migration.source} -> {st.migration.target}: total "
                  f"{st.migration.total_ms} ms, downtime {st.migration.downtime_ms} ms")
    if p:
        pv = p.value
        print(f"  placement  {pv.kind} {pv.node or '-'} (epoch {pv.epoch}, id {pv.id})")
        print(f"  why        {pv.reason}")
    for e in events[-10:]:
        print(f"  {_ts(e.at)}  {e.kind:<16} {e.node or '-':<8} {e.reason}")
    return 0


# ---- history and availability ------------------------------------------------------------


def _filter(args: argparse.Namespace) -> EventFilter:
    if args.kind and args.kind not in EVENT_KINDS:
        raise CliError(f"unknown event kind {args.kind!r}; one of {', '.join(EVENT_KINDS)}",
                       EXIT_INPUT)
    return EventFilter(vm=args.vm, node=args.node, kind=args.kind,
                       since=_parse_time(args.since) if args.since else None,
                       until=_parse_time(args.until) if args.until else None)


def cmd_history(args: argparse.Namespace) -> int:
    events, errors = read_events(_store(args), _filter(args))
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

    A VM is down from the moment its node is lost (or it is self-fenced or destroyed)
    until its next boot; a live migration counts its measured downtime."""
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
        if e.kind in ("self_fence", "destroy") and e.vm and e.vm not in down_since:
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
    store = _store(args)
    end = _parse_time(args.until) if args.until else time.time()
    start = _parse_time(args.since) if args.since else end - 86400.0
    if end <= start:
        raise CliError("--since must be before --until", EXIT_INPUT)
    events, _ = read_events(store)
    snap = store.snapshot()
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


# ---- registration ------------------------------------------------------------------------


def register(groups: dict[str, Any]) -> None:
    node, vm, root = groups["node"], groups["vm"], groups["root"]
    p = node.add_parser("show", help="one node in detail")
    p.add_argument("name")
    p.set_defaults(fn=cmd_node_show)
    p = node.add_parser("cordon", help="mark a node unschedulable (its VMs move away)")
    p.add_argument("name")
    p.add_argument("--reason", default="cordoned by operator")
    p.set_defaults(fn=cmd_node_cordon)
    p = node.add_parser("drain", help="revoke the node's lease, as etcdctl lease revoke does")
    p.add_argument("name")
    p.add_argument("--wait", action="store_true", help="show progress until the node is empty")
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(fn=cmd_node_drain)
    for name, fn, help_ in (("start", cmd_vm_start, "set desired state running"),
                            ("stop", cmd_vm_stop, "set desired state stopped"),
                            ("show", cmd_vm_show, "one VM: spec, placement, status, events")):
        p = vm.add_parser(name, help=help_)
        p.add_argument("name")
        p.set_defaults(fn=fn)
    p = vm.add_parser("migrate", help="live-migrate a running VM to a node (asks the leader)")
    p.add_argument("name")
    p.add_argument("--to", required=True, metavar="NODE")
    p.add_argument("--wait", action="store_true", help="wait until it runs there")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(fn=cmd_vm_migrate)
    p = vm.add_parser("edit", help="change memory, vCPUs or domain XML")
    p.add_argument("name")
    p.add_argument("--memory-mib", type=int)
    p.add_argument("--vcpus", type=int)
    p.add_argument("--xml")
    p.set_defaults(fn=cmd_vm_edit)
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
