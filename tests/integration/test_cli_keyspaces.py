"""The CLI picks the keyspace by the marker `/vmha/version`, and its `-o json` output is
the same on both (the contract operators script against).

One etcd holds the same cluster twice: on keyspace 1 under `/k1` and on keyspace 2
under `/k2` (marker `keyspace 2, done`), written in the same order, with the keys each
keyspace has: on keyspace 2 a VM that migrated keeps its source's status key
(superseded), history lies under the agents' and the leader's prefixes (and keyspace
1's layout, as left by a migration).  Every listing and `show` prints the same JSON on
both, but for revisions and lease TTLs; `vmha status` lists the superseded status on
keyspace 2 only.  A marker that says a migration is under way, or does not parse, stops
every command before it writes anything.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator import simulate
from schemas import writes_v2 as w
from schemas.events import Event, event_id
from schemas.keys import Keyspace
from schemas.keys_v2 import KeyspaceV2
from schemas.models import MoveRequest, Placement, VmSpec
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster
from tests.integration.helpers_v2 import send
from tests.unit.builders import (
    cordon_value,
    fence_value,
    leader_value,
    node_value,
    placement_value,
    spec_value,
    status_value,
)

pytestmark = pytest.mark.integration

KS1, KS2 = Keyspace("/k1"), KeyspaceV2("/k2")
VMS = ("web1", "web2", "web3", "web4", "web5")


def cli(endpoints: str, *args: str) -> tuple[int, str, str]:
    """`vmha --etcd ENDPOINTS ARGS` in this process: exit code, stdout, stderr."""
    from cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--etcd", endpoints, *args])
    return code, out.getvalue(), err.getvalue()


def as_json(endpoints: str, prefix: str, *args: str) -> Any:
    code, out, err = cli(endpoints, "--prefix", prefix, "-o", "json", *args)
    assert code == 0, (prefix, args, err)
    return json.loads(out)


def _event(at: float, actor: str, seq: int, kind: str, **kw: Any) -> Event:
    return Event(id=event_id(at, actor, seq), at=at, kind=kind, actor=actor,  # type: ignore[arg-type]
                 **kw)


def write_both(store: EtcdStore, lease: int) -> None:
    """The same cluster on both keyspaces, write by write in the same order."""
    ks2_version = {"schema": 1, "keyspace": 2, "state": "done", "started_at": 1.0,
                   "by": "operator:test", "tool_version": "test"}
    store.put(KS2.version, json.dumps(ks2_version))

    def put(v1_key: str, v2_key: str, value: Any, lease: int = 0) -> None:
        text = value if isinstance(value, str) else json.dumps(value)
        store.put(v1_key, text, lease)
        store.put(v2_key, text, lease)

    put(KS1.config, KS2.config, TEST_CONFIG.to_json())
    put(KS1.leader, KS2.leader, leader_value())
    epoch = store.get(KS2.leader).create_revision  # type: ignore[union-attr]
    for n in ("n1", "n2"):
        put(KS1.node(n), KS2.reg(n), node_value(n, lease_id=f"{lease:x}"), lease)
    put(KS1.cordon("n2"), KS2.cordon("n2"), cordon_value("n2"))
    put(KS1.fence("n3"), KS2.fence("n3"), fence_value("n3"))
    for vm in VMS:
        put(KS1.vm_spec(vm), KS2.spec(vm),
            spec_value(vm, memory_mib=512, state="stopped" if vm == "web5" else "running"))
    places = {"web1": {"kind": "boot", "node": "n1", "id": "p1"},
              "web2": {"kind": "boot", "node": "n1", "id": "p2",
                       "reason": "node cordoned (drain); arrived, n2 released"},
              "web3": {"kind": "pending", "node": None, "id": "p3", "reason": "no room"},
              "web4": {"kind": "boot", "node": "n2", "id": "p4"}}
    for vm, p in places.items():
        value = placement_value(vm, p)
        store.put(KS1.vm_placement(vm), json.dumps(value))
        spec_kv = store.get(KS2.spec(vm))
        assert spec_kv is not None
        # Keyspace 2: the placement with its assignments, as the leader writes it.
        send(store, w.placement(KS2, Placement.model_validate(value), epoch=epoch,
                                place_mod=0, spec=VmSpec.from_json(spec_kv.value),
                                spec_revision=spec_kv.mod_revision, assignments_seen={}))
    statuses = [  # in write order: web2's source first, then its target
        ("web2", status_value("web2", {"node": "n2", "state": "stopped",
                                       "placement_id": "p2"})),
        ("web2", status_value("web2", {
            "node": "n1", "state": "running", "placement_id": "p2",
            "migration": {"total_ms": 812.0, "downtime_ms": 31.0, "source": "n2",
                          "target": "n1"}})),
        ("web1", status_value("web1", {"node": "n1", "state": "running",
                                       "placement_id": "p1"})),
        ("web4", status_value("web4", {"node": "n2", "state": "crashed", "placement_id": "p4",
                                       "error": "guest died", "crashes": 2})),
    ]
    for vm, value in statuses:
        put(KS1.vm_status(vm), KS2.status(value["node"], vm), value)
    move = MoveRequest(vm="web1", to="n2", by="cli", requested_at=20.0)
    put(KS1.vm_move("web1"), KS2.move("web1"), move.to_json())
    put(KS1.vm_spec("bad"), KS2.spec("bad"), '{"schema": 1, "name": "bad"')  # invalid
    t = 1_767_229_200.0
    legacy = _event(t, "leader:o0", 1, "leader_elected", epoch=1)
    boot = _event(t + 1, "agent:n1", 1, "boot", vm="web1", node="n1")
    lost = _event(t + 2, "leader:o1", 1, "node_lost", node="n3", epoch=epoch)
    moved = _event(t + 3, "agent:n1", 2, "migration", vm="web2", node="n1", from_node="n2",
                   total_ms=812.0, downtime_ms=31.0)
    fenced = _event(t + 4, "leader:o1", 2, "fence", node="n3", epoch=epoch)
    put(KS1.event(legacy.id), KS2.history + legacy.id, legacy.to_json())  # v1's layout
    for ev in (boot, moved):
        put(KS1.event(ev.id), KS2.node_event("n1", ev.id), ev.to_json())
    for ev in (lost, fenced):
        put(KS1.event(ev.id), KS2.leader_event(ev.id), ev.to_json())


REVISIONS = {"revision", "key_revision", "lease_ttl_s"}


def _strip(data: Any) -> Any:
    """`data` without what differs by keyspace only: revisions, lease TTLs (counted down
    between two commands), the keys of invalid entries (their layout differs)."""
    if isinstance(data, dict):
        return {k: _strip(v) for k, v in data.items() if k not in REVISIONS}
    if isinstance(data, list):
        return [_strip(v) for v in data]
    return data


def _by_key(snapshot_file: dict[str, Any]) -> dict[str, Any]:
    """A `vmha snapshot` file's values by key, the prefix replaced by /P."""
    prefix = snapshot_file["prefix"]
    return {k["key"].replace(prefix, "/P", 1): k["value"] for k in snapshot_file["keys"]}


