"""The guard as its own service (`vmha guard`, deploy/systemd/vmha-guard.service).

Like Proxmox's watchdog-mux, it outlives the agent: it listens on a unix socket
(/run/vmha/guard.sock), and an agent process connects, identifies its node and pets
it after every acknowledged lease renewal.  One line per message:

    hello <node>               -> "ok <guard pid> <armed 0|1>"
    pet <deadline> <timeout>   the agent's self-fence deadline on CLOCK_MONOTONIC (the
                               clock is system-wide, so both processes share it) and
                               the guard's timeout; fire at min(now + timeout, deadline)
    disarm                     drained, lease revoked: stop guarding (the magic close)

A connection that ends without `disarm` (the agent crashed, was SIGKILLed, or is
being restarted in place) leaves the deadline armed: a new agent process that
connects and pets before it keeps the node's VMs; if none does, the guard fires:
SIGKILL every agent still connected (a frozen agent must never resume and act),
write the fenced marker (fencing.marker: the libvirt hook refuses new work from then
on), destroy every active vmha-managed domain, stop feeding the watchdog (the host then
resets when its timer runs out), and destroy again every fraction of a second until the
node's agent holds a registration again and removes the marker; then serve on, unarmed,
as a guard just started would.  The deadline carried by a pet is the agent's own
self-fence deadline, so the guard never fires later than the leader's fence window
allows, whoever holds the connection.

The watchdog (/dev/watchdog; load `softdog` where there is no hardware one) is opened
at start and fed while the guard has not fired; a clean exit while disarmed releases
it with the magic close.  SIGTERM ends the guard at once while it is disarmed or an
agent is attached (the agent keeps its own deadline and re-attaches to the restarted
guard on its next pet); armed with no agent attached, the stop is deferred until a new
agent disarms it or the deadline passes: the guard is then the only fence left.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fencing.guard import Watchdog, _log, first_pass, log_pass, open_hypervisor
from fencing.lease import LeaseStore
from fencing.lease_hold import LeaseHold, LeaseTerms
from fencing.marker import FencedMarker, default_marker_path, destroy_pass, pass_pause

WATCHDOG_FEED_EVERY_S = 1.0


@dataclass
class _Client:
    sock: socket.socket
    pid: int
    node: str = ""
    buf: bytes = b""


@dataclass
class GuardState:
    """What the guard knows: whether it is armed and when it fires."""

    armed: bool = False
    fire_at: float = float("inf")
    # Since when an armed guard has had no agent attached (the agent died or is being
    # restarted): the re-attach that ends it is logged with the time it took.
    orphaned_at: float | None = None
    timeout: float = 0.0  # carried by the last pet; a lease hold's renewals reuse it
    clients: dict[int, _Client] = field(default_factory=dict)  # by fileno
    # A lease hold pets from its own thread.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pet(self, now: float, deadline: float, timeout: float) -> None:
        with self.lock:
            self.fire_at = min(now + timeout, deadline)  # fencing.policy.guard_fire_at
            self.timeout = timeout
            self.armed = True

    def disarm(self) -> None:
        with self.lock:
            self.armed = False
            self.orphaned_at = None
            self.fire_at = float("inf")

    def due(self, now: float) -> bool:
        with self.lock:
            return self.armed and now >= self.fire_at


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


def listen(path: str, group: str | None = None) -> socket.socket:
    """The guard's socket: only its own user (0600), or also `group` (0660), may attach:
    a pet keeps VMs alive, a disarm ends that.  The agent runs as a user of its own
    (deploy/systemd/vmha-agent.service), so the guard shares a group with it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_socket():
        p.unlink()  # left by a guard that was killed; we own the path now
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    if group:
        import grp

        gid = grp.getgrnam(group).gr_gid
        if os.stat(path).st_gid != gid:  # the unit's Group= makes it so without a chown
            os.chown(path, -1, gid)
    os.chmod(path, 0o660 if group else 0o600)
    srv.listen(8)
    srv.setblocking(False)
    return srv


