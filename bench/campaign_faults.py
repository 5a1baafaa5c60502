"""The fault campaign's etcd member faults, agent restart and hostile values (issue 11),
as a mixin of :class:`bench.campaign.Campaign`.

* ``stall_etcd``: SIGSTOP of one member for 1-6 s, then SIGCONT (a hung process or disk);
* ``blackhole_etcd``: every client's traffic to one member silently dropped for 1-6 s
  (no FIN, no RST: :class:`bench.dropproxy.DropProxy`, a vanished host);
* ``rolling_etcd``: SIGTERM and restart of each member in turn, each back in the raft
  before the next goes (an upgrade);
* ``agent_restart``: SIGKILL of the agent of the node whose guard runs as its own
  service, started again at once (systemd's ``Restart=``): it must adopt its
  registration, keep its VMs where they are, and no fence record may appear;
* ``hostile``: hostile keys and values (not UTF-8, deep nesting, over 256 KiB, wrong
  types, names with slashes and newlines) under every key pattern for a moment, then
  deleted: no daemon may exit and no VM may stop or move.

All keep etcd's quorum: a self-fence during one of them is needless
(:func:`bench.campaign_core.needless`).
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

from bench.campaign_core import StepResult
from bench.campaign_keys import CampaignKeys
from bench.dropproxy import DropProxy
from bench.etcd_faults import member_answers
from lab.localcluster import Daemon, EtcdCluster, EtcdMember, poll_until
from schemas import ClusterConfig
from store.etcd import EtcdStore

MEMBER_FAULTS = ("stall_etcd", "blackhole_etcd", "rolling_etcd")
NEW_FAULTS = (*MEMBER_FAULTS, "agent_restart", "hostile")

#: Before hostile values are written the cluster must be quiet (no fenced host, no
#: migration) for QUIET_HOLD_S, waited for up to QUIET_TIMEOUT_S.
QUIET_HOLD_S = 3.0
QUIET_TIMEOUT_S = 60.0

_NAMES = (b"\xff\xfe", b"fz/a/b", b"fz\nx", "fz-\u00e9t\u00e9".encode(), b"fz\x00",
          b"fz" + b"x" * 300, "\U0001f4a5".encode())


def _hostile_value(rng: random.Random) -> bytes:
    depth = rng.randint(1_000, 20_000)
    return rng.choice([
        b"[" * depth + b"]" * depth,
        b'{"a":' * depth + b"1" + b"}" * depth,
        b'{"schema": 1, "x": "' + b"x" * (256 * 1024 + rng.randint(1, 4096)) + b'"}',
        b"\xff\xfe{}",
        b'{"schema": 99, "name": "fz"}',
        b'{"schema": 1, "name": 7, "memory_mib": "lots"}',
        b"[1, 2, 3]", b"",
    ])


class NewFaults:
    """Needs the campaign's etcd, drop proxies, store, rng, agents and observers."""

    etcd: EtcdCluster | None
    store: EtcdStore | None
    keys: CampaignKeys
    rng: random.Random
    drops: list[DropProxy]
    agents: dict[str, Daemon]
    orchs: dict[str, Daemon]
    svc_node: str
    flagged: list[dict[str, object]]
    fake_root: Path
    base_config: ClusterConfig

    def start_agent(self, n: str) -> None:
        raise NotImplementedError

    def hold(self, name: str) -> None:
        raise NotImplementedError

    def release(self, name: str) -> None:
        raise NotImplementedError

    def registrations(self) -> dict[str, int]:
        raise NotImplementedError

    def truth(self) -> dict[str, list[str]]:
        raise NotImplementedError

    def settled(self, replaced: dict[str, int], old_leader: int | None) -> bool:
        raise NotImplementedError

    def wait_member(self, m: EtcdMember, timeout: float = 30.0) -> bool:
        """Until ``m`` answers a linearizable read itself (it is back in the raft)."""
        return member_answers(m, timeout)

    def _fault_stall_etcd(self, rec: StepResult, node: str, i: int) -> None:
        assert self.etcd is not None
        m = self.rng.choice(self.etcd.members)
        rec.target = m.name
        assert m.proc is not None
        m.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(self.rng.uniform(1.0, 6.0))
        finally:
            m.proc.send_signal(signal.SIGCONT)
        if not self.wait_member(m):
            rec.notes.append(f"member {m.name} not back after its stall")

    def _fault_stall_frozen_agent(self, rec: StepResult, node: str, i: int) -> None:
        """The negative control of the needless-self-fence count (never drawn at random):
        a member stall during which ``node``'s agent freezes past its guard's timeout,
        as an agent whose keepalive waits on the stalled member without a deadline of
        its own would.  Quorum stays reachable, so its guard's fire is needless."""
        assert self.etcd is not None
        m = self.rng.choice(self.etcd.members)
        self.hold(node)
        self.agents[node].signal(signal.SIGSTOP)
        m.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            time.sleep(self.base_config.lease_ttl_s + 1.0)
        finally:
            m.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            self.agents[node].signal(signal.SIGCONT)
            self.release(node)
        self.wait_member(m)

    def _fault_blackhole_etcd(self, rec: StepResult, node: str, i: int) -> None:
        assert self.etcd is not None
        j = self.rng.randrange(len(self.drops))
        rec.target = self.etcd.members[j].name
        self.drops[j].drop()
        try:
            time.sleep(self.rng.uniform(1.0, 6.0))
        finally:
            self.drops[j].restore()

    def _fault_rolling_etcd(self, rec: StepResult, node: str, i: int) -> None:
        assert self.etcd is not None
        rec.target = "all"
        for m in self.etcd.members:
            self.etcd.kill_member(m, signal.SIGTERM)
            self.etcd.start_member(m)
            if not self.wait_member(m):
                rec.notes.append(f"member {m.name} not back in the rolling restart")

    def _fault_agent_restart(self, rec: StepResult, node: str, i: int) -> None:
        """SIGKILL + restart at once; checked after the old lease's TTL and the fence
        window have passed (by :meth:`Campaign.step`'s ``min_wait``)."""
        rec.target = node = self.svc_node
        # A move the previous step set going (a rebalance's) would show as a VM lost
        # by the restart.
        if not self._wait_quiet(QUIET_TIMEOUT_S):
            rec.notes.append(f"agent restart: cluster not quiet within {QUIET_TIMEOUT_S} s; "
                             "compared anyway")
        self.hold(node)
        self._restart_before = (self.registrations().get(node), self._on(node))
        self.agents[node].kill()
        self.start_agent(node)
        self.release(node)

    def check_agent_restart(self, rec: StepResult) -> None:
        """After the settle: same registration, same VMs, no fence record."""
        assert self.store is not None
        node = rec.target
        reg, before = self._restart_before
        after_reg, after = self.registrations().get(node), self._on(node)
        bad = []
        if reg is None or after_reg != reg:
            bad.append(f"registration {reg} -> {after_reg} (not adopted)")
        if after != before:
            bad.append(f"VMs on {node} {before} -> {after}")
        if self.store.get(self.keys.fence(node)) is not None:
            bad.append(f"fence record for {node}")
        if bad:
            rec.notes.append("agent restart: " + "; ".join(bad))
            self.flagged.append({"invariant": "R", "step": rec.step, "detail": bad})

    def _on(self, node: str) -> dict[str, float]:
        """VM -> boot time of the VMs running on ``node`` (a reboot changes it)."""
        out: dict[str, float] = {}
        for vm, ns in self.truth().items():
            if node in ns:
                p = self.fake_root / node / "domains" / f"{vm}.json"
                try:
                    out[vm] = float(json.loads(p.read_text()).get("booted_at", 0.0))
                except (OSError, ValueError):
                    out[vm] = -1.0  # read mid-write: compared as a change
        return out

    def _daemon_list(self) -> dict[str, Daemon]:
        return {**self.agents, **self.orchs}

    def _fault_hostile(self, rec: StepResult, node: str, i: int) -> None:
        assert self.store is not None
        # Only exits during the writes count: a daemon an earlier fault killed (the
        # leader, say) is restarted by the supervisor first.
        poll_until(lambda: all(d.alive() for d in self._daemon_list().values()), 10)
        if not self._wait_quiet(QUIET_TIMEOUT_S):
            rec.notes.append(f"hostile: cluster not quiet within {QUIET_TIMEOUT_S} s; "
                             "compared anyway")
        running = {n: d for n, d in self._daemon_list().items() if d.alive()}
        before = {vm: sorted(ns) for vm, ns in self.truth().items()}
        keys = []
        # Indices, so keyspace 1 draws the patterns it always drew for a seed.
        for pattern in self.rng.sample(range(self.keys.pattern_count), 4):
            key = self.keys.hostile_key(pattern, self.rng.choice(_NAMES) + str(i).encode(),
                                        node)
            self.store.client.put(key, _hostile_value(self.rng))
            keys.append(key)
        rec.target = f"{len(keys)} keys"
        time.sleep(self.rng.uniform(1.0, 2.0) + self.base_config.keepalive_interval_s)
        for key in keys:
            self.store.client.delete(key)
        bad = []
        after = {vm: sorted(ns) for vm, ns in self.truth().items()}
        if after != before:
            bad.append(f"VMs changed {before} -> {after}")
        now = self._daemon_list()
        gone = sorted(n for n, d in running.items() if not d.alive() or now.get(n) is not d)
        if gone:
            bad.append(f"daemons exited during the writes: {gone}")
        if bad:
            rec.notes.append("hostile: " + "; ".join(bad))
            self.flagged.append({"invariant": "H", "step": rec.step, "detail": bad})

    def _quiet(self) -> bool:
        """No host fenced (a guard's destroy passes run while its marker exists), no
        migration in flight, and every declared VM running once: what the previous
        step set going has played out, so a change during the writes is theirs."""
        if any(self.fake_root.glob("*/fenced")):
            return False
        for path in self.fake_root.glob("*/domains/*.json"):
            try:
                d = json.loads(path.read_text())
            except (OSError, ValueError):
                return False  # mid-write: look again
            if d.get("incoming") or d.get("outgoing"):
                return False
        return self.settled({}, None)

    def _wait_quiet(self, timeout: float) -> bool:
        """:meth:`_quiet`, held for QUIET_HOLD_S (a late guard pass or a placement the
        leader is still writing shows within it)."""
        since: list[float] = []

        def held() -> bool:
            now = time.monotonic()
            if not self._quiet():
                since.clear()
                return False
            since[:] = since or [now]
            return now - since[0] >= QUIET_HOLD_S

        return poll_until(held, timeout, 0.1) is not None

    _restart_before: tuple[int | None, dict[str, float]]


__all__ = ["MEMBER_FAULTS", "NEW_FAULTS", "NewFaults"]
