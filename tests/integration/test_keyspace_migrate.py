"""`vmha keyspace migrate` on real etcd (docs/keyspace-v2.md, section 6, part 5).

A running keyspace-1 cluster (leader and agents in-process on the fake hypervisor)
migrated with no VM restarted or moved and the agents keeping their leases; the tool
stopped after each step and run again; the dry run writing nothing; the rollback from
`switching`; and keyspace 1's code refusing the config of a migrated cluster."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from cli.migrate import Migration, MigrationError
from hypervisor.fake import FakeHypervisor
from nodeagent.agent import AgentOptions, NodeAgent
from orchestrator.leader import EXIT_KEYSPACE_CHANGED, Orchestrator
from orchestrator.leader_v2 import OrchestratorV2, orchestrator_for
from schemas import migration as mig
from schemas.errors import ConfigError
from schemas.keys import Keyspace
from schemas.keys_v2 import KeyspaceV2
from schemas.models import ClusterConfig, CordonMarker, FenceRecord, LeaveMarker
from schemas.models_v2 import KeyspaceVersion
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster, wait_until
from tests.integration.helpers import active, domain_record, spec, start_agent
from tests.unit.builders import node_value

pytestmark = pytest.mark.integration

KS1, KS2 = Keyspace(), KeyspaceV2()
VMS = ("vm1", "vm2", "vm3", "vm4")


@pytest.fixture
def store(etcd: EtcdCluster) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd.endpoints)
    s.put(KS1.config, TEST_CONFIG.to_json())
    try:
        yield s
    finally:
        s.close()


def extras(store: EtcdStore) -> None:
    """What a keyspace-1 cluster holds besides its VMs: a cordon, a fence record and a
    leave marker (of nodes that are not running here)."""
    store.put(KS1.cordon("n5"), CordonMarker(node="n5", reason="rack", by="op", at=1.0).to_json())
    store.put(KS1.fence("n9"), FenceRecord(node="n9", lease_id="1", method="manual",
                                           outcome="success", reason="off", epoch=1,
                                           duration_s=0.0, fenced_at=1.0).to_json())
    store.put(KS1.leaving("n8"), LeaveMarker(node="n8", lease_id="2", reason="drained",
                                             at=1.0).to_json())


def stop_agent(agent: NodeAgent, t: threading.Thread) -> None:
    agent.stopped.set()
    agent.wake.set()
    t.join(10)


def guests(root: Path, where: dict[str, str]) -> dict[str, Any]:
    return {vm: (domain_record(root, node, vm) or {}).get("guest") for vm, node in where.items()}


def placed(store: EtcdStore) -> dict[str, str]:
    out = {}
    for vm in VMS:
        kv = store.get(KS1.vm_status(vm))
        if kv is not None and json.loads(kv.value)["state"] == "running":
            out[vm] = json.loads(kv.value)["node"]
    return out


def test_a_running_cluster_migrates_with_no_vm_restarted_or_moved(
        etcd: EtcdCluster, store: EtcdStore, tmp_path: Path) -> None:
    hvs = {n: FakeHypervisor(tmp_path, n) for n in ("n1", "n2", "n3")}
    agents = {n: start_agent(store, hv, n) for n, hv in hvs.items()}
    orch = Orchestrator(EtcdStore(etcd.endpoints), ident="o1", poll_interval_s=0.2)
    ot = threading.Thread(target=orch.run, daemon=True)
    ot.start()
    v2: OrchestratorV2 | None = None
    try:
        for vm in VMS:
            store.put(KS1.vm_spec(vm), spec(vm).to_json())
        extras(store)
        wait_until(lambda: len(placed(store)) == len(VMS), 30, what="every VM running")
        where = placed(store)
        before = guests(tmp_path, where)
        leases = {n: a.reg.lease_id for n, (a, _) in agents.items() if a.reg}
        places = {vm: store.get(KS1.vm_placement(vm)).value for vm in VMS}  # type: ignore[union-attr]
        said: list[str] = []
        Migration(store, by="operator:test", wait_s=30, poll_s=0.1, say=said.append).run()
        assert said[-1].startswith("done"), said
        # The keyspace-1 leader stopped at the marker, deciding nothing more.
        ot.join(10)
        assert orch.exit_code == EXIT_KEYSPACE_CHANGED
        # Every agent moved its registration to keyspace 2 with the lease it held.
        for n, (a, _) in agents.items():
            assert a.ctx.keyspace == 2 and a.reg is not None and a.reg.lease_id == leases[n]
            reg = store.get(KS2.reg(n))
            assert reg is not None and reg.lease == leases[n]
            assert reg.create_revision == a.reg.create_revision
            assert store.get(KS2.alive(n)) is not None
        # The keys as section 6's table says: copies, assignments, shared paths kept.
        for vm in VMS:
            assert store.get(KS2.place(vm)).value == places[vm]  # type: ignore[union-attr]
            assert store.get(KS2.spec(vm)) is not None
            assert store.get(KS2.assignment(where[vm], vm)) is not None
            assert store.get(KS2.status(where[vm], vm)) is not None
        assert store.get(KS2.leaving("n8")) is not None
        assert store.get(KS2.cordon("n5")) is not None and store.get(KS2.fence("n9"))
        assert json.loads(store.get(KS2.config).value)["schema"] == 2  # type: ignore[union-attr]
        for gone in ("/vmha/vms/", "/vmha/nodes/", "/vmha/alive/", "/vmha/leaving/"):
            assert store.get_prefix(gone) == [], gone
        marker = KeyspaceVersion.from_json(store.get(KS2.version).value)  # type: ignore[union-attr]
        assert marker.state == "done" and marker.by == "operator:test"
        # The orchestrator started again runs keyspace 2 and moves nothing.
        v2o = orchestrator_for(EtcdStore(etcd.endpoints), "o2", threading.Event(),
                               poll_interval_s=0.2)
        assert isinstance(v2o, OrchestratorV2)
        v2 = v2o
        threading.Thread(target=v2.run, daemon=True).start()
        wait_until(lambda: v2 is not None and v2.epoch is not None, 10, what="v2 leads")
        time.sleep(2.0)
        for vm in VMS:
            assert store.get(KS2.place(vm)).value == places[vm]  # type: ignore[union-attr]
        for n, hv in hvs.items():
            assert active(hv) == sorted(vm for vm, node in where.items() if node == n)
            assert agents[n][0].frozen_state is None
        assert guests(tmp_path, where) == before, "a VM was restarted"
    finally:
        if v2 is not None:
            v2.stopped.set()
            v2.wake.set()
        orch.stopped.set()
        for a, t in agents.values():
            stop_agent(a, t)


def v1_state(store: EtcdStore) -> None:
    """A keyspace-1 state without daemons: specs, placements, statuses, a move."""
    from schemas.models import MoveRequest, Placement, VmStatus

    for i, vm in enumerate(VMS):
        node = f"n{i % 2 + 1}"
        store.put(KS1.vm_spec(vm), spec(vm).to_json())
        store.put(KS1.vm_placement(vm), Placement(
            id=f"p-{vm}", vm=vm, node=node, kind="boot", epoch=1, reason="t",
            decided_at=1.0).to_json())
        store.put(KS1.vm_status(vm), VmStatus(vm=vm, node=node, state="running",
                                              placement_id=f"p-{vm}", since=1.0).to_json())
    store.put(KS1.vm_move("vm1"), MoveRequest(vm="vm1", to="n2", by="cli",
                                              requested_at=1.0).to_json())
    store.put("/vmha/vms/bad/spec", "{not json")
    extras(store)


def final(store: EtcdStore) -> dict[str, Any]:
    """The state after a migration, revisions aside (the assignments name their spec's
    revision: compared as the spec's key's mod_revision)."""
    out: dict[str, Any] = {}
    for kv in store.get_prefix("/vmha/"):
        if kv.key == KS2.version:
            out[kv.key] = KeyspaceVersion.from_json(kv.value).state
        elif kv.key.startswith(KS2.assignment_dir):
            a = json.loads(kv.value)
            spec_kv = store.get(KS2.spec(a["vm"]))
            assert spec_kv is not None and a.pop("spec_revision") == spec_kv.mod_revision
            out[kv.key] = a
        else:
            out[kv.key] = kv.value
    return out


class Killed(Exception):
    pass


def test_the_tool_stopped_after_any_step_completes_when_run_again(store: EtcdStore) -> None:
    v1_state(store)
    Migration(store, by="t", say=lambda _s: None).run()
    want = final(store)
    assert "/vmha/spec/bad" in want and "/vmha/vms/bad/spec" not in want
    for step in [*mig.STEPS[:-1], "mid-copy"]:
        for kv in store.get_prefix("/vmha/"):
            store.delete(kv.key)
        store.put(KS1.config, TEST_CONFIG.to_json())
        v1_state(store)
        m = Migration(store, by="t", say=lambda _s: None)

        def kill(done: str, at: str = step) -> None:
            if done == at:
                raise Killed(at)

        if step == "mid-copy":
            m.step_check()
            m.step_freeze()
            d, _ = m.plan(m.read())
            first = mig.sync_txns(d)[0]  # one batch of the copy lands, then the kill
            assert store.txn(first.compares, first.ops).succeeded
        else:
            m.after_step = kill
            with pytest.raises(Killed):
                m.run()
        Migration(store, by="t", say=lambda _s: None).run()
        assert final(store) == want, f"killed after {step}"


def test_config_apply_keeps_the_schema_of_the_keyspace(etcd: EtcdCluster,
                                                       store: EtcdStore) -> None:
    """`vmha config apply` on a migrated cluster writes "schema": 2, so keyspace 1's
    daemons keep refusing to start; on keyspace 1 it writes 1 (and refuses a 2).  After
    the migration the commands write keyspace 2's keys, none of keyspace 1's."""
    cfg = str(Path(__file__).parents[2] / "deploy/etc/cluster.toml")
    apply = ["--etcd", etcd.endpoints, "config", "apply", "--file", cfg]
    assert main(apply) == 0
    assert json.loads(store.get(KS1.config).value)["schema"] == 1  # type: ignore[union-attr]
    Migration(store, by="t", say=lambda _s: None).run()
    assert main(apply) == 0
    assert json.loads(store.get(KS1.config).value)["schema"] == 2  # type: ignore[union-attr]
    add = ["--etcd", etcd.endpoints, "vm", "add", "web9", "--memory-mib", "64"]
    assert main(add) == 0
    assert store.get(KS2.spec("web9")) is not None
    assert store.get(KS1.vm_spec("web9")) is None


def test_dry_run_writes_nothing_and_names_what_it_would_do(
        etcd: EtcdCluster, store: EtcdStore, capsys: pytest.CaptureFixture[str]) -> None:
    v1_state(store)
    rev = store.revision()
    args = ["--etcd", etcd.endpoints, "keyspace", "migrate", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert store.revision() == rev
    assert "steps left: check, freeze, copy, switch, clean, done" in out
    assert "create assignment 4, leaving 1, move 1, place 4, spec 5, status 4" in out
    assert "invalid (copied as it is, still reported): /vmha/vms/bad/spec" in out
    assert "conflicts: none" in out
    # A conflict in keyspace 2 and an agent of an older release: refused, nothing written.
    store.put(KS2.spec("vm1"), "{}")
    old = node_value("n1")  # agent.version 0.1.0
    store.put(KS1.node("n1"), json.dumps(old))
    rev = store.revision()
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "conflicts: /vmha/spec/vm1" in out
    assert "n1 (0.1.0)" in err and "/vmha/spec/vm1" in err
    assert main(["--etcd", etcd.endpoints, "keyspace", "migrate"]) == 1
    assert store.revision() == rev
    assert main(["--etcd", etcd.endpoints, "-o", "json", "keyspace", "show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["keyspace"] == 1 and shown["agents_on_keyspace_1"] == ["n1"]
    assert store.revision() == rev


def test_rollback_from_switching_restores_keyspace_1(store: EtcdStore, tmp_path: Path) -> None:
    hv = FakeHypervisor(tmp_path, "n1")
    v1_state(store)
    agent, t = start_agent(store, hv, "n1")
    try:
        wait_until(lambda: agent.reg is not None and sorted(active(hv)) == ["vm1", "vm3"], 20,
                   what="n1 runs its VMs")
        lease, before = agent.reg.lease_id, guests(tmp_path, {"vm1": "n1", "vm3": "n1"})  # type: ignore[union-attr]
        v1_keys = {kv.key: kv.value for kv in store.get_prefix("/vmha/vms/")}
        m = Migration(store, by="t", wait_s=20, poll_s=0.1, say=lambda _s: None)
        for step in ("check", "freeze", "copy", "switch"):
            getattr(m, f"step_{step}")()
        assert agent.ctx.keyspace == 2 and store.get(KS2.reg("n1")) is not None
        assert store.get(KS1.node("n1")) is None
        m.rollback()
        assert store.get(KS2.version) is None
        assert [kv.key for kv in store.get_prefix("/vmha/") if mig.owned(KS2, kv.key)] == []
        assert {kv.key: kv.value for kv in store.get_prefix("/vmha/vms/")} == v1_keys
        wait_until(lambda: agent.ctx.keyspace == 1 and agent.frozen_state is None, 10,
                   what="n1 back on keyspace 1, unfrozen")
        reg = store.get(KS1.node("n1"))
        assert reg is not None and reg.lease == lease and store.get(KS2.reg("n1")) is None
        assert guests(tmp_path, {"vm1": "n1", "vm3": "n1"}) == before
        # Past the switch there is no way back.
        m.run()
        with pytest.raises(MigrationError, match="cannot be rolled back"):
            m.rollback()
    finally:
        stop_agent(agent, t)


def test_keyspace_1_code_refuses_a_migrated_config(store: EtcdStore, tmp_path: Path) -> None:
    """A daemon that reads keyspace 1 (no marker: it picks keyspace 1) refuses the
    config "schema": 2 at start, naming the command that wrote it."""
    store.put(KS1.config, mig.config_schema_2(TEST_CONFIG.to_json().encode()))
    agent = NodeAgent(store, FakeHypervisor(tmp_path, "n1"), AgentOptions(name="n1"))
    with pytest.raises(ConfigError, match="vmha keyspace migrate"):
        agent.load_config()
    with pytest.raises(ConfigError, match="vmha keyspace migrate"):
        Orchestrator(store, ident="o1").ensure_config()
    assert ClusterConfig.from_json(store.get(KS1.config).value).schema_ == 2  # type: ignore[union-attr]


def test_a_frozen_agent_acts_on_nothing(store: EtcdStore, tmp_path: Path) -> None:
    """Any marker (here one that does not parse) freezes a running keyspace-1 agent: a
    spec removed meanwhile does not make it destroy the domain; it does once the
    marker is gone."""
    from schemas.models import Placement

    hv = FakeHypervisor(tmp_path, "n1")
    store.put(KS1.vm_spec("vm1"), spec("vm1").to_json())
    store.put(KS1.vm_placement("vm1"), Placement(id="p1", vm="vm1", node="n1", kind="boot",
                                                 epoch=1, reason="t", decided_at=1.0).to_json())
    agent, t = start_agent(store, hv, "n1")
    try:
        wait_until(lambda: active(hv) == ["vm1"], 20, what="vm1 running")
        store.put(KS2.version, "{")
        wait_until(lambda: agent.frozen_state == "invalid", 10, what="n1 frozen")
        rev = store.revision()
        store.delete(KS1.vm_spec("vm1"))
        time.sleep(1.0)  # five of its cycles
        assert active(hv) == ["vm1"] and agent.ctx.keyspace == 1
        assert store.revision() == rev + 1, "the frozen agent wrote"
        store.delete(KS2.version)
        wait_until(lambda: active(hv) == [], 10, what="vm1 destroyed once unfrozen")
    finally:
        stop_agent(agent, t)


def test_a_restarted_orchestrator_waits_for_the_migration(store: EtcdStore) -> None:
    store.put(KS2.version, mig.marker_json("switching", "t", "0.2.0", 1.0))
    got: list[Orchestrator | None] = []
    th = threading.Thread(target=lambda: got.append(
        orchestrator_for(store, "o1", threading.Event())), daemon=True)
    th.start()
    time.sleep(1.0)
    assert got == [] and store.get(KS2.leader) is None
    store.put(KS2.version, mig.marker_json("done", "t", "0.2.0", 1.0))
    th.join(10)
    assert len(got) == 1 and isinstance(got[0], OrchestratorV2)
