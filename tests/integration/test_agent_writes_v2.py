"""The agent's keyspace-2 writes on real etcd (nodeagent.writes_v2), in an agent's order:
stale claims rewritten before registering (in batches, refused once registered), the
registration with both leases, a hand-off report compared on its own key and the
peer's, clean-up, the leave marker and the agent's cordon.  Then the same with etcd
auth on and node n1's client certificate: every write applies, nothing of n2's changes,
and n1 writing as n2 is refused.

The leader and the operator are played by the test with their writes of schemas.writes_v2."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from nodeagent.view_v2 import NodeWatch
from nodeagent.writes_v2 import AgentWrites, own_status_mods, status_guard
from schemas import writes_v2 as w
from schemas.keys_v2 import KeyspaceV2
from schemas.models import (
    AliveRecord,
    CordonMarker,
    LeaderRecord,
    LeaveMarker,
    Placement,
    VmSpec,
    VmStatus,
)
from schemas.snapshot_v2 import node_snapshot
from store.etcd import EtcdStore, PermissionDenied
from tests.authetcd import TlsEtcd
from tests.harness import wait_until
from tests.unit.builders import node_value

pytestmark = pytest.mark.integration

KS = KeyspaceV2()
OLD = 70  # stale claims of an earlier registration: more than one batch of 64


def send(store: EtcdStore, write: w.Write) -> int:
    res = store.txn(write.txn.compares, write.txn.ops)
    assert res.succeeded, f"{write.what}: a compare failed"
    return res.revision


def st(node: str, vm: str, state: str) -> VmStatus:
    return VmStatus(vm=vm, node=node, state=state, since=time.time())  # type: ignore[arg-type]


def register(aw: AgentWrites) -> int:
    """Register as the agent does (two leases); returns the token."""
    reg_lease, alive_lease = aw.store.grant_lease(30), aw.store.grant_lease(30)
    alive = AliveRecord(node=aw.me, lease_id=f"{alive_lease:x}", at=time.time())
    res = aw.register(json.dumps(node_value(aw.me, lease_id=f"{reg_lease:x}")), reg_lease,
                      alive.to_json(), alive_lease)
    assert res.succeeded
    reg = aw.store.get(KS.reg(aw.me))
    assert reg is not None and (reg.create_revision, reg.lease) == (res.revision, reg_lease)
    assert aw.store.get(KS.alive(aw.me)).lease == alive_lease  # type: ignore[union-attr]
    return res.revision


def n2_keys(store: EtcdStore) -> dict[str, int]:
    return {kv.key: kv.mod_revision for p in store.list_pages(KS.node_root("n2"))
            for kv in p.kvs}


def agent_sequence(n1: EtcdStore, n2: EtcdStore, orch: EtcdStore, op: EtcdStore) -> None:
    # What an earlier registration of n1 left: claims, one still true (web2 runs here).
    for vm, state in [("web1", "running"), ("web2", "running"), ("web3", "migrating"),
                      ("web4", "stopped"), *((f"old{i:03}", "running") for i in range(OLD))]:
        n1.put(KS.status("n1", vm), st("n1", vm, state).to_json())
    kept = {vm: n1.get(KS.status("n1", vm)).mod_revision  # type: ignore[union-attr]
            for vm in ("web2", "web4")}
    aw = AgentWrites(n1, KS, "n1")
    assert aw.rewrite_stale_claims(["web2"], now=time.time()) == OLD + 2
    states = {s.vm: s.state for s in aw.read_own_statuses()}
    assert states["web1"] == states["web3"] == states["old069"] == "stopped"
    assert states["web2"] == "running"
    assert {vm: n1.get(KS.status("n1", vm)).mod_revision  # type: ignore[union-attr]
            for vm in kept} == kept, "true claims and stopped ones are not rewritten"
    token = register(aw)
    assert aw.rewrite_stale_claims([], now=time.time()) is None, "registered: refused"
    assert states == {s.vm: s.state for s in aw.read_own_statuses()}

    # web5 migrates n2 -> n1; n2 reports it migrating (the current status).
    aw2 = AgentWrites(n2, KS, "n2")
    register(aw2)
    n2.put(KS.status("n2", "web5"), st("n2", "web5", "migrating").to_json())
    spec = VmSpec(name="web5", domain_xml="<domain type='qemu'><name>web5</name></domain>",
                  memory_mib=64, vcpus=1)
    spec_rev = send(op, w.vm_add(KS, spec))
    lease = orch.grant_lease(30)
    epoch = send(orch, w.election(KS, LeaderRecord(id="l1", host="h", pid=1, lease_id="ff",
                                                   elected_at=time.time()), lease))
    p = Placement(id="p5", vm="web5", node="n1", from_node="n2", kind="migrate", epoch=epoch,
                  reason="test", decided_at=time.time())
    send(orch, w.placement(KS, p, epoch=epoch, place_mod=0, spec=spec, spec_revision=spec_rev,
                           assignments_seen={}))
    before = n2_keys(n2)

    watch = NodeWatch(n1, KS, "n1")
    try:
        watch.start()
        wait_until(lambda: "web5" in node_snapshot(KS, watch.view([])).statuses, 5)
        view = watch.view([])
    finally:
        watch.close()
    snap = node_snapshot(KS, view)
    assert snap.invalid == ()
    own = own_status_mods(KS, "n1", view.kvs)
    cur = snap.statuses["web5"]
    guard = status_guard(KS, "n1", snap, own, "web5", cur.mod_revision)
    assert guard.peer == ("n2", before[KS.status("n2", "web5")]) and guard.own_mod == 0
    assert aw.report(token, st("n1", "web5", "running"), guard), "the arrival applies"
    written = n1.get(KS.status("n1", "web5"))
    assert written is not None
    assert VmStatus.from_json(written.value).registration == token
    assert not aw.report(token, st("n1", "web5", "running"), guard), "stale own compare"

    # Clean-up: web4 has neither an assignment nor a domain; web5 has an assignment.
    assert aw.cleanup(token, "web4", kept["web4"])
    assert n1.get(KS.status("n1", "web4")) is None
    assert not aw.cleanup(token, "web5", written.mod_revision)
    assert aw.leave(token, LeaveMarker(node="n1", lease_id="1", reason="drained", at=1.0))
    assert not aw.leave(token + 1, LeaveMarker(node="n1", lease_id="1", reason="x", at=1.0))
    marker = CordonMarker(node="n1", reason="drain", by="agent:n1", at=time.time())
    assert aw.cordon(marker)
    assert not aw.cordon(marker), "a marker there already is kept"
    assert n2_keys(n2) == before, "nothing of n2's changed"


def test_agent_writes_in_order(store: EtcdStore) -> None:
    agent_sequence(store, store, store, store)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_agent_writes_with_node_credentials(etcd_auth: TlsEtcd) -> None:
    n1 = etcd_auth.store("node-n1")
    agent_sequence(n1, etcd_auth.store("node-n2"), etcd_auth.store("orchestrator"),
                   etcd_auth.store("operator"))
    # n1 acting as n2: refused whole, nothing applied.
    as_n2 = AgentWrites(n1, KS, "n2")
    rev = etcd_auth.root.revision()
    with pytest.raises(PermissionDenied):
        as_n2.leave(1, LeaveMarker(node="n2", lease_id="1", reason="x", at=1.0))
    with pytest.raises(PermissionDenied):
        as_n2.cordon(CordonMarker(node="n2", reason="x", by="agent:n2", at=1.0))
    with pytest.raises(PermissionDenied):
        as_n2.rewrite_stale_claims([], now=1.0)  # reads n2's statuses: allowed; writes: no
    assert etcd_auth.root.revision() == rev