COMMANDS = [("vm", "list"), ("node", "list"), ("fence", "list"), ("history",),
            ("history", "--node", "n1"), ("history", "--vm", "web2"),
            ("history", "--kind", "fence"), ("config", "show"), ("vm", "show", "web2"),
            ("vm", "show", "web4"), ("node", "show", "n1"), ("node", "show", "n2"),
            ("node", "show", "n3"), ("explain", "web3")]


def test_every_listing_prints_the_same_json_on_both_keyspaces(etcd: EtcdCluster) -> None:
    store = EtcdStore(etcd.endpoints)
    try:
        write_both(store, store.grant_lease(60))
        ep = etcd.endpoints
        for args in COMMANDS:
            one, two = as_json(ep, "/k1", *args), as_json(ep, "/k2", *args)
            if args == ("explain", "web3"):  # the planner's clock
                one.pop("planner_now"), two.pop("planner_now")
            assert _strip(one) == _strip(two), args
            assert one, args  # each shows something of the cluster
        # `vmha snapshot` files hold keyspace 1's keys (docs/snapshot-format.md): the same.
        one, two = (_by_key(as_json(ep, prefix, "snapshot")) for prefix in ("/k1", "/k2"))
        assert one == two and "/P/vms/web2/status" in two
        loaded = simulate.load_snapshot(as_json(ep, "/k2", "snapshot"))
        assert sorted(loaded.specs) == ["web1", "web2", "web3", "web4", "web5"]
        assert loaded.statuses["web2"].value.node == "n1" and sorted(loaded.nodes) == ["n1", "n2"]
        assert [e["kind"] for e in as_json(ep, "/k2", "history")] == [
            "leader_elected", "boot", "node_lost", "migration", "fence"]
        vms = {v["name"]: v for v in as_json(ep, "/k2", "vm", "list")}
        assert (vms["web2"]["node"], vms["web2"]["state"]) == ("n1", "running")
        assert vms["web4"]["error"] == "guest died (2 crashes)"

        s1, s2 = as_json(ep, "/k1", "status"), as_json(ep, "/k2", "status")
        assert s1["leader"]["epoch"] > 0 and s2["leader"]["epoch"] > 0
        assert s1["superseded"] == []
        assert [(s["vm"], s["node"], s["state"], s["key"]) for s in s2["superseded"]] == [
            ("web2", "n2", "stopped", KS2.status("n2", "web2"))]
        assert [(i["kind"], i["name"]) for i in s1["invalid"]] == [
            (i["kind"], i["name"]) for i in s2["invalid"]] == [("vm_spec", "bad")]
        for s in (s1, s2):
            s["leader"].pop("epoch")
            for k in ("superseded", "invalid", "invalid_keys"):
                s.pop(k)
        assert _strip(s1) == _strip(s2)
    finally:
        store.close()


