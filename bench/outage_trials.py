"""The outage benchmark's trials on the lab (run inside the benchmark's own network
namespace, see :mod:`bench.outage`): reference streams, raw libvirt migrations, vmha's
graceful failures (lease revoke, SIGTERM) and crashes, each with a paced probe stream
(:mod:`bench.outageprobe`) against a network-reachable kernel guest
(:mod:`lab.netguest`).

The lab is the one ``vmha lab up`` starts: etcd auth on, keyspace 2.  The benchmark
reads it as the operator (:mod:`lab.labview`), runs ``vmha`` as the operator and drains
by root's ``etcdctl lease revoke`` of the node's registration lease (the operator's role
may not revoke leases).  ``--no-auth`` runs keyspace 1 on plain etcd instead (the lab
the results in docs/outage.md were measured on); every trial means the same on both."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.outage_streams import STREAM_BY_KEY, Stream, summarize
from lab import labview
from lab.configs import LAB_CONFIG
from lab.localcluster import poll_until, wait_until

VM = "bench0"
NODES = ("n1", "n2")
PRE_ROLL_S = 1.5
POST_ROLL_S = 1.0


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _other(node: str) -> str:
    return NODES[1] if node == NODES[0] else NODES[0]


def _waited(pred: Callable[[], object], timeout: float, what: str,
            interval: float = 0.01) -> float:
    """:func:`wait_until`, then when it held (monotonic)."""
    wait_until(pred, timeout, interval, what)
    return time.monotonic()


def plan_unique(plan: list[Stream]) -> list[Stream]:
    seen: dict[str, Stream] = {}
    for s in plan:
        seen.setdefault(s.key, s)
    return list(seen.values())


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


class OutageTrials:
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
        """`vmha ARGS` as the operator (root without auth)."""
        return labview.vmha(self.lc, *argv)

    def _save(self) -> None:
        data = {"meta": self.meta, "trials": self.trials}
        tmp = self.out / "outage.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.out / "outage.json")

    def _probe(self, stream: Stream, tag: str, max_seconds: float = 120.0) -> ProbeRun:
        return ProbeRun(stream, self.net.guest_ip, self.raw_dir / f"{tag}.json", max_seconds)

    def _only_node(self) -> str:
        """The one node the guest runs on; a clear error if it runs nowhere (or twice)."""
        nodes = self.lc.ground_truth().get(VM, [])
        if len(nodes) != 1:
            console = self.out / "logs" / f"{VM}.console.log"
            raise RuntimeError(f"the guest runs on {nodes or 'no node'}; its console "
                               f"(a guest kernel panic?) is in {console}")
        return nodes[0]

    def _moved(self, src: str, dst: str) -> bool:
        return self.lc.node_domains(dst).get(VM) == "running" \
            and self.lc.node_domains(src).get(VM) != "running"

    def _answers(self, timeout: float) -> float:
        """Wait until the guest answers a UDP probe; return when it did."""
        from lab.netguest import ECHO_PORT, PROBE_MAGIC

        def answered() -> bool:
            try:
                sock.sendto(struct.pack("!IIII", PROBE_MAGIC, 1, 0, 0),
                            (self.net.guest_ip, ECHO_PORT))
                sock.recv(64)
                return True
            except OSError:
                return False

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.3)
            if poll_until(answered, timeout) is None:
                raise TimeoutError(f"guest {self.net.guest_ip} did not answer within "
                                   f"{timeout} s")
        return time.monotonic()

    def _status(self) -> dict[str, Any] | None:
        """The guest's current status (keyspace 2: the one of its nodes' written last)."""
        return labview.vm_status(self.store, self.lc, VM)

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

    def _node_ready(self, name: str) -> bool:
        """Registered and not cordoned: the leader may place the guest there again."""
        return labview.schedulable(self.store, self.lc, name)

    def _back_in_service(self, node: str) -> None:
        _waited(lambda: self._node_ready(node), 60, f"{node} back in service", 0.05)

    # -- phases --

    def start_lab(self) -> None:
        from lab.cluster import LabCluster

        self.root = Path(tempfile.mkdtemp(prefix="vmhab-", dir="/tmp"))
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.lc = LabCluster(self.root / "lab", logs, node_names=NODES,
                             auth=not self.args.no_auth)
        self.lc.start(LAB_CONFIG.to_json(), orchestrators=2)
        self.store = labview.reader(self.lc)
        self.meta["config"] = json.loads(LAB_CONFIG.to_json())
        self.meta.update(etcd_auth=self.lc.auth, keyspace=labview.keyspace(self.store, self.lc))
        # the guest's first node is the leader's choice among registered nodes only
        labview.wait_registered(self.lc, self.store)

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
            self.raw_trial(i, stream)
        node = self._only_node()
        conn = libvirt.open(self.lc.nodes[node].uri)
        try:
            dom = conn.lookupByName(VM)
            dom.destroy()
            dom.undefine()
        finally:
            conn.close()

    def raw_trial(self, i: int, stream: Stream) -> None:
        from lab import migrate_live

        src = self._only_node()
        dst = _other(src)
        run = self._probe(stream, f"raw-{i:03d}-{stream.key}")
        time.sleep(PRE_ROLL_S)
        box: dict[str, Any] = {}

        def migrate() -> None:
            try:
                box.update(migrate_live(self.lc.nodes[src].uri, self.lc.nodes[dst].uri, VM))
            except Exception as exc:  # noqa: BLE001 - reported below
                box["error"] = repr(exc)
            box["returned"] = time.monotonic()

        t_fail = time.monotonic()
        mover = threading.Thread(target=migrate, daemon=True)
        mover.start()
        t_running = _waited(lambda: self._moved(src, dst), 120, "the guest on " + dst)
        mover.join(120)
        if "error" in box:
            raise RuntimeError(f"raw migration failed: {box['error']}")
        t_ret = float(box["returned"])
        time.sleep(POST_ROLL_S)
        probe = run.finish()
        self._record({"phase": "raw", "kind": "libvirt", "stream": stream.key, "src": src,
                      "dst": dst, "t_fail": t_fail, "call_s": round(t_ret - t_fail, 3),
                      "running_s": round(t_running - t_fail, 3),
                      "downtime_ms": box["downtime_ms"], "total_ms": box["total_ms"]},
                     run, probe)

    def add_vm(self) -> None:
        xml = self.out / "logs" / f"{VM}.xml"
        xml.write_text(self.guest_xml())
        r = self._vmha("vm", "add", VM, "--memory-mib", "96", "--xml", str(xml))
        if r.returncode != 0:
            raise RuntimeError(f"vmha vm add failed: {r.stderr}")
        t0 = time.monotonic()
        _waited(lambda: (self._status() or {}).get("state") == "running", 120,
                "vmha to report the guest running", 0.1)
        self._answers(180)
        self.meta["vmha_boot_to_answer_s"] = round(time.monotonic() - t0, 2)
        _log(f"vmha guest answers after {self.meta['vmha_boot_to_answer_s']} s")

    def graceful(self, stream: Stream, kind: str, index: int) -> None:
        src = self._only_node()
        dst = _other(src)
        lease = labview.registration_lease(self.store, self.lc, src)
        agent = self.lc.agents[src]
        run = self._probe(stream, f"vmha-{index:03d}-{kind}-{stream.key}")
        time.sleep(PRE_ROLL_S)
        t_fail = time.monotonic()
        if kind == "revoke":
            labview.revoke_lease(self.lc, lease)  # as root with auth
        else:
            agent.signal(signal.SIGTERM)
        t_running = _waited(lambda: self._moved(src, dst), 120, "the guest on " + dst)

        def repaired() -> bool:
            st = self._status() or {}
            if not (st.get("state") == "running" and st.get("node") == dst):
                return False
            if VM in self.lc.node_domains(src):
                return False
            return not (kind == "sigterm" and agent.alive())

        t_repaired = _waited(repaired, 120, "the node drained", 0.02)
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
            _waited(lambda: self.store.get(labview.reg_key(self.lc, src)) is not None, 60,
                    f"agent {src} registered again", 0.05)
        r = self._vmha("node", "uncordon", src)
        if r.returncode != 0:
            raise RuntimeError(f"vmha node uncordon {src}: {r.stderr}")
        self._back_in_service(src)
        self._record(trial, run, probe)

    def crash(self, index: int) -> None:
        stream = STREAM_BY_KEY["icmp100"]
        src = self._only_node()
        dst = _other(src)
        run = self._probe(stream, f"crash-{index:03d}", max_seconds=300)
        time.sleep(PRE_ROLL_S)
        t_fail = time.monotonic()
        self.lc.crash_host(src)
        t_running = _waited(lambda: self.lc.node_domains(dst).get(VM) == "running", 120,
                            "the guest cold-booted on " + dst, 0.02)
        t_answer = self._answers(180)
        time.sleep(POST_ROLL_S)
        probe = run.finish()
        # first ICMP answer from the new node (answers in flight at the crash do not count)
        after = sorted(t for _s, t, _c in probe["answers"] if t > t_running)
        first = after[0] if after else None
        fence = self.store.get(labview.fence_key(self.lc, src))
        trial = {"phase": "crash", "kind": "crash", "stream": stream.key, "src": src,
                 "dst": dst, "t_fail": t_fail, "running_s": round(t_running - t_fail, 3),
                 "udp_answer_s": round(t_answer - t_fail, 3),
                 "answer_s": round(first - t_fail, 3) if first else None,
                 "fence": json.loads(fence.value) if fence else None}
        self.lc.restart_node(src)
        self.lc.start_agent(src)
        self._back_in_service(src)
        self._record(trial, run, probe)

    def _vmha_plan(self, streams: list[Stream]) -> list[tuple[Stream, str]]:
        plan: list[tuple[Stream, str]] = []
        for i in range(self.args.trials):
            for j, s in enumerate(streams):
                if self.args.short:
                    plan.append((s, ("revoke", "sigterm")[(i + j) % 2]))
                else:
                    plan.extend([(s, "revoke"), (s, "sigterm")])
        return plan

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
            for k, (stream, kind) in enumerate(self._vmha_plan(streams)):
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
