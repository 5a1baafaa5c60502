"""`vmha vm`: declare VMs (with placement options and admission control), change their
desired state, ask the leader to move one, and inspect them."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli.cluster import open_cluster
from cli.common import (
    EXIT_FAIL,
    EXIT_INPUT,
    CliError,
    _ago,
    _first_error,
    _out,
    _ts,
    default_domain_xml,
)
from cli.policy import add_parser as add_check_parser
from orchestrator import simulate
from schemas import MAX_VALUE_BYTES, SchemaError, VmSpec
from schemas.domain_policy import DomainPolicyError, check_domain_xml
from schemas.models import MoveRequest, Placement, VmStatus, domain_uuid
from schemas.snapshot import ClusterSnapshot
from store.history import EventFilter

# ---- add (placement options, admission control: N+1) ------------------------------------


def _prefs(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        node, sep, weight = item.partition("=")
        try:
            out[node] = float(weight) if sep else 1.0
        except ValueError:
            raise CliError(f"--prefer {item!r}: expected NODE=WEIGHT", EXIT_INPUT) from None
    return out


def identity_clash(snap: ClusterSnapshot, spec: VmSpec) -> str | None:
    """Which other VM has the same domain identity, if any.  A domain's name is its VM's
    name (the schema requires it), so only the <uuid> can clash: libvirt refuses a second
    domain with a UUID it knows, and the VM would never boot there.  vmha does not own
    the UUID: an XML without one gets a fresh one from libvirt (docs/design.md)."""
    mine = domain_uuid(spec.domain_xml)
    if mine is None:
        return None
    for name, entry in sorted(snap.specs.items()):
        if name != spec.name and domain_uuid(entry.value.domain_xml) == mine:
            return (f"domain UUID {mine} of vm/{spec.name} is already used by vm/{name}; "
                    "give it its own <uuid> or remove the element (libvirt then makes one)")
    return None


def refuse_oversized(value: str, what: str) -> None:
    """Exit 2 for a value the daemons would refuse to read (schemas.MAX_VALUE_BYTES)."""
    size = len(value.encode())
    if size > MAX_VALUE_BYTES:
        raise CliError(f"{what}: the value is {size} bytes, over the limit of "
                       f"{MAX_VALUE_BYTES} bytes (docs/keyspace.md); nothing written",
                       EXIT_INPUT)


def read_xml_file(path: str) -> str:
    """A domain XML file's text; exit 2 naming the file when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CliError(f"cannot read domain XML file {path!r}: {why}", EXIT_INPUT) from None


def refuse_by_policy(snap: ClusterSnapshot, spec: VmSpec) -> None:
    """Exit 2 naming what the cluster's domain XML policy refuses (docs/domain-policy.md);
    the agents apply the same rule before they define the domain."""
    try:
        check_domain_xml(spec.domain_xml, spec.name, snap.config)
    except DomainPolicyError as exc:
        raise CliError(f"{exc}; nothing written", EXIT_INPUT) from None


def cmd_vm_add(args: argparse.Namespace) -> int:
    xml = read_xml_file(args.xml) if args.xml else default_domain_xml(
        args.name, args.memory_mib, args.vcpus)
    try:
        spec = VmSpec(name=args.name, domain_xml=xml, memory_mib=args.memory_mib,
                      vcpus=args.vcpus, state="stopped" if args.stopped else "running",
                      priority=args.priority, anti_affinity=args.anti_affinity,
                      soft_anti_affinity=args.soft_anti_affinity, affinity=args.affinity,
                      soft_affinity=args.soft_affinity, node_preferences=_prefs(args.prefer),
                      allowed_nodes=args.allow_node)
    except ValueError as exc:
        raise CliError(str(SchemaError(f"vm {args.name}", "", _first_error(exc))),
                       EXIT_INPUT) from None
    refuse_oversized(spec.to_json(), f"vm {args.name}")
    cluster = open_cluster(args)
    key = cluster.spec_key(args.name)
    snap = cluster.snapshot()
    refuse_by_policy(snap, spec)
    clash = identity_clash(snap, spec)
    if clash:
        raise CliError(clash, EXIT_INPUT)
    policy = snap.config.placement.admission
    if policy != "off" and args.name not in snap.specs:
        verdict = simulate.admission_check(snap, spec)
        if not verdict.ok:
            if policy == "refuse" and not args.force:
                raise CliError(f"admission refused ({verdict.message}); the cluster policy "
                               "is admission=refuse (use --force to add anyway)", EXIT_INPUT)
            print(f"warning: {verdict.message}", file=sys.stderr)
    res = cluster.add_spec(spec)
    if not res.succeeded:
        raise CliError(f"VM {args.name!r} already exists ({key})", EXIT_INPUT)
    print(f"vm/{args.name} added ({key}, revision {res.revision})")
    return 0