@pytest.mark.parametrize("marker", [
    '{"schema": 1, "keyspace": 2, "state": "migrating", "started_at": 1.0, '
    '"by": "operator:alice", "tool_version": "0.2.0"}',
    '{"schema": 1, "keyspace": 2, "state": "switching", "started_at": 1.0, '
    '"by": "operator:alice", "tool_version": "0.2.0"}',
    '{"schema": 1, "keyspace": 3, "state": "done"}',
    "not json"])
def test_no_command_runs_while_the_marker_does_not_say_done(etcd: EtcdCluster, tmp_path: Path,
                                                           marker: str) -> None:
    version = KeyspaceV2(KS1.prefix).version
    cfg = tmp_path / "cluster.json"
    cfg.write_text(TEST_CONFIG.to_json())
    store = EtcdStore(etcd.endpoints)
    try:
        store.put(KS1.config, TEST_CONFIG.to_json())
        store.put(KS1.node("n1"), json.dumps(node_value("n1")))
        store.put(KS1.vm_spec("web1"), json.dumps(spec_value("web1")))
        store.put(version, marker)
        before = store.revision()
        for args in (("vm", "add", "web2", "--memory-mib", "64"), ("vm", "stop", "web1"),
                     ("vm", "remove", "web1"), ("node", "cordon", "n1"),
                     ("node", "drain", "n1"), ("node", "confirm-off", "n3"),
                     ("config", "apply", "--file", str(cfg)), ("vm", "list"),
                     ("node", "list"), ("fence", "list"), ("status",), ("history",)):
            code, out, err = cli(etcd.endpoints, "--prefix", KS1.prefix, *args)
            assert code == 1, (args, code, out, err)
            assert out == "", args
            why = ("migration in progress" if "state" in marker and "keyspace\": 2" in marker
                   else "does not parse")
            assert why in err and version in err, (args, err)
        assert store.revision() == before, "nothing written"
    finally:
        store.close()
