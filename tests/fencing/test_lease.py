"""LeaseKeeper: a failed keepalive is tried again at once (the store has moved to the
next endpoint), each attempt with the keepalive's own deadline, and the self-fence
deadline counts from the send time of the attempt etcd acknowledged."""

from __future__ import annotations

import threading
import time

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


class OddStore:
    """Raises an error no one foresaw (not "unavailable") on the first keepalives."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def keepalive(self, lease_id: int, timeout: float | None = None) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("Channel closed")
        return 6


def test_unforeseen_keepalive_error_does_not_end_renewal() -> None:
    # A keepalive thread that died on such an error would leave a healthy node to
    # self-fence at its deadline: renewal must go on, and only the deadline may fence.
    cfg = ClusterConfig(lease_ttl_s=3, keepalive_interval_s=0.2, keepalive_timeout_s=0.1,
                        etcd_election_timeout_s=0.2, self_fence_safety_s=0.5,
                        fence_margin_s=1.0)
    store = OddStore(failures=2)
    renewed = threading.Event()
    fenced = threading.Event()
    keeper = LeaseKeeper(store, cfg, 1, time.monotonic(), on_gone=lambda _: None,
                         on_deadline=fenced.set, on_renewed=renewed.set, unavailable=Down)
    keeper.start()
    try:
        assert renewed.wait(5.0), "renewal stopped after an unforeseen error"
    finally:
        keeper.stop()
    assert store.calls >= 3
    assert not fenced.is_set()


def test_failing_renewed_callback_does_not_end_renewal() -> None:
    cfg = ClusterConfig(lease_ttl_s=3, keepalive_interval_s=0.2, keepalive_timeout_s=0.1,
                        etcd_election_timeout_s=0.2, self_fence_safety_s=0.5,
                        fence_margin_s=1.0)
    store = OddStore(failures=0)
    calls: list[int] = []
    enough = threading.Event()

    def on_renewed() -> None:
        calls.append(1)
        if len(calls) >= 3:
            enough.set()
        raise RuntimeError("guard socket gone")

    keeper = LeaseKeeper(store, cfg, 1, time.monotonic(), on_gone=lambda _: None,
                         on_deadline=lambda: None, on_renewed=on_renewed, unavailable=Down)
    keeper.start()
    try:
        assert enough.wait(5.0), "renewal stopped after its callback failed"
    finally:
        keeper.stop()
