"""etcd member faults under a running cluster: no guard fire, no self-fence, no move.

A 3-member etcd (each member's client port behind a proxy that can drop its traffic),
3 agents on the fake hypervisor, 2 orchestrators and 6 VMs.  The faults run one after
the other, each on a cluster that keeps its quorum:

* stall:      SIGSTOP of one member, SIGCONT after STALL seconds (a hung process or disk);
* kill:       SIGKILL of one member and a restart (a crash);
* rolling:    SIGTERM and restart of every member in turn (an upgrade);
* blackhole:  one member's client traffic silently dropped for STALL seconds (no FIN,
              no RST: a vanished host or a partition);
* move-leader: ``etcdctl move-leader`` to another member (a forced raft election).

Afterwards the agents' logs and the fake hypervisor's ground truth must show 0 guard
fires, 0 self-fences, 0 VMs moved and every daemon still running.  The integration
test (tests/integration/test_etcd_faults.py) runs each fault once; this module's
``main`` runs ROUNDS of them and writes the counts (``make bench-etcd-faults``).

Usage: python -m bench.etcd_faults --rounds 3 --stall 30 --out results/bench-etcd-faults.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cli.common import default_domain_xml
from hypervisor.fake import fake_ground_truth
from lab.localcluster import (
    EtcdCluster,
    EtcdMember,
    FakeCluster,
    poll_until,
    start_etcd,
    wait_until,
)
from schemas import ClusterConfig, Keyspace, VmSpec
from store.etcd import EtcdStore, StoreUnavailable

KS = Keyspace()
NODES = ("n1", "n2", "n3")
VMS = 6


class DropProxy:
    """A loopback TCP proxy whose traffic can be silently dropped.

    While dropping, bytes are neither read on to the other side nor answered and no
    connection is closed: the peer sees what a lost link or a vanished host gives, a
    hang until its own deadline (unlike bench.tcpproxy, which closes connections).
    New connections wait unforwarded.  ``restore()`` lets the held bytes through."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self._open = threading.Event()
        self._open.set()
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def drop(self) -> None:
        self._open.clear()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed.set()
        self._open.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._open.wait()
        try:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        with self._lock:
            self._conns += [client, upstream]
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._open.wait()  # dropping: hold the bytes, answer nothing
                if self._closed.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass  # either side closed: the proxy's connection ends with it
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@dataclass
class ProxiedFakeCluster(FakeCluster):
    """A FakeCluster whose daemons reach etcd through the given client endpoints."""

    client_endpoints: str = ""

    def common(self) -> list[str]:
        return ["--etcd", self.client_endpoints, "--prefix", self.prefix]


@dataclass
class Rig:
    etcd: EtcdCluster
    proxies: list[DropProxy]
    fc: ProxiedFakeCluster
    store: EtcdStore
    placement: dict[str, list[str]] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)

    def note(self, fault: str, started: float, **kw: Any) -> None:
        rec = {"fault": fault, "seconds": round(time.monotonic() - started, 2), **kw}
        self.log.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)


@contextlib.contextmanager
def fault_rig(config: ClusterConfig, workdir: Path) -> Iterator[Rig]:
    """The cluster the faults run on, with every VM placed and running."""
    etcd = start_etcd(3)
    proxies: list[DropProxy] = []
    store: EtcdStore | None = None
    fc: ProxiedFakeCluster | None = None
    try:
        proxies = [DropProxy(m.client_port) for m in etcd.members]
        store = EtcdStore(etcd.endpoints)
        store.put(KS.config, config.to_json())
        fc = ProxiedFakeCluster(etcd, workdir,
                                client_endpoints=",".join(p.endpoint for p in proxies))
        for n in NODES:
            fc.start_agent(n)
        for o in ("o1", "o2"):
            fc.start_orchestrator(o)
        for i in range(VMS):
            name = f"vm{i}"
            store.put(KS.vm_spec(name), VmSpec(name=name, memory_mib=256, vcpus=1,
                                               domain_xml=default_domain_xml(name, 256, 1))
                      .to_json())
        wait_until(lambda: len(fake_ground_truth(fc.fake_root)) == VMS, 60,
                   what="every VM running")
        rig = Rig(etcd, proxies, fc, store)
        rig.placement = fake_ground_truth(fc.fake_root)
        yield rig
    finally:
        if fc is not None:
            fc.stop()
        if store is not None:
            store.close()
        for p in proxies:
            p.close()
        etcd.stop()


# ---- faults -------------------------------------------------------------------------------


def member_answers(m: EtcdMember, timeout: float = 30.0) -> bool:
    """Whether ``m`` answers a linearizable read itself (it is back in the raft) within
    ``timeout``."""
    s = EtcdStore(m.endpoint, retry_budget=0.5, timeout=1.0)

    def ok() -> bool:
        try:
            s.revision()
            return True
        except StoreUnavailable:
            return False

    try:
        return poll_until(ok, timeout, 0.1) is not None
    finally:
        s.close()


def wait_member_healthy(rig: Rig, m: EtcdMember, timeout: float = 30.0) -> None:
    """Until the member answers a linearizable read itself (it has rejoined the raft)."""
    if not member_answers(m, timeout):
        raise TimeoutError(f"timed out after {timeout} s waiting for etcd member {m.name} "
                           "healthy")


def stall(rig: Rig, i: int, seconds: float) -> None:
    m, t0 = rig.etcd.members[i], time.monotonic()
    assert m.proc is not None
    m.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        m.proc.send_signal(signal.SIGCONT)
    wait_member_healthy(rig, m)
    rig.note("stall", t0, member=m.name)


