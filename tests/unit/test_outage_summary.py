"""The outage bench's probe-stream analysis (pure; no lab needed)."""

from __future__ import annotations

from bench.outage import aggregate, summarize


def _stream(pps: float, n: int, lost: set[int], guest_missed: set[int]) -> dict[str, object]:
    gap = 1.0 / pps
    sent = [100.0 + i * gap for i in range(n)]
    answers = []
    count = 0
    for i in range(n):
        if i in guest_missed:
            continue
        count += 1
        if i not in lost:
            answers.append((i, sent[i] + 0.001, count))
    return {"pps": pps, "sent": sent, "answers": answers, "guest_count": count}


def test_one_burst_split_by_direction() -> None:
    probe = _stream(100, 300, lost={150, 151, 152, 153, 160}, guest_missed={150, 151, 152})
    s = summarize(probe, t_fail=101.0)
    assert s["sent"] == 300 and s["answered"] == 295 and s["lost"] == 5
    assert s["lost_to_guest"] == 3 and s["lost_from_guest"] == 2
    assert s["implied_outage_ms"] == 50.0
    assert s["bursts"] == 2 and s["largest_burst"] == 4
    assert abs(s["largest_burst_at_s"] - 0.5) < 1e-9
    assert abs(s["longest_silence_ms"] - 50.0) < 1e-6


def test_aggregate_groups_by_phase_and_kind() -> None:
    trials = []
    for kind, lost in (("revoke", {10, 11}), ("sigterm", {10, 11, 12, 13})):
        probe = _stream(10, 50, lost=lost, guest_missed=set())
        trials.append({"phase": "vmha", "kind": kind, "stream": "udp10",
                       "probe": summarize(probe, 100.0), "downtime_ms": 100.0})
    agg = aggregate(trials)
    assert agg["udp10"]["revoke"]["lost"] == (2.0, 0.0)
    assert agg["udp10"]["sigterm"]["lost"] == (4.0, 0.0)
    assert agg["udp10"]["vmha"]["n"] == 2 and agg["udp10"]["vmha"]["lost"][0] == 3.0
