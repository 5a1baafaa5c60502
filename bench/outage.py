"""`vmha bench outage`: the 2006 thesis's chapter 5 measurements, repeated on the lab.

One command (root) that

1. makes a network namespace of its own (``ip netns add``) with a Linux bridge and no
   uplink, and runs itself again inside it: etcd, the lab's libvirtd daemons (so the
   guests' taps land on that bridge and migrations use the namespace's loopback),
   vmha's agents and orchestrators, and the probe sender all live there; probes go
   only to the guest's address inside it;
2. boots a network-reachable kernel guest (:mod:`lab.netguest`) on two lab
   nodes and measures, with paced probe streams (:mod:`bench.outageprobe`):

   * a reference stream per rate (no failure);
   * the raw-libvirt baseline: the same guest live-migrated directly with libvirt
     (peer-to-peer, no vmha), N times per rate;
   * vmha's graceful failures, N per rate and per kind, as an operator causes them:
     ``etcdctl lease revoke`` of the guest's node, and SIGTERM of its agent (what
     ``systemctl stop`` sends).  After each one the node is uncordoned (and, after a
     SIGTERM, its agent started again), so the guest moves back and forth;
   * an uncontrolled failure: the guest's node crashes (agent, guard, libvirtd and
     QEMU SIGKILLed); the guest answers again once it has cold-booted elsewhere;

   The lab is the one ``vmha lab up`` starts (etcd auth on, keyspace 2; the revoke is
   root's, the uncordon the operator's); ``--no-auth`` runs keyspace 1 on plain etcd;

3. writes ``outage.md`` (tables next to the thesis's numbers), ``outage.json``
   (every trial), ``raw/*.json`` (every probe stream) and PNG plots to ``--out``.

Rates as in the thesis: UDP at 10, 100 and 1000 pps (Table 5.2), one G.711-like VoIP
stream of 160-byte datagrams at 50 pps (Table 5.4), ICMP echo at 100/s (Figure 5.5).
The thesis streamed 45 s per trial; here a stream starts shortly before the failure and
ends once the node is drained, which counts the same losses in less time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.outage_plots import write_plots
from bench.outage_report import write_report
from bench.outage_streams import STREAMS, aggregate, summarize
from bench.outage_trials import OutageTrials

__all__ = ["STREAMS", "aggregate", "cmd_bench_outage", "register", "summarize", "write_plots",
           "write_report"]


def _inside(args: argparse.Namespace) -> int:
    from lab.netguest import current_netns_name

    netns = current_netns_name()
    if netns is None or netns != args.netns:
        raise SystemExit("refusing to run outside the benchmark's own network namespace")
    OutageTrials(args, netns).run()
    return 0


def cmd_bench_outage(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if args.report_only:
        print(write_report(out))
        for p in write_plots(out):
            print(p)
        return 0
    if args.netns:
        return _inside(args)
    if os.geteuid() != 0:
        print("vmha bench outage needs root (network namespace, libvirtd, QEMU)",
              file=sys.stderr)
        return 1
    from lab.artifacts import ArtifactError
    from lab.netguest import GuestNet, create_netns, delete_netns, ensure_net_artifacts

    name = f"vmha-bench-{os.getpid()}"
    try:  # from the cache only, before entering a namespace that reaches no archive
        ensure_net_artifacts(GuestNet(name))
    except ArtifactError as exc:
        print(f"vmha bench outage: {exc}", file=sys.stderr)
        return 1
    create_netns(GuestNet(name))
    try:
        argv = [sys.executable, "-m", "vmha", "bench", "outage", "--netns", name,
                "--out", str(out), "--trials", str(args.trials), "--raw-trials",
                str(args.raw_trials), "--crashes", str(args.crashes), "--streams",
                args.streams, "--reference-seconds", str(args.reference_seconds),
                "--max-minutes", str(args.max_minutes)]
        if args.short:
            argv.append("--short")
        if args.no_auth:
            argv.append("--no-auth")
        # A session of its own, so a Ctrl-C reaches it once, forwarded below, and it has
        # the time to tear its lab down (subprocess.run would SIGKILL it after 0.25 s).
        campaign = subprocess.Popen(["ip", "netns", "exec", name, *argv],
                                    start_new_session=True)
        try:
            rc = campaign.wait()
        except KeyboardInterrupt:
            campaign.send_signal(signal.SIGINT)
            rc = campaign.wait()
    finally:
        delete_netns(name)
    if (out / "outage.json").exists():
        print(write_report(out))
        with contextlib.suppress(ImportError):
            for p in write_plots(out):
                print(p)
    return rc


def register(groups: dict[str, Any]) -> None:
    root = groups["root"]
    bench = root.choices.get("bench")
    if bench is None:
        bench = root.add_parser("bench", help="measurements on the lab (root)")
        sub = bench.add_subparsers(dest="benchcmd", required=True)
    else:  # pragma: no cover - another module made the group first
        sub = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.add_parser("outage", help="the 2006 thesis's outage measurements on the lab: "
                                      "packets lost per graceful failure, vmha vs raw libvirt")
    p.add_argument("--out", default="results/outage", help="results directory")
    p.add_argument("--trials", type=int, default=8,
                   help="graceful failures per rate and per kind (revoke, SIGTERM)")
    p.add_argument("--raw-trials", type=int, default=8,
                   help="raw libvirt migrations per rate (baseline)")
    p.add_argument("--crashes", type=int, default=1, help="uncontrolled failures")
    p.add_argument("--streams", default=",".join(s.key for s in STREAMS))
    p.add_argument("--reference-seconds", type=float, default=5.0)
    p.add_argument("--max-minutes", type=float, default=60.0,
                   help="start no new trial after this long")
    p.add_argument("--short", action="store_true",
                   help="one failure per rate (kinds alternate), one raw migration")
    p.add_argument("--no-auth", action="store_true",
                   help="run the lab on keyspace 1 without etcd auth (default: etcd auth "
                        "on, keyspace 2, as `vmha lab up` starts it)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite outage.md and the plots from outage.json")
    p.add_argument("--netns", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_bench_outage)
