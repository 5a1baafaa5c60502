"""The events of a scenario (`events.txt`, one per line), applied to the world.

Each event is what the outside world does: a host dies, an operator cordons a node,
a migration finishes.  Events never decide anything; the planners react to them in the
rounds that follow (tests/scenarios/runner.py).  The list is in the README.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fencing.policy import guard_timeout
from schemas.models import (
    ClusterConfig,
    CordonMarker,
    FenceRecord,
    MoveRequest,
    VmSpec,
    VmStatus,
)
from tests.scenarios.actors import finish_migration
from tests.scenarios.loader import domain_xml, registration
from tests.scenarios.model import KS, Dom, Migration, NodeSim, ScenarioError, World


@dataclass(frozen=True)
class Event:
    line: int
    verb: str
    args: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join([self.verb, *self.args])


def parse_events(text: str) -> list[Event]:
    out: list[Event] = []
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()  # not shlex: JSON arguments keep their quotes
        if words[0] not in HANDLERS and words[0] != "wait":
            raise ScenarioError(f"events line {i}: unknown event {words[0]!r}")
        out.append(Event(i, words[0], tuple(words[1:])))
    return out


def _json(args: tuple[str, ...], at: int) -> dict[str, Any]:
    if len(args) <= at:
        return {}
    try:
        data = json.loads(" ".join(args[at:]))
    except ValueError as exc:
        raise ScenarioError(f"expected a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise ScenarioError("expected a JSON object")
    return data


def _vm_node(w: World, vm: str) -> NodeSim:
    for n in w.nodes.values():
        d = n.domains.get(vm)
        if d is not None and not d.incoming:
            return n
    raise ScenarioError(f"no node has a domain {vm!r}")


def _migration(w: World, vm: str) -> Migration:
    for m in w.migrations:
        if m.vm == vm:
            return m
    raise ScenarioError(f"no migration of {vm!r} in flight")


# ---- nodes -------------------------------------------------------------------------------


def _end_migrations(w: World, name: str) -> None:
    """A host that disappears ends the migrations it takes part in."""
    for m in list(w.migrations):
        if m.target == name:
            finish_migration(w, m, ok=False, error=f"target {name} unreachable")
        elif m.source == name:
            w.migrations.remove(m)
            w.nodes[m.target].domains.pop(m.vm, None)


def _self_fence(w: World, n: NodeSim, why: str, keep_incoming: bool = False) -> None:
    gone = sorted(vm for vm, d in n.domains.items() if d.active and d.managed
                  and not (keep_incoming and d.incoming))
    for vm in gone:
        n.domains[vm].state = "shutoff"
    n.busy.clear()
    w.changed()
    w.emit(n.name, "self-fence", ",".join(gone) or "-", reason=why)


def node_crash(w: World, name: str) -> None:
    """The host dies: its domains are gone; its lease expires (now)."""
    n = w.node(name)
    _end_migrations(w, name)
    n.domains.clear()
    n.busy.clear()
    n.agent = "down"
    w.lease_gone(name, alive_too=True)
    w.changed()


def node_partition(w: World, name: str, *how: str) -> None:
    """Cut off from etcd: the agent self-fenced at its deadline, its lease expires (now).
    `keep-migrations`: the live migrations towards it go on (their streams use another
    network, and their incoming domains escaped the self-fence): each ends only by an
    event or by its source's abort."""
    n = w.node(name)
    keep = "keep-migrations" in how
    if not keep:
        _end_migrations(w, name)
    _self_fence(w, n, "lease not renewed before the deadline (etcd unreachable)",
                keep_incoming=keep)
    n.agent = "down"
    w.lease_gone(name, alive_too=True)


def agent_kill(w: World, name: str) -> None:
    """kill -9 of the agent: the guard (if enabled) destroys the domains; lease expires."""
    n = w.node(name)
    if w.store.snapshot().config.guard_enabled:
        _self_fence(w, n, "guard: agent gone, domains destroyed")
    n.agent = "down"
    w.lease_gone(name, alive_too=True)


def lease_revoked(w: World, name: str, *how: str) -> None:
    """`etcdctl lease revoke`: the agent drains (cordon, register again); `stuck`: it
    never registers again and self-fences at its old deadline; `late S`: its cycle is
    busy, it registers again (cordoned) S seconds later."""
    n = w.node(name)
    w.lease_gone(name)
    cfg = w.store.snapshot().config
    if "stuck" in how:
        n.agent, n.deadline = "stuck", w.t + cfg.lease_ttl_s - cfg.self_fence_safety_s
        return
    if "late" in how:
        n.agent, n.deadline = "stuck", w.t + cfg.lease_ttl_s - cfg.self_fence_safety_s
        n.back_at = w.t + float(how[how.index("late") + 1])
        return
    _cordon(w, name, "lease revoked (drain)", f"agent:{name}")
    w.register(name)


