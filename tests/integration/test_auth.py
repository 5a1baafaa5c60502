"""etcd authentication of keyspace 2 (docs/keyspace-v2.md, sections 1, 2 and 5) against a
real etcd with TLS, client-certificate authentication and auth enabled by `vmha auth
setup`: each credential writes what its role's writes of `schemas.writes_v2` write, sent
as those very transactions, and every other write is refused whole (PermissionDenied,
the revision unchanged)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest

from schemas import writes_v2 as w
from schemas.acl import KeyRange
from schemas.events import Event, event_id
from schemas.keys_v2 import KeyspaceV2
from schemas.models import (
    ClusterConfig,
    CordonMarker,
    FenceRecord,
    LeaderRecord,
    Placement,
    VmSpec,
    VmStatus,
)
from store.auth import EtcdAuth, Grant
from store.etcd import EtcdStore, PermissionDenied, Put, StoreRejected
from tests.authetcd import TlsEtcd
from tests.conftest import AUTH_NODES

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")]

KS = KeyspaceV2()


def send(store: EtcdStore, write: w.Write) -> int:
    """Send `write` as its transaction; it must apply (all compares hold)."""
    res = store.txn(write.txn.compares, write.txn.ops)
    assert res.succeeded, f"{write.what}: a compare failed"
    return res.revision


def refused(etcd: TlsEtcd, request: Callable[[], Any], what: str) -> None:
    """`request` is refused for want of a permission, and nothing of it applied."""
    before = etcd.root.revision()
    started = time.monotonic()
    with pytest.raises(PermissionDenied):
        request()
    assert time.monotonic() - started < 1.0, f"{what}: refused at once, never retried"
    assert etcd.root.revision() == before, f"{what}: applied in part"


def refused_write(etcd: TlsEtcd, store: EtcdStore, write: w.Write) -> None:
    refused(etcd, lambda: store.txn(write.txn.compares, write.txn.ops), write.what)


def spec(vm: str) -> VmSpec:
    return VmSpec(name=vm, domain_xml=f"<domain type='qemu'><name>{vm}</name></domain>",
                  memory_mib=64, vcpus=1)


def status(node: str, vm: str, state: str = "stopped") -> VmStatus:
    return VmStatus(vm=vm, node=node, state=state, since=time.time())  # type: ignore[arg-type]


def event(actor: str) -> Event:
    return Event(id=event_id(time.time(), actor, 1), at=time.time(), kind="boot", actor=actor)


def fence(node: str, epoch: int) -> FenceRecord:
    return FenceRecord(node=node, lease_id="ab", method="self", outcome="success",
                       reason="lost", epoch=epoch, duration_s=1.0, fenced_at=time.time())


def placement(vm: str, node: str, epoch: int) -> Placement:
    return Placement(id="p1", vm=vm, node=node, kind="boot", epoch=epoch, reason="test",
                     decided_at=time.time())


def register(store: EtcdStore, me: str) -> tuple[int, int]:
    """`me` registers as its agent does: returns (token, registration lease)."""
    reg_lease, alive_lease = store.grant_lease(30), store.grant_lease(30)
    token = send(store, w.registration(KS, me, json.dumps({"name": me}), reg_lease,
                                       json.dumps({"node": me}), alive_lease))
    return token, reg_lease


def vmha_json(etcd: TlsEtcd, cn: str, *args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = etcd.vmha(cn, "-o", "json", *args)
    assert code in (0, 1), err
    return code, json.loads(out)


def test_setup_refuses_on_keyspace_1_and_a_dry_run_writes_nothing(etcd_tls: TlsEtcd) -> None:
    auth = EtcdAuth(etcd_tls.root)
    before = etcd_tls.root.revision()
    code, _, err = etcd_tls.vmha("root", "auth", "setup", "--nodes", "n1", "--root-cn-only")
    assert code == 1
    assert "/vmha/version is absent" in err and "keyspace 1" in err
    assert "vmha keyspace migrate" in err and "would stop every agent" in err
    etcd_tls.mark_keyspace_2(state="switching")
    code, _, err = etcd_tls.vmha("root", "auth", "setup", "--root-cn-only")
    assert code == 1 and "not done" in err and "'switching'" in err
    assert not auth.enabled() and auth.role_names() == [] and auth.user_names() == []

    etcd_tls.mark_keyspace_2()
    before = etcd_tls.root.revision()
    code, plan = vmha_json(etcd_tls, "root", "auth", "setup", "--nodes", "n1", "--dry-run")
    assert code == 0 and plan["dry_run"] and plan["writes"] == 0
    assert plan["config"] == "would create"
    assert "add role node-n1" in plan["changes"]
    assert "grant node-n1 readwrite [/vmha/n/n1/, /vmha/n/n10)" in plan["changes"]
    assert "add user node-n1 (client certificate CN=node-n1)" in plan["changes"]
    assert plan["changes"][-1] == "enable authentication"
    assert not auth.enabled() and auth.role_names() == [] and auth.user_names() == []
    assert etcd_tls.root.revision() == before

    # A write whose outcome already holds (a retry after a lost answer) succeeds; any
    # other refusal raises.
    auth.role_add("x")
    auth.role_add("x")
    with pytest.raises(StoreRejected, match="role name not found"):
        auth.grant("nope", Grant("read", KeyRange.key("/k")))
    with pytest.raises(StoreRejected, match="user name not found"):
        auth.user_grant_role("nobody", "x")
    auth.role_delete("x")
    auth.role_delete("x")
    assert auth.role_names() == []


def test_setup_twice_writes_nothing_the_second_time(etcd_auth: TlsEtcd) -> None:
    auth = EtcdAuth(etcd_auth.root)
    assert auth.enabled()
    wanted = set(AUTH_NODES)
    state = auth.state(lambda _: True)
    assert {"orchestrator", "operator", "monitoring",
            *(f"node-{n}" for n in wanted)} <= set(state.roles)
    assert state.users["node-n1"] == {"node-n1"} and state.users["root"] == {"root"}
    assert etcd_auth.root.get(KS.config) is not None, "setup creates the default config"
    before = etcd_auth.root.revision()

    code, again = vmha_json(etcd_auth, "root", "auth", "setup", "--root-cn-only")
    assert code == 0 and again["changes"] == [] and again["writes"] == 0
    assert again["config"] == "unchanged"
    assert etcd_auth.root.revision() == before
    assert auth.state(lambda _: True) == state
    code, report = vmha_json(etcd_auth, "root", "auth", "check")
    assert code == 0 and report["differences"] == [] and report["enabled"]

    # A grant lost by hand shows in check, and setup grants it again, alone.
    auth.revoke("node-n2", next(g.keys for g in state.roles["node-n2"] if g.kind == "read"))
    code, report = vmha_json(etcd_auth, "root", "auth", "check")
    assert code == 1 and len(report["differences"]) == 1
    code, fix = vmha_json(etcd_auth, "root", "auth", "setup")
    assert fix["changes"] == report["differences"] and fix["writes"] == 1
    assert auth.state(lambda _: True) == state
    # Only etcd's root administers auth.
    code, _, err = etcd_auth.vmha("operator", "auth", "check")
    assert code == 1 and "root credential" in err


def test_a_node_writes_its_own_keys_only(etcd_auth: TlsEtcd) -> None:
    n1, n2 = etcd_auth.store("node-n1"), etcd_auth.store("node-n2")
    op = etcd_auth.store("operator")
    spec_rev = send(op, w.vm_add(KS, spec("web1")))
    # Everything the node role writes (section 2), in an agent's order.
    claims_rev = send(n1, w.stale_claims(KS, "n1", [status("n1", "web1")])[0])
    token, _ = register(n1, "n1")
    send(n1, w.own_put(KS, "n1", token, KS.leaving("n1"), json.dumps({"node": "n1"})))
    report_rev = send(n1, w.status_report(KS, "n1", token, status("n1", "web1", "running"),
                                          own_mod=claims_rev, assignment_mod=0))
    send(n1, w.agent_cordon(KS, "n1", CordonMarker(node="n1", reason="drain", by="agent",
                                                   at=time.time())))
    send(n1, w.node_event(KS, "n1", event("agent:n1")))
    send(n1, w.status_cleanup(KS, "n1", token, "web1", own_mod=report_rev))
    # ... and reads what its agent needs.
    assert n1.get(KS.spec("web1")).mod_revision == spec_rev  # type: ignore[union-attr]
    assert [kv.key for p in n1.list_pages(KS.node_dir) for kv in p.kvs] == [
        KS.alive("n1"), KS.leaving("n1"), KS.reg("n1")]
    n1.get(KS.config), n1.get(KS.version), n1.count_only(KS.assignments("n1"))

    n2_token, n2_lease = register(n2, "n2")
    now = time.time()
    denied = [
        w.registration(KS, "n2", "{}", 0, "{}", 0, adopt_token=n2_token),
        w.own_put(KS, "n2", n2_token, KS.leaving("n2"), "{}"),
        w.status_report(KS, "n2", n2_token, status("n2", "web1"), own_mod=0, assignment_mod=0),
        w.agent_cordon(KS, "n2", CordonMarker(node="n2", reason="x", by="agent", at=now)),
        w.node_event(KS, "n2", event("agent:n2")),
        w.placement(KS, placement("web1", "n1", 1), epoch=0, place_mod=0, spec=spec("web1"),
                    spec_revision=spec_rev, assignments_seen={}),
        w.fence_record(KS, fence("n3", 1), epoch=0, fence_mod=0),
        w.vm_add(KS, spec("web2")),
        w.set_config(KS, ClusterConfig()),
        w.cordon(KS, CordonMarker(node="n2", reason="x", by="op", at=now)),
    ]
    for write in denied:
        refused_write(etcd_auth, n1, write)
    # Its own assignments are the leader's to write, and the leader key its to hold.
    refused(etcd_auth, lambda: n1.put(KS.assignment("n1", "web1"), "{}"), "own assignment")
    refused(etcd_auth, lambda: n1.put(KS.leader, "{}"), "leader key")
    # Nor may it end another node's registration (the lease's keys are n2's).
    refused(etcd_auth, lambda: n1.revoke_lease(n2_lease), "revoke of n2's lease")
    assert etcd_auth.root.get(KS.reg("n2")) is not None
    refused(etcd_auth, lambda: n1.get(KS.leader), "read of the leader key")


def test_orchestrator_operator_and_monitoring(etcd_auth: TlsEtcd) -> None:
    orch, op = etcd_auth.store("orchestrator"), etcd_auth.store("operator")
    mon, n1 = etcd_auth.store("monitoring"), etcd_auth.store("node-n1")
    spec_rev = send(op, w.vm_add(KS, spec("web1")))
    send(op, w.set_config(KS, ClusterConfig()))
    register(n1, "n1")
    lease = orch.grant_lease(30)
    epoch = send(orch, w.election(KS, LeaderRecord(id="l1", host="h", pid=1, lease_id="ff",
                                                   elected_at=time.time()), lease))
    send(orch, w.placement(KS, placement("web1", "n1", epoch), epoch=epoch, place_mod=0,
                           spec=spec("web1"), spec_revision=spec_rev, assignments_seen={}))
    assert n1.get(KS.assignment("n1", "web1")) is not None, "n1 reads its assignment"
    send(orch, w.fence_record(KS, fence("n3", epoch), epoch=epoch, fence_mod=0))
    send(orch, w.leader_event(KS, event("leader:l1")))
    for write in (w.registration(KS, "n1", "{}", 0, "{}", 0, adopt_token=1),
                  w.status_report(KS, "n1", 1, status("n1", "web1"), own_mod=0,
                                  assignment_mod=0),
                  w.vm_add(KS, spec("web2")), w.set_config(KS, ClusterConfig())):
        refused_write(etcd_auth, orch, write)
    refused(etcd_auth, lambda: orch.put(KS.reg("n1"), "{}"), "orchestrator: registration")
    for write in (w.fence_record(KS, fence("n3", epoch), epoch=epoch, fence_mod=0),
                  w.election(KS, LeaderRecord(id="l2", host="h", pid=1, lease_id="ff",
                                              elected_at=1.0), 0)):
        refused_write(etcd_auth, op, write)

    # Monitoring reads everything, writes nothing.
    everything = [kv.key for p in etcd_auth.root.list_pages(KS.root) for kv in p.kvs]
    assert [kv.key for p in mon.list_pages(KS.root) for kv in p.kvs] == everything
    assert mon.count_only(KS.history).count == 1
    for write in (w.election(KS, LeaderRecord(id="l3", host="h", pid=1, lease_id="ff",
                                              elected_at=1.0), 0),
                  w.vm_add(KS, spec("web3")), w.set_config(KS, ClusterConfig()),
                  w.node_event(KS, "n1", event("agent:n1")),
                  w.cordon(KS, CordonMarker(node="n1", reason="x", by="op", at=1.0))):
        refused_write(etcd_auth, mon, write)
    refused(etcd_auth, lambda: mon.txn([], [Put(KS.history + "x", "1")]), "monitoring: history")


def test_rotation_refuses_the_old_certificate(etcd_auth: TlsEtcd) -> None:
    old = etcd_auth.store("node-n1")
    token, _ = register(old, "n1")
    code, out = vmha_json(etcd_auth, "root", "auth", "node", "rotate", "n1")
    assert code == 0 and out["new_user"] == "node-n1.g2" and out["writes"] == 2
    new = etcd_auth.store("node-n1.g2")
    # Both certificates work until the rotation is finished (the agent restarts in place).
    send(new, w.own_put(KS, "n1", token, KS.leaving("n1"), "{}"))
    send(old, w.own_put(KS, "n1", token, KS.leaving("n1"), "{}"))
    code, again, _ = etcd_auth.vmha("root", "auth", "node", "rotate", "n1")
    assert code == 0 and "under way" in again and "nothing written" in again
    code, out = vmha_json(etcd_auth, "root", "auth", "node", "rotate", "n1", "--finish")
    assert code == 0 and out["changes"] == ["delete user node-n1"] and out["kept"] == "node-n1.g2"
    refused(etcd_auth, lambda: old.put(KS.leaving("n1"), "{}"), "the old certificate")
    refused(etcd_auth, lambda: old.get(KS.reg("n1")), "a read with the old certificate")
    send(new, w.own_put(KS, "n1", token, KS.leaving("n1"), "{}"))
    assert etcd_auth.root.get(KS.reg("n1")) is not None, "the registration is untouched"
    # Setup does not bring the retired user back.
    code, out = vmha_json(etcd_auth, "root", "auth", "setup")
    assert code == 0 and out["writes"] == 0


def test_node_add_and_remove(etcd_auth: TlsEtcd) -> None:
    code, out = vmha_json(etcd_auth, "root", "auth", "node", "add", "n3")
    assert code == 0 and out["changes"][0] == "add role node-n3" and out["writes"] >= 3
    n3 = etcd_auth.store("node-n3")
    register(n3, "n3")
    code, _, err = etcd_auth.vmha("root", "auth", "node", "remove", "n3")
    assert code == 1 and "in use (registered" in err
    code, out = vmha_json(etcd_auth, "root", "auth", "node", "remove", "n3", "--i-know")
    assert out["changes"] == ["delete user node-n3", "delete role node-n3"]
    refused(etcd_auth, lambda: n3.put(KS.leaving("n3"), "{}"), "a removed node")
