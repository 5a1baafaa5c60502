"""On the lab (real libvirtd, QEMU guests): `kill -9` of a guest's QEMU under its running
agent is a recorded outage (a `crash` event, status crashed then running again with a
new `since`, counted by `vmha availability`) and a restart in place; a guest that keeps
crashing is relocated after `max_restart`, then marked failed after `max_relocate`
(issue 11, item 4).

The lab runs with etcd authentication on, the cluster on keyspace 2 (as `vmha lab up`
starts it); the test reads etcd and runs `vmha` as the operator.

Root only; skipped like the other lab tests.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lab import qemu_pids
from lab.cluster import LabCluster
from lab.labview import placement as lab_placement
from lab.labview import vm_status, vmha
from lab.localcluster import wait_until
from schemas.keys_v2 import KeyspaceV2
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.lab.test_e2e import _REASON, running_lab

pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

KS = KeyspaceV2()
CONFIG = TEST_CONFIG.model_copy(update={"max_restart": 1, "max_relocate": 1,
                                        "failure_backoff_initial_s": 0.5,
                                        "failure_backoff_max_s": 2.0})
VM = "vm0"


def history(store: EtcdStore, kind: str) -> list[dict[str, Any]]:
    """``VM``'s events of ``kind``, from every node's and the leader's history."""
    out = [json.loads(kv.value) for kv in store.get_prefix(KS.history)]
    return sorted((e for e in out if e.get("vm") == VM and e.get("kind") == kind),
                  key=lambda e: str(e["id"]))


def placement(store: EtcdStore, lc: LabCluster) -> dict[str, Any]:
    p = lab_placement(store, lc, VM)
    assert p is not None
    return p


def status_when(store: EtcdStore, lc: LabCluster, pred: Callable[[dict[str, Any]], bool],
                what: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        st = vm_status(store, lc, VM)
        return st if st is not None and pred(st) else None
    found = wait_until(probe, 60, 0.05, what)
    assert found is not None
    return found


def kill_qemu(lc: Any, node: str) -> int:
    pid = wait_until(lambda: qemu_pids(lc.nodes[node]).get(VM), 20, 0.05, f"{VM}'s QEMU")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return int(pid)


def test_qemu_killed_is_a_crash_restart_then_relocation_then_failed(tmp_path: Path) -> None:
    with running_lab(tmp_path, CONFIG) as (lc, store):
        first = status_when(store, lc, lambda s: s["state"] == "running", f"{VM} running")
        node = first["node"]
        killed = time.monotonic()
        old_pid = kill_qemu(lc, node)
        wait_until(lambda: history(store, "crash"), 30, 0.05, "a crash event")
        again = status_when(store, lc, lambda s: s["state"] == "running"
                            and s.get("crashes") == 1, "restarted in place")
        restart_s = time.monotonic() - killed
        assert again["node"] == node and again["since"] > first["since"]
        assert qemu_pids(lc.nodes[node]).get(VM) not in (None, old_pid)
        out = vmha(lc, "--output", "json", "availability")
        row = next(r for r in json.loads(out.stdout)["vms"] if r["vm"] == VM)
        assert row["outages"] == 1 and row["availability"] < 1.0, row
        print(f"\nkill -9 -> running again (polled): {restart_s:.2f} s; availability: {row}")
        # More than max_restart (1) crashes on the node: relocated.
        kill_qemu(lc, node)
        moved = status_when(store, lc, lambda s: s["state"] == "running" and s["node"] != node,
                            "relocated")
        assert placement(store, lc)["failed_nodes"] == [node]
        # The same on its second node: more than max_relocate (1) nodes: failed.
        kill_qemu(lc, moved["node"])
        status_when(store, lc, lambda s: s["state"] == "running" and s.get("crashes") == 1,
                    "restarted in place on the second node")
        kill_qemu(lc, moved["node"])
        p = wait_until(lambda: (placement(store, lc)["kind"] == "failed" and placement(store, lc)),
                       30, 0.05, "marked failed")
        assert p and p["failed_nodes"] == [node, moved["node"]]
        assert "max_relocate 1" in p["reason"] and "crashed 2 times" in p["reason"]
        assert len(history(store, "crash")) == 4
        out = vmha(lc, "vm", "list")
        assert "failed" in out.stdout
