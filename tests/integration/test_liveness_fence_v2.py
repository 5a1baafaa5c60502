"""Liveness fencing on keyspace 2 (docs/keyspace-v2.md, section 4; part 7) on real etcd,
with agents and their guard services as processes on the fake hypervisor
(`bench.liveness_crash`'s cluster: two nodes, one orchestrator, one VM, TTL 3 s):

* the version probe: every member's version, and `auto` is `bounded` on an etcd with
  the stale-leader revocations (Debian's 3.4.23) and `fast` only without;
* a crash (SIGKILL of agent and guard service, guests killed) is fenced after the
  bounded window under `auto` here, after the margin with `fast` set in the config;
* both leases revoked by root while the agent lives, under `bounded`: it registers
  again, no fence record, the VM stays and never runs twice;
* a drain by revoking the registration lease alone, even under `fast`: keyspace 1's
  rule (the liveness key is there), no fence record, the VM moves live.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.liveness_crash import VM, crash_once, running_on, start
from fencing.liveness_fence import liveness_window, resolve_mode, version_fixed
from fencing.policy import fence_window
from hypervisor.fake import FakeHypervisor
from lab.configs import FAST_CONFIG
from lab.invariants import DoubleRunChecker, FakeTruth
from nodeagent.agent import AgentOptions, NodeAgent
from orchestrator.liveness_v2 import PROBE_INTERVAL_S, LivenessProbe
from schemas.keys_v2 import KeyspaceV2
from schemas.models import ClusterConfig, NodeRegistration
from store.etcd import EtcdStore
from tests.harness import EtcdCluster, FakeCluster, wait_until
from tests.integration.helpers import log_events
from tests.integration.helpers_v2 import mark_keyspace_2

pytestmark = pytest.mark.integration

KS = KeyspaceV2()


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def info(self, event: str, **kw: object) -> None:
        self.events.append((event, kw))

    warning = info


def test_every_member_is_asked_its_version(etcd3: EtcdCluster) -> None:
    store = EtcdStore(etcd3.endpoints.split(",")[0])  # one endpoint: the list has all
    try:
        members = store.members()
        assert len(members) == 3
        # A member of a fresh cluster on a loaded machine may miss one deadline.
        versions = wait_until(lambda: (v := store.member_versions(members))
                              and all(v.values()) and v, 30, what="every member's version")
        assert len(versions) == 3 and all(re.match(r"^\d+\.\d+\.\d+", v or "")
                                          for v in versions.values()), versions
        log = _Log()
        now = [0.0]
        probe = LivenessProbe(store, log, lambda: now[0])
        auto = ClusterConfig(liveness_fence="auto")
        assert probe.current(auto) == "bounded"  # nothing asked yet: the safe mode
        wait_until(lambda: probe.probe_once() or all(probe.versions().values()), 30,
                   what="the probe's answers")
        want = "fast" if all(version_fixed(v) for v in versions.values()) else "bounded"
        assert probe.current(auto) == want
        assert resolve_mode("auto", versions).mode == want
        assert probe.current(ClusterConfig(liveness_fence="fast")) == "fast"
        assert [e for e, _ in log.events].count("liveness_fence_mode") >= 2
        # A member stopped: asked again after the interval, it does not answer, so
        # auto is bounded.
        etcd3.kill_member(etcd3.members[2])
        now[0] += PROBE_INTERVAL_S
        probe.probe_once()
        assert probe.versions()["m2"] is None
        assert probe.current(auto) == "bounded"
    finally:
        store.close()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, etcd: EtcdCluster, tmp_path: Path
            ) -> Iterator[tuple[FakeCluster, EtcdStore]]:
    fc, store = start(etcd, tmp_path, request.param)
    try:
        yield fc, store
    finally:
        fc.stop()
        store.close()


def waited_and_window(reason: str) -> tuple[float, float]:
    m = re.search(r"gone for ([\d.]+) s, window ([\d.]+) s", reason)
    assert m is not None, reason
    return float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("cluster", ["auto", "fast"], indirect=True)
def test_a_crash_is_fenced_after_the_liveness_window(
        cluster: tuple[FakeCluster, EtcdStore]) -> None:
    fc, store = cluster
    versions = store.member_versions(store.members())
    kv = store.get(KS.config)
    assert kv is not None
    cfg = ClusterConfig.from_json(kv.value)
    mode = resolve_mode(cfg.liveness_fence, versions).mode
    window = liveness_window(cfg, mode)
    assert window is not None
    with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
        r = crash_once(fc, store)
    assert checker.violations == [], checker.violations
    reason = r["fence_reason"]
    assert reason is not None and f"liveness fence {mode}" in reason, reason
    waited, said = waited_and_window(reason)
    assert said == pytest.approx(window, abs=0.01) and waited >= said
    # The lease outlives the crash by at least TTL - interval - RPC deadline (the last
    # acknowledged send came at most that much before): the record follows the window
    # after that, and comes before keyspace 1's window would have allowed it.
    earliest = FAST_CONFIG.lease_ttl_s - FAST_CONFIG.keepalive_interval_s - \
        FAST_CONFIG.keepalive_timeout_s
    assert r["crash_to_fence_s"] >= earliest + window - 0.1, r
    assert r["crash_to_fence_s"] < earliest + fence_window(cfg), r


def registration(store: EtcdStore, node: str) -> NodeRegistration | None:
    kv = store.get(KS.reg(node))
    return NodeRegistration.from_json(kv.value) if kv is not None else None


@pytest.mark.parametrize("cluster", ["bounded"], indirect=True)
def test_both_leases_revoked_while_the_agent_lives(
        cluster: tuple[FakeCluster, EtcdStore]) -> None:
    """What etcd #12528 does to a live node, done by root: both leases revoked at once.
    The agent pets no guard until it has registered again, which it does well before
    the bounded window ends: no fence record, the VM stays, never two copies."""
    fc, store = cluster
    node = running_on(fc)
    assert node is not None
    reg, alive = store.get(KS.reg(node)), store.get(KS.alive(node))
    assert reg is not None and alive is not None and reg.lease != alive.lease
    with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
        store.revoke_lease(reg.lease)
        store.revoke_lease(alive.lease)
        revoked = time.monotonic()
        wait_until(lambda: (kv := store.get(KS.reg(node))) is not None and kv.lease != reg.lease,
                   10, what=f"{node} registered again")
        back_s = time.monotonic() - revoked
        # Past the bounded window (3.5 s) and keyspace 1's (6.2 s): nothing fenced.
        until = revoked + fence_window(FAST_CONFIG) + 1.0
        while time.monotonic() < until:
            assert store.get(KS.fence(node)) is None, "fenced while alive"
            time.sleep(0.1)
    assert checker.violations == [] and checker.samples > 20
    assert back_s < 2.2, f"registered again {back_s:.2f} s after the revoke"
    now = registration(store, node)
    assert now is not None and not now.cordoned, "etcd's revoke is not a drain"
    assert running_on(fc) == node
    assert log_events(fc.agents[node], "leases_revoked_by_etcd")
    assert not log_events(fc.agents[node], "self_fence_deadline")


@pytest.mark.parametrize("cluster", ["fast"], indirect=True)
def test_a_drain_by_registration_revoke_is_no_liveness_fence(
        cluster: tuple[FakeCluster, EtcdStore]) -> None:
    """An operator's drain revokes the registration lease alone; the liveness key stays,
    so even under `fast` the leader keeps keyspace 1's window: no fence, a live move."""
    fc, store = cluster
    node = running_on(fc)
    assert node is not None
    reg = store.get(KS.reg(node))
    assert reg is not None
    with DoubleRunChecker(FakeTruth(fc.fake_root)).running() as checker:
        store.revoke_lease(reg.lease)
        revoked = time.monotonic()
        wait_until(lambda: (n := running_on(fc)) is not None and n != node, 20,
                   what=f"{VM} moved off {node}")
        until = revoked + fence_window(FAST_CONFIG) + 1.0
        while time.monotonic() < until:
            assert store.get(KS.fence(node)) is None, "a drain fenced"
            time.sleep(0.1)
    assert checker.violations == []
    now = registration(store, node)
    assert now is not None and now.cordoned
    assert [e["vm"] for e in log_events(fc.agents[node], "migrate_done")] == [VM]


