"""The leader's rules for one VM, tried in the order of `VM_RULES` (docs/design.md).

Each rule reads the VM's facts and the cycle state, may write a decision into the state,
and returns True when the VM is decided for this cycle (the later rules are skipped).
A rule that decides "no write" also returns True: steady state is a decision.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.placement import Choice
from orchestrator.rules.facts import (
    VmFacts,
    is_fenced,
    migration_arrived,
    migration_job_running,
)
from orchestrator.rules.state import CLUSTER, CycleState
from schemas.models import RUNNING_STATES, gave_up

VmRule = Callable[[CycleState, VmFacts], bool]


def operator_move(st: CycleState, f: VmFacts) -> bool:
    """0. An operator asked to move the VM (vmha vm migrate): a live migration from where
    it runs now, only once it runs steadily there.  If the move is not possible now, say
    why and let the usual rules decide (a drain must not wait for it)."""
    snap, p, s = st.inp.snap, f.p, f.s
    mv = snap.moves.get(f.vm)
    if (mv is None or p is None or not p.node or s is None or s.node != p.node
            or s.state != "running" or p.node not in snap.nodes or mv.value.to == p.node
            or f.unfenced):
        return False
    to, src = mv.value.to, p.node
    limit = st.inp.per_node_limit
    group = st.placer.nodes[src].group if src in st.placer.nodes else None
    refusal = (f"{st.inflight[CLUSTER]} migrations in flight cluster-wide"
               if st.inflight[CLUSTER] >= st.inp.cfg.placement.max_migrations_in_flight
               else f"{src} has no free migration slot" if st.inflight[src] >= limit
               else st.placer.verdict(f.spec, to, exclude={src}, live_group=group,
                                      busy=st.busy()))
    if refusal is None:
        st.place(f.vm, "migrate", to, f"operator request by {mv.value.by}: live-migrate "
                 f"from {src} to {to}", {}, from_node=src)
        st.take_slot(src, to)
        return True
    st.wait(f.vm, f"requested move to {to} not possible now: {refusal}")
    return False


def stay_failed(st: CycleState, f: VmFacts) -> bool:
    """A VM marked failed stays so, unplaced, until its spec changes (`vmha vm edit`, or
    `vmha vm start` again) or it is found running somewhere (then the usual rules adopt it)."""
    p, spec_rev = f.p, st.inp.snap.specs[f.vm].mod_revision
    if p is None or p.kind != "failed" or p.spec_revision != spec_rev:
        return False
    if f.s is not None and f.s.state in RUNNING_STATES:
        return False
    st.wait(f.vm, f"failed: {p.reason}; change its spec (vmha vm edit, vmha vm start) to "
                  "try again")
    return True


def relocate_failing(st: CycleState, f: VmFacts) -> bool:
    """The node of the VM's placement gave up on it (boot refused
    `max_boot_failures_per_node` times, or crashed more than `max_restart` times): boot it
    on another node, at most `max_relocate` times, then mark it failed with the reason.
    Written only while the status that says so is unchanged."""
    snap, p, s, cfg = st.inp.snap, f.p, f.s, st.inp.cfg
    if (p is None or p.node is None or s is None or s.placement_id != p.id
            or s.state in RUNNING_STATES or s.node not in (p.node, p.from_node)
            or f.unfenced):
        return False
    # Counted on the placement's node, even when the status is the migration source's
    # hand-off acknowledgement (it carries the target's counts).
    why = gave_up(s.model_copy(update={"node": p.node}), cfg)
    if why is None:
        return False
    tried = tuple(dict.fromkeys([*p.failed_nodes, p.node]))
    spec_rev = snap.specs[f.vm].mod_revision

    def put(kind: str, node: str | None, reason: str, scores: dict[str, float]) -> None:
        st.place(f.vm, kind, node, reason, scores, fenced=f.fenced_holders(snap),
                 failed_nodes=tried, spec_revision=spec_rev if kind == "failed" else None,
                 status_mod_revision=snap.statuses[f.vm].mod_revision)

    if len(tried) > cfg.max_relocate:
        put("failed", None, f"gave up after {len(tried)} node(s) ({', '.join(tried)}; "
            f"max_relocate {cfg.max_relocate}): {why}", {})
        return True
    choice = st.placer.choose(f.spec, set(tried))
    if choice.node is None:
        put("failed", None, f"{why}; no other node to relocate to: {choice.reason}", {})
        return True
    put("boot", choice.node, f"relocated ({len(tried)} of max_relocate {cfg.max_relocate}): "
        f"{why}; boot on {choice.node}: {choice.reason}", choice.scores)
    return True


def release_arrived_source(st: CycleState, f: VmFacts) -> bool:
    """1. A live migration arrived (its target reports it running): the placement drops
    its source, so a drained node that leaves or restarts is no longer a holder that
    could be fenced (docs/fencing.md, "Drains never call a fence device")."""
    p, s, snap = f.p, f.s, st.inp.snap
    if (p is None or s is None or p.node not in snap.nodes
            or not migration_arrived(p, s)):
        return False
    st.release_source(f.vm, p, snap.statuses[f.vm].mod_revision)
    return True


def steady_boot(st: CycleState, f: VmFacts) -> bool:
    """1. A boot placement on a schedulable node needs no write."""
    p = f.p
    return bool(p and p.kind == "boot" and p.node and st.inp.snap.schedulable(p.node))


def _live_migration(st: CycleState, f: VmFacts) -> bool:
    """A migrate placement whose target is registered and that has not failed, unless it
    has arrived on a target cordoned since (then it moves on, like any cordoned VM)."""
    snap, p = st.inp.snap, f.p
    if (p is None or p.kind != "migrate" or p.node is None or p.node not in snap.nodes
            or f.failed):
        return False
    return not (f.arrived and snap.is_cordoned(p.node))


def steady_migration(st: CycleState, f: VmFacts) -> bool:
    """1. A migration in flight (source registered) or arrived needs no write: it is never
    re-targeted, not even when its target gets cordoned meanwhile."""
    return (_live_migration(st, f) and f.p is not None
            and (f.p.from_node in st.inp.snap.nodes or f.arrived))


def migration_source_lost(st: CycleState, f: VmFacts) -> bool:
    """2. The source of an unfinished migration is lost: wait for its fence record, then
    cold-boot the VM on the migration target if that is schedulable."""
    snap, p = st.inp.snap, f.p
    if not _live_migration(st, f) or p is None or not p.from_node or not p.node:
        return False
    if not is_fenced(snap, p.from_node):
        st.wait(f.vm, f"migration source {p.from_node} lost; waiting for its fence: "
                      f"{st.fence_why.get(p.from_node, '')}")
        return True
    if not snap.schedulable(p.node):
        return False
    fe = snap.fences[p.from_node]
    st.place(f.vm, "boot", p.node, f"migration source {p.from_node} was fenced before the "
             "VM arrived; cold boot on the migration target", {},
             fenced=((p.from_node, fe.mod_revision),))
    return True


def migration_to_lost_target(st: CycleState, f: VmFacts) -> bool:
    """2b. The target of a running migration is lost: the job may still deliver the VM
    there, so nothing new is placed until the source reports that the job ended
    (completed, failed or aborted: the source aborts it once it sees the target's
    registration gone, or at `migration_timeout_s`).  The target's fence record does not
    end the wait: it says what ran when it was written, and the job can deliver the
    guest afterwards.  A lost source is left to the holders' fences (wait_unfenced,
    cold_boot): its fence ends its jobs too (docs/fencing.md, "Migrations in flight")."""
    snap, p = st.inp.snap, f.p
    if (p is None or p.node is None or p.node in snap.nodes or p.from_node is None
            or p.from_node not in snap.nodes or not migration_job_running(p, f.s)):
        return False
    st.wait(f.vm, f"migration to lost node {p.node} still running on {p.from_node}; the VM "
                  f"may land there: waiting for {p.from_node} to report the job ended")
    return True


def wait_unfenced(st: CycleState, f: VmFacts) -> bool:
    """3. While a lost holder is not fenced, nothing is written: the VM may run there."""
    if not f.unfenced:
        return False
    st.wait(f.vm, f"node(s) {', '.join(f.unfenced)} lost and not yet fenced; "
                  "the VM may still run there: "
                  + "; ".join(st.fence_why.get(h, "") for h in f.unfenced))
    return True


def keep_on_source(st: CycleState, f: VmFacts) -> bool:
    """4. A live holder that is schedulable keeps the VM (no failed migration); a boot
    placement is written only if the placement says otherwise (adoption)."""
    src = f.source
    if src is None or not st.inp.snap.schedulable(src) or f.failed:
        return False
    if not (f.p and f.p.kind == "boot" and f.p.node == src):
        st.place(f.vm, "boot", src, f"VM reported on {src}; keeping it there", {},
                 fenced=f.fenced_holders(st.inp.snap))
    return True


def hand_off(st: CycleState, f: VmFacts) -> bool:
    """5. The live holder is cordoned or the last migration failed: live-migrate, within
    the source's migration group and the migration limits; never a cold boot."""
    src = f.source
    if src is None:
        return False
    slot = st.slot_refusal(src)
    if slot:
        st.wait(f.vm, f"must leave {src}: waiting for a migration slot ({slot})")
        return True
    busy = st.busy()
    exclude = {src}
    if f.failed and f.p and f.p.node:
        exclude.add(f.p.node)
    choice = st.placer.choose(f.spec, exclude, live_from=src, busy=busy)
    if choice.node is None and f.failed:  # no other node fits: try the failed target again
        choice = st.placer.choose(f.spec, {src}, live_from=src, busy=busy)
    if choice.node is None:
        st.wait(f.vm, f"must leave {src}: waiting for a migration slot on a target"
                if choice.slot_only else
                f"must leave {src} but {choice.reason}; it stays on {src} "
                "(never cold-booted elsewhere while its node is up)")
        return True
    target = choice.node
    why = ("node cordoned (drain)" if st.inp.snap.is_cordoned(src)
           else f"migration to {f.p.node} failed" if f.p and f.failed else "hand-off")
    st.place(f.vm, "migrate", target, f"{why}: live-migrate from {src} to {target}: "
             f"{choice.reason}", choice.scores, from_node=src)
    st.take_slot(src, target)
    return True


