"""etcd member faults under a running cluster: no guard fire, no self-fence, no move.

A 3-member etcd (each member's client port behind a proxy that can drop its traffic),
3 agents on the fake hypervisor, 2 orchestrators and 6 VMs.  As root, ``main`` runs each
member in a network namespace of its own, routed through a *rig* namespace where the
daemons and the benchmark run (:mod:`lab.etcdnet`; it re-runs itself in there and
deletes every namespace at the end).  The faults run one after the other, each on a
cluster that keeps its quorum:

* stall:      SIGSTOP of one member, SIGCONT after STALL seconds (a hung process or disk);
* kill:       SIGKILL of one member and a restart (a crash);
* rolling:    SIGTERM and restart of every member in turn (an upgrade);
* blackhole:  one member's client traffic silently dropped for STALL seconds at the
              proxy (no FIN, no RST): the member stays in the raft cluster, only its
              clients lose it (a one-sided partition);
* cutoff:     (namespaces only) every packet to and from one member, its peers' too,
              silently dropped for STALL seconds by nftables (no FIN, RST or ICMP):
              a vanished host; the member leaves the raft cluster's view, and if it
              led, the others elect a new leader.  Each cut is checked while it holds:
              a TCP connect and an etcd read to the member must time out;
* move-leader: ``etcdctl move-leader`` to another member (a forced raft election).

Afterwards the agents' logs and the fake hypervisor's ground truth must show 0 guard
fires, 0 self-fences, 0 VMs moved and every daemon still running.  The integration
test (tests/integration/test_etcd_faults.py) runs each fault once; this module's
``main`` runs ROUNDS of them and writes the counts (``make bench-etcd-faults``).

With ``--keyspace 2`` the cluster runs on keyspace 2 (its marker written before any
daemon starts, as ``vmha keyspace migrate`` leaves it).

Usage: python -m bench.etcd_faults --rounds 3 --stall 30 --out results/bench-etcd-faults.json
       [--faults cutoff,stall,...] [--loopback] [--keyspace 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.dropproxy import DropProxy
from cli.cluster import Cluster
from cli.cluster_v2 import ClusterV2
from cli.common import default_domain_xml
from hypervisor.fake import fake_ground_truth
from lab.etcdnet import EtcdNet, netns_usable, probe_cut
from lab.localcluster import (
    EtcdCluster,
    EtcdMember,
    FakeCluster,
    poll_until,
    start_etcd,
    wait_until,
)
from schemas import ClusterConfig, Keyspace, VmSpec
from schemas.keys_v2 import KeyspaceV2
from schemas.models_v2 import KeyspaceVersion
from store.etcd import EtcdStore, StoreUnavailable

KS = Keyspace()
NODES = ("n1", "n2", "n3")
VMS = 6


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
    cluster: Cluster  # the store's keyspace, as the `vmha` commands read it
    net: EtcdNet | None = None
    placement: dict[str, list[str]] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)

    def note(self, fault: str, started: float, **kw: Any) -> None:
        rec = {"fault": fault, "seconds": round(time.monotonic() - started, 2), **kw}
        self.log.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)


@contextlib.contextmanager
def fault_rig(config: ClusterConfig, workdir: Path, net: EtcdNet | None = None,
              keyspace: int = 1) -> Iterator[Rig]:
    """The cluster the faults run on, on ``keyspace`` (1 or 2), with every VM placed and
    running; with ``net``, each etcd member in its namespace (this process runs in
    ``net.rig``)."""
    etcd = start_etcd(3, places=None if net is None else
                      [(net.member_ip(i), net.member_ns(i)) for i in range(3)])
    proxies: list[DropProxy] = []
    store: EtcdStore | None = None
    fc: ProxiedFakeCluster | None = None
    try:
        proxies = [DropProxy(m.client_port, m.host) for m in etcd.members]
        store = EtcdStore(etcd.endpoints)
        store.put(KS.config, config.to_json())
        cluster = Cluster(store)
        if keyspace == 2:  # before any daemon starts: they all run on keyspace 2
            store.put(KeyspaceV2().version, KeyspaceVersion(
                keyspace=2, state="done", started_at=time.time(), by="operator:bench",
                tool_version="bench").to_json())
            cluster = ClusterV2(store)
        fc = ProxiedFakeCluster(etcd, workdir,
                                client_endpoints=",".join(p.endpoint for p in proxies))
        for n in NODES:
            fc.start_agent(n)
        for o in ("o1", "o2"):
            fc.start_orchestrator(o)
        for i in range(VMS):
            name = f"vm{i}"
            added = cluster.add_spec(VmSpec(name=name, memory_mib=256, vcpus=1,
                                            domain_xml=default_domain_xml(name, 256, 1)))
            if not added.succeeded:
                raise RuntimeError(f"{name} exists already: the rig needs a fresh etcd")
        wait_until(lambda: len(fake_ground_truth(fc.fake_root)) == VMS, 60,
                   what="every VM running")
        rig = Rig(etcd, proxies, fc, store, cluster, net)
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


def stall_leader(rig: Rig, seconds: float) -> None:
    """A stall of whichever member is the raft leader now: past the TTL, etcd 3.4.23's
    resumed leader may revoke the leases it saw expire (#12528), the agents' both."""
    stall(rig, leader_index(rig.etcd), seconds)


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


def leader_among(members: list[EtcdMember]) -> str | None:
    """The raft leader's name once every one of ``members`` names the same one of them
    (None: they don't, or it is outside them, or one of them does not answer)."""
    try:
        status = json.loads(etcdctl("endpoint", "status", "-w", "json",
                                    endpoints=",".join(m.endpoint for m in members)))
    except (RuntimeError, ValueError, subprocess.TimeoutExpired):
        return None
    ids = {s["Status"]["header"]["member_id"]: s["Endpoint"] for s in status}
    leaders = {s["Status"]["leader"] for s in status}
    if len(status) != len(members) or len(leaders) != 1 or not leaders <= ids.keys():
        return None
    leader_ep = ids[leaders.pop()]
    return next(m.name for m in members if m.endpoint == leader_ep)


def cutoff(rig: Rig, i: int | None, seconds: float) -> None:
    """Member ``i`` (None: the raft leader at the time) cut off the network for
    ``seconds`` (:meth:`lab.etcdnet.EtcdNet.cut`); raises if the cut lets anything
    through."""
    if rig.net is None:
        raise RuntimeError("cutoff needs the etcd members in network namespaces (root)")
    t0 = time.monotonic()
    led = leader_index(rig.etcd)
    i = led if i is None else i
    m = rig.etcd.members[i]
    others = [o for o in rig.etcd.members if o is not m]
    rig.net.cut(i)
    try:
        probe = probe_cut(m.host, m.client_port)
        # The members left keep (or elect) a leader among themselves: the raft's view.
        leader_during = wait_until(lambda: leader_among(others), seconds + 10, 0.2,
                                   f"a leader among the members other than {m.name}")
        time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
    finally:
        rig.net.heal(i)
    if probe != {"tcp": "timeout", "read": "timeout"}:
        raise RuntimeError(f"the cutoff of {m.name} let something through: {probe}")
    # Its peers' TCP retransmissions backed off during the cut (the last wait of 30 s
    # of silence is about 13-25 s): the member may rejoin only that much later.
    wait_member_healthy(rig, m, timeout=60.0)
    rig.note("cutoff", t0, member=m.name, probe=probe,
             leader_before=rig.etcd.members[led].name,
             leader_during=leader_during)


FAULT_KINDS = ("stall", "stall-leader", "kill", "rolling", "blackhole", "cutoff",
               "cutoff-leader", "move-leader")


def every_fault(stall_s: float, blackhole_s: float | None = None, cut: bool = False
                ) -> list[tuple[str, Callable[[Rig], None]]]:
    """One of each fault, each member in turn where the fault is per member; ``cut``:
    the cutoffs too (the rig's members in namespaces)."""
    faults: list[tuple[str, Callable[[Rig], None]]] = []
    for i in range(3):
        faults.append((f"stall m{i}", partial(stall, i=i, seconds=stall_s)))
    for i in range(3):
        faults.append((f"kill m{i}", partial(kill_restart, i=i)))
    faults.append(("rolling restart", rolling_restart))
    for i in range(3):
        faults.append((f"blackhole m{i}", partial(blackhole, i=i,
                                                  seconds=blackhole_s or stall_s)))
    for i in range(3 if cut else 0):
        faults.append((f"cutoff m{i}", partial(cutoff, i=i, seconds=stall_s)))
    faults.append(("move-leader", move_leader))
    return faults


def chosen_faults(stall_s: float, kinds: list[str] | None, cut: bool
                  ) -> list[tuple[str, Callable[[Rig], None]]]:
    """:func:`every_fault` of the given kinds (None: all), in that order; the kind
    ``cutoff-leader`` is one cutoff of whichever member leads at the time, and
    ``stall-leader`` one stall of it."""
    faults = every_fault(stall_s, cut=cut)
    if kinds is None:
        return faults
    out: list[tuple[str, Callable[[Rig], None]]] = []
    for kind in kinds:
        if kind == "cutoff-leader":
            out.append(("cutoff leader", partial(cutoff, i=None, seconds=stall_s)))
        elif kind == "stall-leader":
            out.append(("stall leader", partial(stall_leader, seconds=stall_s)))
        else:
            out += [f for f in faults if f[0].split()[0] == kind]
    return out


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
    fences = sorted(rig.cluster.snapshot().fences)
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
        # Leases etcd itself revoked under a live agent (#12528: the resumed raft leader),
        # as each keyspace's agent reports it; they must cost no fence and no move.
        "revoked_by_etcd": sum(len(events(t, "leases_revoked_by_etcd", "lease_revoked"))
                               for t in logs.values()),
        # The closest a failed keepalive came to the self-fence deadline (None: none failed).
        "min_remaining_s": min((float(e["remaining_s"]) for e in failed), default=None),
    }


