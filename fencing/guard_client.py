"""The agent's side of the guard service (fencing.guard_server) over its unix socket.

A broken connection (the guard service was restarted) is re-established on the next
pet; the guard only counts pets, so a reconnect loses nothing.  `close()` ends the
connection *without* disarming: the agent is being restarted in place, and the guard
keeps the deadline until the next agent process attaches and pets.
"""

from __future__ import annotations

import socket

import structlog
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_random_exponential

from fencing.lease_hold import LeaseTerms
from schemas.errors import TemporaryError

log = structlog.get_logger("vmha.guard_client")


class GuardUnreachable(TemporaryError):
    """The guard service does not answer on its socket."""


class SocketGuardClient:
    def __init__(self, path: str, node: str, *, connect_within_s: float = 10.0) -> None:
        self.path = path
        self.node = node
        self.sock: socket.socket | None = None
        self.pid = 0
        self.was_armed = False
        self._terms: str | None = None  # the lease line, sent again to a restarted guard
        self._connect_retrying(connect_within_s)

    def _connect_retrying(self, within_s: float) -> None:
        # The guard starts before the agent (After=vmha-guard.service) but may still be
        # binding its socket; bounded, jittered retries.
        @retry(retry=retry_if_exception_type(GuardUnreachable), reraise=True,
               stop=stop_after_delay(within_s), wait=wait_random_exponential(0.05, 1.0))
        def attempt() -> None:
            self._connect()

        attempt()

    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            s.connect(self.path)
            s.sendall(f"hello {self.node}\n".encode())
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    raise OSError("guard closed the connection")
                reply += chunk
        except OSError as exc:
            s.close()
            raise GuardUnreachable(f"guard at {self.path}: {exc}") from exc
        parts = reply.decode(errors="replace").split()
        if len(parts) != 3 or parts[0] != "ok":
            s.close()
            raise GuardUnreachable(f"guard at {self.path} answered {reply[:80]!r}")
        self.sock, self.pid, self.was_armed = s, int(parts[1]), parts[2] == "1"
        log.info("guard_attached", socket=self.path, guard_pid=self.pid,
                 was_armed=self.was_armed)

    def alive(self) -> bool:
        """A service guard is never 'gone' for the agent: it reconnects on the next pet."""
        return True

    def _send(self, line: str) -> bool:
        for attempt in range(2):
            payload = line
            if self.sock is None:
                try:
                    self._connect()
                except GuardUnreachable as exc:
                    log.error("guard_unreachable", error=str(exc))
                    return False
                if self._terms is not None and line != self._terms:
                    payload = f"{self._terms}\n{line}"  # a restarted guard learns the lease
            sock = self.sock
            if sock is None:
                return False
            try:
                sock.sendall(payload.encode() + b"\n")
                return True
            except OSError as exc:
                log.warning("guard_connection_lost", error=str(exc), retrying=attempt == 0)
                sock.close()
                self.sock = None
        return False

    def pet(self, deadline: float, timeout_s: float) -> bool:
        return self._send(f"pet {deadline:.6f} {timeout_s:.6f}")

    def announce(self, terms: LeaseTerms) -> bool:
        """Tell the guard which lease it may hold while no agent is attached
        (fencing.lease_hold)."""
        self._terms = terms.line()
        return self._send(self._terms)

    def disarm(self) -> None:
        if self._send("disarm"):
            log.info("guard_disarmed")
        self.close()

    def close(self) -> None:
        """End the connection; the guard stays armed until a new agent pets it."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
