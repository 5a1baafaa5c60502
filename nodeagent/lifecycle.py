"""How the agent process ends: a stop drains the node, a restart keeps its VMs in place.

systemd sends the same SIGTERM for `systemctl stop` and `systemctl restart`.  On
SIGTERM the agent asks systemd which job runs on its own unit (`systemctl list-jobs`):

* a restart job (`systemctl restart`, `try-restart`, `reload-or-restart`, a package
  upgrade's restart): **restart in place**: stop renewing and exit, leaving the lease,
  the registration and the armed guard service to the next agent process, which
  adopts them (`nodeagent.adopt`) before the guard's deadline; the VMs never move;
* anything else (`systemctl stop`, a shutdown, no systemd at all, systemd not
  answering): **drain**: cordon, live-migrate every VM away, revoke, exit.  A drain
  that has not finished after `drain_timeout_s` (shorter than the unit's
  TimeoutStopSec) ends with destroy -> revoke -> exit: never VMs left running unfenced.

SIGUSR2 restarts in place whatever systemd is doing: the agent exits with
EXIT_RESTART, which the unit's `RestartForceExitStatus=` restarts.  Restarting in
place needs the guard service (`--guard-socket`): a guard of the agent's own dies
with it, so without one the agent drains instead.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from store.etcd import StoreUnavailable

if TYPE_CHECKING:
    from nodeagent.agent import NodeAgent

EXIT_RESTART = 75  # EX_TEMPFAIL
RESTART_JOBS = {"restart", "try-restart", "reload-or-restart", "try-reload-or-restart"}
log = structlog.get_logger("vmha.agent")


def unit_from_cgroup(text: str) -> str | None:
    """The systemd unit of a process from its /proc/<pid>/cgroup (cgroup v2 or v1)."""
    for line in text.splitlines():
        path = line.rsplit(":", 1)[-1]
        for part in reversed(path.split("/")):
            if part.endswith(".service"):
                return part
    return None


def job_type_from(list_jobs: str, unit: str) -> str | None:
    """The type of the job running on `unit`, from `systemctl list-jobs --plain
    --no-legend` ("<id> <unit> <type> <state>" a line)."""
    for line in list_jobs.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == unit:
            return parts[2]
    return None


def systemd_job_type(unit: str | None = None) -> str | None:
    """The job systemd runs on `unit` (default: this process's unit) now; None outside
    systemd or if systemd does not answer (then the caller drains: the safe reading of
    a SIGTERM)."""
    try:
        unit = unit or unit_from_cgroup(Path("/proc/self/cgroup").read_text())
        if unit is None:
            return None
        out = subprocess.run(["systemctl", "list-jobs", "--plain", "--no-legend", "--full"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("systemd_job_unknown", error=str(exc), reading="stop: drain")
        return None
    return job_type_from(out, unit)


class StopControl:
    """Signals in, the agent's way out: restart in place, drain, or drain given up."""

    def __init__(self, agent: NodeAgent, drain_timeout_s: float,
                 unit: str | None = None) -> None:
        self.agent = agent
        self.unit = unit
        self.drain_timeout_s = drain_timeout_s
        self.restarting = False
        self.explicit_restart = False
        self.drain_expired = False
        self._timer: threading.Timer | None = None

    def can_restart_in_place(self) -> bool:
        return self.agent.ctx.opts.guard_socket is not None

    def on_sigterm(self) -> None:
        job = systemd_job_type(self.unit)
        if job in RESTART_JOBS and self.can_restart_in_place():
            self.restart_in_place(f"systemd {job} job")
        else:
            self.drain(f"systemd {job} job" if job else "SIGTERM")

    def on_sigusr2(self) -> None:
        if self.can_restart_in_place():
            self.explicit_restart = True
            self.restart_in_place("SIGUSR2")
        else:
            self.drain("SIGUSR2 without the guard service: a restart in place would "
                       "leave no guard")

    def restart_in_place(self, why: str) -> None:
        self.agent.ctx.log.warning("restart_in_place_requested", cause=why)
        self.restarting = True
        self.agent.stopped.set()
        self.agent.wake.set()

    def drain(self, why: str) -> None:
        self.agent.ctx.log.warning("drain_requested", cause=why,
                                   gives_up_in_s=self.drain_timeout_s)
        self.agent.request_exit()
        if self._timer is None:
            self._timer = threading.Timer(self.drain_timeout_s, self._drain_timed_out)
            self._timer.daemon = True
            self._timer.start()

    def _drain_timed_out(self) -> None:
        self.drain_expired = True
        self.agent.ctx.log.error("drain_timeout", after_s=self.drain_timeout_s,
                                 reason="drain not finished: destroy, revoke, exit")
        self.agent.stopped.set()
        self.agent.wake.set()

    def finish(self, rc: int) -> int:
        """After `agent.run()` returned: what is left to do, and the exit status."""
        if self._timer is not None:
            self._timer.cancel()
        m = self.agent.membership
        if self.restarting:
            m.release_for_restart()
            return EXIT_RESTART if self.explicit_restart else 0
        if self.drain_expired:
            return self._give_up_drain()
        return rc

    def _give_up_drain(self) -> int:
        """Destroy -> revoke -> exit: the leader may boot the VMs elsewhere at once."""
        m = self.agent.membership
        m.self_fence()
        active, _ = self.agent.execution.drain_state()
        if active:
            # Not destroyed: the guard stays armed and fires at the lease's deadline.
            self.agent.ctx.log.error("drain_give_up_failed", remaining=active,
                                     reason="left to the guard")
            return 1
        reg = m.reg
        if reg is not None:
            try:
                m.leave(reg, "drain timed out: every VM destroyed")
            except StoreUnavailable as exc:
                # The domains are gone already; the lease expires on its own.
                self.agent.ctx.log.error("revoke_failed", error=str(exc))
        m.disarm_guard()
        self.agent.ctx.log.warning("drain_given_up", reason="domains destroyed, lease revoked")
        return 1
