"""What every `vmha` command shares: exit codes, the error type, the etcd store from the
global flags, output as a table or JSON, times, and the command-group registrar type."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from schemas import Keyspace

EXIT_FAIL, EXIT_INPUT, EXIT_ETCD = 1, 2, 3

#: Adds commands to the parser: gets the command groups built so far by name ("root",
#: then "vm", "node", "config": argparse sub-parser collections) and "parser" (the root
#: parser).  Each noun module of the CLI has one; layers above the CLI (the lab, the
#: benchmarks) pass theirs in.
Registrar = Callable[[dict[str, Any]], None]


def global_defaults() -> dict[str, str]:
    """The defaults of `--etcd` and `--prefix` (from the environment, else local)."""
    return {"etcd": os.environ.get("VMHA_ETCD", "127.0.0.1:2379"),
            "prefix": os.environ.get("VMHA_PREFIX", "/vmha")}


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def _store(args: argparse.Namespace) -> Any:
    from store.etcd import EtcdStore, TlsFiles

    tls = None
    if args.etcd_cacert:
        tls = TlsFiles(args.etcd_cacert, args.etcd_cert, args.etcd_key)
    elif args.etcd_cert or args.etcd_key:
        raise CliError("--etcd-cert/--etcd-key need --etcd-cacert", EXIT_INPUT)
    return EtcdStore(args.etcd, Keyspace(args.prefix), tls=tls)


def default_domain_xml(name: str, memory_mib: int, vcpus: int) -> str:
    """A disk-less BIOS guest: enough for the fake and the test driver."""
    return (f"<domain type='qemu'><name>{name}</name>"
            f"<memory unit='MiB'>{memory_mib}</memory><vcpu>{vcpus}</vcpu>"
            "<os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>"
            "<devices><console type='pty'/></devices></domain>")


def _out(args: argparse.Namespace, data: Any, table: list[list[Any]] | None) -> None:
    if args.output == "json" or table is None:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


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


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        e = errors()[0]
        loc = ".".join(str(p) for p in e.get("loc", ()))
        return f"{loc + ': ' if loc else ''}{e['msg']}"
    return str(exc)


def node_state(row: dict[str, Any]) -> str:
    """A node row's state (see :func:`_node_rows`), as `vmha node list` shows it."""
    return ("fenced" if row["fenced"] else "lost" if not row["registered"]
            else "cordoned" if row["cordoned"] else "ready")


def _node_rows(snap: Any, store: Any) -> list[dict[str, Any]]:
    names = sorted(set(snap.nodes) | set(snap.cordons) | set(snap.fences))
    rows = []
    for n in names:
        reg = snap.nodes[n].value if n in snap.nodes else None
        used = sum(snap.specs[v].value.memory_mib for v, p in snap.placements.items()
                   if p.value.node == n and v in snap.specs
                   and snap.specs[v].value.state == "running")
        ttl = None
        if reg is not None:
            try:
                ttl = store.lease_ttl(int(reg.lease_id, 16))
            except Exception:  # noqa: BLE001 - display only; the row still prints
                ttl = None
        rows.append({"name": n, "registered": reg is not None,
                     "lease_id": reg.lease_id if reg else None, "lease_ttl_s": ttl,
                     "cordoned": n in snap.cordons,
                     "cordon_reason": snap.cordons[n].value.reason if n in snap.cordons else None,
                     "fenced": n in snap.fences,
                     "memory_mib": reg.capacity.memory_mib if reg else None,
                     "free_memory_mib": reg.capacity.memory_mib - used if reg else None,
                     "vcpus": reg.capacity.vcpus if reg else None,
                     "libvirt_uri": reg.libvirt_uri if reg else None})
    return rows
