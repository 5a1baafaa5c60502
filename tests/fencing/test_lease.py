"""LeaseKeeper against real etcd: a failed round is tried again at once (the store has
moved to the next member), each attempt with the keepalive's own deadline, and the
self-fence deadline counts from the send time of the round etcd acknowledged; both
leases of keyspace 2 go in one round and bound the deadline."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence

import pytest
from structlog.testing import capture_logs

from fencing.lease import LeaseKeeper
from schemas.models import ClusterConfig
from store.etcd import EtcdStore, StoreUnavailable
from tests.harness import EtcdCluster, wait_until
from tests.integration.helpers import store_on_follower

pytestmark = pytest.mark.integration

# The test config's timing (lab.configs.FAST_CONFIG), which passes validate_timing.
FAST = ClusterConfig(lease_ttl_s=3, keepalive_interval_s=0.2, keepalive_timeout_s=0.1,
                     etcd_election_timeout_s=0.2, self_fence_safety_s=0.5, fence_margin_s=1.0)


class RecordingStore(EtcdStore):
    """A real store that notes the lease ids of each round it sends (a spy: etcd
    answers every round)."""

    def __init__(self, endpoints: str) -> None:
        super().__init__(endpoints)
        self.rounds: list[tuple[int, ...]] = []

    def keepalive_round(self, lease_ids: Sequence[int], timeout: float | None = None
                        ) -> dict[int, int]:
        self.rounds.append(tuple(lease_ids))
        return super().keepalive_round(lease_ids, timeout)


def sent_at(keeper: LeaseKeeper, cfg: ClusterConfig) -> float:
    """The send time the keeper's deadline counts from."""
    return keeper.deadline - (cfg.lease_ttl_s - cfg.self_fence_safety_s)


def test_failed_keepalive_is_retried_at_once_with_its_own_deadline(etcd3: EtcdCluster) -> None:
    # The first round goes out after one interval (2 s) to a stopped member and gets no
    # answer within its deadline (0.25 s); a retry that waited for the next interval
    # would come 2 s later.
    cfg = ClusterConfig(keepalive_interval_s=2.0, keepalive_timeout_s=0.25)
    store, member = store_on_follower(etcd3)
    renewed_at: list[float] = []
    assert member.proc is not None
    try:
        lease = store.grant_lease(cfg.lease_ttl_s)
        granted = time.monotonic()
        os.kill(member.proc.pid, signal.SIGSTOP)
        keeper = LeaseKeeper(store, cfg, lease, granted, on_gone=lambda _: None,
                             on_deadline=lambda: None,
                             on_renewed=lambda: renewed_at.append(time.monotonic()),
                             unavailable=StoreUnavailable)
        started = time.monotonic()
        keeper.start()
        try:
            wait_until(lambda: renewed_at, 6.0, what="a renewal")
        finally:
            keeper.stop()
    finally:
        os.kill(member.proc.pid, signal.SIGCONT)
        store.close()
    first = started + cfg.keepalive_interval_s
    # Acknowledged on the retry, at once after the first attempt's deadline ...
    assert renewed_at[0] - first < cfg.keepalive_timeout_s + 0.5, renewed_at[0] - first
    # ... and the deadline counts from the retry's send, not from the first attempt's.
    assert sent_at(keeper, cfg) >= first + cfg.keepalive_timeout_s
    assert sent_at(keeper, cfg) <= renewed_at[0]
    assert keeper.last_renew_latency_s is not None
    assert keeper.last_renew_latency_s < cfg.keepalive_timeout_s


def test_unforeseen_keepalive_error_does_not_end_renewal(etcd: EtcdCluster,
                                                        store: EtcdStore) -> None:
    # A keepalive thread that died on an error no one foresaw would leave a healthy node
    # to self-fence at its deadline: renewal must go on, and only the deadline may fence.
    # The error here is a caller's bug the store refuses (a round that names its lease
    # twice: ValueError, not "unavailable"), until the partner is corrected.
    lease = store.grant_lease(FAST.lease_ttl_s)
    renewed = threading.Event()
    fenced = threading.Event()
    keeper = LeaseKeeper(store, FAST, lease, time.monotonic(), on_gone=lambda _: None,
                         on_deadline=fenced.set, on_renewed=renewed.set,
                         unavailable=StoreUnavailable, partner=lease)
    keeper.start()
    try:
        assert not renewed.wait(3 * FAST.keepalive_interval_s)
        keeper.set_partner(store.grant_lease(FAST.lease_ttl_s))
        assert renewed.wait(5.0), "renewal stopped after an unforeseen error"
    finally:
        keeper.stop()
    assert not fenced.is_set()


