"""Invalid keys are logged once per key and revision, and counted in a gauge; a failed
cycle's backoff grows, is jittered and bounded (telemetry.invalid_keys)."""

from __future__ import annotations

from typing import Any

from schemas.snapshot import ClusterSnapshot, RawKV
from telemetry import metrics
from telemetry.invalid_keys import CycleBackoff, InvalidKeyReporter
from tests.unit.builders import KS


class Log:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def error(self, event: str, **kw: Any) -> None:
        self.events.append({"event": event, **kw})


def _snap(revision: int, *kvs: tuple[str, int]) -> ClusterSnapshot:
    return ClusterSnapshot.from_kvs(KS, revision, [RawKV(k, b"[", r, r) for k, r in kvs])


def test_each_key_logged_once_per_revision_and_gauge_follows() -> None:
    log = Log()
    rep = InvalidKeyReporter(log)
    a, b = KS.vm_spec("a"), KS.node("b")
    rep.report(_snap(10, (a, 5)))
    rep.report(_snap(11, (a, 5)))  # the same key at the same revision: not again
    assert [(e["key"], e["key_revision"], e["revision"]) for e in log.events] == [(a, 5, 10)]
    assert metrics.INVALID_KEYS._value.get() == 1
    rep.report(_snap(12, (a, 7), (b, 8)))  # rewritten, and a new one
    assert [(e["key"], e["key_revision"]) for e in log.events[1:]] == [(b, 8), (a, 7)]
    assert metrics.INVALID_KEYS._value.get() == 2
    rep.report(_snap(13))
    assert metrics.INVALID_KEYS._value.get() == 0
    rep.report(_snap(14, (a, 7)))  # broken again after being fixed: logged again
    assert len(log.events) == 4
    assert all(e["event"] == "invalid_key_ignored" and e["error"] for e in log.events)


def test_cycle_backoff_grows_bounded_and_resets() -> None:
    b = CycleBackoff(first_s=0.5, max_s=10.0)
    delays = [b.failed() for _ in range(12)]
    assert all(0 < d <= 10.0 for d in delays)
    assert delays[0] <= 1.0 and delays[-1] == 10.0
    assert b.failures == 12
    b.succeeded()
    assert b.failures == 0 and b.failed() <= 1.0


def test_leader_logs_each_config_error_once_until_the_config_is_valid_again() -> None:
    from structlog.testing import capture_logs

    from orchestrator.leader import Orchestrator

    class _Store:
        keyspace = KS

    orch = Orchestrator(_Store(), ident="t")  # type: ignore[arg-type]

    def cfg(value: bytes) -> ClusterSnapshot:
        return ClusterSnapshot.from_kvs(KS, 1, [RawKV(KS.config, value, 1, 1)])

    bad_a, bad_b, good = cfg(b"[" * 50_000), cfg(b'{"lease_ttl_s": "x"}'), cfg(b"{}")
    with capture_logs() as logs:
        for snap in (bad_a, bad_a, bad_b, bad_b, good, bad_a):
            orch._check_config(snap)
    assert [e["event"] for e in logs] == ["config_rejected"] * 3
