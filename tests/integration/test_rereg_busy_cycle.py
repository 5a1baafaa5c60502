"""A drain on keyspace 2 while the agent's cycle is stuck in a hypervisor call
(docs/keyspace-v2.md, section 4, "The agent"; real etcd, an in-process agent on the fake
hypervisor).

The registration lease revoked by root (an operator's drain) while the cycle thread waits
in a domain operation: here a destroy waiting for the host's lock, which the test holds
as another libvirt job holds a domain's job lock (libvirt makes a call wait up to 30 s
for it).  The agent must register again from its lease keeper's thread, with
short-deadline RPCs, while the cycle is still stuck: its guard is petted again before it
would fire, it never self-fences, the VM it was not asked to stop keeps running, and the
revoke is still told for a drain (the cordon).  Before, re-registration ran on the cycle
thread: the old deadline passed while the cycle waited, and the node self-fenced.

And a drain while the member the agent's requests go to is stopped: each request of the
new registration gives up on it after `keepalive_timeout_s`, not the store's 2 s.
"""

from __future__ import annotations

import fcntl
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.etcd_faults import leader_index
from fencing.policy import guard_fire_at, guard_timeout
from hypervisor.fake import FakeHypervisor, guest_alive
from nodeagent.agent import AgentOptions, NodeAgent
from schemas.models import NodeRegistration, VmStatus
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster, wait_until
from tests.integration.helpers import domain_record, stopped
from tests.integration.helpers_v2 import KS, Leader, mark_keyspace_2
from tests.integration.test_liveness_fence_v2 import RecordingGuard

pytestmark = pytest.mark.integration

# How long the test holds the host's lock after the revoke: past the old registration's
# deadline (at most TTL - safety = 2.5 s after its last renewal) and the guard timeout.
HOLD_S = TEST_CONFIG.lease_ttl_s + 1.0


def start_guarded(store: EtcdStore, hv: FakeHypervisor
                  ) -> tuple[NodeAgent, RecordingGuard, threading.Thread]:
    """Agent n1 running in a thread, its guard pets recorded."""
    agent = NodeAgent(store, hv, AgentOptions(name="n1", poll_interval_s=0.2, guard=False))
    guard = RecordingGuard(agent)
    agent.membership.guard = guard  # type: ignore[assignment]
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    return agent, guard, t


def waiting_in(t: threading.Thread, call: str) -> bool:
    """True if thread `t` waits for the fake host's lock inside `call`."""
    frame = sys._current_frames().get(t.ident or 0)
    names = set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return "_locked" in names and call in names


def running(store: EtcdStore, vm: str) -> bool:
    kv = store.get(KS.status("n1", vm))
    return kv is not None and VmStatus.from_json(kv.value).state == "running"


def pets_kept(guard: RecordingGuard, since: float, old_lease: int) -> None:
    """The guard never went without a pet for its timeout (nor past a pet's deadline)
    from `since` until now, and no pet came while unregistered."""
    now = time.monotonic()
    pets = [p for p in guard.pets if p[0] > since - 3.0]
    for (when, _, deadline), (nxt, _, _) in zip(pets, [*pets[1:], (now, 0, 0.0)],
                                                strict=True):
        assert nxt < guard_fire_at(when, deadline, TEST_CONFIG), \
            f"the guard would have fired {nxt - when:.2f} s after a pet"
    assert not [p for p in pets if p[0] > since + 0.1 and p[1] in (old_lease, 0)], \
        "petted while unregistered"


