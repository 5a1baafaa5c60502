"""The leader and the agents of a scenario: the REAL planners, their writes simulated.

`leader_cycle` runs `orchestrator.planner.plan` and applies each action as
orchestrator.leader does (one transaction with the same compares); `agent_cycle` runs
`nodeagent.plan.plan` for one node and carries out each action as nodeagent.agent does
(status writes fenced by the node's token, hypervisor operations on the simulated
domains).  Every decision is written to the scenario's log.
"""

from __future__ import annotations

import re
from typing import Any

from nodeagent import plan as agent_plan
from nodeagent.failures import carried
from orchestrator import planner
from schemas.models import (
    FenceRecord,
    LeaveMarker,
    MigrationStats,
    VmStatus,
    failure_backoff,
    gave_up,
)
from schemas.snapshot import ClusterSnapshot
from tests.scenarios.model import (
    KS,
    WALL0,
    Compare,
    Dom,
    Migration,
    NodeSim,
    ScenarioError,
    World,
)
from tests.scenarios.v2 import v2_verdict

MIGRATION_RETRY_BACKOFF_S = 3.0  # nodeagent.agent.AgentOptions default


def _rejected(ok: bool) -> str:
    return "" if ok else " REJECTED"


# ---- the leader ------------------------------------------------------------------------


def leader_cycle(world: World, snap: ClusterSnapshot) -> None:
    """One leader cycle on `snap`, its decisions applied and logged."""
    ld = world.leader
    waits = ld.waits
    if not ld.enabled or snap.leader is None or snap.leader.create_revision != ld.epoch:
        return
    for name, entry in snap.nodes.items():
        ld.last_leases[name] = entry.value.lease_id
    result = planner.plan(snap, epoch=ld.epoch, now=world.t, wall_time=world.wall,
                          lost_since=ld.lost_since, liveness=ld.liveness,  # type: ignore[arg-type]
                          both_gone_since=ld.both_gone_since)
    for node in sorted(set(ld.lost_since) - set(result.lost_since)):
        if node in snap.nodes:
            world.emit("leader", "node-back", node, reason="registered again before being "
                                                            "fenced")
    for node in sorted(set(result.lost_since) - set(ld.lost_since)):
        world.emit("leader", "node-lost", node, reason="registration (lease) gone; fence "
                                                        "window starts")
    ld.lost_since = dict(result.lost_since)
    for node in sorted(set(result.both_gone_since) - set(ld.both_gone_since)):
        world.emit("leader", "node-dead", node, reason="liveness key gone too; liveness "
                                                        f"fence window ({ld.liveness}) starts")
    ld.both_gone_since = dict(result.both_gone_since)
    waited: set[str] = set()
    for action in result.actions:
        if isinstance(action, planner.Wait):
            waited.add(action.vm)
            _log_wait(world, action, waits)
        else:
            apply_leader(world, action, snap)
    for vm in set(waits) - waited:
        del waits[vm]


def _log_wait(world: World, a: planner.Wait, waits: dict[str, str]) -> None:
    """A wait is logged when it starts or its reason changes (numbers aside)."""
    key = re.sub(r"\d+(\.\d+)?", "#", a.reason)
    if waits.get(a.vm) != key:
        waits[a.vm] = key
        world.emit("leader", "wait", a.vm, reason=a.reason)


def apply_leader(world: World, a: planner.Action, snap: ClusterSnapshot) -> None:
    epoch = world.leader.epoch
    store = world.store
    # Keyspace 2: its transaction must succeed exactly when keyspace 1's does.
    v2 = (None if world.leader_model is None
          else v2_verdict(store, world.leader_model, a, epoch))
    before = store.revision
    _apply_leader(world, a)
    if v2 is not None and v2 != (store.revision != before):
        raise ScenarioError(f"t={world.t}: keyspace 2's compares say {v2} for {a!r}, "
                            f"keyspace 1's the opposite")


