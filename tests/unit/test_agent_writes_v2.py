"""The agent's keyspace-2 write decisions (nodeagent.writes_v2), pure: the status
compare on its own key (docs/keyspace-v2.md section 7, "Left for part 4"), stale claims
and clean-up.

The strongest check: every status write the agent plan's table makes on keyspace 2
(reports and crashes), guarded by `status_guard`, applies on the very state the plan
read, and fails once any status of the VM it depended on has changed."""

from __future__ import annotations

from typing import Any

import pytest

from hypervisor.base import Domain
from nodeagent.plan import Crashed, Report, plan
from nodeagent.writes_v2 import (
    StatusGuard,
    cleanups,
    keeps_record,
    own_status_mods,
    stale_claims,
    status_guard,
)
from schemas import writes_v2 as w
from schemas.keys_v2 import KeyspaceV2
from schemas.models import Placement, VmStatus
from schemas.snapshot import RawKV
from schemas.snapshot_v2 import NodeView, node_snapshot
from schemas.txn import Txn
from tests.unit.builders import cluster, migrate
from tests.unit.test_agent_plan import NODES, NOW, SCENARIOS
from tests.unit.test_agent_view_v2 import held
from tests.unit.test_snapshot_v2 import assignment_kv, status_kv, to_v2

KS = KeyspaceV2()
TOKEN = 4242


def applies(txn: Txn, kvs: list[RawKV]) -> bool:
    """Whether etcd would apply `txn` on a store holding `kvs` (the compares only)."""
    state = {kv.key: (kv.create_revision, kv.mod_revision) for kv in kvs}
    for c in txn.compares:
        create, mod = state.get(c.key, (0, 0))
        got = create if c.target == "create" else mod
        assert c.op == "==" and c.target in ("create", "mod"), c
        if got != c.value:
            return False
    return True


def status_writes(me: str, kvs: list[RawKV], domains: dict[str, Domain]
                  ) -> list[tuple[str, StatusGuard, Txn]]:
    snap = node_snapshot(KS, NodeView(me, 100, tuple(kvs)))
    own = own_status_mods(KS, me, kvs)
    out = []
    for a in plan(me, snap, domains, now=NOW):
        if isinstance(a, Report | Crashed):
            g = status_guard(KS, me, snap, own, a.vm, a.expect_mod_revision)
            s = VmStatus(vm=a.vm, node=me, state="stopped", since=NOW)
            out.append((a.vm, g, w.status_report(KS, me, TOKEN, s, own_mod=g.own_mod,
                                                  assignment_mod=g.assignment_mod,
                                                  peer=g.peer).txn))
    return out


@pytest.mark.parametrize(("me", "snap_args", "domains", "expected"), SCENARIOS)
def test_every_status_write_of_the_plan_table_applies_on_what_it_read(
        me: str, snap_args: dict[str, Any], domains: list[Domain], expected: list[Any]) -> None:
    by_name = {d.name: d for d in domains}
    v1 = cluster(**{"nodes": NODES, **snap_args})
    kvs = held(me, to_v2(v1), by_name)
    reg = RawKV(KS.reg(me), b"{}", TOKEN, TOKEN)  # the token compare: our registration
    kvs = [kv for kv in kvs if kv.key != KS.reg(me)]
    for vm, g, txn in status_writes(me, kvs, by_name):
        assert applies(txn, [*kvs, reg]), (vm, g)
        # Any status key of the VM the write depends on, changed since: refused.
        for key in [KS.status(me, vm), *([KS.status(g.peer[0], vm)] if g.peer else [])]:
            cur = next((kv for kv in kvs if kv.key == key), None)
            bumped = RawKV(key, b"{}", cur.create_revision if cur else 999, 10**6)
            assert not applies(txn, [*(kv for kv in kvs if kv.key != key), bumped, reg])
        assert not applies(txn, kvs), "without our registration: refused"


