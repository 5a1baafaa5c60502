"""`vmha keyspace`: which keyspace the cluster runs, and the migration to keyspace 2
(docs/keyspace.md, "Keyspace version 2"; docs/keyspace-v2.md, section 6).

    vmha keyspace show                               the marker and what each keyspace holds
    vmha keyspace migrate [--dry-run] [--wait-s S]   keyspace 1 -> 2, resumable
    vmha keyspace migrate --rollback                 back to keyspace 1 (before the clean-up)

Run it with etcd's root credential, or while auth is off (it always is on keyspace 1).
Every daemon must run a release that freezes for it (this one or newer); the command
names those that do not and writes nothing.
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from cli.common import EXIT_FAIL, CliError, _out, _store
from cli.migrate import Migration, MigrationError, View, leader_name
from schemas import migration as mig
from schemas.errors import SchemaError
from schemas.models_v2 import KeyspaceVersion


def _by() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (a container)
        return "operator:unknown"


def describe(m: Migration, view: View) -> dict[str, Any]:
    """What the migration holds and would do, read-only (the dry run and `show`)."""
    ks2 = m.ks2
    d, pending = m.plan(view)
    marker: dict[str, Any] | None = None
    if view.marker is not None:
        try:
            marker = KeyspaceVersion.from_json(view.marker.value, view.marker.key).model_dump(
                mode="json", by_alias=True)
        except SchemaError as exc:
            marker = {"invalid": str(exc)}
    try:
        state = view.state
        left = list(mig.steps_left(state))
    except MigrationError:
        state, left = "invalid", []
    refusals = (m.refusals(view).messages if state not in ("invalid", "done") else [])
    creates: dict[str, int] = {}
    for key, _ in d.create:
        kind = _kind(ks2, key)
        creates[kind] = creates.get(kind, 0) + 1
    if pending:
        creates["assignment"] = creates.get("assignment", 0) + pending
    return {
        "prefix": m.store.keyspace.prefix, "revision": view.revision,
        "keyspace": 2 if state == "done" else 1, "marker": marker, "steps_left": left,
        "keyspace_1_keys": view.v1.counts,
        "agents_on_keyspace_1": sorted(view.v1.registrations),
        "agents_on_keyspace_2": sorted(view.v2_regs),
        "leader": leader_name(view.leader) if view.leader else None,
        "copy": {"create": creates, "overwrite": len(d.update), "delete": len(d.extra),
                 "equal": d.same},
        "conflicts": d.conflicts if view.marker is None else [],
        "clean": {"delete": len(view.v1.sources)},
        "invalid_keys": list(view.v1.invalid),
        "left_in_place": [f"{x.key}: {x.reason}" for x in view.v1.left],
        "refusals": refusals,
    }


def _kind(ks2: Any, key: str) -> str:
    ref = ks2.parse(key)
    return str(getattr(ref, "kind", "") or "other")


def _print(data: dict[str, Any], dry: bool) -> None:
    c = data["copy"]
    made = ", ".join(f"{k} {n}" for k, n in sorted(c["create"].items())) or "none"
    regs1, regs2 = data["agents_on_keyspace_1"], data["agents_on_keyspace_2"]
    state = (data["marker"] or {}).get("state", "absent")
    print(f"keyspace {data['keyspace']} (marker {state}) at revision {data['revision']}"
          f"{'; dry run: nothing written' if dry else ''}")
    held = ", ".join(f"{k} {n}" for k, n in sorted(data["keyspace_1_keys"].items()))
    print(f"keyspace 1 keys to copy: {held or 'none'}")
    print(f"agents on keyspace 1: {', '.join(regs1) or 'none'}; on keyspace 2: "
          f"{', '.join(regs2) or 'none'}; leader: {data['leader'] or 'none'}")
    steps = data["steps_left"]
    print(f"steps left: {', '.join(steps) or 'none'}")
    lines = {
        "check": f"check: {'; '.join(data['refusals']) or 'ok'}",
        "freeze": "freeze: marker migrating; the leader stops, agents write nothing",
        "copy": f"copy: create {made}; overwrite {c['overwrite']}, delete {c['delete']}, "
                f"already equal {c['equal']} (transactions of at most 64 ops)",
        "switch": f"switch: agents move their registrations with their leases: "
                  f"{', '.join(regs1) or 'none left'}",
        "clean": f"clean: delete {data['clean']['delete']} copied keyspace 1 key(s); config "
                 '"schema": 2',
        "done": "done: marker done; the daemons run keyspace 2",
    }
    for step in steps:
        print(f"  {lines[step]}")
    print(f"conflicts: {', '.join(data['conflicts']) or 'none'}")
    for key in data["invalid_keys"]:
        print(f"invalid (copied as it is, still reported): {key}")
    for line in data["left_in_place"]:
        print(f"left in place: {line}")


def _migration(args: argparse.Namespace) -> Migration:
    return Migration(_store(args), by=_by(), wait_s=args.wait_s,
                     say=(lambda _s: None) if args.output == "json" else print)


def cmd_show(args: argparse.Namespace) -> int:
    args.wait_s = 0.0
    m = _migration(args)
    data = describe(m, m.read())
    if args.output == "json":
        _out(args, data, None)
    else:
        _print(data, dry=False)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    m = _migration(args)
    try:
        if args.rollback:
            if args.dry_run:
                view = m.read()
                print(f"would roll back from {view.state or 'no migration'}: delete "
                      f"{len(view.have)} keyspace 2 key(s) and the marker once "
                      f"{len(view.v2_regs)} agent(s) moved back")
                return 0
            m.rollback()
        elif args.dry_run:
            data = describe(m, m.read())
            if args.output == "json":
                _out(args, data, None)
            else:
                _print(data, dry=True)
            if data["refusals"]:
                raise CliError("refusing to migrate: " + "; ".join(data["refusals"]),
                               EXIT_FAIL)
            return 0
        else:
            m.run()
    except MigrationError as exc:
        raise CliError(str(exc), EXIT_FAIL) from None
    if args.output == "json":
        _out(args, {"writes": m.writes}, None)
    return 0


def register(groups: dict[str, Any]) -> None:
    ks = groups["root"].add_parser(
        "keyspace", help="the keyspace version and the migration to keyspace 2"
    ).add_subparsers(dest="keyspacecmd", required=True)
    groups["keyspace"] = ks
    ks.add_parser("show", help="the marker, each keyspace's keys and agents, the steps "
                  "left").set_defaults(fn=cmd_show)
    m = ks.add_parser("migrate", help="migrate keyspace 1 to 2 (resumable; run again "
                      "after an interruption)")
    m.add_argument("--dry-run", action="store_true", help="check and print the steps with "
                   "their counts, conflicts and invalid keys; write nothing")
    m.add_argument("--rollback", action="store_true", help="back to keyspace 1: allowed "
                   "until the clean-up starts")
    m.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for the "
                   "leader to stop and the agents to switch (default 60)")
    m.set_defaults(fn=cmd_migrate)
