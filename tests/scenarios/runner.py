"""Replay a scenario folder through the real planners with virtual time; print its log.

    python -m tests.scenarios.runner tests/scenarios/<name>     # the log, to stdout

A scenario starts from `start.json`, settles, then applies each line of `events.txt`
and settles again.  Settling runs rounds at the current virtual time: in a round the
leader and every agent decide from ONE snapshot (they run concurrently in a real
cluster), then their writes are applied in that order, with etcd's compares; rounds
repeat until one changes nothing.  `wait N` advances the clock tick by tick and settles
at each tick.  Nothing sleeps and nothing talks to etcd or libvirt.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.scenarios.actors import agent_cycle, finish_migration, leader_cycle
from tests.scenarios.events import Event, apply_event, parse_events, tick_timers
from tests.scenarios.loader import load_start
from tests.scenarios.model import ScenarioError, World
from tests.scenarios.v2 import v2_model, v2_snapshot

MAX_ROUNDS = 40
MAX_TICKS = 100_000


def settle(world: World, seen: set[str]) -> None:
    for _ in range(MAX_ROUNDS):
        before = (world.store.revision, world.version)
        if world.auto_migrate:
            for m in list(world.migrations):
                finish_migration(world, m, ok=True)
        snap = world.store.snapshot()
        if world.keyspace == 2:
            world.leader_model = v2_model(world.store)
        leader_cycle(world, snap if world.keyspace == 1 else v2_snapshot(world.leader_model))
        for name in sorted(world.nodes):
            agent_cycle(world, world.nodes[name], snap)
        check(world, seen)
        if (world.store.revision, world.version) == before:
            return
    raise ScenarioError(f"t={world.t}: still changing after {MAX_ROUNDS} rounds")


def check(world: World, seen: set[str]) -> None:
    """Invariant: a VM is active on at most one node (an incoming copy aside)."""
    where: dict[str, list[str]] = {}
    for name, n in sorted(world.nodes.items()):
        for vm, d in n.domains.items():
            if d.active and d.managed and not d.incoming:
                where.setdefault(vm, []).append(name)
    for vm, nodes in sorted(where.items()):
        text = f"{vm} active on {', '.join(nodes)}"
        if len(nodes) > 1 and text not in seen:
            seen.add(text)
            world.emit("check", "VIOLATION", text)


def advance(world: World, seconds: float, seen: set[str]) -> None:
    steps = round(seconds / world.tick_s)
    if steps < 0 or steps > MAX_TICKS or abs(steps * world.tick_s - seconds) > 1e-9:
        raise ScenarioError(f"wait {seconds}: not a whole number of ticks of {world.tick_s} s")
    for _ in range(steps):
        world.t = round(world.t + world.tick_s, 6)
        tick_timers(world)
        settle(world, seen)


def final_state(world: World) -> list[str]:
    """The end state, one line per VM and node, for the log's last lines."""
    snap = world.store.snapshot()
    out = []
    domains = {vm for sim in world.nodes.values() for vm in sim.domains}
    for vm in sorted(set(snap.specs) | set(snap.placements) | set(snap.statuses) | domains):
        spec, pe, se = snap.specs.get(vm), snap.placements.get(vm), snap.statuses.get(vm)
        doms = [f"{n}:{d.state}{'' if d.managed else '(unmanaged)'}"
                for n, sim in sorted(world.nodes.items())
                for v, d in sim.domains.items() if v == vm]
        p = pe.value if pe else None
        where = ("none" if p is None else f"{p.kind} {p.from_node} -> {p.node}"
                 if p.kind == "migrate" else f"{p.kind} {p.node or ''}".strip())
        out.append(f"final   vm {vm}: spec {spec.value.state if spec else 'none'}; "
                   f"placement {where}; status "
                   f"{f'{se.value.state} on {se.value.node}' if se else 'none'}; "
                   f"domains {' '.join(doms) or 'none'}")
    for name in sorted(set(world.nodes) | set(snap.fences) | set(snap.cordons)):
        reg, fence, n = snap.nodes.get(name), snap.fences.get(name), world.nodes.get(name)
        out.append(f"final   node {name}: {'registered' if reg else 'not registered'}"
                   f"{', cordoned' if snap.is_cordoned(name) else ''}"
                   f"{f', fence {fence.value.method}/{fence.value.outcome}' if fence else ''}"
                   f"; agent {n.agent if n else 'none'}")
    if world.migrations:
        out.append("final   migrations in flight: "
                   + ", ".join(f"{m.vm} {m.source} -> {m.target}" for m in world.migrations))
    return out


def run_world(world: World, events: list[Event]) -> list[str]:
    seen: set[str] = set()
    settle(world, seen)
    for ev in events:
        if ev.verb == "wait":
            world.emit("event", "wait", " ".join(ev.args))
            try:
                seconds = float(ev.args[0])
            except (IndexError, ValueError):
                raise ScenarioError(f"events line {ev.line}: wait SECONDS") from None
            advance(world, seconds, seen)
        else:
            apply_event(world, ev)
            settle(world, seen)
    return world.log + final_state(world)


def run_scenario(folder: Path, keyspace: int = 1) -> list[str]:
    """The log of a scenario; `keyspace` 2: the leader decides on keyspace 2."""
    events_file = folder / "events.txt"
    events = parse_events(events_file.read_text()) if events_file.exists() else []
    world = load_start(folder / "start.json")
    world.keyspace = keyspace
    return run_world(world, events)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.scenarios.runner SCENARIO_FOLDER", file=sys.stderr)
        return 2
    try:
        lines = run_scenario(Path(argv[0]))
    except ScenarioError as exc:
        print(f"scenario error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
