"""Benchmark (not a test): keyspace 2 at scale (docs/keyspace-v2.md, section 7, part 8).

A 3-member etcd on loopback; NODES agents (the real `NodeAgent`, each with its own etcd
client) in processes of AGENTS_PER_PROCESS on the record-only fake hypervisor, with the
crash target alone in a process of its own; the leader (`OrchestratorV2`) in its own
process; VMS_PER_NODE VMs a node, each with a domain XML of XML_BYTES.  Phases:

* boot: specs written, the leader started (its first list reads them all, in pages),
  every VM placed and reported running;
* idle (IDLE_S): etcd's egress, requests by method;
* crash: SIGKILL of the crash target's process (the node's power: its record-only
  guests die with it) until each of its VMs runs elsewhere;
* drain: root's revoke of a node's registration lease until each of its VMs runs
  elsewhere (moved live);
* leader restart: the leader stopped and a new one started: its first cycle lists the
  whole keyspace in pages.

Every number about etcd comes from its members' `/metrics` (no gRPC request of the
bench falls inside a phase, except the drain's one revoke); which VM runs where from
the fake hypervisor's records; times from the statuses' `since`, read after each phase.

Usage: python -m bench.scale --nodes 50 [--idle-s 60] [--out results/bench-scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import scale_report
from bench.common import pct
from bench.scale_metrics import (
    CpuMeter,
    Scrape,
    cycles,
    diff,
    leader_metric,
    net_of_keepalives,
    scrape,
)
from hypervisor.fake import guest_alive
from lab.localcluster import EtcdCluster, free_ports, start_etcd, wait_until
from schemas.keys_v2 import KeyspaceV2
from schemas.models import ClusterConfig, FenceRecord, VmSpec, VmStatus
from schemas.models_v2 import KeyspaceVersion
from store.errors import StoreError
from store.etcd import EtcdStore, Put, StoreUnavailable
from store.paging import KeyRange
from store.watchmodel import WatchedState

KS = KeyspaceV2()
ROOT = Path(__file__).resolve().parents[1]
VM_MEMORY_MIB = 256


def domain_xml(vm: str, size: int) -> str:
    """A disk-less guest's XML padded to `size` bytes with its description."""
    head = f"<domain type='qemu'><name>{vm}</name><description>"
    tail = (f"</description><memory unit='MiB'>{VM_MEMORY_MIB}</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>"
            "<devices><console type='pty'/></devices></domain>")
    return head + "x" * max(0, size - len(head) - len(tail)) + tail



class KeyGone:
    """When the bench saw `key` deleted (a watch of that key alone: no read per poll,
    which the phase's request counts would include)."""

    def __init__(self, store: EtcdStore, key: str) -> None:
        self.at: float | None = None
        self._closed = threading.Event()
        self.state = WatchedState(store, [KeyRange.key(key)])
        self.state.start()
        self._t = threading.Thread(target=self._follow, daemon=True)
        self._t.start()

    def _follow(self) -> None:
        while self.at is None and not self._closed.is_set():
            try:
                changes = self.state.wait(1.0)
            except StoreError:
                return  # closed, or the watch failed: no time to report
            if any(c.kv is None for c in changes):
                self.at = time.time()

    def close(self) -> None:
        self._closed.set()
        self.state.close()