# ---- remove, list, show ------------------------------------------------------------------


def cmd_vm_remove(args: argparse.Namespace) -> int:
    cluster = open_cluster(args)
    kv = cluster.store.get(cluster.spec_key(args.name))
    if kv is None:
        raise CliError(f"no VM named {args.name!r}", EXIT_INPUT)
    if not cluster.remove_spec(args.name, kv.mod_revision):
        raise CliError(f"{cluster.spec_key(args.name)} changed meanwhile; nothing removed, "
                       "try again", EXIT_FAIL)
    print(f"vm/{args.name} removed (its node destroys and undefines it)")
    return 0


def cmd_vm_list(args: argparse.Namespace) -> int:
    snap = open_cluster(args).snapshot()
    rows: list[dict[str, Any]] = []
    for name in sorted(snap.specs):
        spec = snap.specs[name].value
        p = snap.placements[name].value if name in snap.placements else None
        s = snap.statuses[name].value if name in snap.statuses else None
        rows.append({"name": name, "desired": spec.state, "memory_mib": spec.memory_mib,
                     "vcpus": spec.vcpus, "placed_on": p.node if p else None,
                     "placement": p.kind if p else None, "node": s.node if s else None,
                     "state": s.state if s else None, "since": s.since if s else None,
                     "reason": p.reason if p else None, "error": _error(p, s)})
    table = [["NAME", "DESIRED", "MEM", "VCPU", "PLACED", "NODE", "STATE", "SINCE",
              "ERROR"]] + [
        [r["name"], r["desired"], r["memory_mib"], r["vcpus"],
         f"{r['placed_on'] or '-'}({r['placement'] or '-'})", r["node"] or "-",
         r["state"] or "-", _ago(r["since"]), _short(r["error"])] for r in rows]
    _out(args, rows, table)
    return 0


def _error(p: Placement | None, s: VmStatus | None) -> str | None:
    """What an operator must see first: why vmha gave up, else the last failure."""
    if p is not None and p.kind == "failed":
        return f"failed: {p.reason}"
    if s is None or not s.error:
        return None
    counts = ", ".join(f"{n} {what}" for n, what in ((s.boot_failures, "boot failures"),
                                                     (s.crashes, "crashes")) if n)
    return f"{s.error} ({counts})" if counts else s.error


def _short(text: str | None, width: int = 160) -> str:
    if not text:
        return "-"
    return text if len(text) <= width else text[:width - 3] + "..."


def cmd_vm_show(args: argparse.Namespace) -> int:
    cluster = open_cluster(args)
    snap = cluster.snapshot()
    if args.name not in snap.specs:
        bad = [str(e) for e in snap.errors if e.key == cluster.spec_key(args.name)]
        raise CliError(bad[0] if bad else f"no VM named {args.name!r}", EXIT_INPUT)
    spec = snap.specs[args.name].value
    p = snap.placements.get(args.name)
    s = snap.statuses.get(args.name)
    events, _ = cluster.events(EventFilter(vm=args.name))
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
        if st.boot_failures or st.crashes:
            print(f"  failures   {st.boot_failures} boot failures, {st.crashes} crashes on "
                  f"{st.node}" + (f"; next try {_ts(st.retry_at)}" if st.retry_at else ""))
        if st.migration:
            print(f"  migrated   {st.migration.source} -> {st.migration.target}: total "
                  f"{st.migration.total_ms} ms, downtime {st.migration.downtime_ms} ms")
    if p:
        pv = p.value
        print(f"  placement  {pv.kind} {pv.node or '-'} (epoch {pv.epoch}, id {pv.id})"
              + (f"; gave up on {', '.join(pv.failed_nodes)}" if pv.failed_nodes else ""))
        print(f"  why        {pv.reason}")
    for e in events[-10:]:
        print(f"  {_ts(e.at)}  {e.kind:<16} {e.node or '-':<8} {e.reason}")
    return 0


