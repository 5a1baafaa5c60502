"""Which keyspace `/vmha/version` selects: the one rule the agent, the orchestrator and
the CLI apply (docs/keyspace-v2.md, section 6).

Absent: keyspace 1, as every release before the marker.  `keyspace 2, done`: keyspace
2.  Anything else (a migration under way, or a value that does not parse) selects
none: the caller waits or refuses, and never guesses, because a daemon on the wrong
keyspace finds no VM there and would destroy its domains.
"""

from __future__ import annotations

from typing import Literal

from schemas.errors import SchemaError, TemporaryError
from schemas.models_v2 import KeyspaceVersion
from schemas.snapshot import RawKV


class KeyspaceUndecided(TemporaryError):
    """The marker selects neither keyspace.  `state` is the migration's (None: the value
    does not parse) and `by` who started it."""

    def __init__(self, message: str, state: str | None = None, by: str | None = None
                 ) -> None:
        super().__init__(message)
        self.state = state
        self.by = by


def keyspace_of(marker: RawKV | None, key: str) -> Literal[1, 2]:
    """The keyspace a value of the marker at ``key`` selects (pure); KeyspaceUndecided
    for none."""
    if marker is None:
        return 1
    try:
        v = KeyspaceVersion.from_json(marker.value, key)
    except SchemaError as exc:
        raise KeyspaceUndecided(f"the keyspace marker {key} does not parse ({exc})") from exc
    if v.state != "done":
        raise KeyspaceUndecided(f"keyspace marker {key} says a migration to keyspace 2 is "
                                f"under way ({v.state}, by {v.by})", v.state, v.by)
    return 2
