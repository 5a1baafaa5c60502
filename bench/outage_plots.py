"""The outage benchmark's PNG plots from a run's ``outage.json`` and ``raw/`` streams:
a ping RTT timeline and the VoIP stream's inter-arrival gaps across one graceful
failure (vmha vs raw libvirt, cf. the thesis's Figures 5.5 and 5.8), and the packets
lost per failure by stream."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.outage_streams import STREAMS, THESIS, aggregate

#: Both timelines: vmha (lease revoke) in red against raw libvirt in blue.
PHASES = (("vmha", "revoke", "tab:red"), ("raw", None, "tab:blue"))
#: One phase's drawing on a timeline: axes, trial, probe stream, label, colour.
Draw = Callable[[Any, dict[str, Any], dict[str, Any], str, str], None]


def _rtt(ax: Any, t: dict[str, Any], probe: dict[str, Any], label: str, colour: str) -> None:
    sent = probe["sent"]
    got = {s: a for s, a, _c in probe["answers"] if s < len(sent)}
    xs = [sent[s] - t["t_fail"] for s in sorted(got)]
    ys = [(got[s] - sent[s]) * 1000 for s in sorted(got)]
    lost = [sent[s] - t["t_fail"] for s in range(len(sent)) if s not in got]
    ax.plot(xs, ys, ".", ms=2, color=colour, label=f"{label}: RTT")
    ax.plot(lost, [0] * len(lost), "x", color=colour, ms=5, label=f"{label}: lost ({len(lost)})")


def _gaps(ax: Any, t: dict[str, Any], probe: dict[str, Any], label: str, colour: str) -> None:
    arr = sorted(a for _s, a, _c in probe["answers"])
    xs = [b - t["t_fail"] for b in arr[1:]]
    ys = [(b - a) * 1000 for a, b in zip(arr, arr[1:], strict=False)]
    ax.plot(xs, ys, "-", lw=0.8, color=colour, label=label, drawstyle="steps-pre")


class Plots:
    def __init__(self, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.out = out
        self.trials: list[dict[str, Any]] = json.loads((out / "outage.json").read_text())[
            "trials"]

    def probe_of(self, phase: str, stream: str,
                 kind: str | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The first trial of that phase (and kind) on that stream, with its probe file."""
        for t in self.trials:
            if t["phase"] != phase or t["stream"] != stream or (kind and t["kind"] != kind):
                continue
            path = self.out / "raw" / str(t.get("probe_file"))
            if path.is_file():
                return t, json.loads(path.read_text())
        return None

    def save(self, fig: Any, ax: Any, name: str, ylabel: str, title: str) -> Path:
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = self.out / name
        fig.savefig(path, dpi=120)
        self.plt.close(fig)
        return path

    def timeline(self, stream: str, draw: Draw, name: str, ylabel: str, title: str) -> Path:
        fig, ax = self.plt.subplots(figsize=(9, 4))
        for phase, kind, colour in PHASES:
            found = self.probe_of(phase, stream, kind)
            if found:
                label = "vmha (lease revoke)" if phase == "vmha" else "raw libvirt migration"
                draw(ax, *found, label, colour)
        ax.axvline(0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("time since failure / migration start (s)")
        return self.save(fig, ax, name, ylabel, title)

    def loss_per_rate(self) -> Path:
        agg = aggregate(self.trials)
        fig, ax = self.plt.subplots(figsize=(9, 4.5))
        groups = [("raw", "raw libvirt"), ("revoke", "vmha revoke"),
                  ("sigterm", "vmha SIGTERM"), ("thesis", "thesis add-on"), ("xm", "thesis xm")]
        width = 0.16
        for gi, (g, label) in enumerate(groups):
            xs, ys, es = [], [], []
            for si, s in enumerate(STREAMS):
                if g in ("thesis", "xm"):
                    v = THESIS[s.key]["addon" if g == "thesis" else "xm"]
                    if v is None:
                        continue
                    m, sd = float(v[0]), float(v[1])
                else:
                    r = agg.get(s.key, {}).get(g)
                    if not r or r["lost"] is None:
                        continue
                    m, sd = r["lost"]
                xs.append(si + (gi - 2) * width)
                ys.append(max(m, 0.1))
                es.append(sd)
            if xs:
                ax.bar(xs, ys, width, yerr=es, label=label, capsize=2)
        ax.set_yscale("log")
        ax.set_xticks(range(len(STREAMS)), [s.label for s in STREAMS], fontsize=7)
        return self.save(fig, ax, "loss_per_rate.png", "packets lost per failure (log)",
                         "Packets lost per graceful failure, by stream")


def write_plots(out: Path) -> list[Path]:
    p = Plots(out)
    return [p.timeline("icmp100", _rtt, "rtt_timeline.png", "ICMP round-trip time (ms)",
                       "Ping at 100/s across one graceful failure (cf. thesis Figure 5.5)"),
            p.timeline("voip50", _gaps, "interarrival.png", "inter-arrival gap (ms)",
                       "VoIP-like stream (50 pps, 160 B): inter-arrival gaps "
                       "(cf. thesis Figure 5.8)"),
            p.loss_per_rate()]