def etcd_revokes(w: World, name: str, *how: str) -> None:
    """etcd revokes both leases of a live agent (a raft leader paused past the TTL,
    etcd #12528): both keys go.  The agent pets its guard no more while unregistered and
    registers again, uncordoned, at once; `late S`: S seconds later; `stuck`: never.
    The guard fires at the latest min(2 x keepalive_timeout + guard timeout, TTL -
    safety) after the revoke (the last pet came before it), unless it registered."""
    n = w.node(name)
    w.lease_gone(name, alive_too=True)
    cfg = w.store.snapshot().config
    if "stuck" not in how and "late" not in how:
        w.register(name)
        return
    fires = min(2 * cfg.keepalive_timeout_s + guard_timeout(cfg),
                cfg.lease_ttl_s - cfg.self_fence_safety_s)
    n.agent, n.deadline, n.back_cordoned = "stuck", w.t + fires, False
    if "late" in how:
        n.back_at = w.t + float(how[how.index("late") + 1])


def agent_stop(w: World, name: str) -> None:
    """SIGTERM: cordon, wait until no VM runs here, then revoke the lease and exit."""
    w.node(name).exiting = True
    _cordon(w, name, "agent stopping (SIGTERM): drain", f"agent:{name}")


def node_return(w: World, name: str) -> None:
    """The node's agent starts (again) and registers; its domains are as they are."""
    n = w.node(name)
    if w.store.get(KS.node(name)) is not None:
        w.lease_gone(name)  # the old registration expired before the new agent registers
    n.exiting = False
    w.register(name)


def node_join(w: World, name: str, mem: str = "8192", vcpus: str = "8", *rest: str) -> None:
    if name in w.nodes:
        raise ScenarioError(f"node {name!r} exists")
    extra = _json((mem, vcpus, *rest), 2)
    w.nodes[name] = NodeSim(name, registration(name, {"memory_mib": int(mem),
                                                      "vcpus": int(vcpus), **extra}))
    w.register(name)


def _cordon(w: World, name: str, reason: str, by: str) -> None:
    if w.store.get(KS.cordon(name)) is None:
        w.store.put(KS.cordon(name), CordonMarker(node=name, reason=reason, by=by, at=w.wall))


def cordon(w: World, name: str) -> None:
    w.node(name)
    _cordon(w, name, "operator", "operator")


def uncordon(w: World, name: str) -> None:
    w.store.delete(KS.cordon(name))


def tick_timers(w: World) -> None:
    """Per tick: a late agent registers again; a stuck one self-fences at its old
    lease's deadline."""
    for n in w.nodes.values():
        if n.agent == "stuck" and n.back_at is not None and w.t >= n.back_at:
            n.back_at = None
            if n.back_cordoned:
                _cordon(w, n.name, "lease revoked (drain)", f"agent:{n.name}")
            n.back_cordoned = True
            w.register(n.name)
            continue
        if n.agent == "stuck" and n.deadline is not None and w.t >= n.deadline:
            n.deadline = None
            _self_fence(w, n, "stuck agent: its old lease's deadline passed")


# ---- VMs, migrations, fencing, leader ------------------------------------------------


def vm_add(w: World, vm: str, mem: str = "1024", vcpus: str = "1", *rest: str) -> None:
    data = {"name": vm, "domain_xml": domain_xml(vm), "memory_mib": int(mem),
            "vcpus": int(vcpus), **_json((mem, vcpus, *rest), 2)}
    w.store.put(KS.vm_spec(vm), VmSpec.model_validate(data))


def _set_state(w: World, vm: str, state: str) -> None:
    rec = w.store.get(KS.vm_spec(vm))
    if rec is None:
        raise ScenarioError(f"unknown VM {vm!r}")
    w.store.put(KS.vm_spec(vm), {**rec.value, "state": state})


def vm_status(w: World, vm: str, node: str, state: str, pid: str = "", *rest: str) -> None:
    """A status as if NODE's agent had written it (e.g. an old or racing report)."""
    w.store.put(KS.vm_status(vm), VmStatus.model_validate(
        {"vm": vm, "node": node, "state": state, "placement_id": pid or None,
         "since": w.wall, **_json((vm, node, state, pid, *rest), 4)}))


def migration_done(w: World, vm: str) -> None:
    m = _migration(w, vm)
    if m.aborting:  # the source's abort wins: the job ends aborted, the VM stays there
        finish_migration(w, m, ok=False, error=f"{m.aborting}: migration aborted")
        return
    finish_migration(w, m, ok=True)


def migration_failed(w: World, vm: str, *why: str) -> None:
    arrived = bool(why) and why[0] == "after-arrival"
    error = " ".join(why[1:] if arrived else why) or "migration failed"
    finish_migration(w, _migration(w, vm), ok=False, arrived=arrived, error=error)


def migrations_done(w: World) -> None:
    for m in list(w.migrations):
        finish_migration(w, m, ok=True)


def domain_crash(w: World, vm: str) -> None:
    _vm_node(w, vm).domains[vm].state = "crashed"
    w.changed()