class GuardServer:
    def __init__(self, path: str, uri: str, watchdog: str | None = None,
                 watchdog_timeout_s: int = 10,
                 clock: Callable[[], float] = time.monotonic,
                 hold_store: LeaseStore | None = None, restart_grace_s: float = 0.0,
                 socket_group: str | None = None, fenced_marker: str | None = None) -> None:
        self.hv = open_hypervisor(uri, adopt_host=uri.startswith("fake://"))
        self.marker = FencedMarker(fenced_marker or default_marker_path(uri))
        # Fired and the marker still there: destroy again at `_next_pass` (see fire()).
        self.fenced = False
        self._next_pass = float("inf")
        self.path = path
        self.srv = listen(path, socket_group)
        self._watchdog = (watchdog, watchdog_timeout_s)
        self.wd = Watchdog(watchdog, watchdog_timeout_s) if watchdog else None
        self.state = GuardState()
        self.clock = clock
        self.stop_requested = False
        self._fed_at = float("-inf")
        # fencing.lease_hold: with an etcd client, the lease is renewed while no agent
        # is attached, for at most restart_grace_s.
        self.hold_store = hold_store
        self.restart_grace_s = restart_grace_s
        self.terms: LeaseTerms | None = None
        self.hold: LeaseHold | None = None

    def request_stop(self) -> None:
        self.stop_requested = True
        if not self._may_stop():
            _log("guard_stop_deferred", reason="armed and no agent attached: exits once an "
                                               "agent disarms it, or fires")

    def _may_stop(self) -> bool:
        """Disarmed, or an agent is attached: that agent keeps its own deadline and
        re-attaches to the next guard (a restart of the guard itself).  Armed with no
        agent, the guard is all that stands between the VMs and a double run."""
        st = self.state
        if self.fenced:
            return False  # the repeated passes are all that destroys late work
        return not st.armed or any(c.node for c in st.clients.values())

    def run(self) -> int:
        st = self.state
        _log("guard_listening", socket=self.path, uri=self.hv.uri,
             watchdog=self.wd is not None)
        while True:
            now = self.clock()
            if self.fenced:
                if not self.marker.exists():
                    self._unfence()
                elif now >= self._next_pass:
                    self.fence_pass()
            elif st.due(now):
                self.fire()
                continue
            if (self.hold is not None and st.orphaned_at is not None
                    and now - st.orphaned_at >= self.restart_grace_s):
                self._end_hold("restart grace over: no agent attached; the guard fires at "
                               "its time after the last renewal")
            if self.stop_requested and self._may_stop():
                self._exit_clean()
                return 0
            if self.wd and now - self._fed_at >= WATCHDOG_FEED_EVERY_S:
                self.wd.feed()
                self._fed_at = now
            due = self._next_pass if self.fenced else st.fire_at
            wait = max(0.0, min(0.05, due - now))
            socks = [self.srv, *(c.sock for c in st.clients.values())]
            try:
                readable, _, _ = select.select(socks, [], [], wait)
            except InterruptedError:
                continue
            for s in readable:
                if s is self.srv:
                    self._accept()
                else:
                    self._read(st.clients[s.fileno()])

    def _accept(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.state.clients[conn.fileno()] = _Client(conn, _peer_pid(conn))

    def _drop(self, c: _Client, why: str) -> None:
        self.state.clients.pop(c.sock.fileno(), None)
        c.sock.close()
        st = self.state
        if st.armed and not any(o.node for o in st.clients.values()):
            st.orphaned_at = self.clock()
            self._start_hold()
        _log("agent_disconnected", agent_pid=c.pid, node=c.node, reason=why, armed=st.armed,
             fires_in_s=round(st.fire_at - self.clock(), 3) if st.armed else None)

    def _read(self, c: _Client) -> None:
        try:
            chunk = c.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop(c, f"read failed: {exc}")
            return
        if not chunk:
            self._drop(c, "connection closed without disarm" if self.state.armed
                       else "connection closed")
            return
        c.buf += chunk
        while b"\n" in c.buf:
            line, c.buf = c.buf.split(b"\n", 1)
            self._handle(c, line.decode(errors="replace").split())

    def _handle(self, c: _Client, parts: list[str]) -> None:
        st = self.state
        if not parts:
            return
        if parts[0] == "hello" and len(parts) == 2:
            c.node = parts[1]
            _log("agent_attached", agent_pid=c.pid, node=c.node, armed=st.armed,
                 fires_in_s=round(st.fire_at - self.clock(), 3) if st.armed else None)
            try:
                c.sock.sendall(f"ok {os.getpid()} {int(st.armed)}\n".encode())
            except OSError as exc:
                self._drop(c, f"reply failed: {exc}")
        elif parts[0] == "pet" and len(parts) == 3:
            try:
                deadline, timeout = float(parts[1]), float(parts[2])
            except ValueError:
                _log("bad_message", agent_pid=c.pid, message=" ".join(parts)[:100])
                return
            self._end_hold("an agent petted")
            was = st.armed
            now = self.clock()
            if st.orphaned_at is not None:
                # The restart budget: how long the node went without an agent, and how
                # much of the guard's deadline was left when the new one petted.
                _log("agent_reattached", agent_pid=c.pid, node=c.node,
                     unattended_s=round(now - st.orphaned_at, 3),
                     margin_s=round(st.fire_at - now, 3))
                st.orphaned_at = None
            st.pet(now, deadline, timeout)
            if not was:
                _log("guard_armed", agent_pid=c.pid, fires_in_s=round(st.fire_at - self.clock(), 3))
        elif parts[0] == "lease":
            try:
                self.terms = LeaseTerms.parse(parts[1:])
            except ValueError as exc:
                _log("bad_message", agent_pid=c.pid, message=" ".join(parts)[:100],
                     error=str(exc))
        elif parts[0] == "alive" and self.terms is not None:
            # Follows its `lease` line (fencing.lease_hold): the liveness lease to hold too.
            try:
                self.terms = self.terms.with_alive(parts[1:])
            except ValueError as exc:
                _log("bad_message", agent_pid=c.pid, message=" ".join(parts)[:100],
                     error=str(exc))
        elif parts[0] == "paired" and self.terms is not None and self.terms.alive_id:
            # Keyspace 2: renew both leases in one round (fencing.lease_hold).
            self.terms = self.terms.with_paired()
        elif parts[0] == "disarm":
            self._end_hold("agent disarmed")
            self.terms = None
            st.disarm()
            _log("guard_disarmed", agent_pid=c.pid, reason="agent exiting cleanly")
        else:
            _log("bad_message", agent_pid=c.pid, message=" ".join(parts)[:100])

    # ---- the lease hold (fencing.lease_hold) ---------------------------------------------

    def _start_hold(self) -> None:
        st, terms = self.state, self.terms
        if self.hold_store is None or terms is None or self.restart_grace_s <= 0:
            return
        self._end_hold("restarted")
        with st.lock:
            deadline = st.fire_at
        self.hold = LeaseHold(self.hold_store, terms, deadline, self._held, self._hold_gone,
                              clock=self.clock).start()
        _log("lease_hold_started", lease=f"{terms.lease_id:x}",
             liveness_lease=f"{terms.alive_id:x}" if terms.alive_id else None,
             grace_s=self.restart_grace_s,
             fires_in_s=round(deadline - self.clock(), 3),
             reason="no agent attached: renewing the lease until one pets again")

    def _held(self, deadline: float) -> None:
        """A renewal etcd acknowledged while holding: it counts as a pet."""
        st, hold = self.state, self.hold
        if hold is None or not st.armed:
            return
        st.pet(self.clock(), deadline, st.timeout)

    def _hold_gone(self) -> None:
        _log("lease_hold_gone", reason="etcd says the lease no longer exists: nothing left "
                                       "to hold; the guard fires at its time")

    def _end_hold(self, why: str) -> None:
        hold, self.hold = self.hold, None
        if hold is None:
            return
        hold.stop()
        _log("lease_hold_ended", lease=f"{hold.terms.lease_id:x}", renewals=hold.renewals,
             reason=why)

    def fire(self) -> None:
        self._end_hold("firing")
        started = self.clock()
        killed = []
        for c in list(self.state.clients.values()):
            try:
                os.kill(c.pid, signal.SIGKILL)
                killed.append(c.pid)
            except ProcessLookupError:
                _log("agent_already_gone", agent_pid=c.pid)
        res = first_pass(self.hv, self.marker)
        if self.wd:
            self.wd.close(disarm=False)
            self.wd = None
        _log("guard_fired", agents_killed=killed, destroyed=res.destroyed, failed=res.failed,
             took_ms=round((self.clock() - started) * 1000, 1), marker=str(self.marker.path),
             reason="no pet from any agent before the deadline")
        # libvirtd still accepts work the first pass missed: destroy again until the
        # node's agent holds a registration again (it removes the marker; the guard then
        # serves on, unarmed) or the watchdog resets the host.  The socket stays open
        # meanwhile: the restarted agent attaches before it registers.
        self.state.disarm()
        self.fenced = True
        self._next_pass = self.clock() + pass_pause()

    def _unfence(self) -> None:
        """The node's agent holds a registration again and removed the marker: serve on
        as a guard that has just started (unarmed until that agent's next pet, the
        watchdog held again).  Staying, rather than exiting for Restart=, keeps the
        connection the agent already has."""
        self.fenced = False
        self._next_pass = float("inf")
        self.state.disarm()
        path, timeout = self._watchdog
        if path and self.wd is None:
            self.wd = Watchdog(path, timeout)
        _log("guard_unfenced", reason="fenced marker removed: the node's agent registered "
                                      "again", agents=len(self.state.clients))

    def fence_pass(self) -> None:
        res = destroy_pass(self.hv, self.marker.exists)
        if res.destroyed or res.failed:
            log_pass(res)
        self._next_pass = self.clock() + pass_pause()

    def _exit_clean(self) -> None:
        if self.wd:
            self.wd.close(disarm=True)
        self._close_socket()
        _log("guard_exit", reason="stop requested and not armed")

    def _close_socket(self) -> None:
        for c in list(self.state.clients.values()):
            c.sock.close()
        self.state.clients.clear()
        self.srv.close()
        Path(self.path).unlink(missing_ok=True)


def serve(path: str, uri: str, watchdog: str | None, watchdog_timeout_s: int,
          fenced_marker: str | None = None, hold_store: LeaseStore | None = None,
          restart_grace_s: float = 0.0, socket_group: str | None = None) -> int:
    """The `vmha guard` daemon: runs until it is stopped while disarmed (or with an agent
    attached); after firing it serves on once the node's agent registered again."""
    from telemetry import metrics

    server = GuardServer(path, uri, watchdog, watchdog_timeout_s, hold_store=hold_store,
                         restart_grace_s=restart_grace_s, socket_group=socket_group,
                         fenced_marker=fenced_marker)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.request_stop())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    metrics.notify("READY=1\nSTATUS=listening")
    return server.run()
