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


class TwoLeases:
    """Lease 1 always renewed; lease 2 (the partner) until `partner_gone` is set."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.partner_gone = False
        self.calls: list[tuple[int, float]] = []

    def keepalive(self, lease_id: int, timeout: float | None = None) -> int:
        self.calls.append((lease_id, self.clock[0]))
        self.clock[0] += 0.1  # each keepalive takes 0.1 (virtual) s
        return 0 if lease_id == 2 and self.partner_gone else 6


def test_a_partner_lease_is_renewed_in_the_same_round_and_bounds_the_deadline() -> None:
    """Keyspace 2: both leases in one round; the deadline counts from the round's first
    send only when both were acknowledged, and stays put while the partner is gone."""
    cfg = ClusterConfig(lease_ttl_s=3, keepalive_interval_s=0.05, keepalive_timeout_s=0.1,
                        etcd_election_timeout_s=0.2, self_fence_safety_s=0.5,
                        fence_margin_s=1.0)
    now = [100.0]
    store = TwoLeases(now)
    gone: list[int] = []
    renewals = threading.Semaphore(0)
    keeper = LeaseKeeper(store, cfg, 1, 100.0, on_gone=lambda _: None, on_deadline=None,
                         on_renewed=renewals.release, clock=lambda: now[0],
                         partner=2, on_partner_gone=gone.append)
    keeper.start()
    try:
        assert renewals.acquire(timeout=5)
        pairs = [(a[0], b[0]) for a, b in zip(store.calls[::2], store.calls[1::2],
                                              strict=False)]
        assert pairs and all(p == (1, 2) for p in pairs), store.calls
        first_send = store.calls[-2][1]
        assert keeper.deadline == self_fence_deadline(first_send, cfg)
        store.partner_gone = True
        deadline = time.monotonic() + 5
        while not gone and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone == [2]
        frozen = keeper.deadline
        time.sleep(0.3)  # rounds go on: the registration lease renewed, not the deadline
        assert keeper.deadline == frozen and gone == [2]
        assert [c for c in store.calls[-4:] if c[0] == 2] == [], "a gone partner is not asked"
        # A replacement partner: the deadline moves again.
        store.partner_gone = False
        keeper.set_partner(3)
        while keeper.deadline == frozen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert keeper.deadline > frozen and any(c[0] == 3 for c in store.calls)
    finally:
        keeper.stop()


def test_without_a_partner_one_keepalive_a_round() -> None:
    cfg = ClusterConfig(keepalive_interval_s=0.05)
    now = [0.0]
    store = TwoLeases(now)
    renewals = threading.Semaphore(0)
    keeper = LeaseKeeper(store, cfg, 1, 0.0, on_gone=lambda _: None, on_deadline=None,
                         on_renewed=renewals.release, clock=lambda: now[0])
    keeper.start()
    try:
        assert renewals.acquire(timeout=5) and renewals.acquire(timeout=5)
    finally:
        keeper.stop()
    assert {lease for lease, _ in store.calls} == {1}


def test_lease_terms_say_paired_after_the_alive_line() -> None:
    from fencing.lease_hold import LeaseHold, LeaseTerms

    cfg = ClusterConfig(lease_ttl_s=3, keepalive_interval_s=0.3, keepalive_timeout_s=0.25,
                        etcd_election_timeout_s=0.5, self_fence_safety_s=0.5,
                        fence_margin_s=1.0)
    terms = LeaseTerms.of(0x10, cfg, 0x11, paired=True)
    assert terms.line().splitlines() == ["lease 10 3 0.5 0.3 0.25", "alive 11", "paired"]
    parsed = LeaseTerms.parse(terms.line().splitlines()[0].split()[1:]).with_alive(["11"])
    assert parsed.with_paired() == terms
    assert not LeaseTerms.of(0x10, cfg, 0, paired=True).paired  # nothing to pair with
    assert LeaseTerms.of(0x10, cfg, 0x11).line().splitlines()[-1] == "alive 11"
    # The hold renews both in one round (one keeper, the liveness lease its partner).
    hold = LeaseHold(TwoLeases([0.0]), terms, 10.0, lambda _d: None, lambda: None,
                     clock=lambda: 0.0)
    assert hold.alive is None and hold.keeper.partner == 0x11
    apart = LeaseHold(TwoLeases([0.0]), LeaseTerms.of(0x10, cfg, 0x11), 10.0,
                      lambda _d: None, lambda: None, clock=lambda: 0.0)
    assert apart.alive is not None and apart.keeper.partner == 0
