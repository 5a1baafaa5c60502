"""Pure fencing timing rules: config validation, self-fence deadline and the leader's verdict."""

from __future__ import annotations

from typing import Any

import pytest

from fencing.policy import (
    ETCD_EXPIRY_GRANULARITY_S,
    FenceVerdict,
    UnsafeConfigError,
    fence_window,
    guard_timeout,
    renewal_gap,
    require_safe_timing,
    self_fence_deadline,
    self_fence_verdict,
    validate_timing,
)
from schemas.models import ClusterConfig

TEST = dict(lease_ttl_s=3, keepalive_interval_s=0.3, keepalive_timeout_s=0.25,
            etcd_election_timeout_s=0.5, self_fence_safety_s=0.5, fence_margin_s=1.0)
TEST_CFG = ClusterConfig(**TEST)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(ClusterConfig(), id="defaults"),
        pytest.param(TEST_CFG, id="short-test-config"),
        # A member fault's renewal gap plus slack (0.25 + 0.5 + 1.0 + 0.25 = 2.0 s) is
        # exactly the guard timeout.
        pytest.param(ClusterConfig(lease_ttl_s=3, keepalive_interval_s=0.25,
                                   keepalive_timeout_s=0.25, etcd_election_timeout_s=0.5,
                                   self_fence_safety_s=0.5, fence_margin_s=0.5,
                                   guard_timeout_s=2.0),
                     id="tightest-edges"),
        pytest.param(ClusterConfig(lease_ttl_s=60, keepalive_interval_s=20,
                                   self_fence_safety_s=10, fence_margin_s=10), id="slow"),
    ],
)
def test_safe_configs_accepted(cfg: ClusterConfig) -> None:
    assert validate_timing(cfg) == []
    require_safe_timing(cfg)  # does not raise


# Each row breaks exactly one rule: (changes to the test config, words of the one problem)
UNSAFE: list[Any] = [
    pytest.param(dict(self_fence_safety_s=0.2, fence_margin_s=1.0),
                 ["self_fence_safety_s=0.2", "below 0.25 s"], id="safety-too-small"),
    pytest.param(dict(lease_ttl_s=1, self_fence_safety_s=1.0, fence_margin_s=1.0),
                 ["self_fence_safety_s=1.0", "smaller than lease_ttl_s=1"],
                 id="safety-equals-ttl"),
    pytest.param(dict(lease_ttl_s=1, self_fence_safety_s=1.5, fence_margin_s=2.0),
                 ["self_fence_safety_s=1.5", "smaller than lease_ttl_s=1"],
                 id="safety-exceeds-ttl"),
    pytest.param(dict(keepalive_interval_s=1.3),
                 ["keepalive_interval_s=1.3", "fewer than two keepalive attempts",
                  "2.50 s"], id="keepalive-too-slow"),
    pytest.param(dict(lease_ttl_s=5, keepalive_interval_s=5.0, self_fence_safety_s=1.0,
                      fence_margin_s=2.0),
                 ["keepalive_interval_s=5.0", "4.00 s"], id="keepalive-equals-ttl"),
    pytest.param(dict(fence_margin_s=0.55, self_fence_safety_s=0.6),
                 ["fence_margin_s=0.55", "at least self_fence_safety_s=0.6"],
                 id="margin-below-safety"),
    pytest.param(dict(fence_margin_s=0.4, self_fence_safety_s=0.3),
                 ["fence_margin_s=0.4", "lease-expiry granularity"],
                 id="margin-below-etcd-granularity"),
    # A stalled member: 0.3 + 2 * 1.0 + 2 * 0.5 + 0.25 = 3.55 s between renewals.
    pytest.param(dict(keepalive_timeout_s=1.0),
                 ["keepalive_timeout_s", "= 3.55 s", "lease_ttl_s - self_fence_safety_s=2.50",
                  "raise lease_ttl_s"], id="keepalive-timeout-beyond-deadline"),
    # A stalled leader: 0.3 + 2 * 0.25 + 2 * 1.0 + 0.25 = 3.05 s between renewals.
    pytest.param(dict(etcd_election_timeout_s=1.0),
                 ["etcd_election_timeout_s", "= 3.05 s", "fence itself"],
                 id="election-beyond-deadline"),
    pytest.param(dict(guard_timeout_s=1.8),
                 ["= 2.05 s", "guard_timeout_s=1.80", "the guard would fire"],
                 id="member-fault-beyond-guard"),
]


@pytest.mark.parametrize(("changes", "words"), UNSAFE)
def test_unsafe_configs_rejected(changes: dict[str, Any], words: list[str]) -> None:
    cfg = ClusterConfig(**{**TEST, **changes})
    problems = validate_timing(cfg)
    assert len(problems) == 1, problems
    for w in words:
        assert w in problems[0]
    with pytest.raises(UnsafeConfigError) as info:
        require_safe_timing(cfg)
    assert str(info.value) == "unsafe cluster timing: " + problems[0]
    assert isinstance(info.value, ValueError)


