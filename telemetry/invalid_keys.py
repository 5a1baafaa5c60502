"""Reporting invalid keys and unexpected cycle errors, the same way in every daemon.

A hostile or broken value must be visible (a log event, the `vmha_invalid_keys`
gauge, `vmha status`) without flooding the log: each key is logged once per
revision of it, not once per cycle.  A cycle that fails for an unexpected reason is
retried after a bounded, jittered backoff (tenacity's wait function), so a bug that
one piece of data triggers neither ends the daemon nor spins it.
"""

from __future__ import annotations

from typing import Any

from tenacity import RetryCallState, wait_exponential_jitter

from schemas.snapshot import ClusterSnapshot
from telemetry import metrics


class InvalidKeyReporter:
    def __init__(self, log: Any, seen: frozenset[tuple[str, int]] = frozenset()) -> None:
        self._log = log
        self._seen: set[tuple[str, int]] = set(seen)

    @property
    def seen(self) -> frozenset[tuple[str, int]]:
        """The (key, revision) pairs reported and still invalid at the last report."""
        return frozenset(self._seen)

    def report(self, snap: ClusterSnapshot) -> None:
        current = {(i.key, i.mod_revision): i for i in snap.invalid}
        for ident in sorted(set(current) - self._seen):
            i = current[ident]
            self._log.error("invalid_key_ignored", key=i.key, key_revision=i.mod_revision,
                            kind=i.kind, name=i.name, field=i.error.field,
                            error=i.error.message, revision=snap.revision)
        # Forget keys fixed or deleted, so the same key broken again is logged again.
        self._seen = set(current)
        metrics.INVALID_KEYS.set(len(current))


class CycleBackoff:
    """Delay before the next cycle after `failures` unexpected errors in a row."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self._wait = wait_exponential_jitter(multiplier=first_s, max=max_s, jitter=first_s)
        self._max_s = max_s
        self.failures = 0

    def failed(self) -> float:
        self.failures += 1
        metrics.CYCLE_ERRORS.inc()
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = min(self.failures, 30)
        return min(self._max_s, float(self._wait(state)))

    def succeeded(self) -> None:
        self.failures = 0
