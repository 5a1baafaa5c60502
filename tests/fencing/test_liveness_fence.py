"""Keyspace 2's liveness fencing rules (fencing.liveness_fence): the version probe's
decision, the windows, and how they combine with the fence policy."""

from __future__ import annotations

import pytest

from fencing.liveness_fence import (
    liveness_verdict,
    liveness_window,
    resolve_mode,
    track_both_gone,
    version_fixed,
)
from fencing.policy import fence_decision, fence_window
from schemas.models import ClusterConfig

# The test suite's timing (lab.configs.FAST_CONFIG): guard timeout 2.2 s.
TEST = ClusterConfig(lease_ttl_s=3, keepalive_interval_s=0.3, keepalive_timeout_s=0.25,
                     etcd_election_timeout_s=0.5, self_fence_safety_s=0.5, fence_margin_s=1.0)


@pytest.mark.parametrize(("version", "fixed"), [
    ("3.4.23", False), ("3.4.27", False), ("3.4.28", True), ("3.4.35", True),
    ("3.5.10", False), ("3.5.11", True), ("3.5.17", True),
    ("3.6.0", True), ("3.6.5", True), ("3.7.1", True), ("4.0.0", True),
    ("3.3.27", False), ("3.2.32", False), ("v3.5.11", True), ("3.6.0-rc.1", True),
    ("", False), (None, False), ("banana", False),
])
def test_which_etcd_versions_revoke_no_lease_after_a_stall(version: str | None,
                                                             fixed: bool) -> None:
    assert version_fixed(version) is fixed


def test_auto_is_fast_only_when_every_member_is_fixed() -> None:
    fixed = {"a:2379": "3.5.11", "b:2379": "3.6.1", "c:2379": "3.4.28"}
    assert resolve_mode("auto", fixed).mode == "fast"
    one_old = {**fixed, "c:2379": "3.4.23"}
    choice = resolve_mode("auto", one_old)
    assert choice.mode == "bounded" and "c:2379 (3.4.23)" in choice.why
    silent = {**fixed, "b:2379": None}
    choice = resolve_mode("auto", silent)
    assert choice.mode == "bounded" and "b:2379 (no answer)" in choice.why
    assert resolve_mode("auto", {}).mode == "bounded"


@pytest.mark.parametrize("setting", ["fast", "bounded", "off"])
def test_a_mode_set_in_the_config_ignores_the_versions(setting: str) -> None:
    assert resolve_mode(setting, {"a:2379": "3.4.23"}).mode == setting
    assert resolve_mode(setting, {"a:2379": "3.6.0"}).mode == setting


def test_windows_of_the_test_config() -> None:
    assert liveness_window(TEST, "fast") == pytest.approx(1.0)
    # min(2 x 0.25 + 2.2, 3 - 0.5) + 1.0: the guard's pet deadline bounds it.
    assert liveness_window(TEST, "bounded") == pytest.approx(3.5)
    assert liveness_window(TEST, "off") is None
    no_guard = TEST.model_copy(update={"guard_enabled": False})
    assert liveness_window(no_guard, "bounded") == pytest.approx(3.5)
    # Every liveness window is shorter than keyspace 1's, which it replaces only when
    # shorter (fence_decision takes the earlier verdict).
    assert fence_window(TEST) == pytest.approx(6.2)


def test_windows_of_the_defaults() -> None:
    cfg = ClusterConfig()
    assert liveness_window(cfg, "fast") == pytest.approx(2.0)
    assert liveness_window(cfg, "bounded") == pytest.approx(min(1.0 + 4.5, 5.0) + 2.0)


def test_the_window_counts_from_both_keys_gone_and_names_the_mode() -> None:
    assert liveness_verdict(None, 100.0, TEST, "fast") is None
    assert liveness_verdict(10.0, 100.0, TEST, "off") is None
    waiting = liveness_verdict(10.0, 12.0, TEST, "bounded")
    assert waiting is not None and not waiting.fenced
    assert waiting.remaining_s == pytest.approx(1.5)
    done = liveness_verdict(10.0, 13.5, TEST, "bounded")
    assert done is not None and done.fenced
    assert "liveness fence bounded" in done.reason and "window 3.50 s" in done.reason


def test_both_gone_is_tracked_from_the_first_observation() -> None:
    lost = {"a": 1.0, "b": 1.0, "c": 2.0}
    first = track_both_gone(lost, {"b": object()}, {}, 5.0)
    assert first == {"a": 5.0, "c": 5.0}
    later = track_both_gone({"a": 1.0, "b": 1.0}, {}, first, 7.0)
    assert later == {"a": 5.0, "b": 7.0}  # c came back: forgotten


def test_fence_decision_takes_the_liveness_verdict_only_where_self_fencing_counts() -> None:
    lv = liveness_verdict(0.0, 3.6, TEST, "bounded")
    d = fence_decision(TEST, "n1", 0.0, 3.6, 1e9, None, liveness=lv)
    assert d.method == "self" and "liveness fence bounded" in d.reason
    # Without the liveness verdict keyspace 1's window still waits.
    assert fence_decision(TEST, "n1", 0.0, 3.6, 1e9, None).method is None
    # external never trusts self-fencing: the device is called, not the record written.
    ext = TEST.model_copy(update={"fence_policy": "external", "fence_devices": {
        "*": {"agent": ["fence_vmha"]}}})
    assert fence_decision(ext, "n1", 0.0, 3.6, 1e9, None, liveness=lv).method == "external"
    # A waiting liveness verdict never delays keyspace 1's window.
    early = liveness_verdict(6.0, 6.5, TEST, "bounded")
    assert fence_decision(TEST, "n1", 0.0, 6.5, 1e9, None, liveness=early).method == "self"
