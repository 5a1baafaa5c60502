"""LeaseKeeper: a failed keepalive is tried again at once (the store has moved to the
next endpoint), each attempt with the keepalive's own deadline, and the self-fence
deadline counts from the send time of the attempt etcd acknowledged."""

from __future__ import annotations

import threading

from fencing.lease import LeaseKeeper
from fencing.policy import self_fence_deadline
from schemas.errors import TemporaryError
from schemas.models import ClusterConfig


class Down(TemporaryError):
    pass


class FlakyStore:
    """Fails the first `failures` keepalives, then grants the TTL."""

    def __init__(self, failures: int, clock: list[float]) -> None:
        self.failures = failures
        self.calls: list[tuple[float, float | None]] = []
        self.clock = clock
        self.lock = threading.Lock()

    def keepalive(self, lease_id: int, timeout: float | None = None) -> int:
        with self.lock:
            self.calls.append((self.clock[0], timeout))
            self.clock[0] += 1.0  # each attempt is sent one (virtual) second later
            if len(self.calls) <= self.failures:
                raise Down("member does not answer")
            return 6


def test_failed_keepalive_is_retried_at_once_with_its_own_deadline() -> None:
    # The first keepalive goes out after one interval (2 s); retries that each waited
    # for the next interval would need 8 s, more than the test waits.
    cfg = ClusterConfig(keepalive_interval_s=2.0, keepalive_timeout_s=0.25)
    now = [100.0]
    store = FlakyStore(failures=3, clock=now)
    renewed = threading.Event()
    keeper = LeaseKeeper(store, cfg, 1, 100.0, on_gone=lambda _: None,
                         on_deadline=lambda: None, on_renewed=renewed.set,
                         unavailable=Down, clock=lambda: now[0])
    keeper.start()
    try:
        assert renewed.wait(6.0)
    finally:
        keeper.stop()
    sends = [t for t, _ in store.calls]
    assert len(sends) >= 4 and sends[:4] == [100.0, 101.0, 102.0, 103.0]
    assert all(t == cfg.keepalive_timeout_s for _, t in store.calls)
    # Counted from the send of the acknowledged (4th) attempt, not of the first.
    assert keeper.deadline == self_fence_deadline(103.0, cfg)
