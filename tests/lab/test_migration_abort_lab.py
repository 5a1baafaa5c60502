"""Real QEMU (issue 12, item 2): the destination of a live migration is lost mid-copy
while its libvirtd keeps receiving the stream; the source aborts the job and exactly one
copy of the guest runs, on the source and then on a third node.

The destination's agent is SIGKILLed with the guard disabled (`lab_noguard`), so
nothing on that node destroys the incoming domain: only the source's abort stops the
copy from landing there.  (Its other VMs then run twice, the documented gap of a
disabled guard; the test checks the migrating guest only.)  Before issue 12 the leader
re-placed the VM once the destination was fenced while the copy still ran, and the copy
then landed.

The lab runs with etcd authentication on, the cluster on keyspace 2 (`running_lab`), and
the source is drained by root's revoke of its registration's lease."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from lab import qemu_pids
from lab.cluster import LabCluster
from lab.localcluster import wait_until
from store.etcd import EtcdStore
from tests.lab.test_e2e import (
    _REASON,
    KERNEL_VM,
    UNLIMITED_MIB_S,
    add_kernel_guest,
    arrived,
    events,
    lab_noguard,
    log_mark,
    placement,
    revoke_lease,
    truth_poller,
)

libvirt = pytest.importorskip("libvirt")
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]
__all__ = ["lab_noguard"]  # the fixture, used by name
T = TypeVar("T")


def lc_wait(pred: Callable[[], T], timeout: float, what: str) -> T:
    return wait_until(pred, timeout, 0.05, what)


def test_destination_lost_mid_copy_source_aborts_one_copy_runs(
        lab_noguard: tuple[LabCluster, EtcdStore], tmp_path: Path) -> None:
    lc, store = lab_noguard
    src, _console = add_kernel_guest(lc, tmp_path, min_uptime=1.0)
    conn = libvirt.open(lc.nodes[src].uri)
    try:
        dom = conn.lookupByName(KERNEL_VM)
        dom.migrateSetMaxSpeed(2, 0)  # 96 MiB at 2 MiB/s: the copy outlives the lease
        marks = {n: log_mark(d) for n, d in lc.agents.items()}
        with truth_poller(lc).running() as poller:
            revoke_lease(lc, src)  # drain the source

            def incoming() -> str | None:
                p = placement(store, lc, KERNEL_VM)
                if p is None or p["kind"] != "migrate" or p["from_node"] != src:
                    return None
                return p["node"] if lc.node_domains(p["node"]).get(KERNEL_VM) == "migrating" \
                    else None

            dst = str(lc_wait(incoming, 30, "the migration streaming in"))
            lc.agents[dst].kill()  # its registration expires; its libvirtd keeps receiving
            aborts = lc_wait(lambda: events(lc.agents[src], "migration_abort", marks[src],
                                            KERNEL_VM), 30, "the source to abort the job")
            assert aborts[0]["reason"] == f"target {dst} lost (no registration)", aborts
            lc_wait(lambda: events(lc.agents[src], "migrate_failed", marks[src], KERNEL_VM),
                    30, "the aborted job to end")
            assert lc.ground_truth().get(KERNEL_VM) == [src]
            dom.migrateSetMaxSpeed(UNLIMITED_MIB_S, 0)
            final = str(lc_wait(lambda: arrived(store, lc, KERNEL_VM, {src, dst}), 60,
                                "k0 migrated to a third node"))
            time.sleep(1.0)
    finally:
        conn.close()
    # Only k0 is under test: the destination's other VMs do run twice once its node is
    # "fenced" (its agent killed with the guard disabled: the known gap of
    # docs/fencing.md, scenarios/guard-disabled-agent-killed).
    assert [v for v in poller.violations if v["vm"] == KERNEL_VM] == []
    assert poller.seen(KERNEL_VM) <= {src, final}, poller.seen(KERNEL_VM)
    assert lc.ground_truth()[KERNEL_VM] == [final]
    assert KERNEL_VM not in qemu_pids(lc.nodes[dst])

