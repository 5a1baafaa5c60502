"""`vmha lab up|down|status|demo`: a whole vmha cluster on real QEMU, on this machine.

`up` starts, as background processes that outlive the command: a real etcd (1 or 3
members), N lab libvirt nodes (one namespaced libvirtd each, see lab), one
node agent per node on its libvirtd and two orchestrators.  Everything lives under one
lab directory (default /var/lib/vmha-lab, or ``--dir``) whose ``lab.json`` records every
pid with its exact command line, so `status` and `down` work from any shell.

`down` kills exactly those processes by pid (a pid whose command line no longer
matches is left alone), stops the lab nodes (libvirtd, QEMU, by the pid files they
write), unmounts anything left under the lab directory and removes what `up` created.
Ctrl-C (or SIGTERM) during `up` does the same.

Registered into `vmha` through cli.main.EXTENSIONS; it also turns `vmha demo`
into the lab demo (lab.demo), keeping the fake-hypervisor one as
`vmha demo --fake`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cli.common import EXIT_FAIL, EXIT_INPUT, CliError

STATE_FILE = "lab.json"
ENV_FILE = "env.sh"
DIR_MARKER = ".vmha-lab-dir"
#: What `up` creates inside the lab directory (and `down` removes).
OWNED = ("nodes", "etcd", "logs", "guests", ENV_FILE, STATE_FILE)
DEFAULT_DIR = Path(os.environ.get("VMHA_LAB_DIR") or "/var/lib/vmha-lab")
EXIT_INTERRUPTED = 130

_KILL_WAIT_S = 10.0


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ---- processes by pid ------------------------------------------------------------------


def pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


def proc_alive(rec: dict[str, Any]) -> bool:
    """The recorded process still runs, with exactly the command line it was started with."""
    from lab import pid_alive

    pid = rec.get("pid")
    return (isinstance(pid, int) and pid > 1 and pid_alive(pid)
            and pid_cmdline(pid) == list(rec.get("argv", ())))


def kill_recorded(recs: list[dict[str, Any]], first: int = signal.SIGKILL) -> list[int]:
    """Signal each recorded process that is still the one we started; wait until they are
    gone (SIGKILL after a grace period if ``first`` is gentler).  Returns survivors."""
    from lab import pid_alive

    targets = [r for r in recs if proc_alive(r)]
    for r in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(r["pid"]), signal.SIGCONT)
            os.kill(int(r["pid"]), first)
    deadline = time.monotonic() + _KILL_WAIT_S
    left = [int(r["pid"]) for r in targets]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if pid_alive(p)]
    if left and first != signal.SIGKILL:
        for r in targets:
            if int(r["pid"]) in left and proc_alive(r):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(r["pid"]), signal.SIGKILL)
        deadline = time.monotonic() + _KILL_WAIT_S
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [p for p in left if pid_alive(p)]
    return left


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP behave like Ctrl-C (KeyboardInterrupt) inside the block."""
    def handler(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---- state -----------------------------------------------------------------------------


def load_state(lab_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((lab_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {lab_dir / STATE_FILE}: {exc}") from None
    return data if isinstance(data, dict) else None


def save_state(lab_dir: Path, state: dict[str, Any]) -> None:
    tmp = lab_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, lab_dir / STATE_FILE)


def cluster_state(lc: Any, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` plus every process ``lc`` (a LabCluster) has started, as JSON."""
    state = dict(base)
    if lc.etcd is not None:
        state["etcd"] = {
            "endpoints": lc.etcd.endpoints, "base": str(lc.etcd.base),
            "members": [{"name": m.name, "pid": m.proc.pid, "argv": list(m.proc.args),
                         "endpoint": m.endpoint, "log": str(m.log_path)}
                        for m in lc.etcd.members if m.proc],
        }
    state["nodes"] = [{"name": n.name, "index": n.index, "uri": n.uri, "dir": str(n.dir)}
                      for n in lc.nodes.values()]
    daemons = {}
    for kind, group in (("agent", lc.agents), ("orchestrator", lc.orchestrators)):
        for name, d in group.items():
            if d.proc is not None:
                daemons[f"{kind}:{name}"] = {"pid": d.proc.pid, "argv": list(d.proc.args),
                                             "args": list(d.args), "log": str(d.log_path)}
    state["daemons"] = daemons
    return state


def _etcd_recs(state: dict[str, Any]) -> list[dict[str, Any]]:
    return list((state.get("etcd") or {}).get("members", []))


def _daemon_recs(state: dict[str, Any]) -> list[dict[str, Any]]:
    return list((state.get("daemons") or {}).values())


# ---- up ----------------------------------------------------------------------------------


def missing_prerequisite() -> str | None:
    """Why the lab cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "the lab needs root (it starts libvirtd in mount namespaces)"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    for tool in ("unshare", "libvirtd", "qemu-system-x86_64", "mount", "etcd", "etcdctl"):
        if shutil.which(tool, path=path) is None:
            return (f"the lab needs {tool}: run `VMHA_LAB=1 bash scripts/setup.sh` "
                    "(packages in lab/APT_PACKAGES.txt)")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "the lab needs libvirt-python (pip install -e .)"
    return None


def _check_dir(lab_dir: Path) -> None:
    if lab_dir == Path("/") or len(lab_dir.parts) < 2:
        raise CliError(f"refusing lab directory {lab_dir}", EXIT_INPUT)
    if lab_dir.exists() and not lab_dir.is_dir():
        raise CliError(f"{lab_dir} is not a directory", EXIT_INPUT)


def wait_progress(pred: Callable[[], object], timeout: float, what: str,
                  detail: Callable[[], str] | None = None, interval: float = 0.1) -> float:
    """Wait until ``pred()`` is true, showing progress; return the seconds waited.

    On a terminal one line is rewritten in place; otherwise a line every 5 s."""
    start = time.monotonic()
    tty = sys.stdout.isatty()
    last_line = 0.0
    while not pred():
        waited = time.monotonic() - start
        extra = ""
        if detail is not None:
            with contextlib.suppress(Exception):  # display only
                extra = f"  [{detail()}]"
        if waited > timeout:
            if tty:
                print()
            raise CliError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        if tty:
            line = f"   ... waiting for {what}: {waited:4.1f} s{extra}"
            print(f"\r{line[:150]:<150}", end="", flush=True)
        elif waited - last_line >= 5:
            say(f"   ... still waiting for {what} ({waited:.0f} s){extra}")
            last_line = waited
        time.sleep(interval)
    took = time.monotonic() - start
    if tty:
        print("\r" + " " * 150 + "\r", end="", flush=True)
    return took


def _cluster_ready(endpoints: str, nodes: list[str]) -> bool:
    from store.etcd import EtcdStore, StoreUnavailable

    store = EtcdStore(endpoints, retry_budget=0.5)
    try:
        snap = store.snapshot()
    except StoreUnavailable:
        return False
    finally:
        store.close()
    return snap.leader is not None and all(n in snap.nodes for n in nodes)


def _write_examples(lab_dir: Path) -> None:
    """Guest XML files an operator can `vmha vm add` (a kernel guest if it can be built)."""
    from lab import DEFAULT_CACHE, ArtifactError, kernel_guest_xml, tiny_guest_xml

    guests = lab_dir / "guests"
    guests.mkdir(exist_ok=True)
    (guests / "web1.xml").write_text(tiny_guest_xml("web1"))
    with contextlib.suppress(ArtifactError, OSError):
        (guests / "k1.xml").write_text(
            kernel_guest_xml("k1", DEFAULT_CACHE, guests / "k1.console.log"))


def _print_info(lab_dir: Path, state: dict[str, Any]) -> None:
    ep = state["etcd"]["endpoints"]
    node = state["nodes"][0]["name"]
    say(f"\nlab up in {lab_dir}: {len(state['nodes'])} libvirt nodes "
        f"({', '.join(n['name'] for n in state['nodes'])}), etcd {ep} "
        f"({len(_etcd_recs(state))} member(s)), one agent per node, 2 orchestrators")
    say(f"  state: {lab_dir / STATE_FILE}    logs: {lab_dir / 'logs'}")
    say("\nTry (or `source " + str(lab_dir / ENV_FILE) + "` first and drop the flags):")
    say(f"  vmha --etcd {ep} status")
    say(f"  vmha --etcd {ep} vm add web1 --memory-mib 32 --xml {lab_dir / 'guests/web1.xml'}")
    if (lab_dir / "guests" / "k1.xml").exists():
        say(f"  vmha --etcd {ep} vm add k1 --memory-mib 96 --xml {lab_dir / 'guests/k1.xml'}"
            f"   # a Linux guest; tail -f {lab_dir / 'guests/k1.console.log'}")
    say(f"  etcdctl --endpoints {ep} get --prefix /vmha/ --keys-only")
    say(f"  etcdctl --endpoints {ep} lease revoke $(vmha --etcd {ep} -o json node list"
        f" | python3 -c 'import json,sys; print([n[\"lease_id\"] for n in json.load(sys.stdin)"
        f" if n[\"name\"] == \"{node}\"][0])')   # drain {node}")
    say(f"  vmha --etcd {ep} node uncordon {node}")
    say(f"  vmha lab status --dir {lab_dir}")
    say(f"  vmha lab down --dir {lab_dir}")


def _write_env(lab_dir: Path, endpoints: str) -> None:
    (lab_dir / ENV_FILE).write_text(
        "# source this file to talk to the vmha lab\n"
        f"export VMHA_ETCD={endpoints}\nexport ETCDCTL_API=3\n"
        f"export ETCDCTL_ENDPOINTS={endpoints}\n")


def _resume(args: argparse.Namespace, lab_dir: Path, state: dict[str, Any]) -> int:
    """`up` on an existing lab: restart what died, if etcd still runs."""
    from lab import start_node
    from lab.localcluster import Daemon

    names = [n["name"] for n in state.get("nodes", [])]
    if args.nodes not in (None, len(names)) or \
            args.etcd_members not in (None, len(_etcd_recs(state))):
        raise CliError(f"a lab with {len(names)} node(s) and {len(_etcd_recs(state))} etcd "
                       f"member(s) is already in {lab_dir}; `vmha lab down --dir {lab_dir}` "
                       "first", EXIT_INPUT)
    dead_etcd = [m["name"] for m in _etcd_recs(state) if not proc_alive(m)]
    if dead_etcd or not names:
        raise CliError(f"the lab in {lab_dir} is broken (etcd {', '.join(dead_etcd)} not "
                       f"running); `vmha lab down --dir {lab_dir}`, then up again")
    restarted = []
    for n in state["nodes"]:
        before = n.get("libvirtd_pid")
        node = start_node(lab_dir / "nodes", n["name"], n["index"])
        if node.pid != before:
            restarted.append(f"libvirtd of {n['name']}")
        n["libvirtd_pid"] = node.pid
    for key, rec in state["daemons"].items():
        if proc_alive(rec):
            continue
        d = Daemon(key.split(":", 1)[1], list(rec["args"]), Path(rec["log"])).start()
        assert d.proc is not None
        rec["pid"], rec["argv"] = d.proc.pid, [sys.executable, "-m", "vmha", *d.args]
        restarted.append(key)
        save_state(lab_dir, state)
    save_state(lab_dir, state)
    say(f"lab already up in {lab_dir}" + (f"; restarted {', '.join(restarted)}"
                                          if restarted else " (nothing to do)"))
    wait_progress(lambda: _cluster_ready(state["etcd"]["endpoints"], names), 30,
          "agents registered and a leader elected")
    _print_info(lab_dir, state)
    return 0


def cmd_lab_up(args: argparse.Namespace) -> int:
    problem = missing_prerequisite()
    if problem:
        raise CliError(problem)
    from lab.cluster import LAB_CONFIG, LabCluster

    lab_dir = Path(args.dir).resolve()
    _check_dir(lab_dir)
    if args.nodes is not None and not 1 <= args.nodes <= 9:
        raise CliError("--nodes must be 1..9", EXIT_INPUT)
    state = load_state(lab_dir)
    if state is not None:
        return _resume(args, lab_dir, state)
    args.nodes = args.nodes or 3
    args.etcd_members = args.etcd_members or 1
    if lab_dir.exists() and any(p.name in OWNED for p in lab_dir.iterdir()):
        raise CliError(f"{lab_dir} holds left-overs of a lab without {STATE_FILE}; "
                       f"`vmha lab down --dir {lab_dir}` removes them", EXIT_INPUT)
    created = not lab_dir.exists()
    lab_dir.mkdir(parents=True, exist_ok=True)
    if created:
        (lab_dir / DIR_MARKER).touch()
    names = tuple(f"n{i}" for i in range(1, args.nodes + 1))
    base = {"version": 1, "dir": str(lab_dir), "created_dir": created,
            "node_names": list(names), "started_at": time.time(), "prefix": args.prefix}
    started = time.monotonic()
    with interrupts():
        try:
            say(f"== vmha lab up: etcd ({args.etcd_members} member(s)), {len(names)} libvirt "
                f"nodes, {len(names)} agents, 2 orchestrators; state in {lab_dir}")
            save_state(lab_dir, base)
            lc = LabCluster(lab_dir / "nodes", lab_dir / "logs", node_names=names,
                            prefix=args.prefix, etcd_members=args.etcd_members,
                            etcd_dir=lab_dir / "etcd")
            lc.on_change = lambda: save_state(lab_dir, cluster_state(lc, base))
            lc.start(LAB_CONFIG.to_json())
            state = cluster_state(lc, base)
            for n in state["nodes"]:
                n["libvirtd_pid"] = lc.nodes[n["name"]].pid
            save_state(lab_dir, state)
            _write_env(lab_dir, lc.endpoints)
            say(f"   etcd at {lc.endpoints}; libvirtd nodes, agents and orchestrators started")
            wait_progress(lambda: _cluster_ready(lc.endpoints, list(names)), 40,
                  "agents registered and a leader elected")
            _write_examples(lab_dir)
        except KeyboardInterrupt:
            say("\ninterrupted: tearing the lab down")
            teardown(lab_dir, quiet=True)
            return EXIT_INTERRUPTED
        except BaseException as exc:
            say(f"lab up failed ({exc}); tearing down what it started")
            teardown(lab_dir, quiet=True)
            if isinstance(exc, CliError | SystemExit):
                raise
            raise CliError(f"lab up failed: {exc}") from exc
    _print_info(lab_dir, state)
    say(f"\n(up in {time.monotonic() - started:.1f} s)")
    return 0


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

    daemons = _daemon_recs(state)
    # What the daemons started themselves (an agent's guard process), found by parent pid
    # before the parents die, with the command line seen now.
    kids = [{"pid": k, "argv": pid_cmdline(k)} for r in daemons if proc_alive(r)
            for k in child_pids(int(r["pid"]))]
    left = kill_recorded(daemons, signal.SIGKILL) + kill_recorded(kids, signal.SIGKILL)
    if left:
        problems.append(f"daemons {left} did not die")
    if (lab_dir / "nodes").exists():
        try:
            destroy_lab(lab_dir / "nodes")
        except LabError as exc:
            problems.append(str(exc))
    left = kill_recorded(_etcd_recs(state), signal.SIGTERM)
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
    _check_dir(lab_dir)
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
    for m in _etcd_recs(state):
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
                          "etcd": state.get("etcd", {}).get("endpoints")}, indent=2))
        return 0 if up else EXIT_FAIL
    say(f"lab in {lab_dir}: {'up' if up else 'DEGRADED (run `vmha lab up` to restart)'}")
    width = max(len(r["kind"]) for r in rows) if rows else 4
    for r in rows:
        say(f"  {r['kind']:<{width}}  {r['name']:<4} pid {str(r['pid']):<8} "
            f"{'running' if r['alive'] else 'DEAD':<8} {r['detail']}")
    etcd_alive = any(r["alive"] for r in rows if r["kind"] == "etcd")
    if etcd_alive:
        from cli.main import cmd_status

        say("")
        ns = argparse.Namespace(**{**vars(args), "etcd": state["etcd"]["endpoints"],
                                   "prefix": state.get("prefix", "/vmha")})
        with contextlib.suppress(Exception):  # display only
            cmd_status(ns)
    return 0 if up else EXIT_FAIL


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
    up = sub.add_parser("up", help="start the lab in the background (idempotent)")
    up.add_argument("--dir", default=str(DEFAULT_DIR), help=dir_help)
    up.add_argument("--nodes", type=int, help="libvirt nodes (default 3)")
    up.add_argument("--etcd-members", type=int, choices=[1, 3], help="default 1")
    up.set_defaults(fn=cmd_lab_up)
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