class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.n, self.total = a.nodes, a.nodes * a.vms_per_node
        self.nodes = [f"n{i:04d}" for i in range(self.n)]
        self.vms = [f"vm{i:05d}" for i in range(self.total)]
        self.work = Path(tempfile.mkdtemp(prefix="vmha-scale-", dir="/dev/shm"))
        self.root = self.work / "fake"
        self.cluster: EtcdCluster | None = None
        self.store: EtcdStore | None = None
        self.hosts: dict[str, subprocess.Popen[bytes]] = {}
        self.leader: subprocess.Popen[bytes] | None = None
        self.leader_listen = f"127.0.0.1:{free_ports(1)[0]}"
        self.cycles_file = self.work / "cycles-1.txt"
        self.config = json.loads(a.config) if a.config else {}
        self.res: dict[str, Any] = {"nodes": self.n, "vms": self.total,
                                    "xml_bytes": a.xml_bytes,
                                    "config": self.config or "defaults",
                                    "agent_poll_s": a.agent_poll,
                                    "agents_per_process": a.agents_per_process,
                                    "agents_nice": a.agents_nice,
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    # ---- processes ----------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        assert self.cluster is not None
        return [m.endpoint for m in self.cluster.members]

    def _spawn(self, tag: str, args: list[str], nice: int = 0) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{tag}.log", "ab")  # noqa: SIM115 - lives with the process
        prefix = ["nice", "-n", str(nice)] if nice else []
        return subprocess.Popen([*prefix, sys.executable, "-m", "bench.scale_procs", *args,
                                 "--endpoints", ",".join(self.endpoints)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def start_hosts(self) -> None:
        """The crash target (n0000) alone in a process; the rest in groups."""
        groups = [self.nodes[:1]] + [self.nodes[i:i + self.a.agents_per_process]
                                     for i in range(1, self.n, self.a.agents_per_process)]
        for i, names in enumerate(groups):
            self.hosts[f"agents-{i}"] = self._spawn(f"agents-{i}", [
                "agents", "--fake-root", str(self.root), "--names", ",".join(names),
                "--poll-interval", str(self.a.agent_poll), "--log-level", self.a.log_level],
                nice=self.a.agents_nice)

    def start_leader(self, cycles_file: Path) -> None:
        self.leader = self._spawn(cycles_file.stem.replace("cycles", "leader"), [
            "leader", "--metrics-listen", self.leader_listen, "--cycles", str(cycles_file)])

    def cpu(self) -> CpuMeter:
        assert self.cluster is not None
        return CpuMeter({"etcd": [m.proc.pid for m in self.cluster.members if m.proc],
                         "leader": [self.leader.pid] if self.leader else [],
                         "agent_hosts": [p.pid for p in self.hosts.values()]})

    def registered(self) -> int:
        """Keys under /vmha/n/ (before any VM: two a registered node), 0 while etcd does
        not answer (a box short of CPU: the reading says so, the wait goes on)."""
        assert self.store is not None
        try:
            return self.store.count_only(KS.node_dir).count
        except StoreUnavailable:
            return 0

    # ---- observation (no etcd request) --------------------------------------------------

    def running_on(self, vms: set[str]) -> dict[str, list[str]]:
        """Where each of `vms` runs, from the fake hypervisor's records."""
        out: dict[str, list[str]] = {}
        for node_dir in os.scandir(self.root):
            d = Path(node_dir.path) / "domains"
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for fn in names:
                vm = fn[:-5]
                if not fn.endswith(".json") or vm not in vms:
                    continue
                try:
                    rec = json.loads((d / fn).read_text())
                except (OSError, ValueError):
                    continue
                if (rec.get("state") == "running" and not rec.get("incoming")
                        and guest_alive(rec.get("guest"))):
                    out.setdefault(vm, []).append(node_dir.name)
        return out

    def settle(self, quiet_s: float = 3.0, timeout: float = 120.0) -> Scrape:
        """Wait until etcd has served no Txn for `quiet_s` (the leader's and agents'
        writes of the event are done); the reading at that point."""
        last = scrape(self.endpoints)
        quiet_since, deadline = time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = scrape(self.endpoints)
            if now.count("grpc_server_msg_received_total", "Txn") != last.count(
                    "grpc_server_msg_received_total", "Txn"):
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return now
            last = now
        return last

    def phase(self, before: Scrape, after: Scrape, cpu: CpuMeter) -> dict[str, Any]:
        out = diff(before, after)
        out["cpu_per_s"] = cpu.read()
        out["leader_cycles"] = cycles(self.cycles_file, before.at, after.at)
        return out

    # ---- phases ---------------------------------------------------------------------------

    def boot(self) -> None:
        store = self.store
        assert store is not None
        store.put(KS.version, KeyspaceVersion(keyspace=2, state="done", started_at=time.time(),
                                              by="bench.scale", tool_version="bench").to_json())
        if self.config:
            store.put(KS.config, ClusterConfig(**self.config).to_json())
        t0 = time.time()
        for first in range(0, self.total, 50):
            store.txn([], [Put(KS.spec(vm), VmSpec(
                name=vm, domain_xml=domain_xml(vm, self.a.xml_bytes), memory_mib=VM_MEMORY_MIB,
                vcpus=1).to_json()) for vm in self.vms[first:first + 50]], budget=30)
        self.res["specs_written_s"] = round(time.time() - t0, 2)
        before, t0 = scrape(self.endpoints), time.time()
        self.start_hosts()
        cpu = self.cpu()
        try:
            wait_until(lambda: self.registered() >= 2 * self.n,
                       min(self.a.max_wait_s, 60 + self.n * 0.5), 2.0, "every agent registered")
        finally:
            # None: etcd did not answer the count.
            reg: dict[str, Any] = {"cpu_per_s": cpu.read(), "keys": self.registered() or None,
                                   "seconds": round(time.time() - t0, 1)}
            try:
                reg.update(diff(before, scrape(self.endpoints)))
            except OSError as exc:  # etcd's /metrics too starved to answer: say so
                reg["metrics_error"] = str(exc)
            self.res["register"] = reg
        self.res["agents_registered_s"] = round(time.time() - t0, 2)
        before, t0 = scrape(self.endpoints), time.time()
        self.start_leader(self.cycles_file)
        cpu = self.cpu()
        wait_until(lambda: leader_metric(self.leader_listen, "vmha_vms", 'state="running"')
                   == self.total, self.a.max_wait_s, 1.0, "every VM running")
        booted = time.time() - t0
        after = self.settle()
        self.res["boot"] = {**self.phase(before, after, cpu), "running_after_s": round(booted, 2)}

    def idle(self) -> None:
        before, cpu = scrape(self.endpoints), self.cpu()
        time.sleep(self.a.idle_s)
        p = self.phase(before, scrape(self.endpoints), cpu)
        p["sent_bytes_per_s_per_node"] = round(p["sent_bytes"] / p["seconds"] / self.n, 1)
        ka = p["messages_sent"].get("LeaseKeepAlive", 0)
        p["bytes_per_keepalive"] = round(p["sent_bytes"] / ka, 1) if ka else None
        self.res["idle"] = p

    def _moved(self, victims: set[str], source: str) -> bool:
        where = self.running_on(victims)
        return len(where) == len(victims) and all(ns and source not in ns
                                                  for ns in where.values())

    def _times(self, victims: set[str], t0: float) -> dict[str, Any]:
        """Seconds from `t0` to each moved VM's running status (its `since`)."""
        assert self.store is not None
        xs = []
        for vm, nodes in sorted(self.running_on(victims).items()):
            kv = self.store.get(KS.status(nodes[0], vm))
            if kv is not None:
                st = VmStatus.from_json(kv.value)
                if st.state == "running":
                    xs.append(st.since - t0)
        return {"vms": len(victims), "reported_running": len(xs), "p50_s": pct(xs, 50),
                "max_s": round(max(xs), 3) if xs else None}

    def _event(self, name: str, source: str, act: Any, timeout: float) -> dict[str, Any]:
        victims = {vm for vm, ns in self.running_on(set(self.vms)).items() if source in ns}
        before, cpu, t0 = scrape(self.endpoints), self.cpu(), time.time()
        act()
        wait_until(lambda: self._moved(victims, source), timeout, 0.5, f"{name}: VMs moved")
        p = self.phase(before, self.settle(), cpu)
        bpk = self.res["idle"]["bytes_per_keepalive"] or 0.0
        net = net_of_keepalives(p, bpk)
        p.update({"started_at": t0, "vms_moved": len(victims), "net_bytes": net,
                  "net_bytes_per_vm": round(net / max(1, len(victims))),
                  "to_running": self._times(victims, t0)})
        return p

    def crash(self) -> None:
        host = self.hosts["agents-0"]
        assert self.store is not None
        gone = KeyGone(self.store, KS.reg(self.nodes[0]))
        alive = KeyGone(self.store, KS.alive(self.nodes[0]))
        p = self._event("crash", self.nodes[0], lambda: os.kill(host.pid, signal.SIGKILL), 180)
        # The lease expires up to one keepalive interval sooner than a TTL after the
        # kill, as the last renewal fell: a spread that does not depend on the node
        # count, so the time from the expiry is reported too.  Both of the node's keys
        # gone start the liveness fence window; etcd deletes them one revoke at a time.
        run = p["to_running"]
        for what, key in (("lease", gone), ("liveness", alive)):
            if key.at is not None:
                p[f"{what}_expired_after_s"] = round(key.at - p["started_at"], 3)
        if gone.at is not None:
            exp = p["lease_expired_after_s"]
            p["expiry_to_running"] = {k: round(run[k] - exp, 3) for k in ("p50_s", "max_s")
                                      if run.get(k) is not None}
        if gone.at is not None and alive.at is not None:
            last = round(max(gone.at, alive.at) - p["started_at"], 3)
            p["both_gone_to_running"] = {k: round(run[k] - last, 3) for k in ("p50_s", "max_s")
                                         if run.get(k) is not None}
        gone.close()
        alive.close()
        kv = self.store.get(KS.fence(self.nodes[0]))
        if kv is not None:
            p["fence_recorded_after_s"] = round(FenceRecord.from_json(kv.value).fenced_at
                                                   - p["started_at"], 3)
        self.res["crash"] = p

    def drain(self) -> None:
        assert self.store is not None
        node = self.nodes[1]
        reg = self.store.get(KS.reg(node))
        assert reg is not None and reg.lease
        store = self.store
        self.res["drain"] = self._event("drain", node, lambda: store.revoke_lease(reg.lease), 180)

    def leader_restart(self) -> None:
        assert self.leader is not None and self.store is not None
        before = scrape(self.endpoints)
        self.leader.send_signal(signal.SIGTERM)
        self.leader.wait(30)
        self.cycles_file = self.work / "cycles-2.txt"
        t0 = time.time()
        self.start_leader(self.cycles_file)
        cpu = self.cpu()
        wait_until(lambda: self.cycles_file.exists() and self.cycles_file.read_text(),
                   120, 0.2, "the new leader's first cycle")
        first = self.cycles_file.read_text().split()
        p = self.phase(before, self.settle(), cpu)
        p.update({"first_cycle_after_start_s": round(float(first[0]) - t0, 3),
                  "first_cycle_s": float(first[1]), "lists": int(first[3]),
                  "keys": self.store.count_only(KS.root).count})
        self.res["leader_restart"] = p

    def errors(self) -> dict[str, int]:
        """Lines of every process's log that name a message-size error, a failed cycle, an
        error, a failed keepalive or a self-fence (a host starved of CPU misses renewals)."""
        pats = {"message_size": ("RESOURCE_EXHAUSTED", "larger than max"),
                "cycle_failed": ('"cycle_failed"',), "errors": ('"level": "error"',),
                "keepalive_failed": ('"keepalive_failed"',),
                "self_fence_deadline": ('"self_fence_deadline"',),
                "self_fenced_domain": ('"self_fenced_domain"',)}
        out = dict.fromkeys(pats, 0)
        for log in self.work.glob("*.log"):
            with open(log, errors="replace") as f:
                for line in f:
                    for k, ps in pats.items():
                        if any(x in line for x in ps):
                            out[k] += 1
        return out

    # ---- the run ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.cluster = start_etcd(3)
        self.store = EtcdStore(",".join(self.endpoints))
        try:
            for step in (self.boot, self.idle, self.crash, self.drain, self.leader_restart):
                print(f"bench.scale {self.n} nodes: {step.__name__}", flush=True)
                step()
        except Exception as exc:  # noqa: BLE001 - a run that stops early still reports
            self.res["failed"] = f"{type(exc).__name__}: {exc}"
        finally:
            self.res["log_lines"] = self.errors()
            self.stop()
        return self.res

    def stop(self) -> None:
        for p in [*self.hosts.values(), *([self.leader] if self.leader else [])]:
            if p.poll() is None:
                p.kill()
                p.wait(30)
        if self.store is not None:
            self.store.close()
        if self.cluster is not None:
            self.cluster.stop()
        if not self.a.keep:
            subprocess.run(["rm", "-rf", str(self.work)], check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale")
    ap.add_argument("--nodes", type=int, nargs="+", default=[50])
    ap.add_argument("--vms-per-node", type=int, default=10)
    ap.add_argument("--xml-bytes", type=int, default=4096)
    ap.add_argument("--agents-per-process", type=int, default=50)
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--agent-poll", type=float, default=1.0,
                    help="the agents' libvirt poll interval (they wake on every change of "
                         "their keys anyway; the daemon's default is 1 s)")
    ap.add_argument("--config", help="cluster config fields as JSON (default: the defaults)")
    ap.add_argument("--agents-nice", type=int, default=10,
                    help="niceness of the agent host processes (0: none).  They stand for "
                         "other machines: at 1,000 nodes their idle work took 0.7 of the 2 "
                         "cores and slowed the leader's plans 3-6 times, which a leader on "
                         "its own host would not see")
    ap.add_argument("--max-wait-s", type=float, default=600.0,
                    help="give up on a registration or boot that takes longer")
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--keep", action="store_true", help="keep the logs and fake records")
    ap.add_argument("--label", default="",
                    help="the runs' key in the JSON: LABEL-NODES (default: NODES)")
    ap.add_argument("--out", default="results/bench-scale.json")
    a = ap.parse_args(argv)
    # SIGTERM ends the run as Ctrl-C does: processes stopped, etcd removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(a.out)
    data: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    ok = True
    for n in a.nodes:
        a.nodes = n
        res = Bench(a).run()
        ok = ok and "failed" not in res
        data["runs"][f"{a.label}-{n}" if a.label else str(n)] = res
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
        out.with_suffix(".md").write_text(scale_report.markdown(data))
        print(json.dumps(res, indent=2), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
