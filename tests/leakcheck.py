"""Pytest plugin: nothing the test session starts outlives it.

At start the session puts ``VMHA_TEST_SESSION=<uuid>`` into its environment, and every
process it starts inherits it: etcd, vmha's daemons and their guards, the lab's
``unshare``/``ip netns exec`` children, libvirtd, virtlockd, browsers.  QEMU is the
exception (libvirtd starts it with a cleared environment), but it lives in its lab
node's mount namespace, so after every test the plugin notes the mount namespaces of
the session's processes and counts every process in one of them as the session's, too.

When the session finishes (every fixture finalized), a process of the session still
running is a leak: after a short grace period for processes on their way out, the
plugin SIGKILLs the rest by pid, lists them and fails the session.  Processes of other
test sessions carry another uuid and are left alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Generator
from pathlib import Path

import pytest

ENV = "VMHA_TEST_SESSION"
#: How long processes on their way out (a finalizer's SIGTERM) get before they count.
GRACE_S = 5.0
_KILL_WAIT_S = 10.0


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X", b"x")


def _argv(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split())[:300]


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


class LeakCheck:
    """Finds, and at the end kills, the processes this session started."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.marker = f"{ENV}={self.token}".encode()
        self.own_ns = _mnt_ns(os.getpid())
        self.namespaces: set[str] = set()
        self.leaks: list[tuple[int, str, str]] = []

    def ours(self) -> dict[int, str]:
        """Live processes of this session (pid -> how they were recognised)."""
        me = os.getpid()
        live = [p for p in _pids() if p != me and _alive(p)]
        found: dict[int, str] = {}
        for pid in live:
            if _has_marker(pid, self.marker):
                found[pid] = f"has {ENV}"
                ns = _mnt_ns(pid)
                if ns is not None and ns != self.own_ns:
                    self.namespaces.add(ns)
        for pid in live:
            if pid not in found and _mnt_ns(pid) in self.namespaces:
                found[pid] = "in a lab node's mount namespace"
        return found

    def finish(self) -> list[tuple[int, str, str]]:
        """Kill what is left after the grace period; return it as (pid, why, argv)."""
        deadline = time.monotonic() + GRACE_S
        found = self.ours()
        while found and time.monotonic() < deadline:
            time.sleep(0.1)
            found = self.ours()
        leaks = [(pid, why, _argv(pid)) for pid, why in sorted(found.items())]
        for pid in self.ours():  # checked again just before the signal: never a reused pid
            if pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + _KILL_WAIT_S
        while any(_alive(pid) for pid in found) and time.monotonic() < deadline:
            time.sleep(0.05)
        return leaks


_CHECK = LeakCheck()


def pytest_configure(config: pytest.Config) -> None:
    os.environ[ENV] = _CHECK.token


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    yield
    _CHECK.ours()  # notes the mount namespaces of lab nodes while they still run


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _CHECK.leaks = _CHECK.finish()
    if _CHECK.leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _CHECK.leaks:
        return
    terminalreporter.section("processes left running by the tests (now killed)", red=True)
    for pid, why, argv in _CHECK.leaks:
        terminalreporter.write_line(f"pid {pid} ({why}): {argv}")
    terminalreporter.write_line(f"{len(_CHECK.leaks)} leaked process(es): the session fails")