def test_failing_renewed_callback_does_not_end_renewal(etcd: EtcdCluster,
                                                      store: EtcdStore) -> None:
    calls: list[int] = []
    enough = threading.Event()

    def on_renewed() -> None:
        calls.append(1)
        if len(calls) >= 3:
            enough.set()
        raise RuntimeError("guard socket gone")

    keeper = LeaseKeeper(store, FAST, store.grant_lease(FAST.lease_ttl_s), time.monotonic(),
                         on_gone=lambda _: None, on_deadline=lambda: None,
                         on_renewed=on_renewed, unavailable=StoreUnavailable)
    keeper.start()
    try:
        assert enough.wait(5.0), "renewal stopped after its callback failed"
    finally:
        keeper.stop()


def test_a_partner_lease_is_renewed_in_the_same_round_and_bounds_the_deadline(
        etcd: EtcdCluster) -> None:
    """Keyspace 2: both leases in one round; the deadline counts from the round's send
    only when both were acknowledged, and stays put while the partner is gone."""
    cfg = ClusterConfig(lease_ttl_s=3, keepalive_interval_s=0.05, keepalive_timeout_s=0.1,
                        etcd_election_timeout_s=0.2, self_fence_safety_s=0.5,
                        fence_margin_s=1.0)
    store, other = RecordingStore(etcd.endpoints), EtcdStore(etcd.endpoints)
    reg, alive = store.grant_lease(cfg.lease_ttl_s), store.grant_lease(cfg.lease_ttl_s)
    gone: list[int] = []
    renewals = threading.Semaphore(0)
    before = time.monotonic()
    keeper = LeaseKeeper(store, cfg, reg, before, on_gone=lambda _: None, on_deadline=None,
                         on_renewed=renewals.release, partner=alive,
                         on_partner_gone=gone.append)
    keeper.start()
    try:
        assert renewals.acquire(timeout=5)
        assert store.rounds and all(r == (reg, alive) for r in store.rounds), store.rounds
        assert before < sent_at(keeper, cfg) <= time.monotonic()
        time.sleep(1.0)  # a third of the TTL: both leases renewed all along
        assert store.lease_ttl(reg) >= 2 and store.lease_ttl(alive) >= 2
        # Another client revokes the partner (etcd then answers TTL 0 for it).
        other.revoke_lease(alive)
        wait_until(lambda: gone, 5, what="the partner found gone")
        assert gone == [alive]
        frozen = keeper.deadline
        asked = len(store.rounds)
        time.sleep(0.3)  # rounds go on: the registration lease renewed, not the deadline
        assert keeper.deadline == frozen and gone == [alive]
        assert len(store.rounds) > asked and all(r == (reg,) for r in store.rounds[asked:]), \
            "a gone partner is not asked"
        assert store.lease_ttl(reg) >= 2
        # A replacement partner: the deadline moves again.
        new = store.grant_lease(cfg.lease_ttl_s)
        keeper.set_partner(new)
        wait_until(lambda: keeper.deadline > frozen, 5, what="the deadline moving")
        assert store.rounds[-1] == (reg, new)
    finally:
        keeper.stop()
        store.close()
        other.close()


def test_without_a_partner_one_keepalive_a_round(etcd: EtcdCluster) -> None:
    cfg = ClusterConfig(keepalive_interval_s=0.05)
    store = RecordingStore(etcd.endpoints)
    lease = store.grant_lease(cfg.lease_ttl_s)
    renewals = threading.Semaphore(0)
    keeper = LeaseKeeper(store, cfg, lease, time.monotonic(), on_gone=lambda _: None,
                         on_deadline=None, on_renewed=renewals.release)
    keeper.start()
    try:
        assert renewals.acquire(timeout=5) and renewals.acquire(timeout=5)
    finally:
        keeper.stop()
        store.close()
    assert set(store.rounds) == {(lease,)}


def test_lease_terms_say_paired_after_the_alive_line(etcd: EtcdCluster,
                                                    store: EtcdStore) -> None:
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
    hold = LeaseHold(store, terms, 10.0, lambda _d: None, lambda: None, clock=lambda: 0.0)
    assert hold.alive is None and hold.keeper.partner == 0x11
    apart = LeaseHold(store, LeaseTerms.of(0x10, cfg, 0x11), 10.0,
                      lambda _d: None, lambda: None, clock=lambda: 0.0)
    assert apart.alive is not None and apart.keeper.partner == 0


class ReplacingStore(RecordingStore):
    """A real store on which the partner is replaced while a round is in flight (as the
    agent's cycle thread replaces a liveness lease found gone, `set_partner`), once."""

    def __init__(self, endpoints: str) -> None:
        super().__init__(endpoints)
        self.keeper: LeaseKeeper | None = None
        self.replacement = 0

    def keepalive_round(self, lease_ids: Sequence[int], timeout: float | None = None
                        ) -> dict[int, int]:
        if self.keeper is not None and self.replacement and len(lease_ids) == 1:
            self.keeper.set_partner(self.replacement)
            self.replacement = 0
        return super().keepalive_round(lease_ids, timeout)


