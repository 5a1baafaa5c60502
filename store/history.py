"""Writing, reading and pruning the event history in etcd (see schemas.events)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from schemas.errors import SchemaError
from schemas.events import Event, event_id
from store.etcd import EtcdStore, StoreRejected, StoreUnavailable

log = structlog.get_logger("vmha.history")


class HistoryWriter:
    """Best-effort: a lost event is logged, never allowed to block a decision."""

    def __init__(self, store: EtcdStore, actor: str,
                 key: Callable[[str], str] | None = None) -> None:
        """`key`: an event id -> its key (keyspace 1's `Keyspace.event` if None)."""
        self.store = store
        self.actor = actor
        self._key = key or store.keyspace.event
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def record(self, kind: str, **fields: Any) -> Event | None:
        at = time.time()
        with self._lock:
            seq = next(self._seq)
        ev = Event(id=event_id(at, self.actor, seq), at=at, kind=kind,  # type: ignore[arg-type]
                   actor=self.actor, **fields)
        try:
            self.store.put(self._key(ev.id), ev.to_json())
        except StoreUnavailable as exc:
            log.warning("event_not_recorded", kind=kind, error=str(exc), **fields)
            return None
        except StoreRejected as exc:  # e.g. too large: still never blocks the decision
            log.error("event_rejected", kind=kind, error=str(exc), **fields)
            return None
        return ev


@dataclass(frozen=True)
class EventFilter:
    vm: str | None = None
    node: str | None = None
    kind: str | None = None
    since: float | None = None
    until: float | None = None

    def match(self, e: Event) -> bool:
        return ((self.vm is None or e.vm == self.vm)
                and (self.node is None or self.node in (e.node, e.from_node))
                and (self.kind is None or e.kind == self.kind)
                and (self.since is None or e.at >= self.since)
                and (self.until is None or e.at <= self.until))


def read_events(store: EtcdStore, flt: EventFilter | None = None) -> tuple[list[Event], list[str]]:
    """All events in time order, and the errors of the records that did not parse.

    Each record is parsed on its own: a hostile one (too large, deeply nested, not
    UTF-8) is one error in the list, never an exception for the reader (the leader
    prunes with this, the CLI shows history with it)."""
    events, errors = [], []
    for kv in store.get_prefix(store.keyspace.history):
        try:
            ev = Event.from_json(kv.value, key=kv.key)
        except SchemaError as exc:
            errors.append(str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - one hostile record never ends a reader
            errors.append(f"{kv.key}: refused ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        if flt is None or flt.match(ev):
            events.append(ev)
    events.sort(key=lambda e: e.id)
    return events, errors


def prune(store: EtcdStore, events: Iterable[Event], retention_s: float, max_events: int,
          now: float | None = None) -> int:
    """Delete events older than the retention or beyond the newest `max_events`."""
    now = time.time() if now is None else now
    ordered = sorted(events, key=lambda e: e.id)
    excess = max(0, len(ordered) - max_events)
    doomed = [e for i, e in enumerate(ordered) if i < excess or now - e.at > retention_s]
    for e in doomed:
        store.delete(store.keyspace.event(e.id))
    return len(doomed)
