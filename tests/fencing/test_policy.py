"""The pure fencing rules: guard timing, fence window, fence policy decisions."""

from __future__ import annotations

import pytest

from fencing.liveness_fence import liveness_verdict
from fencing.policy import (
    FenceDecision,
    fence_decision,
    fence_retry_delay,
    fence_window,
    guard_fire_at,
    guard_timeout,
    validate_timing,
)
from lab.configs import FAST_CONFIG
from schemas.models import ClusterConfig, FenceDevice, FenceRecord

CFG = FAST_CONFIG
DEV = {"*": FenceDevice(agent=["/bin/true"])}


def test_default_guard_timeout_is_one_keepalive_before_the_deadline() -> None:
    assert guard_timeout(CFG) == pytest.approx(3 - 0.5 - 0.3)
    assert guard_timeout(ClusterConfig()) == 6 - 1 - 0.5
    assert validate_timing(CFG) == [] and validate_timing(ClusterConfig()) == []


def test_unsafe_guard_timing_is_refused() -> None:
    too_long = CFG.model_copy(update={"guard_timeout_s": 2.5})
    assert any("guard_timeout_s=2.50 must be below" in p for p in validate_timing(too_long))
    too_short = CFG.model_copy(update={"guard_timeout_s": 0.3})
    assert any("must exceed keepalive_interval_s" in p for p in validate_timing(too_short))
    # Disabled guard: its timeout is not checked and not part of the window.
    off = too_long.model_copy(update={"guard_enabled": False})
    assert validate_timing(off) == []
    assert fence_window(off) == 3 + 1.0


def test_fence_window_covers_ttl_guard_timeout_and_margin() -> None:
    assert fence_window(CFG) == 3 + guard_timeout(CFG) + 1.0


def test_guard_fires_at_the_earlier_of_timeout_and_deadline() -> None:
    assert guard_fire_at(10.0, 100.0, CFG) == 10.0 + guard_timeout(CFG)
    assert guard_fire_at(10.0, 10.5, CFG) == 10.5


def test_external_policy_needs_a_device() -> None:
    cfg = CFG.model_copy(update={"fence_policy": "external"})
    assert any("needs at least one entry" in p for p in validate_timing(cfg))
    assert validate_timing(cfg.model_copy(update={"fence_devices": DEV})) == []


def rec(outcome: str, attempts: int, at: float) -> FenceRecord:
    return FenceRecord(node="n1", lease_id="1", method="external", outcome=outcome,  # type: ignore[arg-type]
                       reason="boom", epoch=1, duration_s=0.1, fenced_at=at, attempts=attempts)


def test_self_policy_waits_for_the_window() -> None:
    assert fence_decision(CFG, "n1", 0.0, 1.0, 0.0, None).method is None
    assert fence_decision(CFG, "n1", 0.0, fence_window(CFG), 0.0, None).method == "self"


def test_external_policy_runs_after_the_revoke_grace_and_backs_off_after_failures() -> None:
    cfg = CFG.model_copy(update={"fence_policy": "external", "fence_devices": DEV,
                                 "fence_retry_initial_s": 1.0, "fence_retry_max_s": 4.0})
    # A drain by lease revoke registers again within the grace: no device yet.
    d = fence_decision(cfg, "n1", 0.0, cfg.revoke_grace_s - 0.01, 100.0, None)
    assert d.method is None and "waiting revoke_grace_s=3 s" in d.reason and d.device == "*"
    d = fence_decision(cfg, "n1", 0.0, cfg.revoke_grace_s, 100.0, None)
    assert d.method == "external" and d.device == "*"
    # Failed twice at wall time 100: next attempt after 2 s (1, 2, 4, 4, ...).
    assert fence_retry_delay(cfg, 2) == 2.0 and fence_retry_delay(cfg, 9) == 4.0
    d = fence_decision(cfg, "n1", 0.0, 50.0, 101.0, rec("failed", 2, 100.0))
    assert d.method is None and "failed 2 time(s)" in d.reason and "next attempt" in d.reason
    assert fence_decision(cfg, "n1", 0.0, 50.0, 102.0, rec("failed", 2, 100.0)).method == \
        "external"
    # Never self-fencing under "external", however long it waits.
    assert fence_decision(cfg, "n1", 0.0, 1e6, 101.0, rec("failed", 2, 100.0)).method is None


