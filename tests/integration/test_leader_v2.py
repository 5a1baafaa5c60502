"""The leader alone on keyspace 1 and on keyspace 2, against real etcd; the agents are
simulated by the test, which writes their registrations and statuses itself.

The same stories run on both keyspaces (`ks`: 1 or 2): a new VM is placed; a node is
lost, fenced and its VM booted elsewhere; an idle cluster costs no transaction.  On
keyspace 2 also: the assignments move in the placement's transaction, a spec edit
refreshes them, `vm remove` deletes them, a confirm-off becomes a manual fence, and
the marker chooses (and ends) the loop."""

from __future__ import annotations

import gc
import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from fencing.policy import fence_window
from orchestrator import txn_v2
from orchestrator.leader import Orchestrator
from orchestrator.leader_v2 import EXIT_KEYSPACE_CHANGED, OrchestratorV2, orchestrator_for
from schemas import Keyspace
from schemas.errors import ConfigError
from schemas.keys_v2 import KeyspaceV2
from schemas.models import FenceRecord, Placement, VmStatus
from schemas.models_v2 import Assignment, ConfirmOff, KeyspaceVersion
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG, vmha
from tests.harness import EtcdCluster, wait_until
from tests.integration.helpers import spec
from tests.integration.test_watchmodel import Clock, stall, stopped
from tests.unit.builders import node_value

pytestmark = pytest.mark.integration
KS, KS2 = Keyspace(), KeyspaceV2()
# No guard: the fence window is TTL + margin (4 s), so a crash story stays short.
CONFIG = TEST_CONFIG.model_copy(update={"guard_enabled": False})
MARKER = KeyspaceVersion(keyspace=2, state="done", started_at=1.0, by="root",
                         tool_version="test")


@dataclass
class World:
    """etcd as the agents of the test's nodes leave it, in keyspace `ks`."""

    etcd: EtcdCluster
    store: EtcdStore
    ks: int
    leases: dict[str, int]

    def register(self, node: str) -> None:
        lease = self.store.grant_lease(60)  # the test revokes it to lose the node
        self.leases[node] = lease
        value = node_value(node, lease_id=f"{lease:x}")
        key = KS.node(node) if self.ks == 1 else KS2.reg(node)
        self.store.put(key, json_of(value), lease)

    def lose(self, node: str) -> None:
        self.store.revoke_lease(self.leases.pop(node))

    def report(self, node: str, vm: str, state: str, placement_id: str) -> int:
        """Write the status as the node's agent would; its revision."""
        st = VmStatus(vm=vm, node=node, state=state, placement_id=placement_id,  # type: ignore[arg-type]
                      since=time.time())
        return self.store.put(KS.vm_status(vm) if self.ks == 1 else KS2.status(node, vm),
                              st.to_json())

    def placement(self, vm: str) -> tuple[Placement, int] | None:
        kv = self.store.get(KS.vm_placement(vm) if self.ks == 1 else KS2.place(vm))
        return (Placement.from_json(kv.value), kv.mod_revision) if kv else None

    def spec_key(self, vm: str) -> str:
        return KS.vm_spec(vm) if self.ks == 1 else KS2.spec(vm)

    def assignments(self, vm: str) -> dict[str, tuple[Assignment, int]]:
        out = {}
        for kv in self.store.get_prefix(KS2.assignment_dir):
            a = Assignment.from_json(kv.value)
            if a.vm == vm:
                out[kv.key.split("/")[-2]] = (a, kv.mod_revision)
        return out