class RecordingGuard:
    """Stands for the guard service: records each pet with the registration the agent
    held when it petted."""

    pid = 0

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.pets: list[tuple[float, int, float]] = []  # (when, lease held, deadline)

    def pet(self, deadline: float, timeout: float) -> bool:
        reg = self.agent.reg
        self.pets.append((time.monotonic(), reg.lease_id if reg else 0, deadline))
        return True

    def announce(self, terms: object) -> bool:
        return True

    def alive(self) -> bool:
        return True

    def disarm(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_no_guard_pet_while_the_registration_is_gone(etcd: EtcdCluster,
                                                      tmp_path: Path) -> None:
    """The premise of the bounded window: from the revoke of both leases until the new
    registration, the agent pets its guard with nothing (keyspace 1 pets a later
    deadline there); the new registration's first pet follows at once."""
    store = EtcdStore(etcd.endpoints)
    mark_keyspace_2(store)
    store.put(KS.config, FAST_CONFIG.to_json())
    agent = NodeAgent(store, FakeHypervisor(tmp_path, "n1"),
                      AgentOptions(name="n1", poll_interval_s=0.2, guard=False))
    guard = RecordingGuard(agent)
    agent.membership.guard = guard  # type: ignore[assignment]
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: agent.reg is not None and len(guard.pets) > 3, 15,
                   what="registered and petting")
        reg = agent.reg
        assert reg is not None
        alive = store.get(KS.alive("n1"))
        assert alive is not None
        store.revoke_lease(reg.lease_id)
        store.revoke_lease(alive.lease)
        revoked = time.monotonic()
        wait_until(lambda: agent.reg is not None and agent.reg.lease_id != reg.lease_id, 10,
                   what="registered again")
        time.sleep(0.5)
        # A renewal acknowledged just before the revoke may pet just after it.
        late = [p for p in guard.pets if p[0] > revoked + 0.1 and p[1] in (reg.lease_id, 0)]
        assert late == [], "petted while unregistered"
        new = [p for p in guard.pets if p[1] == agent.reg.lease_id]
        assert new, "the new registration pets"
        # Every pet's deadline is the minimum over both leases, so at most the round's
        # first send + TTL - safety: never later than the pet itself + TTL - safety.
        ttl_less = FAST_CONFIG.lease_ttl_s - FAST_CONFIG.self_fence_safety_s
        assert all(d <= when + ttl_less + 0.01 for when, _, d in guard.pets)
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(10)
        store.close()
