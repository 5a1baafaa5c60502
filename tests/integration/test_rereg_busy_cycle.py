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
"""

from __future__ import annotations

import fcntl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fencing.policy import guard_fire_at
from hypervisor.fake import FakeHypervisor, guest_alive
from nodeagent.agent import AgentOptions, NodeAgent
from schemas.models import NodeRegistration, VmStatus
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster, wait_until
from tests.integration.helpers import domain_record
from tests.integration.helpers_v2 import KS, Leader, mark_keyspace_2
from tests.integration.test_liveness_fence_v2 import RecordingGuard

pytestmark = pytest.mark.integration

# How long the test holds the host's lock after the revoke: past the old registration's
# deadline (at most TTL - safety = 2.5 s after its last renewal) and the guard timeout.
HOLD_S = TEST_CONFIG.lease_ttl_s + 1.0


@pytest.fixture
def v2store(etcd: EtcdCluster) -> Iterator[EtcdStore]:
    store = EtcdStore(etcd.endpoints)
    mark_keyspace_2(store)
    store.put(KS.config, TEST_CONFIG.to_json())
    try:
        yield store
    finally:
        store.close()


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


def test_drain_while_the_cycle_waits_in_libvirt(v2store: EtcdStore, tmp_path: Path) -> None:
    store, cfg = v2store, TEST_CONFIG
    leader = Leader(store)
    hv = FakeHypervisor(tmp_path, "n1")
    agent = NodeAgent(store, hv, AgentOptions(name="n1", poll_interval_s=0.2, guard=False))
    guard = RecordingGuard(agent)
    agent.membership.guard = guard  # type: ignore[assignment]
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
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
        # The guard never went without a pet for its timeout (nor past a pet's deadline),
        # and no pet came while unregistered.
        now = time.monotonic()
        pets = [p for p in guard.pets if p[0] > revoked - 3.0]
        for (when, _, deadline), (nxt, _, _) in zip(pets, [*pets[1:], (now, 0, 0.0)],
                                                    strict=True):
            assert nxt < guard_fire_at(when, deadline, cfg), \
                f"the guard would have fired {nxt - when:.2f} s after a pet"
        assert not [p for p in pets if p[0] > revoked + 0.1 and p[1] in (old.lease_id, 0)], \
            "petted while unregistered"
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
