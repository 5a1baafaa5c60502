"""The fault campaign's first faults (kill, stop, partition, failing fence devices,
quorum loss, compaction, capacity), as a mixin of :class:`bench.campaign.Campaign`."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

from bench.campaign_core import StepResult
from bench.campaign_keys import CampaignKeys
from bench.tcpproxy import Proxy
from lab.invariants import HistoryChecker, visibly_pending
from lab.localcluster import Daemon, EtcdCluster, poll_until
from schemas import ClusterConfig, VmSpec
from store.etcd import EtcdStore


def xml(name: str, mem: int) -> str:
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>{mem}</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>")



class ClassicFaults:
    """Needs the campaign's etcd, proxies, daemons, store, history and rng."""

    etcd: EtcdCluster | None
    store: EtcdStore | None
    keys: CampaignKeys
    history: HistoryChecker | None
    rng: random.Random
    agents: dict[str, Daemon]
    orchs: dict[str, Daemon]
    proxies: dict[str, list[Proxy]]
    mode_file: Path
    compacted: int
    base_config: ClusterConfig
    i4: list[dict[str, object]]

    def hold(self, name: str) -> None:
        raise NotImplementedError

    def release(self, name: str) -> None:
        raise NotImplementedError

    def leader(self) -> str | None:
        raise NotImplementedError

    def _down_for(self, low: float, high: float) -> None:
        """Hold a fault for the lease TTL plus a random extra."""
        time.sleep(self.base_config.lease_ttl_s + self.rng.uniform(low, high))

    def _fault_kill_agent(self, rec: StepResult, node: str, i: int) -> None:
        self.agents[node].kill()

    def _fault_stop_agent(self, rec: StepResult, node: str, i: int) -> None:
        self.hold(node)
        self.agents[node].signal(signal.SIGSTOP)
        self._down_for(1.0, 2.0)
        self.agents[node].signal(signal.SIGCONT)
        self.release(node)
        if not self.agents[node].alive():
            rec.notes.append("agent killed by its guard while stopped")

    def _fault_partition_agent(self, rec: StepResult, node: str, i: int) -> None:
        for p in self.proxies[node]:
            p.block()
        self._down_for(0.5, 2.0)
        for p in self.proxies[node]:
            p.unblock()

    def _fault_fence_hang(self, rec: StepResult, node: str, i: int) -> None:
        self._failing_fence("hang", node)

    def _fault_fence_fail(self, rec: StepResult, node: str, i: int) -> None:
        self._failing_fence("fail", node)

    def _failing_fence(self, mode: str, node: str) -> None:
        self.mode_file.write_text(mode)
        self.hold(node)
        self.agents[node].kill()
        # The device is called only after revoke_grace_s: hold long enough for retries.
        grace = self.base_config.revoke_grace_s
        self._down_for(2.0 + grace, 4.0 + grace)
        self.mode_file.write_text("ok")
        self.release(node)

    def _fault_kill_leader(self, rec: StepResult, node: str, i: int) -> None:
        rec.target = self.leader() or "-"
        if rec.target in self.orchs:
            self.orchs[rec.target].kill()

    def _fault_stop_leader(self, rec: StepResult, node: str, i: int) -> None:
        rec.target = self.leader() or "-"
        if rec.target in self.orchs:
            d = self.orchs[rec.target]
            self.hold(rec.target)
            d.signal(signal.SIGSTOP)
            self._down_for(0.5, 2.0)
            d.signal(signal.SIGCONT)
            self.release(rec.target)

    def _fault_kill_etcd(self, rec: StepResult, node: str, i: int) -> None:
        assert self.etcd is not None
        m = self.rng.choice(self.etcd.members)
        rec.target = m.name
        self.etcd.kill_member(m)
        time.sleep(self.rng.uniform(0.2, 2.0))
        self.etcd.start_member(m)

    def _fault_quorum_loss(self, rec: StepResult, node: str, i: int) -> None:
        assert self.etcd is not None
        ms = self.rng.sample(self.etcd.members, 2)
        rec.target = "+".join(m.name for m in ms)
        for m in ms:
            self.etcd.kill_member(m)
        self._down_for(0.5, 2.0)
        for m in ms:
            self.etcd.start_member(m)

    def _fault_compact(self, rec: StepResult, node: str, i: int) -> None:
        assert self.store is not None and self.history is not None
        self.history.caught_up()
        try:
            rev = min(self.store.revision(), self.history.last_rev)
            if rev > self.compacted:  # etcd refuses to compact twice to one revision
                self.store.client.compact(rev)
                self.compacted = rev
            rec.target = f"rev{rev}"
        except Exception as exc:  # noqa: BLE001 - etcd may be busy: note it
            rec.notes.append(f"compact failed: {exc!r}")

    def _fault_capacity(self, rec: StepResult, node: str, i: int) -> None:
        store = self.store
        assert store is not None
        big = f"big{i}"
        store.put(self.keys.spec(big), VmSpec(name=big, domain_xml=xml(big, 100000),
                                          memory_mib=100000, vcpus=1).to_json())
        if not poll_until(lambda: visibly_pending(store, big, self.keys.layout), 10):
            rec.notes.append("I4: unplaceable VM not visibly pending")
            self.i4.append({"invariant": "I4", "vm": big})
        store.delete(self.keys.spec(big))
        store.delete(self.keys.place(big))
        rec.target = big