def test_drain_while_the_cycle_waits_in_libvirt(v2store: EtcdStore, tmp_path: Path) -> None:
    store = v2store
    leader = Leader(store)
    hv = FakeHypervisor(tmp_path, "n1")
    agent, guard, t = start_guarded(store, hv)
    lock = open(tmp_path / "n1" / ".lock", "a")  # noqa: SIM115 - closed in finally
    try:
        leader.place("web", "n1")
        leader.place("db", "n1")
        wait_until(lambda: running(store, "web") and running(store, "db"), 15,
                   what="web and db running on n1")
        web = domain_record(tmp_path, "n1", "web")
        assert web is not None and guest_alive(web["guest"])
        old = agent.reg
        assert old is not None
        # Another job holds the host: the agent's stop of db waits for it, on the cycle
        # thread.
        fcntl.flock(lock, fcntl.LOCK_EX)
        leader.remove("db")
        wait_until(lambda: waiting_in(t, "destroy"), 10, what="the cycle waiting in destroy")
        store.revoke_lease(old.lease_id)  # an operator's drain
        revoked = time.monotonic()
        back: float | None = None
        while time.monotonic() < revoked + HOLD_S:
            assert guest_alive(web["guest"]), "web was destroyed"
            assert not agent.membership.flags.fenced, "self-fenced"
            kv = store.get(KS.reg("n1"))
            if back is None and kv is not None and kv.create_revision != old.create_revision:
                back = time.monotonic() - revoked
            time.sleep(0.05)
        assert waiting_in(t, "destroy"), "the cycle was stuck throughout"
        assert back is not None, f"not registered again within {HOLD_S} s of the revoke"
        assert back < 1.5, f"registered again {back:.2f} s after the revoke"
        pets_kept(guard, revoked, old.lease_id)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    try:
        # Told for a drain (the liveness lease lived on): cordoned, mirrored into the
        # registration; db's stop went on, web untouched.
        def drained() -> bool:
            kv = store.get(KS.reg("n1"))
            return (kv is not None and NodeRegistration.from_json(kv.value).cordoned
                    and store.get(KS.cordon("n1")) is not None)
        wait_until(drained, 10, what="cordoned")
        wait_until(lambda: "db" not in hv.list_domains(), 10, what="db stopped")
        assert domain_record(tmp_path, "n1", "web") == web, "web untouched"
        assert not agent.membership.flags.fenced
        assert not agent.membership.fence.marker.path.exists()
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(10)


def test_a_drain_registers_again_past_a_stalled_member(etcd3: EtcdCluster,
                                                       tmp_path: Path) -> None:
    """The member the agent's requests go to stalls (SIGSTOP) as its registration lease
    is revoked: each request of the new registration gives up on it after
    `keepalive_timeout_s` and goes to the next member, so the agent registers again
    well within its guard timeout (the store's usual 2 s deadline alone would exceed
    most of it)."""
    leader = etcd3.members[leader_index(etcd3)]
    for _ in range(30):  # the agent's requests start at a follower (random per store)
        store = EtcdStore(etcd3.endpoints)
        member = next(m for m in etcd3.members
                      if m.endpoint == store.client.endpoint_in_use.netloc)
        if member is not leader:
            break
        store.close()
    else:
        pytest.fail("no store started at a follower")
    operator = EtcdStore(leader.endpoint)
    mark_keyspace_2(operator)
    operator.put(KS.config, TEST_CONFIG.to_json())
    hv = FakeHypervisor(tmp_path, "n1")
    agent, guard, t = start_guarded(store, hv)
    try:
        Leader(operator).place("web", "n1")
        wait_until(lambda: (kv := operator.get(KS.status("n1", "web"))) is not None
                   and VmStatus.from_json(kv.value).state == "running", 15, what="web running")
        web = domain_record(tmp_path, "n1", "web")
        old = agent.reg
        assert web is not None and old is not None
        with stopped(member):
            operator.revoke_lease(old.lease_id)
            revoked = time.monotonic()
            wait_until(lambda: (r := agent.reg) is not None and r.lease_id != old.lease_id,
                       10, 0.01, what="registered again")
            back = time.monotonic() - revoked
            time.sleep(TEST_CONFIG.lease_ttl_s)  # past the old deadline
            assert not agent.membership.flags.fenced, "self-fenced"
            pets_kept(guard, revoked, old.lease_id)
        assert back < guard_timeout(TEST_CONFIG) - 1.0, \
            f"registered again {back:.2f} s after the revoke"
        kv = operator.get(KS.reg("n1"))
        assert kv is not None and kv.lease == agent.reg.lease_id  # type: ignore[union-attr]
        assert guest_alive(web["guest"]) and domain_record(tmp_path, "n1", "web") == web
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(10)
        store.close()
        operator.close()
