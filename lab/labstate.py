"""What `vmha lab up` records and `status`/`down` read: the lab directory's ``lab.json``.

Every process `up` starts is recorded with its pid and exact command line; a recorded
process counts as running only while both still match, so `down` never signals a
recycled pid.  Also the small pieces every lab command shares: output, progress while
waiting, Ctrl-C/SIGTERM handling and the check that the lab can run here at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cli.common import EXIT_INPUT, CliError
from lab.procs import pid_alive, pid_cmdline

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


def proc_alive(rec: dict[str, Any]) -> bool:
    """The recorded process still runs, with exactly the command line it was started with."""
    pid = rec.get("pid")
    return (isinstance(pid, int) and pid > 1 and pid_alive(pid)
            and pid_cmdline(pid) == list(rec.get("argv", ())))


def kill_recorded(recs: list[dict[str, Any]], first: int = signal.SIGKILL) -> list[int]:
    """Signal each recorded process that is still the one we started; wait until they are
    gone (SIGKILL after a grace period if ``first`` is gentler).  Returns survivors."""
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


def etcd_recs(state: dict[str, Any]) -> list[dict[str, Any]]:
    return list((state.get("etcd") or {}).get("members", []))


def daemon_recs(state: dict[str, Any]) -> list[dict[str, Any]]:
    return list((state.get("daemons") or {}).values())


# ---- checks and progress -------------------------------------------------------------


def missing_prerequisite() -> str | None:
    """Why the lab cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "the lab needs root (it starts libvirtd in mount namespaces)"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    # openssl: the lab's CAs (etcd's with auth on, the default; the nodes' with --tls)
    for tool in ("unshare", "libvirtd", "qemu-system-x86_64", "mount", "etcd", "etcdctl",
                 "openssl"):
        if shutil.which(tool, path=path) is None:
            return (f"the lab needs {tool}: run `VMHA_LAB=1 bash scripts/setup.sh` "
                    "(packages in lab/APT_PACKAGES.txt)")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "the lab needs libvirt-python (pip install -e .)"
    return None


def check_dir(lab_dir: Path) -> None:
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
