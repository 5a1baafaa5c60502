"""`vmha bench outage`: the 2006 thesis's chapter 5 measurements, repeated on the lab.

One command (root) that

1. makes a network namespace of its own (``ip netns add``) with a Linux bridge and no
   uplink, and runs itself again inside it: etcd, the lab's libvirtd daemons (so the
   guests' taps land on that bridge and migrations use the namespace's loopback),
   vmha's agents and orchestrators, and the probe sender all live there; probes go
   only to the guest's address inside it;
2. boots a network-reachable kernel guest (:mod:`lab.netguest`) on two lab
   nodes and measures, with paced probe streams (:mod:`bench.outageprobe`):

   * a reference stream per rate (no failure);
   * the raw-libvirt baseline: the same guest live-migrated directly with libvirt
     (peer-to-peer, no vmha), N times per rate;
   * vmha's graceful failures, N per rate and per kind, as an operator causes them:
     ``etcdctl lease revoke`` of the guest's node, and SIGTERM of its agent (what
     ``systemctl stop`` sends).  After each one the node is uncordoned (and, after a
     SIGTERM, its agent started again), so the guest moves back and forth;
   * an uncontrolled failure: the guest's node crashes (agent, guard, libvirtd and
     QEMU SIGKILLed); the guest answers again once it has cold-booted elsewhere;

3. writes ``outage.md`` (tables next to the thesis's numbers), ``outage.json``
   (every trial), ``raw/*.json`` (every probe stream) and PNG plots to ``--out``.

Rates as in the thesis: UDP at 10, 100 and 1000 pps (Table 5.2), one G.711-like VoIP
stream of 160-byte datagrams at 50 pps (Table 5.4), ICMP echo at 100/s (Figure 5.5).
The thesis streamed 45 s per trial; here a stream starts shortly before the failure and
ends once the node is drained, which counts the same losses in less time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
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

VM = "bench0"
NODES = ("n1", "n2")
PRE_ROLL_S = 1.5
POST_ROLL_S = 1.0


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- probe stream analysis ------------------------------------------------------------------


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


class ProbeRun:
    """One probe stream in its own process."""

    def __init__(self, stream: Stream, target: str, out: Path, max_seconds: float = 120.0):
        self.stream = stream
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.outageprobe", "--mode", stream.mode,
             "--target", target, "--pps", str(stream.pps), "--size", str(stream.size),
             "--max-seconds", str(max_seconds), "--out", str(out)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "ready"

    def finish(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return dict(json.loads(self.out.read_text()))


# ---- the campaign (runs inside the namespace) -----------------------------------------------


class Campaign:
    def __init__(self, args: argparse.Namespace, netns: str) -> None:
        from lab.netguest import GuestNet

        self.args = args
        self.out = Path(args.out).resolve()
        self.raw_dir = self.out / "raw"
        self.net = GuestNet(netns)
        self.trials: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.started = time.monotonic()
        self.deadline = self.started + float(args.max_minutes) * 60

    # -- helpers --

    def _vmha(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmha", *self.lc.common(), *argv],
                              capture_output=True, text=True, check=False, timeout=60)

    def _save(self) -> None:
        data = {"meta": self.meta, "trials": self.trials}
        tmp = self.out / "outage.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.out / "outage.json")

    def _probe(self, stream: Stream, tag: str, max_seconds: float = 120.0) -> ProbeRun:
        return ProbeRun(stream, self.net.guest_ip, self.raw_dir / f"{tag}.json", max_seconds)

    def _where(self) -> list[str]:
        return self.lc.ground_truth().get(VM, [])

    def _only_node(self) -> str:
        """The one node the guest runs on; a clear error if it runs nowhere (or twice)."""
        nodes = self._where()
        if len(nodes) != 1:
            console = self.out / "logs" / f"{VM}.console.log"
            raise RuntimeError(f"the guest runs on {nodes or 'no node'}; its console "
                               f"(a guest kernel panic?) is in {console}")
        return nodes[0]

    def _wait(self, pred: Any, timeout: float, what: str, interval: float = 0.01) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return time.monotonic()
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}")

    def _answers(self, timeout: float) -> float:
        """Wait until the guest answers a UDP probe; return when it did."""
        import socket
        import struct

        from lab.netguest import ECHO_PORT, PROBE_MAGIC

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(0.3)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    sock.sendto(struct.pack("!IIII", PROBE_MAGIC, 1, 0, 0),
                                (self.net.guest_ip, ECHO_PORT))
                    sock.recv(64)
                    return time.monotonic()
                except OSError:
                    time.sleep(0.05)
        finally:
            sock.close()
        raise TimeoutError(f"guest {self.net.guest_ip} did not answer within {timeout} s")

    def _status(self) -> dict[str, Any] | None:
        from schemas import Keyspace

        kv = self.store.get(Keyspace(self.lc.prefix).vm_status(VM))
        return dict(json.loads(kv.value)) if kv else None

    def _record(self, trial: dict[str, Any], run: ProbeRun, probe: dict[str, Any]) -> None:
        trial["probe"] = summarize(probe, trial.get("t_fail"))
        trial["probe_file"] = run.out.name
        self.trials.append(trial)
        self._save()
        p = trial.get("probe", {})
        _log(f"{trial['phase']:9} {trial['kind']:8} {trial['stream']:8} "
             f"{trial.get('src', '-')}->{trial.get('dst', '-')}: lost {p.get('lost')}/"
             f"{p.get('sent')} (to guest {p.get('lost_to_guest')}), silence "
             f"{p.get('longest_silence_ms', 0):.0f} ms, running {trial.get('running_s')}, "
             f"repaired {trial.get('repaired_s')}, downtime {trial.get('downtime_ms')}")

    # -- phases --

    def start_lab(self) -> None:
        from lab.cluster import LAB_CONFIG, LabCluster
        from store.etcd import EtcdStore

        self.root = Path(tempfile.mkdtemp(prefix="vmhab-", dir="/tmp"))
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.lc = LabCluster(self.root / "lab", logs, node_names=NODES)
        self.lc.start(LAB_CONFIG.to_json(), orchestrators=2)
        self.store = EtcdStore(self.lc.endpoints)
        self.meta["config"] = json.loads(LAB_CONFIG.to_json())

    def stop_lab(self) -> None:
        with contextlib.suppress(Exception):
            self.store.close()
        with contextlib.suppress(Exception):
            self.lc.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def guest_xml(self) -> str:
        from lab.netguest import net_guest_xml

        return net_guest_xml(VM, self.net, self.out / "logs" / f"{VM}.console.log",
                             memory_mib=96)

    def reference(self, streams: list[Stream], seconds: float) -> None:
        for stream in streams:
            run = self._probe(stream, f"reference-{stream.key}")
            time.sleep(seconds)
            probe = run.finish()
            self._record({"phase": "reference", "kind": "none", "stream": stream.key}, run,
                         probe)

    def raw_baseline(self, plan: list[Stream]) -> None:
        """The guest as an unmanaged domain (vmha leaves it alone), migrated by libvirt."""
        import libvirt

        from lab import migrate_live

        conn = libvirt.open(self.lc.nodes[NODES[0]].uri)
        try:
            dom = conn.defineXML(self.guest_xml())
            dom.create()
        finally:
            conn.close()
        t0 = time.monotonic()
        self._answers(180)
        self.meta["raw_boot_to_answer_s"] = round(time.monotonic() - t0, 2)
        _log(f"raw guest answers after {self.meta['raw_boot_to_answer_s']} s")
        self.reference(plan_unique(plan), self.args.reference_seconds)
        for i, stream in enumerate(plan):
            if time.monotonic() > self.deadline:
                _log("time budget used up: no more raw trials")
                break
            src = self._only_node()
            dst = NODES[1] if src == NODES[0] else NODES[0]
            run = self._probe(stream, f"raw-{i:03d}-{stream.key}")
            time.sleep(PRE_ROLL_S)
            box: dict[str, Any] = {}

            def migrate(src: str = src, dst: str = dst, box: dict[str, Any] = box) -> None:
                try:
                    box.update(migrate_live(self.lc.nodes[src].uri, self.lc.nodes[dst].uri, VM))
                except Exception as exc:  # reported below
                    box["error"] = repr(exc)
                box["returned"] = time.monotonic()

            t_fail = time.monotonic()
            mover = threading.Thread(target=migrate, daemon=True)
            mover.start()
            t_running = self._wait(
                lambda dst=dst, src=src: self.lc.node_domains(dst).get(VM) == "running"
                and self.lc.node_domains(src).get(VM) != "running", 120, "the guest on " + dst)
            mover.join(120)
            if "error" in box:
                raise RuntimeError(f"raw migration failed: {box['error']}")
            t_ret = float(box["returned"])
            res = box
            time.sleep(POST_ROLL_S)
            probe = run.finish()
            self._record({"phase": "raw", "kind": "libvirt", "stream": stream.key, "src": src,
                          "dst": dst, "t_fail": t_fail, "call_s": round(t_ret - t_fail, 3),
                          "running_s": round(t_running - t_fail, 3),
                          "downtime_ms": res["downtime_ms"], "total_ms": res["total_ms"]},
                         run, probe)
        node = self._only_node()
        conn = libvirt.open(self.lc.nodes[node].uri)
        try:
            dom = conn.lookupByName(VM)
            dom.destroy()
            dom.undefine()
        finally:
            conn.close()

    def add_vm(self) -> None:
        xml = self.out / "logs" / f"{VM}.xml"
        xml.write_text(self.guest_xml())
        r = self._vmha("vm", "add", VM, "--memory-mib", "96", "--xml", str(xml))
        if r.returncode != 0:
            raise RuntimeError(f"vmha vm add failed: {r.stderr}")
        t0 = time.monotonic()
        self._wait(lambda: (self._status() or {}).get("state") == "running", 120,
                   "vmha to report the guest running", 0.1)
        self._answers(180)
        self.meta["vmha_boot_to_answer_s"] = round(time.monotonic() - t0, 2)
        _log(f"vmha guest answers after {self.meta['vmha_boot_to_answer_s']} s")

    def _node_ready(self, name: str) -> bool:
        from schemas import Keyspace

        ks = Keyspace(self.lc.prefix)
        return self.store.get(ks.node(name)) is not None and self.store.get(
            ks.cordon(name)) is None

    def graceful(self, stream: Stream, kind: str, index: int) -> None:
        from schemas import Keyspace

        ks = Keyspace(self.lc.prefix)
        src = self._only_node()
        dst = NODES[1] if src == NODES[0] else NODES[0]
        reg = self.store.get(ks.node(src))
        assert reg is not None
        lease = json.loads(reg.value)["lease_id"]
        agent = self.lc.agents[src]
        run = self._probe(stream, f"vmha-{index:03d}-{kind}-{stream.key}")
        time.sleep(PRE_ROLL_S)
        t_fail = time.monotonic()
        if kind == "revoke":
            subprocess.run(["etcdctl", "--endpoints", self.lc.endpoints, "lease", "revoke",
                            str(lease)], check=True, capture_output=True, timeout=30)
        else:
            agent.signal(signal.SIGTERM)
        t_running = self._wait(
            lambda: self.lc.node_domains(dst).get(VM) == "running"
            and self.lc.node_domains(src).get(VM) != "running", 120, "the guest on " + dst)

        def repaired() -> bool:
            st = self._status() or {}
            if not (st.get("state") == "running" and st.get("node") == dst):
                return False
            if VM in self.lc.node_domains(src):
                return False
            return not (kind == "sigterm" and agent.alive())

        t_repaired = self._wait(repaired, 120, "the node drained", 0.02)
        time.sleep(max(0.0, t_running + POST_ROLL_S - time.monotonic()))
        probe = run.finish()
        mig = (self._status() or {}).get("migration") or {}
        trial = {"phase": "vmha", "kind": kind, "stream": stream.key, "src": src, "dst": dst,
                 "t_fail": t_fail, "running_s": round(t_running - t_fail, 3),
                 "repaired_s": round(t_repaired - t_fail, 3),
                 "downtime_ms": mig.get("downtime_ms"), "total_ms": mig.get("total_ms"),
                 "migration": mig,
                 "live_migrated": mig.get("source") == src and mig.get("target") == dst}
        if kind == "sigterm":
            trial["agent_rc"] = agent.proc.returncode if agent.proc else None
            self.lc.start_agent(src)
            self._wait(lambda: self.store.get(ks.node(src)) is not None, 60,
                       f"agent {src} registered again", 0.05)
        r = self._vmha("node", "uncordon", src)
        if r.returncode != 0:
            raise RuntimeError(f"vmha node uncordon {src}: {r.stderr}")
        self._wait(lambda: self._node_ready(src), 60, f"{src} back in service", 0.05)
        self._record(trial, run, probe)

    def crash(self, index: int) -> None:
        stream = STREAM_BY_KEY["icmp100"]
        src = self._only_node()
        dst = NODES[1] if src == NODES[0] else NODES[0]
        run = self._probe(stream, f"crash-{index:03d}", max_seconds=300)
        time.sleep(PRE_ROLL_S)
        t_fail = time.monotonic()
        self.lc.crash_host(src)
        t_running = self._wait(lambda: self.lc.node_domains(dst).get(VM) == "running", 120,
                               "the guest cold-booted on " + dst, 0.02)
        t_answer = self._answers(180)
        time.sleep(POST_ROLL_S)
        probe = run.finish()
        # first ICMP answer from the new node (answers in flight at the crash do not count)
        after = sorted(t for _s, t, _c in probe["answers"] if t > t_running)
        first = after[0] if after else None
        fence = self.store.get(f"{self.lc.prefix}/fence/{src}")
        trial = {"phase": "crash", "kind": "crash", "stream": stream.key, "src": src,
                 "dst": dst, "t_fail": t_fail, "running_s": round(t_running - t_fail, 3),
                 "udp_answer_s": round(t_answer - t_fail, 3),
                 "answer_s": round(first - t_fail, 3) if first else None,
                 "fence": json.loads(fence.value) if fence else None}
        self.lc.restart_node(src)
        self.lc.start_agent(src)
        self._wait(lambda: self._node_ready(src), 60, f"{src} back in service", 0.05)
        self._record(trial, run, probe)

    def run(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.raw_dir.mkdir(exist_ok=True)
        self.meta.update({"netns": self.net.netns, "guest_ip": self.net.guest_ip,
                          "trials_per_rate": self.args.trials, "short": self.args.short,
                          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "cpus": os.cpu_count(), "memory_mib": 96})
        streams = [STREAM_BY_KEY[k] for k in self.args.streams.split(",")]
        if self.args.short:
            self.args.trials = 1
        self.start_lab()
        try:
            raw_plan = [s for _ in range(self.args.raw_trials) for s in streams]
            if self.args.short:
                raw_plan = [STREAM_BY_KEY["udp100"]] if self.args.raw_trials else []
            self.raw_baseline(raw_plan)
            self.add_vm()
            plan: list[tuple[Stream, str]] = []
            for i in range(self.args.trials):
                for j, s in enumerate(streams):
                    if self.args.short:
                        plan.append((s, ("revoke", "sigterm")[(i + j) % 2]))
                    else:
                        plan.extend([(s, "revoke"), (s, "sigterm")])
            for k, (stream, kind) in enumerate(plan):
                if time.monotonic() > self.deadline:
                    _log("time budget used up: no more vmha trials")
                    break
                self.graceful(stream, kind, k)
            for c in range(self.args.crashes):
                self.crash(c)
        finally:
            self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.meta["duration_s"] = round(time.monotonic() - self.started, 1)
            self._save()
            self.stop_lab()


def plan_unique(plan: list[Stream]) -> list[Stream]:
    seen: dict[str, Stream] = {}
    for s in plan:
        seen.setdefault(s.key, s)
    return list(seen.values())


# ---- report -----------------------------------------------------------------------------------


def _ms(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(ms: tuple[float, float] | None, digits: int = 0) -> str:
    if ms is None:
        return "-"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def aggregate(trials: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stream and group (raw, revoke, sigterm, vmha = both): statistics."""
    out: dict[str, dict[str, Any]] = {}
    for stream in STREAMS:
        groups: dict[str, list[dict[str, Any]]] = {
            "reference": [t for t in trials if t["phase"] == "reference"],
            "raw": [t for t in trials if t["phase"] == "raw"],
            "revoke": [t for t in trials if t["phase"] == "vmha" and t["kind"] == "revoke"],
            "sigterm": [t for t in trials if t["phase"] == "vmha" and t["kind"] == "sigterm"],
            "vmha": [t for t in trials if t["phase"] == "vmha"],
        }
        row: dict[str, Any] = {}
        for g, ts in groups.items():
            ts = [t for t in ts if t["stream"] == stream.key and "probe" in t]
            if not ts:
                continue

            def vals(key: str, ts: list[dict[str, Any]] = ts) -> list[float]:
                return [float(t["probe"][key]) for t in ts if t["probe"].get(key) is not None]

            def tvals(key: str, ts: list[dict[str, Any]] = ts) -> list[float]:
                return [float(t[key]) for t in ts if t.get(key) is not None]

            bursts = [t["probe"]["largest_burst"] / stream.pps * 1000 for t in ts]
            row[g] = {"n": len(ts), "lost": _ms(vals("lost")), "burst_ms": _ms(bursts),
                      "lost_to_guest": _ms(vals("lost_to_guest")),
                      "implied_ms": _ms(vals("implied_outage_ms")),
                      "silence_ms": _ms(vals("longest_silence_ms")),
                      "downtime_ms": _ms(tvals("downtime_ms")),
                      "running_s": _ms(tvals("running_s")),
                      "repaired_s": _ms(tvals("repaired_s")),
                      "call_s": _ms(tvals("call_s"))}
        out[stream.key] = row
    return out


