"""`vmha snapshot`, `simulate`, `explain` and `vm add` admission against a real etcd."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from schemas import Keyspace
from store.etcd import EtcdStore
from tests.conftest import vmha
from tests.harness import EtcdCluster
from tests.unit.builders import boot, node_value, placement_value, running, status_value

pytestmark = pytest.mark.integration
KS = Keyspace()


def j(etcd: EtcdCluster, *args: str) -> Any:
    r = vmha(etcd, *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def seed(store: EtcdStore, nodes: dict[str, tuple[int, int]]) -> None:
    for name, (mem, cpu) in nodes.items():
        store.put(KS.node(name), json.dumps(node_value(name, mem, cpu)))


def test_snapshot_simulate_explain(etcd: EtcdCluster, tmp_path: Path) -> None:
    store = EtcdStore(etcd.endpoints)
    try:
        seed(store, {"n1": (8192, 8), "n2": (8192, 8), "n3": (4096, 8)})
        for i in range(4):
            extra = ["--anti-affinity", "db"] if i < 2 else []
            r = vmha(etcd, "vm", "add", f"vm{i}", "--memory-mib", "1024", *extra)
            assert r.returncode == 0, r.stderr
        # Pretend the leader placed them and the agents run them (no daemons here).
        for i, node in enumerate(["n1", "n2", "n1", "n2"]):
            store.put(KS.vm_placement(f"vm{i}"),
                      json.dumps(placement_value(f"vm{i}", boot(node, id=f"p{i}"))))
            store.put(KS.vm_status(f"vm{i}"),
                      json.dumps(status_value(f"vm{i}", running(node, f"p{i}"))))
        r = vmha(etcd, "snapshot")
        assert r.returncode == 0, r.stderr
        snap_file = tmp_path / "cluster.json"
        snap_file.write_text(r.stdout)
        data = json.loads(r.stdout)
        assert data["format"] == "vmha-snapshot" and data["version"] == 1
        assert {k["key"] for k in data["keys"]} >= {KS.node("n1"), KS.vm_spec("vm0")}

        out = j(etcd, "simulate", "--snapshot", str(snap_file), "--fail", "n1", "-o", "json")
        booted = {b["vm"]: b for b in out["booted"]}
        assert set(booted) == {"vm0", "vm2"}
        assert booted["vm0"]["node"] == "n3"  # hard anti-affinity keeps it off n2
        assert all(b["reason"] and b["scores"] for b in booted.values())
        assert out["violations"] == [] and out["pending"] == []
        util = {n["node"]: n for n in out["nodes"]}
        assert "n1" not in util and util["n3"]["vms"] == 1  # a failed node is gone
        assert "stddev" in out["balance"]

        drain = j(etcd, "-o", "json", "simulate", "--snapshot", str(snap_file),
                  "--drain", "n2")
        assert {m["vm"] for m in drain["moves"]} == {"vm1", "vm3"}
        assert all(m["kind"] == "migrate" and m["from_node"] == "n2" for m in drain["moves"])
        assert {n["node"]: n for n in drain["nodes"]}["n2"]["schedulable"] is False

        table = vmha(etcd, "simulate", "--snapshot", str(snap_file), "--fail", "n1")
        assert table.returncode == 0 and "memory utilisation" in table.stdout

        bad = vmha(etcd, "simulate", "--snapshot", str(snap_file), "--fail", "nope")
        assert bad.returncode == 2

        ex = j(etcd, "explain", "vm0", "-o", "json")
        assert ex["placement"]["node"] == "n1" and ex["planner_now"]["action"] == "none"
        rows = {r["node"]: r for r in ex["candidates"]}
        assert rows["n2"]["ruled_out"] == "hard anti-affinity" and rows["n3"]["eligible"]
        text = vmha(etcd, "explain", "vm0")
        assert text.returncode == 0 and "reason:" in text.stdout
    finally:
        store.close()


def test_vm_add_admission_warn_and_refuse(etcd: EtcdCluster) -> None:
    store = EtcdStore(etcd.endpoints)
    try:
        seed(store, {"n1": (4096, 8), "n2": (4096, 8)})
        ok = vmha(etcd, "vm", "add", "small", "--memory-mib", "1024")
        assert ok.returncode == 0 and "warning" not in ok.stderr
        # Default policy warns: 3072 + 1024 cannot all survive the loss of one 4 GiB node.
        warn = vmha(etcd, "vm", "add", "big", "--memory-mib", "3584")
        assert warn.returncode == 0 and "N+1 broken" in warn.stderr
        store.put(KS.config, json.dumps({"schema": 1, "placement": {"admission": "refuse"}}))
        refused = vmha(etcd, "vm", "add", "big2", "--memory-mib", "3584")
        assert refused.returncode == 2 and "admission refused" in refused.stderr
        assert store.get(KS.vm_spec("big2")) is None
        forced = vmha(etcd, "vm", "add", "big2", "--memory-mib", "3584", "--force",
                      "--priority", "5", "--prefer", "n2=2", "--allow-node", "n2")
        assert forced.returncode == 0, forced.stderr
        spec = json.loads(store.get(KS.vm_spec("big2")).value)  # type: ignore[union-attr]
        assert spec["priority"] == 5 and spec["allowed_nodes"] == ["n2"]
        assert spec["node_preferences"] == {"n2": 2.0}
    finally:
        store.close()
