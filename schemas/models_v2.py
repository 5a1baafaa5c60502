"""JSON models new in keyspace version 2 (docs/keyspace-v2.md); `"schema": 1`, sorted
keys and the same refusals as every model of `schemas.models`."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from schemas.keys import valid_name
from schemas.models import MAX_VALUE_BYTES, Model, Placement, VmSpec, _check_name

# An assignment embeds a placement and a spec, each of which may be up to
# MAX_VALUE_BYTES on its own key, plus the defaults a re-serialised spec spells out.
ASSIGNMENT_MAX_BYTES = 2 * MAX_VALUE_BYTES + 16 * 1024

# `vmha keyspace migrate`'s steps (section 6): `migrating` (keyspace 1 frozen, copy),
# `switching` (agents move their registrations), `cleaning` (keyspace 1's keys go; no
# rollback from here), `done` (keyspace 2 runs).
KeyspaceState = Literal["migrating", "switching", "cleaning", "done"]
FROZEN_STATES: frozenset[str] = frozenset({"migrating", "switching", "cleaning"})

# This release, as agents (`agent.version`) and the leader (`version`) record it.  The
# first that freezes for `vmha keyspace migrate` and switches keyspace while running
# (the "bridge" of section 6) is BRIDGE_RELEASE; the tool refuses older daemons.
RELEASE = "0.2.0"
BRIDGE_RELEASE = "0.2.0"


def release_at_least(version: str, minimum: str = BRIDGE_RELEASE) -> bool:
    """`version` ("X.Y.Z", as registered) is `minimum` or newer; "" or junk is not."""
    def parts(v: str) -> tuple[int, ...] | None:
        try:
            return tuple(int(x) for x in v.split("."))
        except ValueError:
            return None
    got, want = parts(version), parts(minimum)
    return got is not None and want is not None and got >= want


class Assignment(Model):
    """`/vmha/a/NODE/VM`: the per-node copy of a placement with the spec it was made
    for, written by the leader in the placement's transaction for each node the
    placement names (section 1, "Assignment").  Everything the agent needs to act on
    VM without reading any other key."""

    max_value_bytes: ClassVar[int] = ASSIGNMENT_MAX_BYTES

    vm: str
    spec_revision: int = Field(ge=1)  # the mod_revision of /vmha/spec/VM that `spec` is
    placement: Placement
    spec: VmSpec

    @field_validator("vm")
    @classmethod
    def _vm(cls, v: str) -> str:
        return _check_name(v, "VM")

    @model_validator(mode="after")
    def _consistent(self) -> Assignment:
        p = self.placement
        if p.vm != self.vm or self.spec.name != self.vm:
            raise ValueError(f"assignment of {self.vm!r} holds the placement of {p.vm!r} "
                             f"and the spec of {self.spec.name!r}")
        if p.kind not in ("boot", "migrate"):
            raise ValueError(f"a {p.kind} placement names no node and has no assignment")
        # The agent builds keys (a peer's registration and status) from these names.
        for node in self.nodes:
            _check_name(node, "node")
        return self

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes the placement names: the nodes that hold this assignment."""
        p = self.placement
        names = [n for n in (p.node, p.from_node) if n]
        return tuple(dict.fromkeys(names))

    def peers(self, me: str) -> tuple[str, ...]:
        """The other node of a migration, as seen from `me`."""
        return tuple(n for n in self.nodes if n != me)

    def status_peers(self, me: str) -> tuple[str, ...]:
        """The nodes whose status of the VM `me` reads: the other node of a migration,
        and the nodes the VM was given up on (`failed_nodes`), whose last status says why
        (docs/keyspace.md, "Failures on keyspace 2"): keyspace 1's single status key
        showed it to the next node, which records a `boot_failed` event only for an
        error it does not show.  A name that is not a node's is skipped."""
        given_up = [n for n in self.placement.failed_nodes if valid_name(n)]
        return tuple(n for n in dict.fromkeys([*self.nodes, *given_up]) if n != me)


class KeyspaceVersion(Model):
    """`/vmha/version`, written by `vmha keyspace migrate` only (section 6).  Absent:
    keyspace 1.  Daemons watch it: `migrating` freezes them, `switching` moves the
    registrations, `done` runs keyspace 2."""

    keyspace: Literal[2]
    state: KeyspaceState
    started_at: float
    by: str  # "operator:alice"
    tool_version: str

    @field_validator("keyspace", mode="before")
    @classmethod
    def _int(cls, v: object) -> object:
        # As the "schema" field: 2.0, "2" or true pick no keyspace; refused, not guessed.
        if type(v) is not int:
            raise ValueError(f"keyspace must be the integer 2, not {repr(v)[:40]}")
        return v


class ConfirmOff(Model):
    """`/vmha/confirm-off/NAME`: an operator's statement that node NAME is off.  The
    leader turns it into a `manual` fence record and deletes it in the same transaction
    (section 2); the operator never writes a fence record."""

    node: str
    by: str
    reason: str
    at: float

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        return _check_name(v, "node")
