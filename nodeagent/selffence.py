"""The agent's self-fence: the fenced marker, then destroy passes until the node holds a
registration again.

One pass of list + destroy is not enough (fencing.marker): libvirtd keeps accepting
work after it, and a failed list left everything running.  So the marker is written
before the first destroy (the libvirt hook refuses new domains from then on), and a
thread repeats the pass until `end()`: the agent holds a registration again (a new one,
or the old lease turned out still valid).  Only then is the marker removed and may the
agent boot; a pass holds the lock that `end()` takes, so no pass destroys a domain
booted afterwards.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from fencing.marker import FencedMarker, PassResult, default_marker_path, destroy_pass, pass_pause
from nodeagent.context import AgentContext
from telemetry import metrics


@dataclass
class LeaseFlags:
    """Set by the lease keeper's threads, read by the agent's cycle."""

    revoked: bool = False          # lease revoked while we were alive: drain (keyspace 1)
    expired: bool = False          # lease expired: we self-fenced, register again
    fenced: bool = False           # self-fenced; cleared once a registration is held
    alive_gone: bool = False       # the liveness lease is gone (nodeagent.liveness)


class SelfFence:
    def __init__(self, ctx: AgentContext, flags: LeaseFlags) -> None:
        self.ctx = ctx
        self.flags = flags
        self.marker = FencedMarker(ctx.opts.fenced_marker or default_marker_path(ctx.hv.uri))
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def log(self) -> Any:
        return self.ctx.log

    def start(self) -> None:
        """Marker, first pass (on the caller's thread: the deadline monitor), then the
        repeating thread."""
        with self._lock:
            self.flags.fenced = True
            try:
                self.marker.write(f"agent:{self.ctx.me}",
                                  "lease not renewed before the self-fencing deadline")
            except OSError as exc:
                # Destroy anyway: the marker is the second line, the destroy the first.
                self.log.error("fenced_marker_not_written", marker=str(self.marker.path),
                               error=str(exc))
            first = self._pass()
        self._report(first, first=True)
        t = self._thread
        if t is None or not t.is_alive():
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name=f"agent-{self.ctx.me}-fence")
            self._thread.start()

    def end(self, why: str) -> None:
        """The node holds a registration: stop the passes, remove the marker."""
        with self._lock:
            self.flags.fenced = False
            try:
                if self.marker.remove():
                    self.log.warning("fenced_marker_removed", marker=str(self.marker.path),
                                     reason=why)
            except OSError as exc:
                # The hook keeps refusing boots here until it is gone: loud, not fatal.
                self.log.error("fenced_marker_not_removed", marker=str(self.marker.path),
                               error=str(exc))

    def _pass(self) -> PassResult:
        """One pass; the caller holds the lock."""
        return destroy_pass(self.ctx.hv, lambda: self.flags.fenced)

    def _loop(self) -> None:
        while not self.ctx.stopped.wait(pass_pause()):
            with self._lock:
                if not self.flags.fenced:
                    return
                res = self._pass()
            self._report(res, first=False)

    def _report(self, res: PassResult, *, first: bool) -> None:
        for failure in res.failed:
            name, _, error = failure.partition(": ")
            if name == "list":
                self.log.error("self_fence_list_failed", error=error, retrying=True)
            else:
                self.log.error("self_fence_destroy_failed", vm=name, error=error,
                               retrying=True)
        for name in res.destroyed:
            metrics.SELF_FENCES.inc()
            self.log.error("self_fenced_domain", vm=name, first_pass=first,
                           reason="lease not renewed before the self-fencing deadline")
        if res.destroyed:
            # Every destroy first, the records afterwards and off this thread: a history
            # write waits on etcd, which is likely what failed, and the next pass must
            # not wait for it.
            threading.Thread(target=self._record, args=(res.destroyed,), daemon=True,
                             name=f"agent-{self.ctx.me}-fence-history").start()

    def _record(self, names: list[str]) -> None:
        for name in names:
            self.ctx.history.record("self_fence", vm=name, node=self.ctx.me,
                                    reason="lease not renewed before the deadline")