def test_every_broken_rule_listed() -> None:
    cfg = ClusterConfig(lease_ttl_s=1, keepalive_interval_s=1.0, self_fence_safety_s=0.1,
                        fence_margin_s=0.05)
    problems = validate_timing(cfg)
    assert len(problems) == 4
    assert "self_fence_safety_s=0.1 is below 0.25 s" in problems[0]
    assert "keepalive_interval_s=1.0" in problems[1]
    assert "fence_margin_s=0.05 must be at least self_fence_safety_s=0.1" in problems[2]
    assert "fence_margin_s=0.05 is below etcd's 0.5 s" in problems[3]
    with pytest.raises(UnsafeConfigError, match="; ".join(["below 0.25 s.*"] + [".*"] * 3)):
        require_safe_timing(cfg)


def test_granularity_constant() -> None:
    assert ETCD_EXPIRY_GRANULARITY_S == 0.5


@pytest.mark.parametrize(
    ("sent", "cfg", "deadline"),
    [
        pytest.param(100.0, ClusterConfig(), 105.0, id="defaults"),
        pytest.param(100.0, TEST_CFG, 102.5, id="test-config"),
        pytest.param(0.0, ClusterConfig(lease_ttl_s=10, self_fence_safety_s=2.5), 7.5,
                     id="from-zero"),
    ],
)
def test_self_fence_deadline(sent: float, cfg: ClusterConfig, deadline: float) -> None:
    got = self_fence_deadline(sent, cfg)
    assert got == pytest.approx(deadline)
    # The deadline is strictly before the earliest possible server-side expiry.
    assert got < sent + cfg.lease_ttl_s


def test_fence_window_is_a_ttl_plus_the_margin() -> None:
    # A full TTL: the leader cannot tell a revoked lease from an expired one.  With the
    # guard enabled (the default) the guard timeout is added (ttl + guard + margin).
    assert fence_window(ClusterConfig()) == 6 + 4.5 + 2 == 12.5
    assert fence_window(TEST_CFG) == pytest.approx(3 + 2.2 + 1.0)
    assert fence_window(ClusterConfig(guard_enabled=False)) == 8.0
    assert fence_window(TEST_CFG.model_copy(update={"guard_enabled": False})) == 4.0


NOGUARD = ClusterConfig(guard_enabled=False)
TEST_NOGUARD = TEST_CFG.model_copy(update={"guard_enabled": False})


@pytest.mark.parametrize(
    ("lost_at", "now", "cfg", "fenced", "remaining", "words"),
    [
        pytest.param(10.0, 10.0, NOGUARD, False, 8.0,
                     "lease gone for 0.00 s, waiting for the fence window (8.00 s)",
                     id="just-lost"),
        pytest.param(10.0, 11.5, NOGUARD, False, 6.5,
                     "lease gone for 1.50 s, waiting", id="inside-window"),
        pytest.param(10.0, 18.0, NOGUARD, True, 0.0,
                     "lease gone for 8.00 s >= fence window 8.00 s", id="window-edge"),
        pytest.param(10.0, 30.0, NOGUARD, True, 0.0,
                     "lease gone for 20.00 s >= fence window 8.00 s", id="long-after"),
        pytest.param(10.0, 13.9, TEST_NOGUARD, False, 0.1, "fence window (4.00 s)",
                     id="test-config-before"),
        pytest.param(10.0, 14.0, TEST_NOGUARD, True, 0.0, "the agent self-fenced",
                     id="test-config-after"),
        pytest.param(10.0, 22.4, ClusterConfig(), False, 0.1, "fence window (12.50 s)",
                     id="guard-before"),
        pytest.param(10.0, 22.5, ClusterConfig(), True, 0.0, "the agent self-fenced",
                     id="guard-after"),
    ],
)
def test_self_fence_verdict(lost_at: float, now: float, cfg: ClusterConfig, fenced: bool,
                            remaining: float, words: str) -> None:
    v = self_fence_verdict(lost_at, now, cfg)
    assert isinstance(v, FenceVerdict)
    assert v.fenced is fenced
    assert v.remaining_s == pytest.approx(remaining)
    assert words in v.reason


def test_renewal_gap_counts_interval_rpc_timeouts_and_election() -> None:
    # docs/fencing.md, "Timing rules": interval + 2 * RPC deadline + 2 * election timeout.
    assert renewal_gap(ClusterConfig()) == 0.5 + 2 * 0.5 + 2 * 1.0 == 3.5
    assert renewal_gap(TEST_CFG) == pytest.approx(0.3 + 2 * 0.25 + 2 * 0.5)
    # The defaults leave a second between a member fault's gap (plus slack) and the guard.
    assert guard_timeout(ClusterConfig()) - renewal_gap(ClusterConfig()) == 1.0
