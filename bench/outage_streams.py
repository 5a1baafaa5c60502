"""The outage benchmark's probe streams, the thesis's numbers, and the analysis of a
probe stream and of many trials (pure: no lab, no files)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

#: What the thesis measured per graceful failure: packets lost, mean and sd
#: (Table 5.2: Heartbeat add-on, and `xm migrate` by hand; Table 5.4: one VoIP stream;
#: §5.3: 10 to 20 pings lost at 100/s).
THESIS: dict[str, dict[str, Any]] = {
    "udp10": {"addon": (2, 4), "xm": (5, 8), "reference": (0, 0)},
    "udp100": {"addon": (55, 13), "xm": (15, 5), "reference": (4, 4)},
    "udp1000": {"addon": (1071, 91), "xm": (578, 81), "reference": (177, 90)},
    "voip50": {"addon": (13, 5), "xm": None, "reference": (0, 0)},
    "icmp100": {"addon": (15, 5), "xm": None, "reference": None, "range": "10-20"},
}
THESIS_REPAIR_S = 15.0


@dataclass(frozen=True)
class Stream:
    key: str
    mode: str  # udp | icmp
    pps: float
    size: int
    label: str


STREAMS: tuple[Stream, ...] = (
    Stream("udp10", "udp", 10, 16, "UDP 10 pps"),
    Stream("udp100", "udp", 100, 16, "UDP 100 pps"),
    Stream("udp1000", "udp", 1000, 16, "UDP 1000 pps"),
    Stream("voip50", "udp", 50, 160, "VoIP-like 50 pps, 160 B"),
    Stream("icmp100", "icmp", 100, 56, "ICMP echo 100/s"),
)
STREAM_BY_KEY = {s.key: s for s in STREAMS}


def summarize(probe: dict[str, Any], t_fail: float | None) -> dict[str, Any]:
    """Loss, bursts, silences and RTTs of one probe stream (times relative to t_fail)."""
    sent: list[float] = probe["sent"]
    n = len(sent)
    pps = float(probe["pps"])
    got: dict[int, float] = {}
    for seq, t, _count in probe["answers"]:
        if 0 <= seq < n and seq not in got:
            got[seq] = t
    lost_seqs = [i for i in range(n) if i not in got]
    bursts: list[list[int]] = []
    for s in lost_seqs:
        if bursts and bursts[-1][1] == s - 1:
            bursts[-1][1] = s
        else:
            bursts.append([s, s])
    zero = t_fail if t_fail is not None else (sent[0] if sent else 0.0)
    answered = sorted(got.items())
    silence_ms = 0.0
    silence_at: float | None = None
    for (_s1, t1), (_s2, t2) in zip(answered, answered[1:], strict=False):
        if (t2 - t1) * 1000 > silence_ms:
            silence_ms = (t2 - t1) * 1000
            silence_at = t1 - zero
    rtts = [(got[s] - sent[s]) * 1000 for s in got]
    guest = probe.get("guest_count")
    biggest = max(bursts, key=lambda b: b[1] - b[0], default=None)
    return {
        "sent": n,
        "answered": len(got),
        "lost": len(lost_seqs),
        "lost_to_guest": (n - guest) if guest is not None else None,
        "lost_from_guest": (guest - len(got)) if guest is not None else None,
        "implied_outage_ms": len(lost_seqs) / pps * 1000,
        "bursts": len(bursts),
        "largest_burst": (biggest[1] - biggest[0] + 1) if biggest else 0,
        "largest_burst_at_s": (sent[biggest[0]] - zero) if biggest else None,
        "longest_silence_ms": silence_ms,
        "longest_silence_at_s": silence_at,
        "rtt_median_ms": statistics.median(rtts) if rtts else None,
        "rtt_max_ms": max(rtts) if rtts else None,
    }


def mean_sd(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(ms: tuple[float, float] | None, digits: int = 0) -> str:
    """``mean ± sd``, or ``-``."""
    if ms is None:
        return "-"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def thesis_cell(key: str, col: str) -> str:
    v = THESIS[key].get(col)
    if v is None:
        return "-"
    if key == "icmp100" and col == "addon":
        return "10–20"
    return f"{v[0]} ± {v[1]}"


def _groups(trials: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {
        "reference": [t for t in trials if t["phase"] == "reference"],
        "raw": [t for t in trials if t["phase"] == "raw"],
        "revoke": [t for t in trials if t["phase"] == "vmha" and t["kind"] == "revoke"],
        "sigterm": [t for t in trials if t["phase"] == "vmha" and t["kind"] == "sigterm"],
        "vmha": [t for t in trials if t["phase"] == "vmha"],
    }


def _group_stats(stream: Stream, ts: list[dict[str, Any]]) -> dict[str, Any]:
    def vals(key: str) -> list[float]:
        return [float(t["probe"][key]) for t in ts if t["probe"].get(key) is not None]

    def tvals(key: str) -> list[float]:
        return [float(t[key]) for t in ts if t.get(key) is not None]

    bursts = [t["probe"]["largest_burst"] / stream.pps * 1000 for t in ts]
    return {"n": len(ts), "lost": mean_sd(vals("lost")), "burst_ms": mean_sd(bursts),
            "lost_to_guest": mean_sd(vals("lost_to_guest")),
            "implied_ms": mean_sd(vals("implied_outage_ms")),
            "silence_ms": mean_sd(vals("longest_silence_ms")),
            "downtime_ms": mean_sd(tvals("downtime_ms")),
            "running_s": mean_sd(tvals("running_s")),
            "repaired_s": mean_sd(tvals("repaired_s")),
            "call_s": mean_sd(tvals("call_s"))}


def aggregate(trials: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stream and group (raw, revoke, sigterm, vmha = both): statistics."""
    out: dict[str, dict[str, Any]] = {}
    groups = _groups(trials)
    for stream in STREAMS:
        row: dict[str, Any] = {}
        for g, ts in groups.items():
            mine = [t for t in ts if t["stream"] == stream.key and "probe" in t]
            if mine:
                row[g] = _group_stats(stream, mine)
        out[stream.key] = row
    return out