def run(config: ClusterConfig, rounds: int, stall_s: float, workdir: Path,
        kinds: list[str] | None = None, net: EtcdNet | None = None, keyspace: int = 1
        ) -> dict[str, Any]:
    with fault_rig(config, workdir, net, keyspace) as rig:
        for _ in range(rounds):
            for _name, fault in chosen_faults(stall_s, kinds, cut=net is not None):
                fault(rig)
        time.sleep(config.lease_ttl_s)  # a late consequence would show by now
        return {"config": config.model_dump(by_alias=True), "keyspace": keyspace,
                "rounds": rounds,
                "stall_s": stall_s, "members_in_netns": net is not None, "faults": rig.log,
                **outcome(rig)}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM too unwinds the rig (processes, namespaces)


def _in_namespaces(args: argparse.Namespace) -> int:
    net = EtcdNet(f"vmha-ef-{os.getpid()}")
    argv = ["--rounds", str(args.rounds), "--stall", str(args.stall), "--out",
            str(Path(args.out).resolve()), "--net-prefix", net.prefix,
            "--keyspace", str(args.keyspace)]
    if args.faults:
        argv += ["--faults", args.faults]
    return net.run_inside([sys.executable, "-m", "bench.etcd_faults", *argv])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stall", type=float, default=30.0)
    ap.add_argument("--out", default="results/bench-etcd-faults.json")
    ap.add_argument("--faults", help="comma-separated kinds, in this order: "
                    f"{','.join(FAULT_KINDS)} (default: each kind but cutoff-leader)")
    ap.add_argument("--loopback", action="store_true",
                    help="etcd members on loopback, no namespaces (no root; no cutoff)")
    ap.add_argument("--keyspace", type=int, choices=(1, 2), default=1,
                    help="the keyspace the cluster runs on (default 1)")
    ap.add_argument("--net-prefix", help=argparse.SUPPRESS)  # run inside the rig namespace
    args = ap.parse_args(argv)
    kinds = args.faults.split(",") if args.faults else None
    if kinds is not None and not set(kinds) <= set(FAULT_KINDS):
        ap.error(f"unknown fault kinds {sorted(set(kinds) - set(FAULT_KINDS))}")
    wants_cut = kinds is not None and bool({"cutoff", "cutoff-leader"} & set(kinds))
    signal.signal(signal.SIGTERM, _interrupt)
    net: EtcdNet | None = None
    if args.net_prefix:
        from lab.netguest import current_netns_name

        net = EtcdNet(args.net_prefix)
        if current_netns_name() != net.rig:
            ap.error("--net-prefix: not inside the rig's network namespace")
    elif not args.loopback:
        why = netns_usable()
        if why is None:
            return _in_namespaces(args)
        if wants_cut:
            ap.error(f"the cutoff fault needs network namespaces: {why}")
        print(f"etcd_faults: {why}: members on loopback, no cutoff", file=sys.stderr)
    elif wants_cut:
        ap.error("the cutoff fault needs network namespaces, not --loopback")
    wd = Path(tempfile.mkdtemp(prefix="vmha-bench-"))
    res = run(ClusterConfig(), args.rounds, args.stall, wd, kinds, net, args.keyspace)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "faults"}, indent=2))
    bad = (res["guard_fires"] or res["self_fences"] or res["vms_moved"]
           or res["fence_records"] or res["daemons_exited"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