def test_hand_off_compares_the_peers_key_and_our_own() -> None:
    # n1 is the target of web1; n2's status (migrating) is the current one, n1's own key
    # an older stopped one: the report compares both.
    kvs = [assignment_kv("n1", "web1", migrate("n2", "n1"), mod=40),
           status_kv("n1", "web1", "stopped", 30), status_kv("n2", "web1", "migrating", 50)]
    snap = node_snapshot(KS, NodeView("n1", 100, tuple(kvs)))
    own = own_status_mods(KS, "n1", kvs)
    assert own == {"web1": 30}
    assert status_guard(KS, "n1", snap, own, "web1", 50) == StatusGuard(30, 40, ("n2", 50))
    # n2, the source, whose own key is current: one status compare, expected as planned.
    snap2 = node_snapshot(KS, NodeView("n2", 100, (
        assignment_kv("n2", "web1", migrate("n2", "n1"), mod=40),
        status_kv("n2", "web1", "migrating", 50))))
    assert status_guard(KS, "n2", snap2, {"web1": 50}, "web1", 50) == StatusGuard(50, 40)
    # No status at all, no assignment (an orphan domain): everything absent.
    empty = node_snapshot(KS, NodeView("n1", 100, ()))
    assert status_guard(KS, "n1", empty, {}, "web9", 0) == StatusGuard(0, 0)


def st(vm: str, state: str, node: str = "n1", **extra: Any) -> VmStatus:
    return VmStatus(vm=vm, node=node, state=state, since=1.0, **extra)  # type: ignore[arg-type]


def test_stale_claims_are_running_claims_without_an_active_domain() -> None:
    own = [st("web3", "migrating", placement_id="p3"), st("web1", "running", crashes=2),
           st("web2", "running"), st("web4", "stopped"), st("web5", "paused"),
           st("web6", "running", node="n2")]
    got = stale_claims("n1", own, active=["web2"], now=50.0)
    assert [(s.vm, s.state, s.since) for s in got] == [
        ("web1", "stopped", 50.0), ("web3", "stopped", 50.0), ("web5", "stopped", 50.0)]
    assert got[0].crashes == 2 and got[1].placement_id == "p3"  # the VM's history stays
    assert all(s.registration is None and "no domain active" in (s.error or "") for s in got)
    # Batched as the contract says: 64 ops a txn, each while unregistered.
    many = stale_claims("n1", [st(f"vm{i:03}", "running") for i in range(130)], [], now=1.0)
    txns = w.stale_claims(KS, "n1", many)
    assert [len(t.txn.ops) for t in txns] == [64, 64, 2]
    assert all(t.txn.compares == (w.token_compare(KS, "n1", 0),) for t in txns)


def test_cleanups_keep_assigned_and_defined() -> None:
    own = {"web1": 5, "web2": 6, "web3": 7, "web4": 8}
    assert cleanups(own, assigned=["web1"], domains=["web2"]) == [("web3", 7), ("web4", 8)]
    assert cleanups({}, [], []) == []


def test_a_failure_record_stays_while_the_placement_names_the_node_given_up_on() -> None:
    gave_up = VmStatus(vm="bad", node="n1", state="stopped", placement_id="p1", since=1.0,
                       error="refused", boot_failures=3)

    def placed(kind: str, node: str | None, failed_nodes: list[str]) -> Placement:
        return Placement(id="p2", vm="bad", node=node, kind=kind, epoch=1,  # type: ignore[arg-type]
                         reason="test", decided_at=1.0, failed_nodes=failed_nodes)

    assert keeps_record("n1", gave_up, placed("failed", None, ["n1"]))
    assert keeps_record("n1", gave_up, placed("boot", "n2", ["n1"]))        # relocated
    assert keeps_record("n1", gave_up.model_copy(update={"boot_failures": 0, "crashes": 2}),
                        placed("failed", None, ["n2", "n1"]))
    assert not keeps_record("n1", gave_up, placed("boot", "n2", []))        # re-armed
    assert not keeps_record("n1", gave_up, placed("failed", None, ["n2"]))  # not n1
    assert not keeps_record("n1", gave_up, None)                            # removed
    assert not keeps_record("n1", gave_up.model_copy(update={"boot_failures": 0}),
                            placed("failed", None, ["n1"]))                 # no failure


def test_own_status_mods_reads_only_our_status_keys() -> None:
    kvs = [status_kv("n1", "web1", "running", 5), status_kv("n10", "web1", "running", 6),
           RawKV(KS.status("n1", "web2"), b"{", 7, 7), RawKV(KS.reg("n1"), b"{}", 8, 8)]
    assert own_status_mods(KS, "n1", kvs) == {"web1": 5, "web2": 7}
