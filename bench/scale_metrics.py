"""What `bench.scale` measures, without a request to etcd's gRPC port (so the bench
itself adds nothing to the numbers it reports): etcd's `/metrics` of every member,
the CPU time of each process from /proc, the box's CPU time from /proc/stat, and the
leader's cycle file (`bench.scale_procs`)."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import pct

#: The gRPC counters read by method (summed over members and codes).
GRPC = ("grpc_server_started_total", "grpc_server_handled_total",
        "grpc_server_msg_received_total", "grpc_server_msg_sent_total")
_LINE = re.compile(r'^(\w+)(?:\{([^}]*)\})? (\S+)$')
_METHOD = re.compile(r'grpc_method="([^"]+)"')
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Scrape:
    """One reading of every member's /metrics, summed over members."""

    at: float
    sent_bytes: float = 0.0
    received_bytes: float = 0.0
    by_method: dict[str, dict[str, float]] = field(default_factory=dict)

    def count(self, metric: str, method: str) -> float:
        return self.by_method.get(metric, {}).get(method, 0.0)


def scrape(endpoints: Iterable[str]) -> Scrape:
    out = Scrape(time.time())
    for ep in endpoints:
        with urllib.request.urlopen(f"http://{ep}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            m = _LINE.match(line)
            if m is None:
                continue
            name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
            if name == "etcd_network_client_grpc_sent_bytes_total":
                out.sent_bytes += value
            elif name == "etcd_network_client_grpc_received_bytes_total":
                out.received_bytes += value
            elif name in GRPC:
                mm = _METHOD.search(labels)
                if mm:
                    per = out.by_method.setdefault(name, {})
                    per[mm.group(1)] = per.get(mm.group(1), 0.0) + value
    return out


def diff(a: Scrape, b: Scrape) -> dict[str, Any]:
    """What etcd did between two readings: bytes sent and received, and requests (unary
    calls and stream messages received) and messages sent, by method."""
    req = {m: int(b.count("grpc_server_msg_received_total", m)
                  - a.count("grpc_server_msg_received_total", m))
           for m in b.by_method.get("grpc_server_msg_received_total", {})}
    sent = {m: int(b.count("grpc_server_msg_sent_total", m)
                   - a.count("grpc_server_msg_sent_total", m))
            for m in b.by_method.get("grpc_server_msg_sent_total", {})}
    return {"seconds": round(b.at - a.at, 3), "sent_bytes": int(b.sent_bytes - a.sent_bytes),
            "received_bytes": int(b.received_bytes - a.received_bytes),
            "requests": {k: v for k, v in sorted(req.items()) if v},
            "messages_sent": {k: v for k, v in sorted(sent.items()) if v}}


def net_of_keepalives(phase: Mapping[str, Any], bytes_per_keepalive: float) -> int:
    """A phase's bytes less its lease keepalives at the idle phase's bytes per keepalive
    answer (at 1,000 nodes the keepalives of a 15 s phase outweigh a crash many times:
    subtracting a rate would leave its noise; subtracting by count leaves the event)."""
    ka = phase["messages_sent"].get("LeaseKeepAlive", 0)
    return int(phase["sent_bytes"] - ka * bytes_per_keepalive)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def box_cpu_seconds() -> float:
    """Busy CPU time of the whole box (every process, every core) from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / _TICK


class CpuMeter:
    """CPU seconds per second of named groups of processes over a phase, and of the
    rest of the box (the machine is shared: other load counts against us)."""

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        self.groups = {k: list(v) for k, v in groups.items()}
        self._t = time.monotonic()
        self._box = box_cpu_seconds()
        self._cpu = {k: sum(cpu_seconds(p) for p in v) for k, v in self.groups.items()}
        self._self = cpu_seconds(os.getpid())

    def read(self) -> dict[str, Any]:
        dt = max(time.monotonic() - self._t, 1e-6)
        out: dict[str, Any] = {}
        ours = 0.0
        for k, pids in self.groups.items():
            used = sum(cpu_seconds(p) for p in pids) - self._cpu[k]
            ours += used
            out[k] = round(used / dt, 3)
        me = cpu_seconds(os.getpid()) - self._self
        out["bench"] = round(me / dt, 3)
        box = box_cpu_seconds() - self._box
        out["other_processes"] = round(max(0.0, box - ours - me) / dt, 3)
        out["box"] = round(box / dt, 3)
        out["loadavg_1m"] = round(os.getloadavg()[0], 2)
        return out


def leader_metric(listen: str, name: str, labels: str = "") -> float | None:
    """One sample of the leader's /metrics (e.g. `vmha_vms`, `state="running"`)."""
    try:
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def cycles(path: Path, since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
    """The leader's cycles between two wall times: how many, p50/p99/max seconds."""
    xs: list[float] = []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and since <= float(parts[0]) <= until:
                xs.append(float(parts[1]))
    return {"cycles": len(xs), "p50_s": pct(xs, 50), "p99_s": pct(xs, 99),
            "max_s": round(max(xs), 3) if xs else None}


__all__ = ["CpuMeter", "Scrape", "cpu_seconds", "cycles", "diff", "leader_metric",
           "net_of_keepalives", "scrape"]