def _cold_choice(st: CycleState, f: VmFacts) -> Choice:
    """The one-at-a-time choice, unless an exact search over the cold boots did better."""
    choice = st.placer.choose(f.spec, set())
    if st.batch is None or f.vm not in st.batch:
        return choice
    target = st.batch[f.vm]
    if target is None:
        return Choice(None, {}, f"left pending: of the {len(st.batch)} VMs needing a boot, "
                      "an exact search places more (or more priority) without this one")
    if st.placer.verdict(f.spec, target, exclude=set(), live_group=None) is None:
        free = st.placer.nodes[target].free_memory_mib - f.spec.memory_mib
        return Choice(target, {target: float(free)}, "exact search over the VMs needing "
                      "a boot (one at a time would have placed fewer)")
    return choice


def cold_boot(st: CycleState, f: VmFacts) -> bool:
    """6. No node may hold the VM (every holder fenced, or none): boot it on the best node
    of any migration group, or write why it is pending."""
    fenced = f.fenced_holders(st.inp.snap)
    choice = _cold_choice(st, f)
    if choice.node is None:
        reason = choice.reason
        if f.spec.priority < st.inp.max_priority:
            reason += f" (priority {f.spec.priority}: higher-priority VMs are placed first)"
        st.place(f.vm, "pending", None, reason, {}, fenced=fenced)
        return True
    why = (f"node(s) {', '.join(f.holders)} fenced; cold boot" if f.holders
           else "not placed yet; boot")
    st.place(f.vm, "boot", choice.node, f"{why} on {choice.node}: {choice.reason}",
             choice.scores, fenced=fenced)
    return True


# The order matters: each rule may assume the earlier ones did not decide.
VM_RULES: tuple[VmRule, ...] = (
    operator_move,
    stay_failed,
    relocate_failing,
    release_arrived_source,
    steady_boot,
    steady_migration,
    migration_source_lost,
    migration_to_lost_target,
    wait_unfenced,
    keep_on_source,
    hand_off,
    cold_boot,
)
