"""The agent's reconcile plan: a pure function from (snapshot, local domains) to actions.

No I/O and no clock: the caller passes `now` (wall time, as in the statuses).  The
agent acts only on what the leader wrote (placements) and reports what really runs
(statuses); see docs/design.md for the hand-off protocol and for how failures are
bounded: a refused boot or a crash is counted in the VM's status, the next try waits
for the status's `retry_at`, and at the limits (`schemas.models.gave_up`) the node
stops trying and the leader relocates the VM.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from hypervisor.base import Domain
from schemas.models import RUNNING_STATES, ClusterConfig, Placement, VmStatus, gave_up
from schemas.snapshot import ClusterSnapshot


@dataclass(frozen=True)
class Boot:
    vm: str
    placement_id: str
    reason: str


@dataclass(frozen=True)
class MigrateOut:
    vm: str
    placement_id: str
    target: str
    target_uri: str
    target_address: str


@dataclass(frozen=True)
class Shutdown:
    vm: str
    reason: str


@dataclass(frozen=True)
class Destroy:
    vm: str
    reason: str


@dataclass(frozen=True)
class Undefine:
    vm: str
    reason: str


@dataclass(frozen=True)
class Report:
    vm: str
    state: str
    placement_id: str | None
    expect_mod_revision: int
    reason: str
    with_migration_stats: bool = False
    reset_failures: bool = False  # it ran failure_reset_s since its last failure


@dataclass(frozen=True)
class Crashed:
    """The guest died under this running agent: an outage to record and report.
    `counted`: its QEMU died (domain state crashed: kill -9, OOM, a panic), which counts
    towards `max_restart` and waits for the backoff; a domain shut off (destroyed by this
    node's own self-fence or guard, or powered off from inside) or gone is recorded but
    not held against the VM, and booted again at once, as before."""

    vm: str
    placement_id: str
    expect_mod_revision: int
    reason: str
    counted: bool = True


@dataclass(frozen=True)
class AbortMigration:
    """Stop an outgoing live migration (libvirt abortJob), or, at its time limit when the
    operator allows it, switch it to post-copy.  `stale`: no migration of this agent
    process runs for the VM although its status says migrating (the agent restarted
    mid-migration): abort whatever job libvirt still runs and report the VM here."""

    vm: str
    placement_id: str
    target: str
    reason: str
    postcopy: bool = False
    stale: bool = False


@dataclass(frozen=True)
class InFlight:
    """A live migration this agent process runs (`started`: the agent's monotonic clock)."""

    vm: str
    placement_id: str
    target: str
    started: float
    postcopy: bool = False  # switched to post-copy: it can no longer be aborted


AgentAction = Boot | MigrateOut | Shutdown | Destroy | Undefine | Report | Crashed | AbortMigration


def migration_verdicts(me: str, snap: ClusterSnapshot, inflight: Mapping[str, InFlight],
                       *, now: float) -> list[AbortMigration]:
    """The live migrations this node runs that must stop now (`now`: the clock of
    `InFlight.started`).  A migration is aborted when the leader no longer wants it (the
    placement changed, the VM is to stop or be removed), when its target lost its
    registration (its copy could start on a node about to be fenced), and at its time
    limit `migration_timeout_s` (or switched to post-copy there, if allowed).  The
    leader keeps the VM out of any new placement until this node reports the job ended."""
    cfg = snap.config
    out: list[AbortMigration] = []
    for vm, m in sorted(inflight.items()):
        if m.postcopy:
            continue  # the guest runs on the target already: nothing left to abort
        spec = snap.specs.get(vm)
        pe = snap.placements.get(vm)
        p = pe.value if pe else None
        why = None
        if spec is None:
            why = "VM spec removed"  # then destroyed here; a stop lets the target stop it
        elif p is None or p.id != m.placement_id:
            why = (f"placement changed to {p.kind} on {p.node or 'no node'} ({p.id})"
                   if p else "placement removed")
        elif m.target not in snap.nodes:
            why = f"target {m.target} lost (no registration)"
        elif now - m.started >= cfg.migration_timeout_s:
            out.append(AbortMigration(
                vm, m.placement_id, m.target,
                f"migration to {m.target} still running after {now - m.started:.0f} s "
                f"(migration_timeout_s={cfg.migration_timeout_s:g})",
                postcopy=cfg.migration_postcopy_on_timeout))
            continue
        if why is not None:
            out.append(AbortMigration(vm, m.placement_id, m.target, why))
    return out


def _counted(s: VmStatus) -> bool:
    return s.boot_failures > 0 or s.crashes > 0


def _report(me: str, vm: str, state: str, pid: str | None, snap: ClusterSnapshot,
            reason: str, stats: bool = False, now: float | None = None) -> Report | None:
    """A report if the status says otherwise, or if a running VM's failure counts are
    due to be forgotten (`now` given: an active state)."""
    se = snap.statuses.get(vm)
    if se is not None:
        cur = se.value
        if cur.node == me and cur.state == state and cur.placement_id == pid:
            cfg = snap.config
            if (now is None or not _counted(cur) or cur.failed_at is None
                    or now - cur.failed_at < cfg.failure_reset_s):
                return None
            return Report(vm, state, pid, se.mod_revision,
                          f"ran {now - cur.failed_at:.0f} s since its last failure: "
                          "failure counts reset", reset_failures=True)
    return Report(vm, state, pid, se.mod_revision if se else 0, reason, stats)


def held_back(s: VmStatus | None, placement_id: str, cfg: ClusterConfig, now: float) -> bool:
    """A failure under this placement holds the next boot until its retry time, and for
    good once the node gave up (the leader relocates the VM)."""
    if s is None or s.placement_id != placement_id or not _counted(s):
        return False
    if gave_up(s, cfg) is not None:
        return True
    return s.retry_at is not None and now < s.retry_at


def plan(me: str, snap: ClusterSnapshot, domains: Mapping[str, Domain],
         busy: Set[str] = frozenset(), *, now: float) -> list[AgentAction]:
    """`busy`: VMs with an operation in flight on this node (left alone this cycle);
    `now`: wall time, compared with the statuses' retry and failure times."""
    out: list[AgentAction] = []
    names = sorted(set(snap.specs) | {d for d, dom in domains.items() if dom.managed})
    for vm in names:
        if vm in busy or vm in snap.invalid_vms:
            # In flight, or a key of it did not parse (its spec may exist but be
            # unreadable): left exactly as it is this cycle.
            continue
        dom = domains.get(vm)
        spec = snap.specs[vm].value if vm in snap.specs else None
        p: Placement | None = snap.placements[vm].value if vm in snap.placements else None
        s: VmStatus | None = snap.statuses[vm].value if vm in snap.statuses else None
        active = dom is not None and dom.active
        placed_here = p is not None and p.node == me
        migrating_out = (p is not None and p.kind == "migrate" and p.from_node == me
                         and not placed_here)

        if dom is not None and not dom.managed:
            continue  # defined by hand: never touched

        if spec is None:
            if active:
                out.append(Destroy(vm, "VM spec removed"))
            elif dom is not None:
                out.append(Undefine(vm, "VM spec removed"))
            continue

        if active:
            assert dom is not None
            if dom.incoming:
                continue  # a live migration is streaming in; the source owns it for now
            if spec.state == "stopped" and (p is None or placed_here):
                out.append(Shutdown(vm, "desired state is stopped"))
                continue
            if placed_here:
                assert p is not None
                arrived = p.kind == "migrate"
                r = _report(me, vm, dom.state, p.id, snap,
                            "arrived by live migration" if arrived else "runs here as placed",
                            stats=arrived, now=now)
                if r:
                    out.append(r)
            elif migrating_out:
                assert p is not None and p.node is not None
                target = snap.nodes.get(p.node)
                if target is None:
                    if s is not None and s.node == me and s.state == "migrating":
                        # Our status says a migration runs, yet no migration of this
                        # process does (it restarted): end any job libvirt still runs
                        # and say the VM is here, so the leader can re-plan it.
                        out.append(AbortMigration(vm, p.id, p.node, f"target {p.node} lost "
                                                  "and no migration of this agent runs",
                                                  stale=True))
                    continue  # target gone: the leader re-plans once the job ended
                out.append(MigrateOut(vm, p.id, p.node, target.value.libvirt_uri,
                                      target.value.migration_address))
            elif p is None or p.kind in ("pending", "failed"):
                # Running here with no decision (agent restart, fresh cluster): report it,
                # the leader adopts it where it runs.
                r = _report(me, vm, dom.state, None, snap, "found running; awaiting placement")
                if r:
                    out.append(r)
            else:
                out.append(Destroy(vm, f"placed on {p.node} ({p.kind}); must not run here"))
            continue

        # Not active here.
        if placed_here and spec.state == "running":
            assert p is not None
            if s is not None and s.node == me and s.state in RUNNING_STATES:
                # It ran here and died under us: an outage.  For a migrate placement the
                # source's hand-off acknowledgement then lets us boot it again.
                out.append(Crashed(vm, p.id, snap.statuses[vm].mod_revision,
                                   f"guest {dom.state if dom else 'gone'} while its status "
                                   f"said {s.state}",
                                   counted=dom is not None and dom.state == "crashed"))
                continue
            if held_back(s, p.id, snap.config, now):
                continue  # waiting for its retry time, or this node gave up on it
            if p.kind == "boot":
                out.append(Boot(vm, p.id, p.reason))
                continue
            if p.kind == "migrate":
                acked = (s is not None and s.node == p.from_node and s.state == "stopped"
                         and s.placement_id == p.id)
                if acked:
                    out.append(Boot(vm, p.id, f"{p.from_node} handed it off without running it"))
                continue
        if migrating_out:
            assert p is not None
            if dom is not None:  # a crashed or shut-off copy: never started again here
                out.append(Undefine(vm, "left-over definition (crashed or moved); "
                                        f"placed on {p.node}"))
            if s is not None and s.node == p.node and s.state in RUNNING_STATES:
                continue  # it arrived; the target reports it now
            r = _report(me, vm, "stopped", p.id, snap, "hand-off: not running here")
            if r:
                out.append(r)
            continue
        if placed_here and spec.state == "stopped":
            r = _report(me, vm, "stopped", p.id if p else None, snap, "stopped as desired")
            if r:
                out.append(r)
        elif s is not None and s.node == me and s.state in RUNNING_STATES:
            out.append(Report(vm, "stopped", s.placement_id, snap.statuses[vm].mod_revision,
                              "status said running here, but it does not"))
        if dom is not None and not placed_here:
            out.append(Undefine(vm, "left-over definition (crashed or moved); "
                                    f"placed on {(p.node if p else None) or 'no node'}"))
    return out