def boot_refused(w: World, vm: str, node: str, *reason: str) -> None:
    """From now on node's hypervisor refuses to boot VM (HypervisorRefused), e.g. a
    domain UUID another domain there has, or XML it rejects; `ok` ends it."""
    n = w.node(node)
    if reason == ("ok",):
        n.refuse.pop(vm, None)
    else:
        n.refuse[vm] = " ".join(reason) or "refused"


def fence_device(w: World, node: str, outcome: str, *detail: str) -> None:
    """The result of an external fence run the leader started (leader._record_external)."""
    if node not in w.leader.external:
        raise ScenarioError(f"no fence device runs for {node!r}")
    w.leader.external.discard(node)
    prev = w.store.get(KS.fence(node))
    if prev is not None and prev.value["outcome"] == "success":
        return  # fenced meanwhile (self or manual): the leader drops the result
    rec = FenceRecord(node=node, lease_id=w.leader.last_leases.get(node, "unknown"),
                      method="external", outcome="success" if outcome == "ok" else "failed",
                      reason=" ".join(detail) or outcome, epoch=w.leader.epoch, duration_s=1.0,
                      fenced_at=w.wall, attempts=prev.value["attempts"] + 1 if prev else 1,
                      device="fence-agent")
    ok = w.store.txn([(KS.leader, "create", w.leader.epoch), (KS.node(node), "create", 0),
                      (KS.fence(node), "mod", prev.mod_revision if prev else 0)],
                     KS.fence(node), rec)
    w.emit("leader", "fence-rec", node, f"external {rec.outcome}{'' if ok else ' REJECTED'}",
           rec.reason)


def fence_confirm(w: World, node: str) -> None:
    """`vmha node confirm-off NODE`: an operator's manual fence."""
    w.store.put(KS.fence(node), FenceRecord(
        node=node, lease_id="unknown", method="manual", outcome="success",
        reason="confirmed off by an operator", epoch=w.leader.epoch, duration_s=0.0,
        fenced_at=w.wall, device="operator"))


def leader_change(w: World) -> None:
    """A new leader (new epoch); it starts its own wait for every lost node."""
    rec = w.store.get(KS.leader)
    w.store.delete(KS.leader)
    w.store.put(KS.leader, rec.value if rec else {"schema": 1, "id": "leader-2",
                                                  "host": "h2", "pid": 98, "lease_id": "fe",
                                                  "elected_at": w.wall})
    new = w.store.get(KS.leader)
    assert new is not None
    w.leader.epoch, w.leader.lost_since, w.leader.external = new.create_revision, {}, set()
    w.leader.both_gone_since = {}
    w.leader.waits = {}
    w.leader.enabled = True


def config(w: World, *args: str) -> None:
    cur = w.store.snapshot().config.model_dump(by_alias=True, mode="json")
    w.store.put(KS.config, ClusterConfig.model_validate({**cur, **_json(args, 0)}))


HANDLERS: dict[str, Callable[..., None]] = {
    "node-crash": node_crash, "node-partition": node_partition, "agent-kill": agent_kill,
    "lease-revoked": lease_revoked, "agent-stop": agent_stop, "node-return": node_return,
    "node-join": node_join, "cordon": cordon, "uncordon": uncordon,
    "vm-add": vm_add, "vm-remove": lambda w, vm: w.store.delete(KS.vm_spec(vm)),
    "vm-stop": lambda w, vm: _set_state(w, vm, "stopped"),
    "vm-start": lambda w, vm: _set_state(w, vm, "running"),
    "vm-move": lambda w, vm, to: w.store.put(KS.vm_move(vm), MoveRequest(
        vm=vm, to=to, by="operator", requested_at=w.wall)),
    "status": vm_status, "migration-done": migration_done,
    "migration-failed": migration_failed, "migrations-done": migrations_done,
    "domain-crash": domain_crash, "boot-refused": boot_refused,
    "domain-start": lambda w, vm, node: _start_dom(w, vm, node),
    "fence-device": fence_device, "fence-confirm": fence_confirm,
    "leader-change": leader_change, "etcd-revokes": etcd_revokes, "config": config,
}


def _start_dom(w: World, vm: str, node: str) -> None:
    """A domain started by hand, behind vmha's back (e.g. `virsh start`)."""
    w.node(node).domains[vm] = Dom("running")
    w.changed()


def apply_event(w: World, ev: Event) -> None:
    w.emit("event", ev.verb, " ".join(ev.args))
    handler = HANDLERS[ev.verb]
    try:
        inspect.signature(handler).bind(w, *ev.args)
    except TypeError as exc:
        raise ScenarioError(f"events line {ev.line}: {ev.text}: wrong arguments ({exc})") \
            from None
    try:
        handler(w, *ev.args)
    except (ScenarioError, ValueError) as exc:
        raise ScenarioError(f"events line {ev.line}: {ev.text}: {exc}") from None
