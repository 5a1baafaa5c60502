"""The event history: what happened, when, by whom, under which epoch, and why.

Events are records, not decisions: nothing reads them to act.  They live under
`<prefix>-history/<id>`; ids sort by time, so `etcdctl get --prefix` lists them
in order.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.models import Model

EventKind = Literal[
    "leader_elected", "placement", "boot", "migration", "migration_failed", "drain",
    "fence", "fence_failed", "node_lost", "node_back", "self_fence", "stop", "destroy",
    # A guest that died under its running agent (an outage), and operations the
    # hypervisor refused (recorded once per distinct error, not once per retry).
    "crash", "boot_failed", "stop_failed",
]

EVENT_KINDS: tuple[str, ...] = EventKind.__args__  # type: ignore[attr-defined]


class Event(Model):
    id: str
    at: float  # unix time, seconds
    kind: EventKind
    actor: str  # "leader:<id>", "agent:<node>", "cli"
    epoch: int | None = None
    vm: str | None = None
    node: str | None = None
    from_node: str | None = None
    reason: str = ""
    total_ms: float | None = Field(default=None, ge=0)
    downtime_ms: float | None = Field(default=None, ge=0)


def event_id(at: float, actor: str, seq: int) -> str:
    """Sortable by time; unique per actor and sequence number."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in actor)
    return f"{int(at * 1_000_000):017d}-{safe}-{seq:06d}"
