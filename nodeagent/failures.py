"""What the agent does when the hypervisor refuses an operation or a guest dies.

* A refused boot is counted in the VM's status (`boot_failures`, `error`, `retry_at`
  after an exponential, capped backoff); the plan waits for `retry_at` and stops at
  `max_boot_failures_per_node`, after which the leader relocates the VM.
* A guest that died under the running agent is a crash: a `crash` event (an outage for
  `vmha availability`), status `crashed` with a new `since`, `crashes` counted, and the
  same backoff before it is booted again (up to `max_restart`).
* Any other refused operation (shutdown, destroy, undefine) backs off per VM here, with
  its error in the status.

History gets a failure once per distinct error, not once per retry: an event is written
only when the error differs from the one the status already shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypervisor.base import HypervisorRefused
from nodeagent import plan as agent_plan
from nodeagent.context import AgentContext
from nodeagent.membership import Membership
from schemas.models import RUNNING_STATES, VmStatus, failure_backoff, gave_up
from schemas.snapshot import ClusterSnapshot

ERROR_CHARS = 500

StatusTxn = Callable[[str, VmStatus, int], bool]


def carried(prev: VmStatus, placement_id: str | None, state: str) -> dict[str, Any]:
    """The failure counts a new status under the same placement keeps (the retry time
    only while the VM is not running: a source's hand-off acknowledgement keeps the
    target's backoff)."""
    if prev.placement_id != placement_id or not (prev.boot_failures or prev.crashes):
        return {}
    keep: dict[str, Any] = {"boot_failures": prev.boot_failures, "crashes": prev.crashes,
                            "failed_at": prev.failed_at, "error": prev.error}
    if state not in RUNNING_STATES:
        keep["retry_at"] = prev.retry_at
    return keep


@dataclass
class _OpBackoff:
    failures: int = 0
    until: float = 0.0  # monotonic
    error: str = ""


@dataclass
class Failures:
    ctx: AgentContext
    m: Membership
    status_txn: StatusTxn
    ops: dict[str, _OpBackoff] = field(default_factory=dict)  # VM -> refused operation

    # ---- boots and crashes: counted in the status ---------------------------------------

    def boot_refused(self, a: agent_plan.Boot, exc: HypervisorRefused,
                     snap: ClusterSnapshot, lg: Any) -> None:
        me, cfg = self.ctx.me, self.m.cfg
        se = snap.statuses.get(a.vm)
        prev = se.value if se else None
        kept = carried(prev, a.placement_id, "stopped") if prev else {}
        n = int(kept.get("boot_failures", 0)) + 1
        now = time.time()
        delay = failure_backoff(cfg, n)
        error = str(exc)[:ERROR_CHARS]
        since = prev.since if prev and prev.node == me and prev.state == "stopped" else now
        status = VmStatus(vm=a.vm, node=me, state="stopped", placement_id=a.placement_id,
                          since=since, error=error, boot_failures=n,
                          crashes=int(kept.get("crashes", 0)), failed_at=now,
                          retry_at=now + delay)
        ok = self.status_txn(a.vm, status, se.mod_revision if se else 0)
        lg.error("boot_refused", placement=a.placement_id, error=error, boot_failures=n,
                 retry_in_s=delay, gave_up=gave_up(status, cfg), written=ok)
        if ok and (prev is None or prev.error != error):
            self.ctx.history.record("boot_failed", vm=a.vm, node=me,
                                    reason=f"{error[:300]} (retried with backoff)")
        self.ctx.wake.set()

    def crashed(self, a: agent_plan.Crashed, snap: ClusterSnapshot, lg: Any) -> None:
        me, cfg = self.ctx.me, self.m.cfg
        se = snap.statuses.get(a.vm)
        prev = se.value if se else None
        kept = carried(prev, a.placement_id, "crashed") if prev else {}
        now = time.time()
        if a.counted:
            n = int(kept.get("crashes", 0)) + 1
            delay = failure_backoff(cfg, n)
            extra: dict[str, Any] = {"error": f"guest died: {a.reason}"[:ERROR_CHARS],
                                     "crashes": n, "failed_at": now, "retry_at": now + delay}
        else:  # not held against the VM: booted again at once
            n, delay = int(kept.get("crashes", 0)), 0.0
            extra = {**kept, "crashes": n, "retry_at": None}
        extra["boot_failures"] = int(kept.get("boot_failures", 0))
        status = VmStatus(vm=a.vm, node=me, state="crashed", placement_id=a.placement_id,
                          since=now, **extra)
        ok = self.status_txn(a.vm, status, a.expect_mod_revision)
        verdict = gave_up(status, cfg)
        lg.error("crash", placement=a.placement_id, reason=a.reason, crashes=n,
                 counted=a.counted, retry_in_s=None if verdict else delay, gave_up=verdict,
                 written=ok)
        if ok:  # each crash is an outage: recorded every time, once (the write is a CAS)
            what = f"crash {n} on {me}" if a.counted else "not counted (not a QEMU death)"
            self.ctx.history.record("crash", vm=a.vm, node=me,
                                    reason=f"{a.reason}; {what}"
                                           + (f"; gave up: {verdict}" if verdict else ""))
        self.ctx.wake.set()

    # ---- other operations: backed off here --------------------------------------------

    def backing_off(self, action: agent_plan.AgentAction) -> bool:
        if isinstance(action, agent_plan.Report):
            return False
        b = self.ops.get(action.vm)
        return b is not None and self.ctx.clock() < b.until

    def succeeded(self, action: agent_plan.AgentAction) -> None:
        if not isinstance(action, agent_plan.Report | agent_plan.Crashed):
            self.ops.pop(action.vm, None)

    def refused(self, action: agent_plan.AgentAction, exc: HypervisorRefused,
                snap: ClusterSnapshot) -> None:
        """A shutdown, destroy, undefine or migration start the hypervisor refused."""
        b = self.ops.setdefault(action.vm, _OpBackoff())
        b.failures += 1
        delay = failure_backoff(self.m.cfg, b.failures)
        b.until = self.ctx.clock() + delay
        error = f"{type(action).__name__.lower()} refused: {exc}"[:ERROR_CHARS]
        self.ctx.log.error("operation_refused", vm=action.vm, op=type(action).__name__,
                           error=error, failures=b.failures, retry_in_s=delay,
                           revision=snap.revision)
        if error == b.error:
            return
        b.error = error
        self.ctx.history.record("stop_failed", vm=action.vm, node=self.ctx.me,
                                reason=f"{error[:300]} (retried with backoff)")
        se = snap.statuses.get(action.vm)
        if se is not None and se.value.node == self.ctx.me:
            self.status_txn(action.vm, se.value.model_copy(update={"error": error}),
                            se.mod_revision)