def test_external_policy_without_device_for_node_says_confirm_off() -> None:
    cfg = CFG.model_copy(update={"fence_policy": "external",
                                 "fence_devices": {"n2": FenceDevice(agent=["/bin/true"])}})
    d = fence_decision(cfg, "n1", 0.0, 100.0, 0.0, None)
    assert d.method is None and "vmha node confirm-off n1" in d.reason


def test_both_policy_falls_back_to_self_after_the_window() -> None:
    cfg = CFG.model_copy(update={"fence_policy": "both", "fence_devices": DEV})
    assert fence_decision(cfg, "n1", 0.0, 0.1, 0.0, None).method is None  # revoke grace
    assert fence_decision(cfg, "n1", 0.0, cfg.revoke_grace_s, 0.0, None).method == "external"
    d = fence_decision(cfg, "n1", 0.0, fence_window(cfg), 0.0, rec("failed", 3, 0.0))
    assert d.method == "self" and "self-fencing trusted" in d.reason


@pytest.mark.parametrize("policy", ["self", "external", "both"])
def test_a_node_that_left_after_a_drain_never_gets_a_fence_device(policy: str) -> None:
    """Its agent wrote a leave marker before revoking its lease: it runs nothing.  The
    self record follows the fence window, whatever the policy; no device is called."""
    cfg = CFG.model_copy(update={"fence_policy": policy, "fence_devices": DEV})
    for now in (0.0, cfg.revoke_grace_s, fence_window(cfg) - 0.01):
        d = fence_decision(cfg, "n1", 0.0, now, 0.0, None, left=True)
        assert d.method is None and d.reason.startswith("node left after a drain")
    d = fence_decision(cfg, "n1", 0.0, fence_window(cfg), 0.0, None, left=True)
    assert d.method == "self" and d.device == ""


def _decide(cfg: ClusterConfig, now: float, record: FenceRecord | None, left: bool,
            both_gone_at: float | None) -> FenceDecision:
    """Lost at 0 (monotonic) = wall time 100; both keys gone at `both_gone_at`."""
    lv = liveness_verdict(both_gone_at, now, cfg, "bounded")
    return fence_decision(cfg, "n1", 0.0, now, 100.0 + now, record, left=left, liveness=lv)


@pytest.mark.parametrize("policy", ["self", "external", "both"])
@pytest.mark.parametrize("record", [None, "failed"])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("both_gone_at", [None, 0.4])
def test_a_wait_says_when_time_alone_may_change_it(policy: str, record: str | None,
                                                   left: bool, both_gone_at: float | None
                                                   ) -> None:
    """The leader sleeps until `recheck_s` and skips planning before it
    (orchestrator.replan): so no decision may turn before it, and following the
    rechecks from any moment reaches the first moment the decision turns."""
    cfg = CFG.model_copy(update={"fence_policy": policy, "fence_devices": DEV,
                                 "fence_retry_initial_s": 1.0, "fence_retry_max_s": 4.0})
    r = rec("failed", 2, 101.0) if record else None
    step = 0.01
    grid = [i * step for i in range(int((fence_window(cfg) + 5.0) / step))]
    turns = next((t for t in grid if _decide(cfg, t, r, left, both_gone_at).method), None)
    for t in grid[::7]:
        d = _decide(cfg, t, r, left, both_gone_at)
        if d.method is not None:
            continue
        if d.recheck_s is None:  # only etcd can change it: it never turns by time
            assert turns is None or turns <= t, (t, d.reason)
            continue
        assert d.recheck_s > 0, (t, d)
        assert _decide(cfg, t + d.recheck_s * 0.999, r, left, both_gone_at).method is None
        u = t
        for _ in range(10):
            d = _decide(cfg, u, r, left, both_gone_at)
            if d.method is not None or d.recheck_s is None:
                break
            u += d.recheck_s
        if turns is None or turns < t:
            assert d.method is None, (t, u, d)
        else:
            assert d.method is not None and turns - step <= u <= turns + 1e-9, (t, u, turns)