def _apply_leader(world: World, a: planner.Action) -> None:
    epoch = world.leader.epoch
    token: Compare = (KS.leader, "create", epoch)
    store = world.store
    if isinstance(a, planner.FenceNode):
        _fence(world, a, token)
    elif isinstance(a, planner.ClearMove):
        ok = store.txn([token, (KS.vm_move(a.vm), "mod", a.mod_revision)], KS.vm_move(a.vm),
                       None)
        world.emit("leader", "clear-move", a.vm, f"(cas {a.mod_revision}){_rejected(ok)}",
                   a.reason)
    elif isinstance(a, planner.ClearFence):
        ok = store.txn([token, (KS.fence(a.node), "mod", a.fence_mod_revision)],
                       KS.fence(a.node), None)
        world.emit("leader", "unfence", a.node, f"(cas {a.fence_mod_revision}){_rejected(ok)}",
                   a.reason)
    elif isinstance(a, planner.WritePlacement):
        p = a.placement
        cmps: list[Compare] = [token, (KS.vm_placement(p.vm), "mod", a.expect_mod_revision)]
        for node, rev in a.fenced_holders:
            cmps += [(KS.node(node), "create", 0), (KS.fence(node), "mod", rev)]
        if a.status_mod_revision is not None:
            cmps.append((KS.vm_status(p.vm), "mod", a.status_mod_revision))
        ok = store.txn(cmps, KS.vm_placement(p.vm), p)
        where = (f"migrate {p.from_node} -> {p.node}" if p.kind == "migrate"
                 else f"boot on {p.node}" if p.kind == "boot" else p.kind)
        fenced = "".join(f" {n}@{r}" for n, r in a.fenced_holders)
        status = ("" if a.status_mod_revision is None
                  else f", status cas {a.status_mod_revision}")
        tried = f", gave up on {','.join(p.failed_nodes)}" if p.failed_nodes else ""
        world.emit("leader", "place", p.vm, f"{where} ({p.id}, cas {a.expect_mod_revision}"
                   f"{', fenced' + fenced if fenced else ''}{status}{tried}){_rejected(ok)}",
                   p.reason)
    else:
        raise TypeError(f"unknown action {a!r}")


def _fence(world: World, a: planner.FenceNode, token: Compare) -> None:
    ld = world.leader
    if a.method == "external":
        if a.node not in ld.external:  # the fence device runs until a fence-device event
            ld.external.add(a.node)
            world.emit("leader", "fence-run", a.node, f"device {a.device}", a.reason)
        return
    prev = world.store.get(KS.fence(a.node))
    since = ld.lost_since.get(a.node, world.t)
    rec = FenceRecord(node=a.node, lease_id=ld.last_leases.get(a.node, "unknown"),
                      method="self", outcome="success", reason=a.reason, epoch=ld.epoch,
                      duration_s=round(world.t - since, 3), fenced_at=world.wall,
                      attempts=prev.value.get("attempts", 1) + 1 if prev else 1)
    ok = world.store.txn([token, (KS.node(a.node), "create", 0),
                          (KS.fence(a.node), "mod", a.expect_mod_revision)],
                         KS.fence(a.node), rec)
    world.emit("leader", "fence", a.node, f"self (cas {a.expect_mod_revision}){_rejected(ok)}",
               a.reason)


# ---- the agents ------------------------------------------------------------------------


def agent_cycle(world: World, n: NodeSim, snap: ClusterSnapshot) -> None:
    mine = snap.nodes.get(n.name)
    if n.agent != "up" or mine is None or mine.create_revision != n.token:
        return
    want = snap.is_cordoned(n.name)
    if mine.value.cordoned != want:  # the agent keeps its registration's flag in step
        reg = mine.value.model_copy(update={"cordoned": want})
        world.store.txn([(KS.node(n.name), "create", n.token)], KS.node(n.name), reg,
                        mine.lease)
        world.emit(n.name, "registered", n.name, "cordoned" if want else "uncordoned")
    _stop_migrations(world, n, snap)
    for action in agent_plan.plan(n.name, snap, n.domains_view(), frozenset(n.busy),
                                  now=world.wall):
        execute(world, n, action, snap)
    if n.exiting and not n.busy and not any(d.active and d.managed
                                            for d in n.domains.values()):
        # The leave marker first, then the revoke (nodeagent.membership.leave).
        world.store.put(KS.leaving(n.name), LeaveMarker(
            node=n.name, lease_id=mine.value.lease_id, reason="drained (SIGTERM)",
            at=world.wall))
        world.lease_gone(n.name)
        n.agent = "down"
        world.emit(n.name, "exit", n.name, reason="drained; lease revoked, agent exits")


def _stop_migrations(world: World, n: NodeSim, snap: ClusterSnapshot) -> None:
    """The agent aborts the migrations it runs that must stop (nodeagent.execution); the
    simulated job ends, aborted, at its next event (post-copy: it switches over now)."""
    mine = {m.vm: m for m in world.migrations if m.source == n.name}
    inflight = {vm: agent_plan.InFlight(vm, m.placement_id, m.target, m.started)
                for vm, m in mine.items()}
    for v in agent_plan.migration_verdicts(n.name, snap, inflight, now=world.t):
        m = mine[v.vm]
        if m.aborting:
            continue  # asked already (the agent repeats abortJob; once is enough here)
        world.emit(n.name, "postcopy" if v.postcopy else "abort", v.vm,
                   f"migration to {v.target} ({v.placement_id})", v.reason)
        if v.postcopy:
            finish_migration(world, m, ok=True)
        else:
            m.aborting = v.reason


