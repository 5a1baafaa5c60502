"""The processes of `bench.scale` (not a test): agent hosts and the leader.

* `agents`: one process running many `NodeAgent`s, each in its own threads with its
  own `EtcdStore` (its own etcd client, leases and watch) on a record-only
  `FakeHypervisor` (no guest processes; a guest runs while this process lives, so a
  SIGKILL of the process is the power loss of all its nodes).  No guard: an agent in a
  thread never starts one (`AgentOptions.guard`), as in the in-process tests.
* `leader`: `OrchestratorV2` in a process of its own, serving its Prometheus metrics,
  with each cycle's duration appended to a file (wall time, seconds, transactions
  sent, paged lists so far): the per-cycle numbers the histogram's buckets only bound.

Usage (by bench.scale):
  python -m bench.scale_procs agents --endpoints E --fake-root DIR --names n0001,n0002
  python -m bench.scale_procs leader --endpoints E --metrics-listen 127.0.0.1:P --cycles F
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from hypervisor.fake import FakeHypervisor
from nodeagent.agent import AgentOptions, NodeAgent
from orchestrator.leader_v2 import OrchestratorV2, keyspace_of
from store.etcd import EtcdStore
from telemetry import logs, metrics

#: Node capacity: 16 VMs of bench.scale's 256 MiB, 1 vCPU (the planner spreads 10 a node
#: and keeps room for a crashed or drained node's VMs).
NODE_MEMORY_MIB = 4096
NODE_VCPUS = 16


#: Agent hosts run this much nicer than etcd and the leader: in a cluster they are other
#: machines, and here a thousand agent threads would otherwise take etcd's CPU (CFS
#: shares by thread) and measure a starved etcd instead of its cost.
AGENT_NICE = 4


def run_agents(a: argparse.Namespace) -> int:
    os.nice(AGENT_NICE)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    agents: list[tuple[NodeAgent, threading.Thread, EtcdStore]] = []
    for name in a.names.split(","):
        store = EtcdStore(a.endpoints)
        hv = FakeHypervisor(Path(a.fake_root), name, NODE_MEMORY_MIB, NODE_VCPUS,
                            migrate_seconds=a.migrate_seconds, record_only=True)
        agent = NodeAgent(store, hv, AgentOptions(name=name, poll_interval_s=a.poll_interval,
                                                  guard=False))
        t = threading.Thread(target=agent.run, name=f"agent-{name}", daemon=True)
        t.start()
        agents.append((agent, t, store))
    stopped.wait()
    for agent, _, _ in agents:
        agent.stopped.set()
        agent.wake.set()
    for _, t, store in agents:
        t.join(5)
        store.close()
    return 0


class TimedOrchestrator(OrchestratorV2):
    """OrchestratorV2 with each cycle's duration written to `out`."""

    def __init__(self, store: EtcdStore, out: TextIO, **kw: Any) -> None:
        super().__init__(store, **kw)
        self.out = out

    def cycle(self) -> Any:
        started = time.monotonic()
        try:
            return super().cycle()
        finally:
            self.out.write(f"{time.time():.3f} {time.monotonic() - started:.6f} "
                           f"{self.stats['txns']} {self.stats['lists']}\n")


def run_leader(a: argparse.Namespace) -> int:
    store = EtcdStore(a.endpoints)
    if keyspace_of(store) != 2:
        raise SystemExit("bench.scale runs keyspace 2: /vmha/version must say done")
    metrics.serve(a.metrics_listen)
    with open(a.cycles, "a", buffering=1) as out:
        orch = TimedOrchestrator(store, out, ident=a.name)

        def stop(*_: object) -> None:
            orch.stopped.set()
            orch.wake.set()

        signal.signal(signal.SIGTERM, stop)
        return orch.run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale_procs")
    ap.add_argument("what", choices=["agents", "leader"])
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--fake-root")
    ap.add_argument("--names", default="")
    ap.add_argument("--poll-interval", type=float, default=1.0)
    ap.add_argument("--migrate-seconds", type=float, default=0.2)
    ap.add_argument("--metrics-listen")
    ap.add_argument("--cycles", help="leader: file the cycle durations are appended to")
    ap.add_argument("--name", default="bench-leader")
    ap.add_argument("--log-level", default="info")
    a = ap.parse_args(argv)
    logs.setup("json", a.log_level)
    return run_agents(a) if a.what == "agents" else run_leader(a)


if __name__ == "__main__":
    raise SystemExit(main())