# ---- start, stop, edit: the spec ---------------------------------------------------------


def _update_spec(args: argparse.Namespace, change: Callable[[VmSpec], VmSpec]) -> VmSpec:
    cluster = open_cluster(args)
    key = cluster.spec_key(args.name)
    kv = cluster.store.get(key)
    if kv is None:
        raise CliError(f"no VM named {args.name!r}", EXIT_INPUT)
    try:
        old = VmSpec.from_json(kv.value, key=key)
        new = change(old)
        new = VmSpec.parse_dict(new.model_dump(by_alias=True), key=key)  # re-validate
    except (SchemaError, ValueError) as exc:
        raise CliError(str(exc), EXIT_INPUT) from None
    if new.domain_xml != old.domain_xml:
        snap = cluster.snapshot()
        refuse_by_policy(snap, new)
        clash = identity_clash(snap, new)
        if clash:
            raise CliError(clash, EXIT_INPUT)
    refuse_oversized(new.to_json(), f"vm {args.name}")
    res = cluster.edit_spec(new, kv.mod_revision)
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


def cmd_vm_edit(args: argparse.Namespace) -> int:
    upd: dict[str, Any] = {}
    if args.memory_mib is not None:
        upd["memory_mib"] = args.memory_mib
    if args.vcpus is not None:
        upd["vcpus"] = args.vcpus
    if args.xml:
        upd["domain_xml"] = read_xml_file(args.xml)
    if not upd:
        raise CliError("nothing to change (give --memory-mib, --vcpus or --xml)", EXIT_INPUT)
    new = _update_spec(args, lambda s: s.model_copy(update=upd))
    print(f"vm/{args.name} updated: memory {new.memory_mib} MiB, {new.vcpus} vCPUs "
          "(takes effect at its next boot)")
    return 0


# ---- migrate -----------------------------------------------------------------------------


def cmd_vm_migrate(args: argparse.Namespace) -> int:
    """Ask the leader to live-migrate a running VM to a node (a request, not a command:
    the leader checks capacity, constraints, migration group and slots)."""
    cluster = open_cluster(args)
    snap = cluster.snapshot()
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
    cluster.request_move(req)
    print(f"vm/{args.name}: move {st.value.node} -> {args.to} requested "
          f"({cluster.move_key(args.name)})")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        snap = cluster.snapshot()
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


# ---- registration ------------------------------------------------------------------------


def _add_parser(vm: Any) -> None:
    add = vm.add_parser("add")
    add.add_argument("name")
    add.add_argument("--memory-mib", type=int, required=True)
    add.add_argument("--vcpus", type=int, default=1)
    add.add_argument("--xml", help="libvirt domain XML file (default: a disk-less guest)")
    add.add_argument("--stopped", action="store_true", help="declare it powered off")
    add.add_argument("--priority", type=int, default=0, help="higher is placed first")
    add.add_argument("--anti-affinity", action="append", default=[], metavar="GROUP")
    add.add_argument("--soft-anti-affinity", action="append", default=[], metavar="GROUP")
    add.add_argument("--affinity", action="append", default=[], metavar="GROUP")
    add.add_argument("--soft-affinity", action="append", default=[], metavar="GROUP")
    add.add_argument("--prefer", action="append", default=[], metavar="NODE=WEIGHT")
    add.add_argument("--allow-node", action="append", default=[], metavar="NODE",
                     help="hard restriction (repeat for several nodes)")
    add.add_argument("--force", action="store_true",
                     help="add even when admission control (N+1) refuses")
    add.set_defaults(fn=cmd_vm_add)


def register(groups: dict[str, Any]) -> None:
    vm = groups["root"].add_parser("vm", help="declare and inspect VMs").add_subparsers(
        dest="vmcmd", required=True)
    groups["vm"] = vm
    _add_parser(vm)
    rm = vm.add_parser("remove")
    rm.add_argument("name")
    rm.set_defaults(fn=cmd_vm_remove)
    vm.add_parser("list").set_defaults(fn=cmd_vm_list)
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
    add_check_parser(vm)
