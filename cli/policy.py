"""`vmha vm check`: which declared VMs the domain XML policy refuses (docs/domain-policy.md).

Run it before an upgrade that brings the policy, and before writing a stricter config
(`--file`): a refused VM keeps running, but its next boot, failover included, is refused
by its node."""

from __future__ import annotations

import argparse
from typing import Any

from cli.cluster import open_cluster
from cli.common import EXIT_INPUT, _out
from schemas.domain_policy import policy_violations


def cmd_vm_check(args: argparse.Namespace) -> int:
    snap = open_cluster(args).snapshot()
    cfg = snap.config
    if args.file:
        from cli.config import read_cluster_config  # cli.config imports cli.vm

        cfg = read_cluster_config(args.file)
    rows: list[dict[str, Any]] = []
    for name in sorted(snap.specs):
        refused = policy_violations(snap.specs[name].value.domain_xml, name, cfg)
        rows.append({"vm": name, "allowed": not refused, "refused": refused})
    table = [["VM", "POLICY"]] + [[r["vm"], "; ".join(r["refused"]) or "ok"] for r in rows]
    _out(args, rows, table)
    return EXIT_INPUT if any(r["refused"] for r in rows) else 0


def add_parser(vm: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = vm.add_parser("check", help="which VMs the domain XML policy refuses (exit 2 if any)")
    p.add_argument("--file", help="check against this cluster config (TOML or JSON) "
                                  "instead of the one in etcd")
    p.set_defaults(fn=cmd_vm_check)