def _status_txn(world: World, n: NodeSim, status: VmStatus, expect: int) -> bool:
    return world.store.txn([(KS.vm_status(status.vm), "mod", expect),
                            (KS.node(n.name), "create", n.token)],
                           KS.vm_status(status.vm), status)


def execute(world: World, n: NodeSim, a: agent_plan.AgentAction,
            snap: ClusterSnapshot) -> None:
    if isinstance(a, agent_plan.Report):
        _report(world, n, a, snap)
    elif isinstance(a, agent_plan.Boot):
        if a.vm in n.refuse:
            _boot_refused(world, n, a, snap)
            return
        placed = snap.placements.get(a.vm)
        same = placed is not None and placed.value.reason == a.reason
        n.domains[a.vm] = Dom("running")
        world.emit(n.name, "boot", a.vm, f"({a.placement_id})", "as placed" if same
                   else a.reason)
    elif isinstance(a, agent_plan.Crashed):
        _crashed(world, n, a, snap)
        return
    elif isinstance(a, agent_plan.Shutdown | agent_plan.Destroy):
        n.domains[a.vm].state = "shutoff"  # the fake hypervisor powers off at once
        verb = "shutdown" if isinstance(a, agent_plan.Shutdown) else "destroy"
        world.emit(n.name, verb, a.vm, reason=a.reason)
    elif isinstance(a, agent_plan.Undefine):
        del n.domains[a.vm]
        world.emit(n.name, "undefine", a.vm, reason=a.reason)
    elif isinstance(a, agent_plan.MigrateOut):
        _migrate_out(world, n, a)
        return
    elif isinstance(a, agent_plan.AbortMigration):
        # No migration of this agent runs (it restarted): nothing for libvirt to abort;
        # the VM is reported here with the reason.
        dom = n.domains[a.vm]
        cur = world.store.get(KS.vm_status(a.vm))
        st = VmStatus(vm=a.vm, node=n.name, state=dom.state,  # type: ignore[arg-type]
                      placement_id=a.placement_id, since=world.wall,
                      error=f"{a.reason}: migration aborted", failed_target=a.target)
        ok = _status_txn(world, n, st, cur.mod_revision if cur else 0)
        world.emit(n.name, "abort", a.vm, f"stale migration to {a.target}; report "
                   f"{dom.state} ({a.placement_id}) failed_target={a.target}{_rejected(ok)}",
                   a.reason)
        return
    else:
        raise TypeError(f"unknown action {a!r}")
    if not isinstance(a, agent_plan.Report):
        world.changed()


def _report(world: World, n: NodeSim, a: agent_plan.Report, snap: ClusterSnapshot) -> None:
    prev = snap.statuses.get(a.vm)
    since = world.wall
    if prev and prev.value.node == n.name and prev.value.state == a.state:
        since = prev.value.since
    dom = n.domains.get(a.vm)
    stats = None
    if a.with_migration_stats and dom is not None and dom.arrived_from is not None:
        stats = MigrationStats(source=dom.arrived_from, target=n.name)
    keep = {} if a.reset_failures or prev is None else carried(prev.value, a.placement_id,
                                                               a.state)
    st = VmStatus(vm=a.vm, node=n.name, state=a.state,  # type: ignore[arg-type]
                  placement_id=a.placement_id, since=since, migration=stats, **keep)
    ok = _status_txn(world, n, st, a.expect_mod_revision)
    world.emit(n.name, "report", a.vm, f"{a.state} ({a.placement_id or 'no placement'}, "
               f"cas {a.expect_mod_revision}){' with migration stats' if stats else ''}"
               f"{_rejected(ok)}", a.reason)


def _counts(st: VmStatus) -> str:
    retry = f", retry at {st.retry_at - WALL0:g}" if st.retry_at else ""
    return f"boot_failures={st.boot_failures} crashes={st.crashes}{retry}"


def _boot_refused(world: World, n: NodeSim, a: agent_plan.Boot, snap: ClusterSnapshot) -> None:
    """As nodeagent.failures.Failures.boot_refused: counted in the status, with backoff."""
    se = snap.statuses.get(a.vm)
    prev = se.value if se else None
    kept = carried(prev, a.placement_id, "stopped") if prev else {}
    cfg = snap.config
    k = int(kept.get("boot_failures", 0)) + 1
    error = n.refuse[a.vm]
    since = prev.since if prev and prev.node == n.name and prev.state == "stopped" else world.wall
    st = VmStatus(vm=a.vm, node=n.name, state="stopped", placement_id=a.placement_id,
                  since=since, error=error, boot_failures=k,
                  crashes=int(kept.get("crashes", 0)), failed_at=world.wall,
                  retry_at=world.wall + failure_backoff(cfg, k))
    ok = _status_txn(world, n, st, se.mod_revision if se else 0)
    verdict = gave_up(st, cfg)
    event = " +history" if ok and (prev is None or prev.error != error) else ""
    world.emit(n.name, "boot-fail", a.vm, f"({a.placement_id}) {_counts(st)}{event}"
               f"{_rejected(ok)}", error + (f"; gave up: {verdict}" if verdict else ""))


