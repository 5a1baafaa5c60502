"""The guard: a small separate process that fences the host if the agent stops renewing.

The agent's own deadline thread (fencing.lease) cannot act when the agent process
is frozen (SIGSTOP, swap storm, a hung libvirt call holding the GIL) or was killed
with `kill -9`.  The guard is a second process, started by the agent, that knows
only the agent's pid, the hypervisor URI, and what the agent tells it over a pipe
(its stdin), one line per message:

    pet <deadline> <timeout>   sent after every acknowledged lease renewal; <deadline>
                               is the agent's self-fence deadline on CLOCK_MONOTONIC
                               (system-wide on Linux, so both processes share it)
    disarm                     clean exit (drained, lease revoked): stop guarding

Once armed by the first pet, the guard fires at

    min(last pet received + timeout, deadline carried by the last pet)

(`fencing.policy.guard_fire_at`), which is never later than the agent's own
deadline.  Firing means, in this order: SIGKILL the agent (a stopped process dies
too, so a frozen agent can never resume and act), write the fenced marker
(fencing.marker: the libvirt hook refuses new work from then on), destroy every active
vmha-managed domain through the hypervisor URI, stop feeding /dev/watchdog (if one was
given: the host then resets when the hardware timer runs out), then destroy again every
fraction of a second (a failed list is tried again) until the node's agent holds a
registration again and removes the marker, and exit with status 3.

EOF on stdin without `disarm` means the agent died: the guard stays armed and
fires at the same time it would have anyway.  A guard that was never armed (guard
disabled in the cluster config) exits after `--linger` seconds: on the fake
hypervisor the guard process *is* the host, so its guests live as long as it does.

Run as `python -m fencing.guard --agent-pid PID --uri URI [--watchdog /dev/watchdog]`.

This pipe mode dies with the agent's cgroup when systemd stops the agent; the guard
*service* (`vmha guard`, `--socket PATH`: fencing.guard_server) outlives the agent and
accepts a restarted agent process that re-attaches before the deadline.  The agent
uses the service when given `--guard-socket`, and starts a guard of its own otherwise.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any

import structlog

from fencing.lease_hold import LeaseTerms
from fencing.marker import (
    FencedMarker,
    PassResult,
    default_marker_path,
    destroy_pass,
    repeat_passes,
)
from hypervisor.base import Hypervisor, HypervisorUnavailable
from schemas.errors import InvariantError

WDIOC_SETTIMEOUT = 0xC0045706  # _IOWR('W', 6, int)
EXIT_FIRED = 3
# The agent's side (GuardClient) logs through structlog; the guard process itself
# writes plain JSON lines (_log) so it needs nothing set up.
client_log = structlog.get_logger("vmha.guard_client")


def _log(event: str, **kw: Any) -> None:
    rec = {"event": event, "logger": "vmha.guard", "pid": os.getpid(),
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), **kw}
    print(json.dumps(rec), file=sys.stderr, flush=True)


def open_hypervisor(uri: str, adopt_host: bool = False) -> Hypervisor:
    """The hypervisor behind `uri` (fake:///dir/<node> or a libvirt URI)."""
    if uri.startswith("fake://"):
        from hypervisor.fake import FakeHypervisor, fake_dir

        if adopt_host:  # the guard process becomes the fake host (writes host.pid)
            d = fake_dir(uri)
            return FakeHypervisor(d.parent, d.name, host_pid=os.getpid())
        return FakeHypervisor.attach(uri)
    from hypervisor.libvirt_adapter import LibvirtHypervisor

    return LibvirtHypervisor(uri)


def destroy_managed(hv: Hypervisor) -> tuple[list[str], list[str]]:
    """One pass over every active managed domain; (destroyed, failed).  A failed list
    raises HypervisorError (fence_vmha reports it to the fence daemon, which retries)."""
    res = destroy_pass(hv, lambda: True)
    if res.failed and res.failed[0].startswith("list: "):
        raise HypervisorUnavailable(res.failed[0])
    return res.destroyed, res.failed


class Watchdog:
    """/dev/watchdog: fed only while the guard's fire time is in the future."""

    def __init__(self, path: str, timeout_s: int) -> None:
        self.f: IO[bytes] | None = open(path, "wb", buffering=0)  # noqa: SIM115
        try:
            fcntl.ioctl(self.f, WDIOC_SETTIMEOUT, struct.pack("I", max(1, timeout_s)))
        except OSError as exc:
            _log("watchdog_timeout_not_set", error=str(exc))

    def feed(self) -> None:
        if self.f is not None:
            self.f.write(b"\0")

    def close(self, disarm: bool) -> None:
        if self.f is not None:
            if disarm:
                self.f.write(b"V")  # magic close: the timer stops
            self.f.close()  # without 'V' the timer keeps running: the host resets
            self.f = None


def run(agent_pid: int, uri: str, linger_s: float, watchdog: str | None,
        watchdog_timeout_s: int, stdin: IO[bytes], fenced_marker: str | None = None) -> int:
    hv = open_hypervisor(uri, adopt_host=uri.startswith("fake://"))
    marker = FencedMarker(fenced_marker or default_marker_path(uri))
    # A signal meant for the agent (Ctrl-C, `systemctl stop` with KillMode=control-group,
    # a kill of its process group) must not end the guard: the agent drains, disarms it
    # and the guard exits on EOF.  Only SIGKILL ends it otherwise.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    wd = Watchdog(watchdog, watchdog_timeout_s) if watchdog else None
    fd = stdin.fileno()
    os.set_blocking(fd, False)
    buf = b""
    armed = False
    eof_at: float | None = None
    fire_at = float("inf")
    _log("guard_started", agent_pid=agent_pid, uri=uri, watchdog=watchdog)
    while True:
        now = time.monotonic()
        if armed and now >= fire_at:
            break
        if not armed and eof_at is not None and now - eof_at >= linger_s:
            _log("guard_exit", reason="agent gone and guard not armed")
            if wd:
                wd.close(disarm=True)
            return 0
        if wd and armed:
            wd.feed()
        wait = 0.05 if not armed else max(0.0, min(0.05, fire_at - now))
        if eof_at is None:
            r, _, _ = select.select([fd], [], [], wait)
        else:
            time.sleep(wait)
            r = []
        if not r:
            continue
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not chunk:
            eof_at = time.monotonic()
            _log("agent_pipe_closed", armed=armed,
                 fires_in_s=round(fire_at - eof_at, 3) if armed else None)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            parts = line.decode(errors="replace").split()
            if not parts:
                continue
            if parts[0] == "pet" and len(parts) == 3:
                received = time.monotonic()
                deadline, timeout = float(parts[1]), float(parts[2])
                fire_at = min(received + timeout, deadline)  # fencing.policy.guard_fire_at
                if not armed:
                    _log("guard_armed", fires_in_s=round(fire_at - received, 3))
                armed = True
            elif parts[0] == "disarm":
                armed = False
                fire_at = float("inf")
                linger_s = 0.0
                _log("guard_disarmed", reason="agent exiting cleanly")
    # Fire.
    started = time.monotonic()
    try:
        os.kill(agent_pid, signal.SIGKILL)
        killed = True
    except ProcessLookupError:
        killed = False
    res = first_pass(hv, marker)
    if wd:
        wd.close(disarm=False)
    _log("guard_fired", agent_pid=agent_pid, agent_killed=killed, destroyed=res.destroyed,
         failed=res.failed, took_ms=round((time.monotonic() - started) * 1000, 1),
         marker=str(marker.path), reason="no pet from the agent before its deadline")
    # libvirtd still accepts work the first pass missed: destroy again until the agent
    # holds a registration again (it removes the marker) or the watchdog resets the host.
    repeat_passes(hv, marker.exists, threading.Event(), log_pass)
    _log("guard_exit", reason="fenced marker removed: the node's agent registered again")
    return EXIT_FIRED


def first_pass(hv: Hypervisor, marker: FencedMarker) -> PassResult:
    """Marker first (the hook refuses new work from then on), then one destroy pass."""
    try:
        marker.write("guard", "no pet from the agent before its deadline")
    except OSError as exc:
        _log("fenced_marker_not_written", marker=str(marker.path), error=str(exc))
    # Destroy even if the marker could not be written (this pass must not wait on it);
    # the repeated passes then stop at once: without a marker nothing says "fenced".
    return destroy_pass(hv, lambda: True)


def log_pass(res: PassResult) -> None:
    _log("guard_fence_pass", destroyed=res.destroyed, failed=res.failed,
         reason="work that started after the first pass, or a failed list or destroy")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fencing.guard")
    ap.add_argument("--agent-pid", type=int, help="the agent that started this guard (pipe mode)")
    ap.add_argument("--socket", help="serve agents on this unix socket instead "
                                     "(the guard service: fencing.guard_server)")
    ap.add_argument("--uri", required=True, help="hypervisor URI (libvirt, or fake:///dir/node)")
    ap.add_argument("--linger", type=float, default=0.0,
                    help="seconds a never-armed guard stays after the agent is gone")
    ap.add_argument("--watchdog", help="e.g. /dev/watchdog: fed only while armed and in time")
    ap.add_argument("--watchdog-timeout", type=int, default=10)
    ap.add_argument("--fenced-marker", help="the file that says this host is fenced, written "
                                            "before the first destroy (default: "
                                            "/run/vmha/fenced; <fake dir>/fenced)")
    a = ap.parse_args(argv)
    if a.socket:
        from fencing.guard_server import serve

        return serve(a.socket, a.uri, a.watchdog, a.watchdog_timeout, a.fenced_marker)
    if a.agent_pid is None:
        ap.error("--agent-pid or --socket is required")
    return run(a.agent_pid, a.uri, a.linger, a.watchdog, a.watchdog_timeout, sys.stdin.buffer,
               a.fenced_marker)


class GuardClient:
    """The agent's handle on its guard process."""

    def __init__(self, uri: str, *, linger_s: float = 0.0, watchdog: str | None = None,
                 fenced_marker: str | None = None) -> None:
        args = [sys.executable, "-m", "fencing.guard", "--agent-pid", str(os.getpid()),
                "--uri", uri, "--linger", str(linger_s)]
        if watchdog:
            args += ["--watchdog", watchdog]
        if fenced_marker:
            args += ["--fenced-marker", fenced_marker]
        # Own session: a Ctrl-C or a signal to the agent's process group leaves it alone.
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, start_new_session=True)
        if self.proc.stdin is None:
            self.proc.kill()
            raise InvariantError("guard process started without a pipe to its stdin")
        self._pipe: IO[bytes] = self.proc.stdin
        self.broken = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not self.broken and self.proc.poll() is None

    def _send(self, line: str) -> bool:
        try:
            self._pipe.write(line.encode() + b"\n")
            self._pipe.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            self.broken = True
            return False

    def pet(self, deadline: float, timeout_s: float) -> bool:
        return self._send(f"pet {deadline:.6f} {timeout_s:.6f}")

    def announce(self, terms: LeaseTerms) -> bool:
        """A guard of the agent's own dies with it: it never holds the lease."""
        return True

    def close(self) -> None:
        """EOF without disarm: the guard stays armed (it dies with the agent's cgroup
        under systemd, so only the guard service can hand the deadline on)."""
        try:
            self._pipe.close()
        except OSError as exc:
            client_log.debug("guard_pipe_close_failed", error=str(exc))

    def disarm(self) -> None:
        self._send("disarm")
        try:
            self._pipe.close()
        except OSError as exc:
            # The guard is gone already; disarming it has nothing left to do.
            client_log.debug("guard_pipe_close_failed", error=str(exc))


if __name__ == "__main__":
    sys.exit(main())
