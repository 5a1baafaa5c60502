"""`vmha lab down` and `vmha lab status`: from any shell, by the pids in ``lab.json``.

`down` kills exactly the recorded processes by pid (a pid whose command line no longer
matches is left alone), stops the lab nodes (libvirtd, QEMU, by the pid files they
write), unmounts anything left under the lab directory and removes what `up` created.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from cli.common import EXIT_FAIL
from lab.labstate import (
    DIR_MARKER,
    OWNED,
    STATE_FILE,
    check_dir,
    daemon_recs,
    etcd_recs,
    kill_recorded,
    load_state,
    proc_alive,
    say,
)
from lab.procs import pid_cmdline

# ---- down --------------------------------------------------------------------------------


def _mounts_under(path: Path) -> list[str]:
    out: list[str] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            mp = fields[4].encode().decode("unicode_escape")
            if mp == str(path) or mp.startswith(str(path) + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def teardown(lab_dir: Path, quiet: bool = False) -> list[str]:
    """Stop everything the lab in ``lab_dir`` started and remove what it created.
    Returns problems (empty: all gone)."""
    from lab import LabError, destroy_lab

    state = load_state(lab_dir) or {}
    problems: list[str] = []
    from lab.cluster import child_pids

    daemons = daemon_recs(state)
    # What the daemons started themselves (an agent's guard process), found by parent pid
    # before the parents die, with the command line seen now.
    kids = [{"pid": k, "argv": pid_cmdline(k)} for r in daemons if proc_alive(r)
            for k in child_pids(int(r["pid"]))]
    left = kill_recorded(daemons, signal.SIGKILL) + kill_recorded(kids, signal.SIGKILL)
    # A guard whose agent died earlier (no longer its child) and that fired destroys
    # again until a registration that will not come: end it too.
    from lab.procs import kill_guards_under

    left += kill_guards_under(lab_dir)
    if left:
        problems.append(f"daemons {left} did not die")
    if (lab_dir / "nodes").exists():
        try:
            destroy_lab(lab_dir / "nodes")
        except LabError as exc:
            problems.append(str(exc))
    left = kill_recorded(etcd_recs(state), signal.SIGTERM)
    if left:
        problems.append(f"etcd {left} did not die")
    for mp in _mounts_under(lab_dir):
        r = subprocess.run(["umount", "-l", mp], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            problems.append(f"umount {mp}: {r.stderr.strip()}")
    if not problems:
        for name in OWNED:
            p = lab_dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if (lab_dir / DIR_MARKER).exists():
            (lab_dir / DIR_MARKER).unlink()
            try:
                lab_dir.rmdir()
            except OSError:
                (lab_dir / DIR_MARKER).touch()
                problems.append(f"{lab_dir} is not empty; left in place")
    if not quiet:
        for problem in problems:
            say(f"problem: {problem}")
    return problems


def cmd_lab_down(args: argparse.Namespace) -> int:
    lab_dir = Path(args.dir).resolve()
    check_dir(lab_dir)
    if load_state(lab_dir) is None and not any(
            (lab_dir / n).exists() for n in OWNED if n != STATE_FILE):
        say(f"no lab in {lab_dir}")
        return 0
    problems = teardown(lab_dir)
    if problems:
        return EXIT_FAIL
    say(f"lab in {lab_dir} is down: every process it started is stopped, its directories "
        "removed")
    return 0


# ---- status ------------------------------------------------------------------------------


def cmd_lab_status(args: argparse.Namespace) -> int:
    from lab import lab_nodes, node_pids, qemu_pids

    lab_dir = Path(args.dir).resolve()
    state = load_state(lab_dir)
    if state is None:
        if args.output == "json":
            print(json.dumps({"dir": str(lab_dir), "up": False}))
        else:
            say(f"no lab in {lab_dir}")
        return EXIT_FAIL
    rows: list[dict[str, Any]] = []
    for m in etcd_recs(state):
        rows.append({"kind": "etcd", "name": m["name"], "pid": m["pid"], "alive": proc_alive(m),
                     "detail": m.get("endpoint") or state["etcd"]["endpoints"]})
    nodes = {n.name: n for n in lab_nodes(lab_dir / "nodes")}
    for n in state.get("nodes", []):
        node = nodes.get(n["name"])
        guests = sorted(qemu_pids(node)) if node else []
        rows.append({"kind": "libvirtd", "name": n["name"], "pid": node.pid if node else None,
                     "alive": bool(node and node.pid and node_pids(node)),
                     "detail": "guests: " + (", ".join(guests) or "-")})
    for key, rec in state.get("daemons", {}).items():
        kind, name = key.split(":", 1)
        rows.append({"kind": kind, "name": name, "pid": rec["pid"], "alive": proc_alive(rec),
                     "detail": rec["log"]})
    up = bool(rows) and all(r["alive"] for r in rows)
    if args.output == "json":
        print(json.dumps({"dir": str(lab_dir), "up": up, "processes": rows,
                          "etcd": state.get("etcd", {}).get("endpoints"),
                          "auth": bool(state.get("auth"))}, indent=2))
        return 0 if up else EXIT_FAIL
    mode = ("etcd auth on, keyspace 2" if state.get("auth")
            else "etcd without auth, keyspace 1")
    say(f"lab in {lab_dir} ({mode}): "
        f"{'up' if up else 'DEGRADED (run `vmha lab up` to restart)'}")
    width = max(len(r["kind"]) for r in rows) if rows else 4
    for r in rows:
        say(f"  {r['kind']:<{width}}  {r['name']:<4} pid {str(r['pid']):<8} "
            f"{'running' if r['alive'] else 'DEAD':<8} {r['detail']}")
    etcd_alive = any(r["alive"] for r in rows if r["kind"] == "etcd")
    if etcd_alive:
        from cli.status import cmd_status

        say("")
        prefix = state.get("prefix", "/vmha")
        tls: dict[str, str | None] = {}
        if state.get("auth"):  # etcd auth on: `vmha status` as the lab's operator
            from lab.etcdpki import EtcdPki, user

            cred = EtcdPki(lab_dir / "nodes").client(user("operator", prefix))
            tls = {"etcd_cacert": cred.cacert, "etcd_cert": cred.cert, "etcd_key": cred.key}
        ns = argparse.Namespace(**{**vars(args), "etcd": state["etcd"]["endpoints"],
                                   "prefix": prefix, **tls})
        with contextlib.suppress(Exception):  # display only
            cmd_status(ns)
    return 0 if up else EXIT_FAIL