def json_of(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def etcd_counts(etcd: EtcdCluster) -> dict[str, int]:
    """Requests etcd handled, by gRPC method (its /metrics)."""
    text = urllib.request.urlopen(f"http://{etcd.members[0].endpoint}/metrics",
                                  timeout=5).read().decode()
    out: dict[str, int] = {}
    for m in re.finditer(r'^grpc_server_handled_total\{([^}]*)\} (\S+)$', text, re.M):
        method = re.search(r'grpc_method="(\w+)"', m.group(1))
        if method:
            out[method.group(1)] = out.get(method.group(1), 0) + int(float(m.group(2)))
    return out


@pytest.fixture(params=[1, 2], ids=["ks1", "ks2"])
def world(request: pytest.FixtureRequest, etcd: EtcdCluster) -> Iterator[World]:
    store = EtcdStore(etcd.endpoints)
    store.put(KS.config, CONFIG.to_json())
    if request.param == 2:
        store.put(KS2.version, MARKER.to_json())
    try:
        yield World(etcd, store, request.param, {})
    finally:
        store.close()


@pytest.fixture
def world2(etcd: EtcdCluster) -> Iterator[World]:
    store = EtcdStore(etcd.endpoints)
    store.put(KS.config, CONFIG.to_json())
    store.put(KS2.version, MARKER.to_json())
    try:
        yield World(etcd, store, 2, {})
    finally:
        store.close()


@pytest.fixture
def leader(world: World) -> Iterator[Orchestrator]:
    yield from _run_leader(world)


@pytest.fixture
def leader2(world2: World) -> Iterator[Orchestrator]:
    yield from _run_leader(world2)


def _run_leader(w: World) -> Iterator[Orchestrator]:
    store = EtcdStore(w.etcd.endpoints)
    orch = orchestrator_for(store, "o1", threading.Event(), poll_interval_s=0.2)
    assert orch is not None
    assert isinstance(orch, OrchestratorV2) == (w.ks == 2)
    t = threading.Thread(target=orch.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: orch.epoch is not None, 10, what="the orchestrator leads")
        yield orch
    finally:
        orch.stopped.set()
        orch.wake.set()
        t.join(10)
        orch.step_down("test over")  # stops the lease keeper before its store closes
        store.close()


def placed(w: World, vm: str, kind: str = "boot", not_on: str = "") -> tuple[Placement, int]:
    def ready() -> tuple[Placement, int] | None:
        got = w.placement(vm)
        return got if got and got[0].kind == kind and got[0].node != not_on else None
    got = wait_until(ready, 15, what=f"{vm} placed ({kind}, not on {not_on!r})")
    assert got is not None
    return got


def test_lost_node_fenced_and_its_vm_booted_elsewhere(world: World,
                                                      leader: Orchestrator) -> None:
    w = world
    w.register("n1")
    w.register("n2")
    w.store.put(w.spec_key("vm1"), spec("vm1").to_json())
    p, _ = placed(w, "vm1")
    w.report(p.node or "", "vm1", "running", p.id)
    lost, other = p.node or "", "n2" if p.node == "n1" else "n1"
    if w.ks == 2:
        assert set(w.assignments("vm1")) == {lost}
    w.lose(lost)
    p2, rev = placed(w, "vm1", not_on=lost)
    assert p2.node == other
    fence = w.store.get(KS.fence(lost))
    assert fence is not None and FenceRecord.from_json(fence.value).method == "self"
    # Placed by the cycle that wrote the fence record, planning again with it at once.
    assert leader.placed_after_fences == 1
    if w.ks == 2:
        # The assignment moved in the placement's own transaction.
        got = w.assignments("vm1")
        assert set(got) == {other}
        a, arev = got[other]
        assert (a.placement, a.spec, arev) == (p2, spec("vm1"), rev)
        events = w.store.get_prefix(KS2.leader_history)
        assert any(b'"fence"' in kv.value for kv in events)
        assert not w.store.get_prefix(KS.history + "0"), "no keyspace-1 event written"


def test_idle_cluster_costs_no_transaction(world: World, leader: Orchestrator,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Settled, the leader decides again and again and writes nothing.  A 3 s window
    of 0.2 s polls is 15 cycles; nothing in the loop writes by the clock (the history
    prune writes only expired events), so it shows what 60 s would."""
    w = world
    w.register("n1")
    w.store.put(w.spec_key("vm1"), spec("vm1").to_json())
    p, _ = placed(w, "vm1")
    reported = w.report("n1", "vm1", "running", p.id)
    # The leader has planned on the report (no decision follows), so the cycle that
    # placed vm1 has ended, its history written (after the report, maybe: outside the
    # model's prefix, so compared with the report's own revision, not etcd's newest).
    wait_until(lambda: leader.quiet is not None and leader.quiet.revision >= reported, 10,
               what="a quiet plan that saw the report")
    rev, counts, cycles = w.store.revision(), etcd_counts(w.etcd), leader._cycles
    plans = leader.plans
    models = leader.models if isinstance(leader, OrchestratorV2) else 0
    time.sleep(3.0)
    after, rev2 = etcd_counts(w.etcd), w.store.revision()
    delta = {m: after.get(m, 0) - counts.get(m, 0) for m in ("Txn", "Range", "Put")}
    ran = leader._cycles - cycles
    with capsys.disabled():
        print(f"\nidle 3 s, keyspace {w.ks}: {ran} cycles, {leader.plans - plans} plans, "
              f"etcd requests {delta}")
    assert ran >= 10
    assert leader.plans == plans, "nothing changed, so nothing was planned (replan.py)"
    assert delta["Txn"] == 0 and delta["Put"] == 0
    # Our own revision() read is the one Range of keyspace 2's window.
    assert rev2 == rev
    if w.ks == 2:
        assert delta["Range"] <= 1, "the model comes from the watch, not from reads"
        assert isinstance(leader, OrchestratorV2) and leader.stats["lists"] == 1
        # Nor is the model built again from the same revision (a second at 10,000 VMs).
        assert leader.models == models, "the model was built again with nothing changed"
        # After its listing the leader moved the parsed cluster out of the collector's
        # reach (leader_v2.settle_heap; its effect is bench-scale's cycle times).
        assert gc.get_freeze_count() > 0


def test_a_quiet_leader_plans_again_on_a_change_and_after_max_quiet(
        world: World, leader: Orchestrator) -> None:
    """A quiet plan stands while the revision stays; any write under the prefix, or
    `max_quiet_s` passing, makes the next cycle plan (a freed rebalance budget, or a
    time rule added later, is seen at the latest then)."""
    w = world
    w.register("n1")
    w.store.put(w.spec_key("vm1"), spec("vm1").to_json())
    p, _ = placed(w, "vm1")
    reported = w.report("n1", "vm1", "running", p.id)
    # The report's revision, not etcd's newest: the leader's history, outside the
    # model's prefix, may be written after the report and moves no model revision.
    wait_until(lambda: leader.quiet is not None and leader.quiet.revision >= reported, 10,
               what="a quiet plan that saw the report")
    plans = leader.plans
    w.report("n1", "vm1", "running", p.id)  # a new `since`: a new revision, same facts
    wait_until(lambda: leader.plans > plans, 10, what="a plan of the new revision")
    wait_until(lambda: leader.quiet is not None, 10, what="quiet again")
    plans = leader.plans
    leader.max_quiet_s = 0.5
    wait_until(lambda: leader.plans >= plans + 2, 10, what="plans with no change, 0.5 s apart")


def test_a_lost_node_is_planned_on_its_loss_then_at_its_window_end(
        world: World, leader: Orchestrator) -> None:
    """While a lost node's fence window runs and nothing else changes, each plan would
    be the same waits: the leader plans on the loss, sleeps until the window ends
    (`Plan.recheck_at`, no later than a poll), and plans then; it used to plan at every
    poll, so it was often in the middle of a plan when the window ended."""
    w = world
    w.register("n1")
    w.register("n2")
    w.store.put(w.spec_key("vm1"), spec("vm1").to_json())
    p, _ = placed(w, "vm1")
    reported = w.report(p.node or "", "vm1", "running", p.id)
    wait_until(lambda: leader.quiet is not None and leader.quiet.revision >= reported, 10,
               what="a quiet plan that saw the report")
    lost = p.node or ""
    w.lose(lost)
    wait_until(lambda: lost in leader.lost_since and leader.recheck_at is not None, 10,
               what="the loss planned")
    since, at, plans = leader.lost_since[lost], leader.recheck_at, leader.plans
    assert at is not None and since < at <= since + fence_window(CONFIG) + 1e-6
    # Until shortly before the window ends: no plan (the leader's clock is
    # time.monotonic), except on keyspace 1 once: its snapshot's revision is etcd's,
    # which the leader's own `node_lost` history record moves.
    time.sleep(max(0.0, at - 0.3 - time.monotonic()))
    assert leader.plans <= plans + (1 if w.ks == 1 else 0), "the same waits planned again"
    p2, _ = placed(w, "vm1", not_on=lost)
    assert p2.node != lost
    fence = w.store.get(KS.fence(lost))
    assert fence is not None and FenceRecord.from_json(fence.value).method == "self"


def test_idle_leader_checks_no_assignment(world2: World, leader2: Orchestrator,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The assignment invariant is checked for every VM after a list, then only for the
    VMs whose keys changed: an idle cycle does no work per VM (at 10,000 VMs each check
    builds an assignment, its spec's domain XML parsed again: seconds a cycle)."""
    w = world2
    w.register("n1")
    vms = [f"vm{i}" for i in range(5)]
    for vm in vms:
        w.store.put(KS2.spec(vm), spec(vm).to_json())
    for vm in vms:
        w.report("n1", vm, "running", placed(w, vm)[0].id)
    checked: list[str] = []
    check = txn_v2._upkeep_of

    def counted(ks: KeyspaceV2, model: Any, vm: str, epoch: int) -> Any:
        checked.append(vm)
        return check(ks, model, vm, epoch)

    monkeypatch.setattr(txn_v2, "_upkeep_of", counted)
    time.sleep(1.0)  # the reports seen, each VM checked once more
    checked.clear()
    cycles = leader2._cycles
    time.sleep(2.0)
    assert leader2._cycles - cycles >= 5
    assert checked == [], "an idle cycle checks no VM"
    # A spec edit: that VM is checked (and its assignment refreshed), no other.
    edited = spec("vm1").model_copy(update={"memory_mib": 512})
    spec_rev = w.store.put(KS2.spec("vm1"), edited.to_json())
    wait_until(lambda: w.assignments("vm1")["n1"][0].spec_revision == spec_rev, 10,
               what="the assignment refreshed")
    time.sleep(0.5)
    assert set(checked) == {"vm1"}


def test_spec_edit_remove_and_confirm_off(world2: World, leader2: Orchestrator) -> None:
    w = world2
    w.register("n1")
    w.store.put(KS2.spec("vm1"), spec("vm1").to_json())
    w.store.put(KS2.spec("vm2"), spec("vm2").to_json())
    p, _ = placed(w, "vm1")
    placed(w, "vm2")
    # vm edit: the assignment gets the new spec, the placement stays.
    edited = spec("vm1").model_copy(update={"memory_mib": 512})
    spec_rev = w.store.put(KS2.spec("vm1"), edited.to_json())
    wait_until(lambda: w.assignments("vm1")["n1"][0].spec_revision == spec_rev, 10,
               what="the assignment refreshed")
    a = w.assignments("vm1")["n1"][0]
    assert a.spec == edited and w.placement("vm1") == (p, w.placement("vm1")[1])  # type: ignore[index]
    # vm remove: placement and assignments go.
    w.store.delete(KS2.spec("vm2"))
    wait_until(lambda: w.placement("vm2") is None and not w.assignments("vm2"), 10,
               what="vm2's placement and assignment removed")
    # confirm-off of a node that is not registered: a manual fence, the request consumed.
    c = ConfirmOff(node="n9", by="operator:alice", reason="pulled the plug", at=time.time())
    w.store.put(KS2.confirm_off("n9"), c.to_json())
    wait_until(lambda: w.store.get(KS2.confirm_off("n9")) is None, 10,
               what="the confirm-off consumed")
    kv = w.store.get(KS2.fence("n9"))
    assert kv is not None
    rec = FenceRecord.from_json(kv.value)
    assert (rec.method, rec.device, rec.reason) == ("manual", "operator:alice",
                                                    "pulled the plug")
    # One for a registered node is dropped, never kept to fence it later.
    w.store.put(KS2.confirm_off("n1"), c.model_copy(update={"node": "n1"}).to_json())
    wait_until(lambda: w.store.get(KS2.confirm_off("n1")) is None, 10,
               what="the confirm-off of a registered node dropped")
    assert w.store.get(KS2.fence("n1")) is None


def test_marker_chooses_the_keyspace_and_a_change_stops_the_loop(
        world2: World, leader2: Orchestrator) -> None:
    w = world2
    store = w.store
    lease = store.get(KS2.leader).lease  # type: ignore[union-attr]
    store.put(KS2.version, MARKER.model_copy(update={"state": "migrating"}).to_json())
    wait_until(lambda: leader2.stopped.is_set(), 10, what="the loop stops")
    assert leader2.exit_code == EXIT_KEYSPACE_CHANGED
    # It resigns: its lease revoked, so the leader key goes at once, not a TTL later.
    wait_until(lambda: store.get(KS2.leader) is None, 1.0, what="the leader key gone")
    assert store.lease_ttl(lease) <= 0
    with pytest.raises(ConfigError, match=r"migration to keyspace 2 is\s+under way"):
        orchestrator_for(store, "o2", threading.Event(), wait=False)
    # Waiting (the daemon), it returns once the migration is done, or None if stopped.
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert orchestrator_for(store, "o2", stop) is None
    store.put(KS2.version, "{")
    with pytest.raises(ConfigError, match="keyspace marker"):
        orchestrator_for(store, "o2", threading.Event(), wait=False)
    store.delete(KS2.version)
    orch = orchestrator_for(store, "o2", threading.Event())
    assert type(orch) is Orchestrator



def test_daemon_reads_the_marker_at_start(world2: World) -> None:
    """`vmha orchestrator`: the marker picks keyspace 2, whose config check only reads
    (it writes no default config); a migration under way is refused."""
    store = world2.store
    store.delete(KS.config)
    rev = store.revision()
    r = vmha(world2.etcd, "orchestrator", "--validate-config")
    assert (r.returncode, r.stdout.strip()) == (0, "config ok"), r.stderr
    assert store.revision() == rev and store.get(KS.config) is None
    store.put(KS2.version, MARKER.model_copy(update={"state": "switching"}).to_json())
    r = vmha(world2.etcd, "orchestrator", "--validate-config")
    assert r.returncode != 0 and "migration to keyspace 2 is under way" in r.stderr


def test_new_term_starts_from_a_fresh_list(world2: World, leader2: Orchestrator) -> None:
    """Deposed (its lease revoked), the leader drops its model; elected again, it lists
    once more and decides on what changed meanwhile."""
    w = world2
    assert isinstance(leader2, OrchestratorV2)
    w.register("n1")
    w.store.put(KS2.spec("vm1"), spec("vm1").to_json())
    placed(w, "vm1")
    first, lease = leader2.epoch, leader2.lease_id
    assert lease is not None
    w.store.revoke_lease(lease)
    wait_until(lambda: leader2.epoch not in (None, first), 15, what="elected again")
    w.store.put(KS2.spec("vm2"), spec("vm2").to_json())
    placed(w, "vm2")
    assert leader2.stats["lists"] == 2
    assert set(w.assignments("vm2")) == {"n1"}


def test_watch_compacted_while_away_relists_and_decides(etcd3: EtcdCluster) -> None:
    """The member under the model's watch stops; meanwhile a spec is added and etcd
    compacts.  The watch resumes elsewhere at a compacted revision: the leader lists
    again (once) and places the VM.  The stall is driven by the watch's injected clock,
    as in test_watchmodel."""
    clock = Clock()
    setup = EtcdStore(etcd3.endpoints)
    setup.put(KS.config, CONFIG.to_json())
    setup.put(KS2.version, MARKER.to_json())
    World(etcd3, setup, 2, {}).register("n1")
    store = EtcdStore(etcd3.endpoints, timeout=0.5)
    leader = OrchestratorV2(store, ident="o1", poll_interval_s=0.2, watch_options={
        "check_interval_s": 0.5, "progress_timeout_s": 1.0, "clock": clock})
    t = threading.Thread(target=leader.run, daemon=True)
    t.start()
    others: EtcdStore | None = None
    try:
        wait_until(lambda: leader.epoch is not None, 10, what="the orchestrator leads")
        setup.put(KS2.spec("vm1"), spec("vm1").to_json())
        placed(World(etcd3, setup, 2, {}), "vm1")
        member = next(m for m in etcd3.members if m.endpoint == leader.state.endpoint)
        others = EtcdStore(",".join(m.endpoint for m in etcd3.members if m is not member),
                           timeout=0.5, retry_budget=5.0)
        w = World(etcd3, others, 2, {})
        # The hardest start: the watch has seen the newest revision when its member stops.
        seen = setup.put(KS2.spec("vm1"), spec("vm1").to_json())
        wait_until(lambda: leader.state.revision >= seen, 10, what="the model saw the write")
        with stopped(member):
            # Two writes: a watch that saw revision R resumes from R+1, and etcd refuses
            # it only if the compaction is past that (compacting at R+1 keeps R+1).
            others.put(KS2.spec("vm2"), spec("vm2").to_json())
            others.put(KS2.spec("vm2"), spec("vm2").to_json())
            others.client.compact(others.revision())
            stall(leader.state, clock)
            wait_until(lambda: leader.stats["lists"] == 2, 10, what="the model listed again")
            p, _ = placed(w, "vm2")
            assert set(w.assignments("vm2")) == {p.node}
        assert leader.stats["lists"] == 2
    finally:
        leader.stopped.set()
        leader.wake.set()
        t.join(10)
        leader.step_down("test over")
        for s in (store, setup, others):
            if s is not None:
                s.close()
