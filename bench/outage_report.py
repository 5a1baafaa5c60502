"""``outage.md`` and ``outage-summary.json`` from a run's ``outage.json``: the outage per
graceful failure next to raw libvirt's and the 2006 thesis's numbers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench.common import md_table
from bench.outage_streams import (
    STREAMS,
    THESIS,
    THESIS_REPAIR_S,
    Stream,
    aggregate,
    fmt,
    mean_sd,
    thesis_cell,
)

INTRO = (
    "Losses are per failure (mean ± sd over the trials, n in brackets); the implied "
    "outage is lost packets × packet gap, the thesis's method. `raw` = the same guest "
    "migrated directly with libvirt (peer-to-peer, no vmha) in the same run. Thesis: "
    "Table 5.2 (UDP, 50 runs each; add-on = Heartbeat with the thesis's add-on, "
    "xm = `xm migrate` by hand), Table 5.4 (one VoIP stream), §5.3 (ping at 100/s).")
TIMINGS_HEADER = (
    "stream", "implied outage raw", "implied outage vmha", "vmha/raw", "libvirt downtime raw",
    "vmha status downtime_ms", "largest loss burst raw", "largest loss burst vmha",
    "longest silence raw", "longest silence vmha",
    "raw: migration start → running elsewhere (s)", "vmha: failure → running elsewhere (s)",
    "failure → node drained (s)", "thesis implied outage")


def _cell(r: dict[str, Any] | None, key: str, digits: int = 0) -> str:
    return fmt(r[key], digits) if r else "-"


def _losses(agg: dict[str, dict[str, Any]]) -> list[str]:
    def lost(row: dict[str, Any], g: str) -> str:
        r = row.get(g)
        return f"{fmt(r['lost'], 1)} [{r['n']}]" if r else "-"

    rows = [[s.label, *(lost(agg.get(s.key, {}), g)
                        for g in ("reference", "raw", "revoke", "sigterm")),
             *(thesis_cell(s.key, c) for c in ("addon", "xm", "reference"))] for s in STREAMS]
    return md_table(("stream", "reference (no failure)", "raw libvirt", "vmha lease revoke",
                     "vmha SIGTERM", "thesis add-on", "thesis xm", "thesis reference"), rows)


def _timing_row(s: Stream, row: dict[str, Any]) -> list[str]:
    raw, vm = row.get("raw"), row.get("vmha")
    ratio = "-"
    if raw and vm and raw["implied_ms"] and vm["implied_ms"] and raw["implied_ms"][0] > 0:
        ratio = f"{vm['implied_ms'][0] / raw['implied_ms'][0]:.2f}"
    th = THESIS[s.key]["addon"]
    return [s.label, _cell(raw, "implied_ms"), _cell(vm, "implied_ms"), ratio,
            _cell(raw, "downtime_ms"), _cell(vm, "downtime_ms"), _cell(raw, "burst_ms"),
            _cell(vm, "burst_ms"), _cell(raw, "silence_ms"), _cell(vm, "silence_ms"),
            _cell(raw, "running_s", 2), _cell(vm, "running_s", 2), _cell(vm, "repaired_s", 2),
            f"{th[0] / s.pps * 1000:.0f}" if th else "-"]


def _verdict(all_raw: list[dict[str, Any]],
             all_vm: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """Outage per failure, in time, from the finest streams (>= 100 pps)."""
    fine = {"udp100", "udp1000", "icmp100"}
    raw_imp = [t["probe"]["implied_outage_ms"] for t in all_raw if t["stream"] in fine]
    vm_imp = [t["probe"]["implied_outage_ms"] for t in all_vm if t["stream"] in fine]
    raw_down = [float(t["downtime_ms"]) for t in all_raw if t.get("downtime_ms") is not None]
    if not (raw_imp and vm_imp):
        return {}, []
    raw_mean = statistics.fmean(raw_imp)
    summary: dict[str, Any] = {
        "raw_implied_ms": mean_sd(raw_imp), "vmha_implied_ms": mean_sd(vm_imp),
        "raw_libvirt_downtime_ms": mean_sd(raw_down),
        "ratio_vmha_to_raw_implied": statistics.fmean(vm_imp) / raw_mean if raw_mean else None,
        "ratio_vmha_to_raw_downtime": statistics.fmean(vm_imp) / statistics.fmean(raw_down)
        if raw_down else None}
    text = (
        f"Pooled over the streams at ≥ 100 pps: implied outage per graceful failure "
        f"{fmt(summary['raw_implied_ms'])} ms with raw libvirt "
        f"(libvirt's own downtime {fmt(summary['raw_libvirt_downtime_ms'])} ms), "
        f"{fmt(summary['vmha_implied_ms'])} ms through vmha: ratio "
        f"{summary['ratio_vmha_to_raw_implied']:.2f} against the raw migration's "
        "measured outage"
        + (f", {summary['ratio_vmha_to_raw_downtime']:.2f} against raw QEMU downtime"
           if summary.get("ratio_vmha_to_raw_downtime") else "")
        + ". Within 1.2x of raw: "
        + ("yes" if (summary.get("ratio_vmha_to_raw_downtime") or 99) <= 1.2 else "no")
        + f". The thesis puts the whole repair at about {THESIS_REPAIR_S:.0f} s; here the "
        "failure → node drained column is that time.")
    return summary, ["## Verdict", "", text, ""]


def _graceful(trials: list[dict[str, Any]], all_vm: list[dict[str, Any]]) -> list[str]:
    live = [t for t in all_vm if (t.get("migration") or {}).get("source") == t.get("src")
            and (t.get("migration") or {}).get("target") == t.get("dst")]
    return [f"Graceful failures through vmha: {len(all_vm)}, of which {len(live)} "
            "ended in a live migration recorded in the VM's status (the rest: "
            "cold boot or no statistics). Reference streams lost "
            + ", ".join(f"{t['probe']['lost']}/{t['probe']['sent']} ({t['stream']})"
                        for t in trials if t["phase"] == "reference") + ".", ""]


def _crashes(out: Path, crashes: list[dict[str, Any]]) -> list[str]:
    rows = []
    for i, t in enumerate(crashes):
        path = out / "raw" / str(t.get("probe_file"))
        if path.is_file() and t.get("running_s") is not None:
            back = t["t_fail"] + t["running_s"]
            arrivals = sorted(a for _s, a, _c in json.loads(path.read_text())["answers"]
                              if a > back)
            t["answer_s"] = round(arrivals[0] - t["t_fail"], 3) if arrivals else None
        rows.append([i + 1, t.get("running_s"), t.get("answer_s"),
                     t["probe"]["lost"] if "probe" in t else "-"])
    return ["## Uncontrolled failure (crash of the guest's node)", "",
            "Agent (and its guard) kill -9, libvirtd and QEMU SIGKILLed; the guest "
            "is cold-booted on the other node after the lease expired and the fence "
            "margin passed. The thesis did not measure this case.", "",
            *md_table(("trial", "running elsewhere (s)", "answers pings again (s)",
                       "pings lost"), rows), ""]


def write_report(out: Path) -> Path:
    data = json.loads((out / "outage.json").read_text())
    trials: list[dict[str, Any]] = data["trials"]
    meta = data["meta"]
    agg = aggregate(trials)
    lines = ["# Outage per graceful failure: vmha on the lab vs. raw libvirt vs. the 2006 thesis",
             "",
             f"Run {meta.get('started')} – {meta.get('finished')} ({meta.get('duration_s')} s), "
             f"{meta.get('cpus')} CPUs; guest: Debian kernel + busybox initramfs, "
             f"{meta.get('memory_mib')} MiB, QEMU TCG, virtio NIC on a bridge in a private "
             "network namespace; two lab nodes, vmha agents + 2 orchestrators, lab timing "
             f"config (lease TTL {meta.get('config', {}).get('lease_ttl_s')} s). " + INTRO,
             "", "## Packets lost per failure", "", *_losses(agg), "",
             "## Outage and timings (ms, s)", "",
             *md_table(TIMINGS_HEADER, [_timing_row(s, agg.get(s.key, {})) for s in STREAMS]),
             ""]
    all_raw = [t for t in trials if t["phase"] == "raw" and "probe" in t]
    all_vm = [t for t in trials if t["phase"] == "vmha" and "probe" in t]
    summary, verdict = _verdict(all_raw, all_vm)
    lines += verdict
    if all_vm:
        lines += _graceful(trials, all_vm)
    crashes = [t for t in trials if t["phase"] == "crash"]
    if crashes:
        lines += _crashes(out, crashes)
    lines += ["Plots: `rtt_timeline.png`, `interarrival.png`, `loss_per_rate.png`. "
              "Every trial in `outage.json`, every probe stream in `raw/`.", ""]
    report = out / "outage.md"
    report.write_text("\n".join(lines))
    (out / "outage-summary.json").write_text(json.dumps({"aggregate": agg, "summary": summary},
                                                        indent=1))
    return report