def _crashed(world: World, n: NodeSim, a: agent_plan.Crashed, snap: ClusterSnapshot) -> None:
    """As nodeagent.failures.Failures.crashed: a crash event, status crashed, backoff."""
    se = snap.statuses.get(a.vm)
    prev = se.value if se else None
    kept = carried(prev, a.placement_id, "crashed") if prev else {}
    cfg = snap.config
    if a.counted:
        k = int(kept.get("crashes", 0)) + 1
        extra: dict[str, Any] = {"error": f"guest died: {a.reason}", "crashes": k,
                                 "failed_at": world.wall,
                                 "retry_at": world.wall + failure_backoff(cfg, k)}
    else:
        extra = {**kept, "crashes": int(kept.get("crashes", 0)), "retry_at": None}
    extra["boot_failures"] = int(kept.get("boot_failures", 0))
    st = VmStatus(vm=a.vm, node=n.name, state="crashed", placement_id=a.placement_id,
                  since=world.wall, **extra)
    ok = _status_txn(world, n, st, a.expect_mod_revision)
    verdict = gave_up(st, cfg)
    world.emit(n.name, "crash", a.vm, f"({a.placement_id}, cas {a.expect_mod_revision}) "
               f"{_counts(st) if a.counted else 'not counted'}{_rejected(ok)}",
               a.reason + (f"; gave up: {verdict}" if verdict else ""))


def _migrate_out(world: World, n: NodeSim, a: agent_plan.MigrateOut) -> None:
    if world.t < n.backoff.get((a.vm, a.target), 0.0) or a.vm in n.busy:
        return  # backing off this (VM, target) pair after a failure, or already running
    cur = world.store.get(KS.vm_status(a.vm))
    if not _status_txn(world, n, VmStatus(vm=a.vm, node=n.name, state="migrating",
                                          placement_id=a.placement_id, since=world.wall),
                       cur.mod_revision if cur else 0):
        world.emit(n.name, "migrate", a.vm, f"to {a.target} ({a.placement_id}) REJECTED",
                   "status changed meanwhile; not started")
        return  # no job without the status that says it runs (nodeagent.execution)
    n.busy.add(a.vm)
    target = world.nodes.get(a.target)
    if target is not None:
        target.domains[a.vm] = Dom("paused", incoming=True)
    world.migrations.append(Migration(a.vm, n.name, a.target, a.placement_id, world.t))
    world.changed()
    world.emit(n.name, "migrate", a.vm, f"to {a.target} ({a.placement_id})",
               "live migration started; status migrating")


def finish_migration(world: World, m: Migration, *, ok: bool, arrived: bool = False,
                     error: str = "") -> None:
    """The end of a live migration; on failure the source reports it if the VM is there."""
    src, tgt = world.node(m.source), world.nodes.get(m.target)
    world.migrations.remove(m)
    src.busy.discard(m.vm)
    world.changed()
    if tgt is not None:
        tgt.domains.pop(m.vm, None)
        if ok or arrived:
            src.domains.pop(m.vm, None)  # persisted on the target, undefined here
            tgt.domains[m.vm] = Dom("running", arrived_from=m.source)
    if ok:
        world.emit(m.source, "migrated", m.vm, f"to {m.target}", "live migration done")
        return
    src.backoff[(m.vm, m.target)] = world.t + MIGRATION_RETRY_BACKOFF_S
    still = src.domains.get(m.vm)
    if still is None or not still.active or src.agent != "up":
        world.emit(m.source, "migr-fail", m.vm, f"to {m.target}",
                   f"{error}; the VM is not here: nothing to report")
        return
    cur = world.store.get(KS.vm_status(m.vm))
    st = VmStatus(vm=m.vm, node=m.source, state=still.state,  # type: ignore[arg-type]
                  placement_id=m.placement_id, since=world.wall, error=error,
                  failed_target=m.target)
    ok_write = _status_txn(world, src, st, cur.mod_revision if cur else 0)
    world.emit(m.source, "migr-fail", m.vm, f"to {m.target}; report {still.state} "
               f"({m.placement_id}) failed_target={m.target}{_rejected(ok_write)}", error)
