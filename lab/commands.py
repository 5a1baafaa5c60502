"""`vmha lab up|down|status|demo`: a whole vmha cluster on real QEMU, on this machine.

`up` starts, as background processes that outlive the command: a real etcd (1 or 3
members; with authentication on and the cluster on keyspace 2 unless ``--no-auth``,
which keeps keyspace 1 on plain etcd), N lab libvirt nodes (one namespaced libvirtd
each, see lab), one node agent per node on its libvirtd and two orchestrators.
Everything lives under one lab directory (default /var/lib/vmha-lab, or ``--dir``)
whose ``lab.json`` records every pid with its exact command line, so `status` and
`down` work from any shell.

`down` kills exactly those processes by pid (a pid whose command line no longer
matches is left alone), stops the lab nodes (libvirtd, QEMU, by the pid files they
write), unmounts anything left under the lab directory and removes what `up` created.
Ctrl-C (or SIGTERM) during `up` does the same.

The commands live in :mod:`lab.labup` and :mod:`lab.labdown`; this module registers
them into `vmha` (the composition root, vmha.main, hands them to the CLI) and turns
`vmha demo` into the lab demo (lab.demo), keeping the fake-hypervisor one as
`vmha demo --fake`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cli.common import CliError
from lab.labdown import cmd_lab_down, cmd_lab_status
from lab.labstate import (
    DEFAULT_DIR,
    EXIT_INTERRUPTED,
    interrupts,
    missing_prerequisite,
    say,
    wait_progress,
)
from lab.labup import cmd_lab_up

# lab.demo and the tests take these from here.
__all__ = ["EXIT_INTERRUPTED", "interrupts", "missing_prerequisite", "register", "say",
           "wait_progress"]


# ---- demo --------------------------------------------------------------------------------


def cmd_lab_demo(args: argparse.Namespace) -> int:
    problem = missing_prerequisite()
    if problem:
        raise CliError(f"{problem}\n(`vmha demo --fake` runs the demo on the fake hypervisor)")
    from lab.demo import run_lab_demo

    return run_lab_demo(Path(args.workdir) if args.workdir else None)


def cmd_demo(args: argparse.Namespace) -> int:
    """`vmha demo`: the lab demo; `vmha demo --fake`: the fake-hypervisor demo."""
    if args.fake:
        from lab.fakedemo import run_demo

        return int(run_demo(Path(args.workdir) if args.workdir else None))
    return cmd_lab_demo(args)


# ---- registration ------------------------------------------------------------------------


def register(groups: dict[str, Any]) -> None:
    root = groups["root"]
    lab = root.add_parser("lab", help="a local lab: real etcd, libvirt nodes with QEMU guests, "
                                      "agents and orchestrators (root)")
    sub = lab.add_subparsers(dest="labcmd", required=True)
    dir_help = f"lab directory (default {DEFAULT_DIR}, env VMHA_LAB_DIR)"
    up = sub.add_parser("up", help="start the lab in the background (idempotent); etcd "
                                   "auth on, keyspace 2, unless --no-auth",
                        description="Start the lab in the background, or restart what died "
                                    "of it.  etcd runs with authentication on and the "
                                    "cluster on keyspace 2; --no-auth: plain etcd and "
                                    "keyspace 1.")
    up.add_argument("--dir", default=str(DEFAULT_DIR), help=dir_help)
    up.add_argument("--nodes", type=int, help="libvirt nodes (default 3)")
    up.add_argument("--etcd-members", type=int, choices=[1, 3], help="default 1")
    up.add_argument("--tls", action="store_true",
                    help="encrypted migration: a lab CA, node certificates, libvirtd TLS "
                         "listeners and migration_tls in the cluster config")
    auth = up.add_mutually_exclusive_group()
    auth.add_argument("--no-auth", dest="auth", action="store_const", const=False,
                      help="etcd without authentication and the cluster on keyspace 1 "
                           "(the lab before auth became its default)")
    auth.add_argument("--auth", dest="auth", action="store_const", const=True,
                      help="kept for scripts; changes nothing, auth is the default: etcd "
                           "TLS with a client certificate per etcd user, keyspace 2, `vmha "
                           "auth setup` run as root, env.sh logs the CLI in as operator (on "
                           "a running lab without auth: refused, as before)")
    # auth None (neither flag): a new lab gets auth, an existing one is taken as it is.
    up.set_defaults(fn=cmd_lab_up, auth=None)
    down = sub.add_parser("down", help="stop every lab process and remove the lab directory")
    down.add_argument("--dir", default=str(DEFAULT_DIR), help=dir_help)
    down.set_defaults(fn=cmd_lab_down)
    st = sub.add_parser("status", help="lab processes, then `vmha status` of the lab")
    st.add_argument("--dir", default=str(DEFAULT_DIR), help=dir_help)
    st.set_defaults(fn=cmd_lab_status)
    demo = sub.add_parser("demo", help="the lab demo (same as `vmha demo`)")
    demo.add_argument("--workdir", help="lab directory for the demo (default: a temporary one)")
    demo.set_defaults(fn=cmd_lab_demo)
    plain = root.add_parser(
        "demo", help="run the demo cluster (the lab; --fake: real etcd, fake hypervisor)",
        description="The lab demo: real etcd, libvirt nodes and QEMU guests (root); "
                    "--fake: the same story on the fake hypervisor.")
    plain.add_argument("--workdir")
    plain.add_argument("--fake", action="store_true",
                       help="the demo on the fake hypervisor (no root, no QEMU, ~15 s)")
    plain.set_defaults(fn=cmd_demo)
