from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bench.etcd_faults import leader_index
from cli.common import default_domain_xml
from hypervisor.fake import FakeHypervisor
from nodeagent.agent import AgentOptions, NodeAgent
from schemas import ClusterConfig, Keyspace, Placement, VmSpec
from store.etcd import EtcdStore
from tests.harness import Daemon, EtcdCluster, EtcdMember

KS = Keyspace()


def log_events(daemon: Daemon, event: str | None = None) -> list[dict[str, Any]]:
    out = []
    for line in daemon.log_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if event is None or rec.get("event") == event:
            out.append(rec)
    return out


def domain_record(root: Path, node: str, vm: str) -> dict[str, Any] | None:
    p = root / node / "domains" / f"{vm}.json"
    try:
        return dict(json.loads(p.read_text()))
    except (FileNotFoundError, ValueError):
        return None


def spec(name: str) -> VmSpec:
    return VmSpec(name=name, domain_xml=default_domain_xml(name, 64, 1), memory_mib=64, vcpus=1)


def active(hv: FakeHypervisor) -> list[str]:
    return sorted(n for n, d in hv.list_domains().items() if d.active)


def place_one(store: EtcdStore, cfg: ClusterConfig, vm: str, node: str, pid: str) -> None:
    """The cluster config, ``vm``'s spec and a leader's boot placement of it on ``node``:
    what the in-process agent tests start from (no orchestrator runs)."""
    store.put(KS.config, cfg.to_json())
    store.put(KS.vm_spec(vm), spec(vm).to_json())
    store.put(KS.vm_placement(vm), Placement(id=pid, vm=vm, node=node, kind="boot", epoch=1,
                                             reason="test", decided_at=time.time()).to_json())


def start_agent(store: EtcdStore, hv: FakeHypervisor, name: str
                ) -> tuple[NodeAgent, threading.Thread]:
    """A NodeAgent of ``name`` running in a daemon thread of the test process."""
    agent = NodeAgent(store, hv, AgentOptions(name=name, poll_interval_s=0.2))
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    return agent, t


@contextmanager
def stopped(member: EtcdMember) -> Iterator[None]:
    assert member.proc is not None
    os.kill(member.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if member.proc.poll() is None:
            os.kill(member.proc.pid, signal.SIGCONT)


def store_on_follower(etcd3: EtcdCluster) -> tuple[EtcdStore, EtcdMember]:
    """A store whose keepalives go to a follower (each store starts at a random member;
    a follower so that the others keep their leader when it stops)."""
    leader = etcd3.members[leader_index(etcd3)]
    for _ in range(30):
        store = EtcdStore(etcd3.endpoints)
        member = next(m for m in etcd3.members if m.endpoint == store.keepalive_endpoint())
        if member is not leader:
            return store, member
        store.close()
    pytest.fail("no store started its keepalives at a follower")


def wakeups(thread: threading.Thread) -> int:
    """How often the kernel has switched `thread` out so far: each wake-up from a
    sleep ends in one (Linux's /proc)."""
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        text = f.read()
    return sum(int(n) for n in re.findall(r"voluntary_ctxt_switches:\s*(\d+)", text))
