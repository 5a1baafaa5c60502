"""A drain (the registration lease revoked) whose agent then cannot reach etcd for a
while keeps its VMs while the leader cannot act yet.

Found by the fault campaign: an `etcdctl lease revoke` right after an etcd member was
killed and restarted; the agent saw the revoke, but its re-registration hung on the
restarting member for 3 s, and its guard fired at the old lease's deadline and
destroyed the VMs it was about to live-migrate: a graceful drain caused an outage.
After a revoke the leader waits its fence window from the moment it saw the
registration gone, which is after the agent's last acknowledged keepalive, so the
agent may keep its VMs until that keepalive's send time + the fence window - the
safety margin (fencing.policy.revoked_deadline), not only until the old deadline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench.dropproxy import DropProxy
from fencing.policy import fence_window
from hypervisor.fake import FakeHypervisor, fake_ground_truth
from schemas import Keyspace, NodeRegistration
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster, wait_until
from tests.integration.helpers import active, place_one, start_agent

pytestmark = pytest.mark.integration
KS = Keyspace()


def test_a_drain_whose_agent_cannot_reach_etcd_for_a_while_keeps_its_vms(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    cfg = TEST_CONFIG
    store = EtcdStore(etcd.endpoints)
    place_one(store, cfg, "app", "n1", "p1")
    proxy = DropProxy(etcd.members[0].client_port)
    hv = FakeHypervisor(tmp_path, "n1")
    agent, t = start_agent(EtcdStore(proxy.endpoint, retry_budget=0.3, timeout=0.3), hv, "n1")
    try:
        wait_until(lambda: active(hv) == ["app"], 30, what="app booted")
        booted = json.loads((hv.ddir / "app.json").read_text())["booted_at"]
        kv = store.get(KS.node("n1"))
        assert kv is not None
        store.revoke_lease(int(NodeRegistration.from_json(kv.value).lease_id, 16))
        wait_until(lambda: agent.membership.flags.revoked, 10, 0.005, what="revoke seen")
        seen = time.monotonic()
        proxy.drop()  # etcd unreachable for the agent from now on
        # Past the old lease's deadline (at most TTL - safety after `seen`), well
        # before the leader may act (TTL + guard timeout + margin after it).
        stall = cfg.lease_ttl_s - cfg.self_fence_safety_s + 0.7
        assert stall < fence_window(cfg) - cfg.self_fence_safety_s - 1.5
        time.sleep(max(0.0, seen + stall - time.monotonic()))
        assert active(hv) == ["app"], "destroyed while the leader could not act yet"
        proxy.restore()
        wait_until(lambda: (r := store.get(KS.node("n1"))) is not None
                   and NodeRegistration.from_json(r.value).cordoned, 15,
                   what="registered again, cordoned (the drain goes on)")
        assert active(hv) == ["app"]
        assert fake_ground_truth(tmp_path) == {"app": ["n1"]}
        assert json.loads((hv.ddir / "app.json").read_text())["booted_at"] == booted
        assert not (hv.dir / "fenced").exists()
    finally:
        proxy.restore()
        agent.stopped.set()
        agent.wake.set()
        t.join(5)
        store.close()
        proxy.close()