def _thesis(key: str, col: str) -> str:
    v = THESIS[key].get(col)
    if v is None:
        return "-"
    if key == "icmp100" and col == "addon":
        return "10–20"
    return f"{v[0]} ± {v[1]}"


def write_report(out: Path) -> Path:
    data = json.loads((out / "outage.json").read_text())
    trials: list[dict[str, Any]] = data["trials"]
    meta = data["meta"]
    agg = aggregate(trials)
    lines = ["# Outage per graceful failure: vmha on the lab vs. raw libvirt vs. the 2006 thesis",
             ""]
    lines.append(
        f"Run {meta.get('started')} – {meta.get('finished')} ({meta.get('duration_s')} s), "
        f"{meta.get('cpus')} CPUs; guest: Debian kernel + busybox initramfs, "
        f"{meta.get('memory_mib')} MiB, QEMU TCG, virtio NIC on a bridge in a private network "
        "namespace; two lab nodes, vmha agents + 2 orchestrators, lab timing config "
        f"(lease TTL {meta.get('config', {}).get('lease_ttl_s')} s). "
        "Losses are per failure (mean ± sd over the trials, n in brackets); the implied "
        "outage is lost packets × packet gap, the thesis's method. `raw` = the same guest "
        "migrated directly with libvirt (peer-to-peer, no vmha) in the same run. Thesis: "
        "Table 5.2 (UDP, 50 runs each; add-on = Heartbeat with the thesis's add-on, "
        "xm = `xm migrate` by hand), Table 5.4 (one VoIP stream), §5.3 (ping at 100/s).")
    lines.append("")
    lines.append("## Packets lost per failure")
    lines.append("")
    lines.append("| stream | reference (no failure) | raw libvirt | vmha lease revoke | "
                 "vmha SIGTERM | thesis add-on | thesis xm | thesis reference |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for s in STREAMS:
        row = agg.get(s.key, {})

        def cell(g: str, row: dict[str, Any] = row) -> str:
            r = row.get(g)
            return f"{_fmt(r['lost'], 1)} [{r['n']}]" if r else "-"

        lines.append(f"| {s.label} | {cell('reference')} | {cell('raw')} | {cell('revoke')} | "
                     f"{cell('sigterm')} | {_thesis(s.key, 'addon')} | {_thesis(s.key, 'xm')} "
                     f"| {_thesis(s.key, 'reference')} |")
    lines.append("")
    lines.append("## Outage and timings (ms, s)")
    lines.append("")
    lines.append("| stream | implied outage raw | implied outage vmha | vmha/raw | "
                 "libvirt downtime raw | vmha status downtime_ms | largest loss burst raw | "
                 "largest loss burst vmha | longest silence raw | "
                 "longest silence vmha | raw: migration start → running elsewhere (s) | "
                 "vmha: failure → running elsewhere (s) | "
                 "failure → node drained (s) | thesis implied outage |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios: list[float] = []
    for s in STREAMS:
        row = agg.get(s.key, {})
        raw, vm = row.get("raw"), row.get("vmha")
        ratio = "-"
        if raw and vm and raw["implied_ms"] and vm["implied_ms"] and raw["implied_ms"][0] > 0:
            r = vm["implied_ms"][0] / raw["implied_ms"][0]
            ratios.append(r)
            ratio = f"{r:.2f}"
        th = THESIS[s.key]["addon"]
        th_ms = f"{th[0] / s.pps * 1000:.0f}" if th else "-"
        lines.append(
            f"| {s.label} | {_fmt(raw['implied_ms']) if raw else '-'} | "
            f"{_fmt(vm['implied_ms']) if vm else '-'} | {ratio} | "
            f"{_fmt(raw['downtime_ms']) if raw else '-'} | "
            f"{_fmt(vm['downtime_ms']) if vm else '-'} | "
            f"{_fmt(raw['burst_ms']) if raw else '-'} | "
            f"{_fmt(vm['burst_ms']) if vm else '-'} | "
            f"{_fmt(raw['silence_ms']) if raw else '-'} | "
            f"{_fmt(vm['silence_ms']) if vm else '-'} | "
            f"{_fmt(raw['running_s'], 2) if raw else '-'} | "
            f"{_fmt(vm['running_s'], 2) if vm else '-'} | "
            f"{_fmt(vm['repaired_s'], 2) if vm else '-'} | {th_ms} |")
    lines.append("")
    all_raw = [t for t in trials if t["phase"] == "raw" and "probe" in t]
    all_vm = [t for t in trials if t["phase"] == "vmha" and "probe" in t]
    summary: dict[str, Any] = {}

    def pooled(ts: list[dict[str, Any]], key: str) -> list[float]:
        return [float(t[key]) for t in ts if t.get(key) is not None]

    # outage per failure, in time, from the finest streams (>= 100 pps)
    fine = {"udp100", "udp1000", "icmp100"}
    raw_imp = [t["probe"]["implied_outage_ms"] for t in all_raw if t["stream"] in fine]
    vm_imp = [t["probe"]["implied_outage_ms"] for t in all_vm if t["stream"] in fine]
    raw_down = pooled(all_raw, "downtime_ms")
    if raw_imp and vm_imp:
        summary = {"raw_implied_ms": _ms(raw_imp), "vmha_implied_ms": _ms(vm_imp),
                   "raw_libvirt_downtime_ms": _ms(raw_down),
                   "ratio_vmha_to_raw_implied": statistics.fmean(vm_imp)
                   / statistics.fmean(raw_imp) if statistics.fmean(raw_imp) else None,
                   "ratio_vmha_to_raw_downtime": statistics.fmean(vm_imp)
                   / statistics.fmean(raw_down) if raw_down else None}
        lines.append("## Verdict")
        lines.append("")
        lines.append(
            f"Pooled over the streams at ≥ 100 pps: implied outage per graceful failure "
            f"{_fmt(summary['raw_implied_ms'])} ms with raw libvirt "
            f"(libvirt's own downtime {_fmt(summary['raw_libvirt_downtime_ms'])} ms), "
            f"{_fmt(summary['vmha_implied_ms'])} ms through vmha: ratio "
            f"{summary['ratio_vmha_to_raw_implied']:.2f} against the raw migration's "
            "measured outage"
            + (f", {summary['ratio_vmha_to_raw_downtime']:.2f} against raw QEMU downtime"
               if summary.get("ratio_vmha_to_raw_downtime") else "")
            + ". Within 1.2x of raw: "
            + ("yes" if (summary.get("ratio_vmha_to_raw_downtime") or 99) <= 1.2 else "no")
            + f". The thesis puts the whole repair at about {THESIS_REPAIR_S:.0f} s; here the "
            "failure → node drained column is that time.")
        lines.append("")
    if all_vm:
        live = [t for t in all_vm if (t.get("migration") or {}).get("source") == t.get("src")
                and (t.get("migration") or {}).get("target") == t.get("dst")]
        lines.append(f"Graceful failures through vmha: {len(all_vm)}, of which {len(live)} "
                     "ended in a live migration recorded in the VM's status (the rest: "
                     "cold boot or no statistics). Reference streams lost "
                     + ", ".join(f"{t['probe']['lost']}/{t['probe']['sent']} ({t['stream']})"
                                 for t in trials if t["phase"] == "reference") + ".")
        lines.append("")
    crashes = [t for t in trials if t["phase"] == "crash"]
    if crashes:
        lines.append("## Uncontrolled failure (crash of the guest's node)")
        lines.append("")
        lines.append("Agent (and its guard) kill -9, libvirtd and QEMU SIGKILLed; the guest "
                     "is cold-booted on the other node after the lease expired and the fence "
                     "margin passed. The thesis did not measure this case.")
        lines.append("")
        lines.append("| trial | running elsewhere (s) | answers pings again (s) | "
                     "pings lost |")
        lines.append("|---|---|---|---|")
        for i, t in enumerate(crashes):
            path = out / "raw" / str(t.get("probe_file"))
            if path.is_file() and t.get("running_s") is not None:
                back = t["t_fail"] + t["running_s"]
                arrivals = sorted(a for _s, a, _c in json.loads(path.read_text())["answers"]
                                  if a > back)
                t["answer_s"] = round(arrivals[0] - t["t_fail"], 3) if arrivals else None
            lines.append(f"| {i + 1} | {t.get('running_s')} | {t.get('answer_s')} | "
                         f"{t['probe']['lost'] if 'probe' in t else '-'} |")
        lines.append("")
    lines.append("Plots: `rtt_timeline.png`, `interarrival.png`, `loss_per_rate.png`. "
                 "Every trial in `outage.json`, every probe stream in `raw/`.")
    lines.append("")
    report = out / "outage.md"
    report.write_text("\n".join(lines))
    data["aggregate"] = agg
    data["summary"] = summary
    (out / "outage-summary.json").write_text(json.dumps({"aggregate": agg, "summary": summary},
                                                        indent=1))
    return report


def write_plots(out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((out / "outage.json").read_text())
    trials: list[dict[str, Any]] = data["trials"]
    made: list[Path] = []

    def probe_of(phase: str, stream: str, kind: str | None = None) -> tuple[
            dict[str, Any], dict[str, Any]] | None:
        for t in trials:
            if t["phase"] != phase or t["stream"] != stream or (kind and t["kind"] != kind):
                continue
            path = out / "raw" / str(t.get("probe_file"))
            if path.is_file():
                return t, json.loads(path.read_text())
        return None

    # RTT timeline across a migration (ICMP, 100/s)
    fig, ax = plt.subplots(figsize=(9, 4))
    for phase, kind, colour in (("vmha", "revoke", "tab:red"), ("raw", None, "tab:blue")):
        found = probe_of(phase, "icmp100", kind)
        if not found:
            continue
        t, probe = found
        sent = probe["sent"]
        got = {s: a for s, a, _c in probe["answers"] if s < len(sent)}
        xs = [sent[s] - t["t_fail"] for s in sorted(got)]
        ys = [(got[s] - sent[s]) * 1000 for s in sorted(got)]
        lost = [sent[s] - t["t_fail"] for s in range(len(sent)) if s not in got]
        label = "vmha (lease revoke)" if phase == "vmha" else "raw libvirt migration"
        ax.plot(xs, ys, ".", ms=2, color=colour, label=f"{label}: RTT")
        ax.plot(lost, [0] * len(lost), "x", color=colour, ms=5,
                label=f"{label}: lost ({len(lost)})")
    ax.axvline(0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("time since failure / migration start (s)")
    ax.set_ylabel("ICMP round-trip time (ms)")
    ax.set_title("Ping at 100/s across one graceful failure (cf. thesis Figure 5.5)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "rtt_timeline.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    made.append(path)

    # inter-arrival gaps of the VoIP-like stream (cf. Figure 5.8)
    fig, ax = plt.subplots(figsize=(9, 4))
    for phase, kind, colour in (("vmha", "revoke", "tab:red"), ("raw", None, "tab:blue")):
        found = probe_of(phase, "voip50", kind)
        if not found:
            continue
        t, probe = found
        arr = sorted(a for _s, a, _c in probe["answers"])
        xs = [b - t["t_fail"] for b in arr[1:]]
        ys = [(b - a) * 1000 for a, b in zip(arr, arr[1:], strict=False)]
        label = "vmha (lease revoke)" if phase == "vmha" else "raw libvirt migration"
        ax.plot(xs, ys, "-", lw=0.8, color=colour, label=label, drawstyle="steps-pre")
    ax.axvline(0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("time since failure / migration start (s)")
    ax.set_ylabel("inter-arrival gap (ms)")
    ax.set_title("VoIP-like stream (50 pps, 160 B): inter-arrival gaps (cf. thesis Figure 5.8)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "interarrival.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    made.append(path)

    # loss per rate
    agg = aggregate(trials)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    groups = [("raw", "raw libvirt"), ("revoke", "vmha revoke"), ("sigterm", "vmha SIGTERM"),
              ("thesis", "thesis add-on"), ("xm", "thesis xm")]
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
    ax.set_ylabel("packets lost per failure (log)")
    ax.set_title("Packets lost per graceful failure, by stream")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "loss_per_rate.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    made.append(path)
    return made


# ---- the command ------------------------------------------------------------------------------


def _inside(args: argparse.Namespace) -> int:
    from lab.netguest import current_netns_name

    netns = current_netns_name()
    if netns is None or netns != args.netns:
        raise SystemExit("refusing to run outside the benchmark's own network namespace")
    Campaign(args, netns).run()
    return 0


def cmd_bench_outage(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if args.report_only:
        print(write_report(out))
        for p in write_plots(out):
            print(p)
        return 0
    if args.netns:
        return _inside(args)
    if os.geteuid() != 0:
        print("vmha bench outage needs root (network namespace, libvirtd, QEMU)",
              file=sys.stderr)
        return 1
    from lab.artifacts import ArtifactError
    from lab.netguest import GuestNet, create_netns, delete_netns, ensure_net_artifacts

    name = f"vmha-bench-{os.getpid()}"
    try:  # from the cache only, before entering a namespace that reaches no archive
        ensure_net_artifacts(GuestNet(name))
    except ArtifactError as exc:
        print(f"vmha bench outage: {exc}", file=sys.stderr)
        return 1
    create_netns(GuestNet(name))
    try:
        argv = [sys.executable, "-m", "vmha", "bench", "outage", "--netns", name,
                "--out", str(out), "--trials", str(args.trials), "--raw-trials",
                str(args.raw_trials), "--crashes", str(args.crashes), "--streams",
                args.streams, "--reference-seconds", str(args.reference_seconds),
                "--max-minutes", str(args.max_minutes)]
        if args.short:
            argv.append("--short")
        # A session of its own, so a Ctrl-C reaches it once, forwarded below, and it has
        # the time to tear its lab down (subprocess.run would SIGKILL it after 0.25 s).
        campaign = subprocess.Popen(["ip", "netns", "exec", name, *argv],
                                    start_new_session=True)
        try:
            rc = campaign.wait()
        except KeyboardInterrupt:
            campaign.send_signal(signal.SIGINT)
            rc = campaign.wait()
    finally:
        delete_netns(name)
    if (out / "outage.json").exists():
        print(write_report(out))
        with contextlib.suppress(ImportError):
            for p in write_plots(out):
                print(p)
    return rc


def register(groups: dict[str, Any]) -> None:
    root = groups["root"]
    bench = root.choices.get("bench")
    if bench is None:
        bench = root.add_parser("bench", help="measurements on the lab (root)")
        sub = bench.add_subparsers(dest="benchcmd", required=True)
    else:  # pragma: no cover - another module made the group first
        sub = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.add_parser("outage", help="the 2006 thesis's outage measurements on the lab: "
                                      "packets lost per graceful failure, vmha vs raw libvirt")
    p.add_argument("--out", default="results/outage", help="results directory")
    p.add_argument("--trials", type=int, default=8,
                   help="graceful failures per rate and per kind (revoke, SIGTERM)")
    p.add_argument("--raw-trials", type=int, default=8,
                   help="raw libvirt migrations per rate (baseline)")
    p.add_argument("--crashes", type=int, default=1, help="uncontrolled failures")
    p.add_argument("--streams", default=",".join(s.key for s in STREAMS))
    p.add_argument("--reference-seconds", type=float, default=5.0)
    p.add_argument("--max-minutes", type=float, default=60.0,
                   help="start no new trial after this long")
    p.add_argument("--short", action="store_true",
                   help="one failure per rate (kinds alternate), one raw migration")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite outage.md and the plots from outage.json")
    p.add_argument("--netns", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_bench_outage)
