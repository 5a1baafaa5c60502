"""Processes by pid, read from /proc: the lab never signals a process by name.

A pid is only signalled after its command line has been checked, so a recycled pid
is never hit.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live process (zombies count as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    # state is the first field after the ")" that closes comm
    rparen = stat.rfind(b")")
    state = stat[rparen + 2 : rparen + 3]
    return state not in (b"Z", b"X", b"x")


def pid_cmdline(pid: int) -> list[str]:
    """``pid``'s argv ([] if it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pid_matches(pid: int, needle: str) -> bool:
    """True if ``pid`` is alive and its argv[0] mentions ``needle``."""
    if not pid_alive(pid):
        return False
    argv = pid_cmdline(pid)
    return bool(argv) and needle in os.path.basename(argv[0])


def read_pid(path: Path) -> int | None:
    """The pid in a pid file (None if missing, garbled or not a plain process)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        pid = int(text)
    except ValueError:
        return None
    return pid if pid > 1 else None


def send_signal(pid: int, sig: int) -> None:
    """Signal ``pid``; one that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_dead(pids: list[int], timeout: float) -> list[int]:
    """Wait until every pid is dead; return the ones still alive."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def guard_pids_under(root: Path) -> list[int]:
    """Live guard processes (``python -m fencing.guard``, started by an agent) that guard
    a host under ``root``: their ``--uri`` names a path below it.  A guard that fired
    destroys again until its node's agent registers again, so a cluster torn down with
    an agent killed and never restarted leaves one looping; its own stop ends it."""
    needle = str(root)
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        argv = pid_cmdline(int(proc.name))
        if "fencing.guard" in argv and any(needle in a for a in argv) and pid_alive(
                int(proc.name)):
            out.append(int(proc.name))
    return out


def kill_guards_under(root: Path, timeout: float = 10.0) -> list[int]:
    """SIGKILL every guard of a host under ``root`` (guard_pids_under); the survivors."""
    pids = guard_pids_under(root)
    for pid in pids:
        send_signal(pid, 9)
    return wait_dead(pids, timeout)