def kill_restart(rig: Rig, i: int, down_s: float = 2.0) -> None:
    m, t0 = rig.etcd.members[i], time.monotonic()
    rig.etcd.kill_member(m, signal.SIGKILL)
    time.sleep(down_s)
    rig.etcd.start_member(m)
    wait_member_healthy(rig, m)
    rig.note("kill", t0, member=m.name)


def rolling_restart(rig: Rig) -> None:
    t0 = time.monotonic()
    for m in rig.etcd.members:
        rig.etcd.kill_member(m, signal.SIGTERM)
        rig.etcd.start_member(m)
        wait_member_healthy(rig, m)
    rig.note("rolling", t0)


def blackhole(rig: Rig, i: int, seconds: float) -> None:
    p, t0 = rig.proxies[i], time.monotonic()
    p.drop()
    try:
        time.sleep(seconds)
    finally:
        p.restore()
    rig.note("blackhole", t0, member=rig.etcd.members[i].name)


def etcdctl(*args: str, endpoints: str) -> str:
    r = subprocess.run(["etcdctl", f"--endpoints={endpoints}", "--dial-timeout=2s",
                        "--command-timeout=5s", *args],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, ETCDCTL_API="3"))
    if r.returncode != 0:
        raise RuntimeError(f"etcdctl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def leader_index(etcd: EtcdCluster) -> int:
    """Which of `etcd.members` is the raft leader now."""
    status = json.loads(etcdctl("endpoint", "status", "-w", "json", endpoints=etcd.endpoints))
    by_ep = {s["Endpoint"]: s["Status"] for s in status}
    for i, m in enumerate(etcd.members):
        st = by_ep.get(m.endpoint)
        if st is not None and st["leader"] == st["header"]["member_id"]:
            return i
    raise RuntimeError(f"no etcd leader among {sorted(by_ep)}")


def move_leader(rig: Rig) -> None:
    t0 = time.monotonic()
    status = json.loads(etcdctl("endpoint", "status", "-w", "json",
                                endpoints=rig.etcd.endpoints))
    leader = status[0]["Status"]["leader"]
    old = next(s["Endpoint"] for s in status if s["Status"]["header"]["member_id"] == leader)
    to = next(s["Status"]["header"]["member_id"] for s in status
              if s["Status"]["header"]["member_id"] != leader)
    etcdctl("move-leader", f"{to:x}", endpoints=old)
    rig.note("move-leader", t0, old_leader=f"{leader:x}", new_leader=f"{to:x}")


def every_fault(stall_s: float, blackhole_s: float | None = None
                ) -> list[tuple[str, Callable[[Rig], None]]]:
    """One of each fault, each member in turn where the fault is per member."""
    faults: list[tuple[str, Callable[[Rig], None]]] = []
    for i in range(3):
        faults.append((f"stall m{i}", partial(stall, i=i, seconds=stall_s)))
    for i in range(3):
        faults.append((f"kill m{i}", partial(kill_restart, i=i)))
    faults.append(("rolling restart", rolling_restart))
    for i in range(3):
        faults.append((f"blackhole m{i}", partial(blackhole, i=i,
                                                  seconds=blackhole_s or stall_s)))
    faults.append(("move-leader", move_leader))
    return faults


# ---- what the faults did -------------------------------------------------------------------


def events(daemon_log: str, *names: str) -> list[dict[str, Any]]:
    out = []
    for line in daemon_log.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") in names:
            out.append(rec)
    return out


def outcome(rig: Rig) -> dict[str, Any]:
    """The counts the acceptance asks for (all must be 0) and what the agents saw."""
    fc = rig.fc
    logs = {n: d.log_text() for n, d in fc.agents.items()}
    truth = fake_ground_truth(fc.fake_root)
    moved = sorted(vm for vm, nodes in rig.placement.items() if truth.get(vm) != nodes)
    fences = [n for n in NODES if rig.store.get(KS.fence(n)) is not None]
    failed = [e for t in logs.values() for e in events(t, "keepalive_failed")]
    return {
        "guard_fires": sum(len(events(t, "guard_fired")) for t in logs.values()),
        "self_fences": sum(len(events(t, "self_fence_deadline", "self_fenced_domain"))
                           for t in logs.values()),
        "vms_moved": moved,
        "fence_records": fences,
        "daemons_exited": sorted(d.name for d in [*fc.agents.values(),
                                                  *fc.orchestrators.values()]
                                 if not d.alive()),
        "keepalive_failures": len(failed),
        # The closest a failed keepalive came to the self-fence deadline (None: none failed).
        "min_remaining_s": min((float(e["remaining_s"]) for e in failed), default=None),
    }


def run(config: ClusterConfig, rounds: int, stall_s: float, workdir: Path) -> dict[str, Any]:
    with fault_rig(config, workdir) as rig:
        for _ in range(rounds):
            for _name, fault in every_fault(stall_s):
                fault(rig)
        time.sleep(config.lease_ttl_s)  # a late consequence would show by now
        return {"config": config.model_dump(by_alias=True), "rounds": rounds,
                "stall_s": stall_s, "faults": rig.log, **outcome(rig)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stall", type=float, default=30.0)
    ap.add_argument("--out", default="results/bench-etcd-faults.json")
    args = ap.parse_args(argv)
    wd = Path(tempfile.mkdtemp(prefix="vmha-bench-"))
    res = run(ClusterConfig(), args.rounds, args.stall, wd)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "faults"}, indent=2))
    bad = (res["guard_fires"] or res["self_fences"] or res["vms_moved"]
           or res["fence_records"] or res["daemons_exited"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