def test_a_partner_replaced_during_a_round_is_not_taken_for_gone(etcd: EtcdCluster) -> None:
    """The round that asked only the registration lease (its partner was gone) ends after
    the replacement was set: the replacement is renewed from the next round on, never
    reported gone (which would freeze the deadline until the node fenced itself)."""
    cfg = ClusterConfig(lease_ttl_s=3, keepalive_interval_s=0.05, keepalive_timeout_s=0.1,
                        etcd_election_timeout_s=0.2, self_fence_safety_s=0.5,
                        fence_margin_s=1.0)
    store, other = ReplacingStore(etcd.endpoints), EtcdStore(etcd.endpoints)
    reg, alive = store.grant_lease(cfg.lease_ttl_s), store.grant_lease(cfg.lease_ttl_s)
    gone: list[int] = []
    keeper = LeaseKeeper(store, cfg, reg, time.monotonic(), on_gone=lambda _: None,
                         on_deadline=None, partner=alive, on_partner_gone=gone.append)
    store.keeper = keeper
    keeper.start()
    try:
        other.revoke_lease(alive)
        wait_until(lambda: gone, 5, what="the partner found gone")
        frozen = keeper.deadline
        new = store.replacement = store.grant_lease(cfg.lease_ttl_s)
        wait_until(lambda: keeper.deadline > frozen, 5, what="the deadline moving")
        time.sleep(0.3)
        assert gone == [alive], "the replacement was reported gone"
        assert store.rounds[-1] == (reg, new)
    finally:
        keeper.stop()
        store.close()
        other.close()


def test_the_deadline_thread_sleeps_until_the_deadline(etcd: EtcdCluster) -> None:
    """The deadline monitor reads the clock about once a second, not every 50 ms, and
    still fires at the deadline: an unrenewed lease fences within the cap of it."""
    cfg = ClusterConfig(lease_ttl_s=12, keepalive_interval_s=5.0, keepalive_timeout_s=1.0)
    store = EtcdStore(etcd.endpoints)
    reads: list[float] = []

    def clock() -> float:
        reads.append(time.monotonic())
        return reads[-1]

    fired: list[float] = []
    try:
        lease = store.grant_lease(cfg.lease_ttl_s)
        keeper = LeaseKeeper(store, cfg, lease, time.monotonic(), on_gone=lambda _: None,
                             on_deadline=lambda: fired.append(time.monotonic()), clock=clock)
        keeper.start()
        time.sleep(2.0)  # no round yet (the first comes after 5 s): only the monitor reads
        assert 1 <= len(reads) <= 4, f"{len(reads)} clock reads in 2 s"
        keeper.stop()
        # A deadline 0.3 s away fires when due, not at the next whole second.
        late = LeaseKeeper(store, cfg, lease, time.monotonic() - (cfg.lease_ttl_s
                           - cfg.self_fence_safety_s) + 0.3, on_gone=lambda _: None,
                           on_deadline=lambda: fired.append(time.monotonic()))
        due = late.deadline
        late.start()
        wait_until(lambda: fired, 5, what="the deadline fired")
        late.stop()
        assert fired[0] >= due
    finally:
        store.close()


def test_a_stopped_keeper_reports_no_failure_of_its_last_round(etcd: EtcdCluster) -> None:
    """The owner stops the keeper, then closes the store (an orchestrator that resigned
    at a keyspace change): a round still in flight fails then, which is no news, and
    must not read as a renewal failure in the log (it did, once, in the suite)."""
    store = EtcdStore(etcd.endpoints)
    member = etcd.members[0]
    assert member.proc is not None
    lease = store.grant_lease(FAST.lease_ttl_s)
    keeper = LeaseKeeper(store, FAST, lease, time.monotonic(), on_gone=lambda _: None,
                         on_deadline=None, unavailable=StoreUnavailable)
    with capture_logs() as logs:
        os.kill(member.proc.pid, signal.SIGSTOP)  # every round now waits for its timeout
        try:
            keeper.start()
            wait_until(lambda: any(e["event"] == "keepalive_failed" for e in logs), 5.0,
                       what="rounds failing while etcd is stopped")
            keeper.stop()
            stopped = len(logs)
            store.close()
            time.sleep(FAST.keepalive_interval_s + 2 * FAST.keepalive_timeout_s)
        finally:
            os.kill(member.proc.pid, signal.SIGCONT)
    late = [e for e in logs[stopped:] if e["event"] in ("keepalive_failed", "keepalive_error")]
    assert not late, late
