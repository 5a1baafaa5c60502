"""End to end on the lab: vmha's real agents (LibvirtHypervisor) on lab libvirt nodes.

Three lab nodes with their own libvirtd, a real etcd, one agent per node, two
orchestrators, and six tiny disk-less QEMU guests (32 MiB).  The lab runs as `vmha lab
up` starts it: etcd with authentication on, the cluster on keyspace 2, each daemon with
its own etcd certificate; the tests read etcd as the operator (:mod:`lab.labview`) and
drain a node as root's `etcdctl lease revoke` of its registration's lease.  What the guests really
do is read from every libvirtd directly (:meth:`LabCluster.ground_truth`), polled in
a thread every ~20 ms to catch a VM running on two nodes at once.

Root only; skipped without libvirtd / QEMU / unshare (same check as the lab tests).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

try:
    import libvirt
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("libvirt-python is not installed", allow_module_level=True)

from fencing.policy import fence_window  # noqa: E402
from lab import (  # noqa: E402
    DEFAULT_CACHE,
    guest_uptime,
    kernel_guest_xml,
    pid_alive,
    qemu_pids,
    tiny_guest_xml,
    wait_guest_uptime,
)
from lab.cluster import LabCluster, child_pids  # noqa: E402
from lab.invariants import DoubleRunChecker, LabTruth  # noqa: E402
from lab.labview import placement as lab_placement  # noqa: E402
from lab.labview import (  # noqa: E402
    reader,
    revoke_registration,
    vm_status,
    vm_statuses,
    vmha,
    wait_registered,
)
from lab.localcluster import Daemon, wait_until  # noqa: E402
from schemas import ClusterConfig  # noqa: E402
from schemas.keys_v2 import KeyspaceV2  # noqa: E402
from store.etcd import EtcdStore  # noqa: E402
from tests.conftest import TEST_CONFIG  # noqa: E402


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (they start libvirtd in mount namespaces)"
    for tool in ("unshare", "libvirtd", "qemu-system-x86_64", "mount", "etcd", "etcdctl"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"lab tests need {tool} (see lab/APT_PACKAGES.txt)"
    return None


_REASON = _skip_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

#: fence and cordon keys are the same on both keyspaces (a keyspace-1 lab reads them too)
KS = KeyspaceV2()
VMS = tuple(f"vm{i}" for i in range(6))
#: Timings measured by the tests, printed at the end (run with -s to see them).
TIMINGS: dict[str, Any] = {}


# ---- helpers ------------------------------------------------------------------------------


def log_mark(d: Daemon) -> int:
    return d.log_path.stat().st_size if d.log_path.exists() else 0


def events(d: Daemon, event: str, since: int = 0, vm: str | None = None) -> list[dict[str, Any]]:
    """JSON log events of ``d`` written after byte offset ``since``."""
    if not d.log_path.exists():
        return []
    with open(d.log_path, "rb") as fh:
        fh.seek(since)
        data = fh.read().decode(errors="replace")
    out = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event and (vm is None or rec.get("vm") == vm):
            out.append(rec)
    return out


def ts(rec: dict[str, Any]) -> float:
    return datetime.fromisoformat(rec["timestamp"]).timestamp()


def truth_poller(lc: LabCluster) -> DoubleRunChecker:
    """I1 on the lab's ground truth, sampled every ~20 ms in a thread."""
    return DoubleRunChecker(LabTruth(lc), interval=0.02)


def vms_on(lc: LabCluster, node: str) -> list[str]:
    return sorted(vm for vm, ns in lc.ground_truth().items() if node in ns)


def status(store: EtcdStore, lc: LabCluster, vm: str) -> dict[str, Any] | None:
    """``vm``'s current status on the lab's keyspace."""
    return vm_status(store, lc, vm)


def all_reported(store: EtcdStore, lc: LabCluster) -> bool:
    for d in [*lc.agents.values(), *lc.orchestrators.values()]:
        if not d.alive():
            raise AssertionError(f"daemon {d.name} died:\n{d.log_text()[-2000:]}")
    truth = lc.ground_truth()
    statuses = vm_statuses(store, lc)
    for vm in VMS:
        st = statuses.get(vm)
        if not (vm in truth and len(truth[vm]) == 1 and st and st["state"] == "running"
                and st["node"] == truth[vm][0]):
            return False
    return True


@contextmanager
def running_lab(tmp_path: Path, config: ClusterConfig) -> Iterator[tuple[LabCluster, EtcdStore]]:
    """The lab with auth on (keyspace 2), six guests running; the store is the operator's."""
    lc = LabCluster(tmp_path / "lab", tmp_path / "logs", auth=True)
    started = time.monotonic()
    lc.start(config.to_json())
    store = reader(lc)
    try:
        wait_registered(lc, store)  # the guests spread over every node (tests drain each)
        for vm in VMS:
            xml = tmp_path / f"{vm}.xml"
            xml.write_text(tiny_guest_xml(vm))
            r = vmha(lc, "vm", "add", vm, "--memory-mib", "32", "--xml", str(xml))
            assert r.returncode == 0, r.stderr
        wait_until(lambda: all_reported(store, lc), 40, 0.1, "all VMs running and reported")
        TIMINGS.setdefault("cluster_up_s", []).append(round(time.monotonic() - started, 2))
        yield lc, store
    finally:
        store.close()
        lc.stop()
        print(f"\nlab e2e timings: {json.dumps(TIMINGS)}")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[LabCluster, EtcdStore]]:
    with running_lab(tmp_path, TEST_CONFIG) as cluster:
        yield cluster


#: No guard, and a fence margin that leaves a restarted agent (Python start-up, waiting
#: for its old lease to expire) time to register even on a loaded 2-core machine.
NOGUARD_CONFIG = TEST_CONFIG.model_copy(update={"guard_enabled": False, "fence_margin_s": 4.0})


@pytest.fixture
def lab_noguard(tmp_path: Path) -> Iterator[tuple[LabCluster, EtcdStore]]:
    """The guard process (fencing.guard) disabled: a killed agent's domains survive it."""
    with running_lab(tmp_path, NOGUARD_CONFIG) as cluster:
        yield cluster


# ---- tests --------------------------------------------------------------------------------


def test_lease_revoke_drains_by_live_migration(lab: tuple[LabCluster, EtcdStore]) -> None:
    lc, store = lab
    victims = vms_on(lc, "n1")
    assert victims, f"the planner spreads {len(VMS)} VMs over 3 nodes: {lc.ground_truth()}"
    marks = {n: log_mark(d) for n, d in lc.agents.items()}
    with truth_poller(lc).running() as poller:
        t0 = time.monotonic()
        revoke_registration(lc, "n1")  # root's `etcdctl lease revoke`
        wait_until(lambda: not lc.node_domains("n1")
                   and all(v in lc.ground_truth() for v in victims), 30, 0.02, "n1 drained")
        drain_s = time.monotonic() - t0
    assert poller.violations == [], poller.violations
    assert poller.samples > 10
    # One live migration per VM; none attempted again after it completed (a repeat
    # fails with "not running" and makes the leader move the VM a second time).
    failed = events(lc.agents["n1"], "migrate_failed", marks["n1"])
    assert failed == [], failed
    truth = lc.ground_truth()
    walls = []
    downtimes = []
    for vm in victims:
        (node,) = truth[vm]
        assert node != "n1"
        done = events(lc.agents["n1"], "migrate_done", marks["n1"], vm)
        assert len(done) == 1, done
        assert done[0]["target"] == node
        walls.append(done[0]["wall_s"])
        for n, d in lc.agents.items():
            assert events(d, "boot", marks[n], vm) == [], f"{vm} cold-booted on {n}"
        def reported(vm: str = vm, node: str = node) -> bool:
            s = status(store, lc, vm)
            return s is not None and s["node"] == node and s["state"] == "running"

        wait_until(reported, 10, 0.05, f"status of {vm} on {node}")
        st = status(store, lc, vm)
        assert st is not None
        migration = st.get("migration") or {}
        assert migration.get("source") == "n1" and migration.get("target") == node, st
        # from libvirt's job statistics (completed incoming job on the target)
        assert migration.get("downtime_ms") is not None, st
        assert migration.get("total_ms") is not None, st
        assert 0 <= migration["downtime_ms"] <= migration["total_ms"], st
        downtimes.append(migration["downtime_ms"])
        TIMINGS.setdefault("status_total_ms", []).append(migration["total_ms"])
    # What the operator sees: each victim running where libvirt runs it.
    listed = vmha(lc, "-o", "json", "vm", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {v["name"]: (v["node"], v["state"]) for v in json.loads(listed.stdout)}
    assert {vm: rows.get(vm) for vm in victims} == {
        vm: (truth[vm][0], "running") for vm in victims}, listed.stdout
    # Source empty: no definition left at all (UNDEFINE_SOURCE), per libvirt itself.
    assert lc.node_domains("n1") == {}
    assert qemu_pids(lc.nodes["n1"]) == {}
    TIMINGS["drain_s"] = round(drain_s, 2)
    TIMINGS["drain_vms"] = len(victims)
    TIMINGS["migrate_wall_s"] = walls
    TIMINGS["status_downtime_ms"] = downtimes


def test_crash_reboots_elsewhere_once_after_fence_then_leftovers_undefined(
        lab: tuple[LabCluster, EtcdStore]) -> None:
    lc, store = lab
    victims = vms_on(lc, "n2")
    assert victims
    marks = {n: log_mark(d) for n, d in lc.agents.items()}
    survivors = [n for n in lc.agents if n != "n2"]
    with truth_poller(lc).running() as poller:
        crashed_at = time.time()
        t0 = time.monotonic()
        lc.crash_host("n2")  # agent and its guard, libvirtd, QEMU: all SIGKILLed
        crashed = time.monotonic()
        wait_until(lambda: all(v in lc.ground_truth() for v in victims), 40, 0.02,
                   "victims running elsewhere")
        recover_s = time.monotonic() - t0
        fence_kv = store.get(KS.fence("n2"))
        assert fence_kv is not None
        fence = json.loads(fence_kv.value)
        for vm in victims:
            boots = [e for n in survivors for e in events(lc.agents[n], "boot", marks[n], vm)]
            assert len(boots) == 1, boots
            assert ts(boots[0]) >= fence["fenced_at"], (boots[0], fence)
            assert ts(boots[0]) >= crashed_at + TEST_CONFIG.lease_ttl_s \
                - TEST_CONFIG.keepalive_interval_s
        # The crashed node comes back: its persistent left-over definitions (inactive)
        # must be undefined by its new agent, never booted.
        lc.restart_node("n2")
        left = lc.node_domains("n2")
        assert all(state == "inactive" for state in left.values()), left
        mark2 = log_mark(lc.agents["n2"])
        t1 = time.monotonic()
        lc.start_agent("n2")
        wait_until(lambda: not (set(lc.node_domains("n2")) & set(victims)), 10, 0.05,
                   "left-over definitions undefined on n2")
        cleanup_s = time.monotonic() - t1
        time.sleep(1.0)
    assert poller.violations == [], poller.violations
    assert poller.samples > 10
    for vm in victims:
        assert "n2" not in poller.seen(vm, crashed), (vm, poller.seen(vm, crashed))
        assert events(lc.agents["n2"], "boot", mark2, vm) == []
        (node,) = lc.ground_truth()[vm]
        assert node in survivors
    undone = {e["vm"] for e in events(lc.agents["n2"], "undefine", mark2)}
    assert set(left) <= undone, (left, undone)
    TIMINGS["crash_to_running_s"] = round(recover_s, 2)
    TIMINGS["fence_duration_s"] = fence.get("duration_s")
    TIMINGS["leftover_cleanup_s"] = round(cleanup_s, 2)
    TIMINGS["leftovers"] = sorted(left)


def test_agent_restart_adopts_running_vms(lab_noguard: tuple[LabCluster, EtcdStore]) -> None:
    """Without a guard, domains outlive a killed agent and its successor adopts them.
    (With the guard, the default, a kill -9 of the agent fences its domains instead.)"""
    lc, store = lab_noguard
    victims = vms_on(lc, "n3")
    assert victims
    before = qemu_pids(lc.nodes["n3"])
    assert set(victims) <= set(before)
    marks = {n: log_mark(d) for n, d in lc.agents.items()}
    with truth_poller(lc).running() as poller:
        lc.agents["n3"].kill()
        t0 = time.monotonic()
        lc.start_agent("n3")
        wait_until(lambda: events(lc.agents["n3"], "registered", marks["n3"]), 20, 0.05,
                   "restarted agent registered")
        TIMINGS["agent_reregister_s"] = round(time.monotonic() - t0, 2)
        # Long enough for the old lease to expire, the leader to notice and its fence
        # margin to pass: nothing may be moved or rebooted.
        time.sleep(NOGUARD_CONFIG.lease_ttl_s + fence_window(NOGUARD_CONFIG) + 1.0)
        wait_until(lambda: all_reported(store, lc), 10, 0.1, "all VMs reported")
    assert poller.violations == [], poller.violations
    after = qemu_pids(lc.nodes["n3"])
    for vm in victims:
        assert after.get(vm) == before[vm], (vm, before, after)
        assert poller.seen(vm) == {"n3"}, (vm, poller.seen(vm))
        for n, d in lc.agents.items():
            assert events(d, "boot", marks[n], vm) == [], f"{vm} rebooted on {n}"
        st = status(store, lc, vm)
        assert st is not None and st["node"] == "n3" and st["state"] == "running"
    assert store.get(KS.fence("n3")) is None


# ---- more helpers --------------------------------------------------------------------------

KERNEL_VM = "k0"
#: libvirt's "no limit" for migrateSetMaxSpeed (MiB/s)
UNLIMITED_MIB_S = 8796093022207


def placement(store: EtcdStore, lc: LabCluster, vm: str) -> dict[str, Any] | None:
    return lab_placement(store, lc, vm)


def revoke_lease(lc: LabCluster, node: str) -> None:
    """Drain ``node``: root's `etcdctl lease revoke` of its registration's lease."""
    revoke_registration(lc, node)


def add_kernel_guest(lc: LabCluster, tmp_path: Path,
                     min_uptime: float = 3.0) -> tuple[str, Path]:
    """Declare the Linux guest, wait until it runs and has printed ``min_uptime``;
    return (its node, its console log)."""
    console = tmp_path / f"{KERNEL_VM}.console.log"
    xml = tmp_path / f"{KERNEL_VM}.xml"
    xml.write_text(kernel_guest_xml(KERNEL_VM, DEFAULT_CACHE, console))
    r = vmha(lc, "vm", "add", KERNEL_VM, "--memory-mib", "96", "--xml", str(xml))
    assert r.returncode == 0, r.stderr
    wait_guest_uptime(console, min_uptime, 90)
    wait_until(lambda: len(lc.ground_truth().get(KERNEL_VM, [])) == 1, 10, 0.1, "k0 running")
    return lc.ground_truth()[KERNEL_VM][0], console


def console_values(console: Path, since: int) -> tuple[list[float], bool]:
    """Uptimes the guest printed after byte ``since``, and whether it printed a boot tag."""
    data = console.read_bytes()[since:]
    ups = [float(v) for v in re.findall(rb"VMHA-UPTIME (\d+(?:\.\d+)?)", data)]
    return ups, b"VMHA-BOOT" in data


def arrived(store: EtcdStore, lc: LabCluster, vm: str, avoid: set[str]) -> str | None:
    """The node ``vm`` runs on and is reported running on, if it is not in ``avoid``."""
    nodes = lc.ground_truth().get(vm, [])
    st = status(store, lc, vm)
    if len(nodes) == 1 and nodes[0] not in avoid and st and st["state"] == "running" \
            and st["node"] == nodes[0]:
        return nodes[0]
    return None


# ---- SIGTERM, failed migration, kernel guest ----------------------------------------------


def test_sigterm_drains_by_live_migration_then_agent_exits_0(
        lab: tuple[LabCluster, EtcdStore]) -> None:
    lc, store = lab
    victims = vms_on(lc, "n1")
    assert victims
    agent = lc.agents["n1"]
    guards = child_pids(agent.pid)
    assert store.get(KS.reg("n1")) is not None
    marks = {n: log_mark(d) for n, d in lc.agents.items()}
    with truth_poller(lc).running() as poller:
        t0 = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert agent.proc is not None
        rc = agent.proc.wait(60)
        exit_s = time.monotonic() - t0
        wait_until(lambda: all(arrived(store, lc, vm, {"n1"}) for vm in victims), 10, 0.05,
                   "statuses of the migrated VMs")
    assert rc == 0, agent.log_text()[-3000:]
    assert poller.violations == [], poller.violations
    assert lc.node_domains("n1") == {}
    assert store.get(KS.reg("n1")) is None  # its lease was revoked on the way out
    assert store.get(KS.cordon("n1")) is not None  # and it comes back cordoned
    assert store.get(KS.fence("n1")) is None  # a drain is not a crash
    assert events(agent, "drained_exiting", marks["n1"])
    for vm in victims:
        done = events(agent, "migrate_done", marks["n1"], vm)
        assert len(done) == 1, done
        for n, d in lc.agents.items():
            assert events(d, "boot", marks[n], vm) == [], f"{vm} cold-booted on {n}"
        st = status(store, lc, vm)
        assert st is not None and st["node"] == done[0]["target"]
        assert (st.get("migration") or {}).get("downtime_ms") is not None, st
    # the agent's guard was disarmed and left with it
    wait_until(lambda: not any(pid_alive(p) for p in guards), 10, 0.05, "guard gone")
    TIMINGS["sigterm_exit_s"] = round(exit_s, 2)


def test_failed_migration_keeps_vm_on_source_then_leader_picks_another_target(
        lab: tuple[LabCluster, EtcdStore], tmp_path: Path) -> None:
    """The destination's libvirtd dies while the Linux guest's memory streams in (the
    source throttled to 4 MiB/s so that the copy takes long enough): the VM keeps
    running on the source, and the leader moves it to a third node."""
    lc, store = lab
    src, console = add_kernel_guest(lc, tmp_path, min_uptime=1.0)
    conn = libvirt.open(lc.nodes[src].uri)
    try:
        dom = conn.lookupByName(KERNEL_VM)
        dom.migrateSetMaxSpeed(4, 0)
        marks = {n: log_mark(d) for n, d in lc.agents.items()}
        with truth_poller(lc).running() as poller:
            revoke_lease(lc, src)

            def incoming() -> str | None:
                p = placement(store, lc, KERNEL_VM)
                if p is None or p["kind"] != "migrate" or p["from_node"] != src:
                    return None
                return p["node"] if lc.node_domains(p["node"]).get(KERNEL_VM) == "migrating" \
                    else None

            dst = str(wait_until(incoming, 30, 0.05, "the migration streaming in"))
            time.sleep(0.5)
            assert lc.node_domains(src).get(KERNEL_VM) == "running"  # still copying
            lc.kill_libvirtd(dst)
            killed = time.monotonic()
            wait_until(lambda: events(lc.agents[src], "migrate_failed", marks[src], KERNEL_VM),
                       20, 0.05, "the source to see the migration fail")
            # Let the next migration run at full speed (it may already have started).
            dom.migrateSetMaxSpeed(UNLIMITED_MIB_S, 0)
            final = str(wait_until(lambda: arrived(store, lc, KERNEL_VM, {src, dst}), 40,
                                   0.05, "k0 migrated to a third node"))
            retarget_s = time.monotonic() - killed
            lc.start_libvirtd(dst)
            wait_until(lambda: all_reported(store, lc), 30, 0.1, "all VMs reported again")
            time.sleep(1.0)
    finally:
        conn.close()
    assert poller.violations == [], poller.violations
    assert final not in (src, dst)
    assert lc.ground_truth()[KERNEL_VM] == [final]
    assert KERNEL_VM not in qemu_pids(lc.nodes[dst])
    assert lc.node_domains(dst).get(KERNEL_VM) in (None, "inactive")
    # the VM was never seen running anywhere but on the source, then the final node
    assert poller.seen(KERNEL_VM) <= {src, final}, poller.seen(KERNEL_VM)
    p = placement(store, lc, KERNEL_VM)
    assert p is not None and p["node"] == final and p["node"] != dst, p
    failed = events(lc.agents[src], "migrate_failed", marks[src], KERNEL_VM)
    assert [e["target"] for e in failed] == [dst], failed
    done = events(lc.agents[src], "migrate_done", marks[src], KERNEL_VM)
    assert [e["target"] for e in done] == [final], done
    for n, d in lc.agents.items():
        assert events(d, "boot", marks[n], KERNEL_VM) == [], f"k0 cold-booted on {n}"
    # It never rebooted: the console shows one boot, and the uptime never went back.
    ups, _ = console_values(console, 0)
    assert console.read_bytes().count(b"VMHA-BOOT") == 1
    assert ups == sorted(ups), ups
    st = status(store, lc, KERNEL_VM)
    assert st is not None and (st.get("migration") or {}).get("target") == final, st
    TIMINGS["failed_migration_retarget_s"] = round(retarget_s, 2)


def test_kernel_guest_uptime_continues_across_drain(
        lab: tuple[LabCluster, EtcdStore], tmp_path: Path) -> None:
    lc, store = lab
    src, console = add_kernel_guest(lc, tmp_path, min_uptime=4.0)
    marks = {n: log_mark(d) for n, d in lc.agents.items()}
    offset = console.stat().st_size
    with truth_poller(lc).running() as poller:
        before = guest_uptime(console)
        assert before is not None
        t0 = time.monotonic()
        revoke_lease(lc, src)
        dst = str(wait_until(lambda: arrived(store, lc, KERNEL_VM, {src}), 30, 0.05,
                             "k0 live-migrated"))
        moved_s = time.monotonic() - t0
        # lines printed on the new node (the guest prints every second)
        after = wait_guest_uptime(console, before + moved_s + 2.0, 20)
    assert poller.violations == [], poller.violations
    ups, rebooted = console_values(console, offset)
    assert not rebooted, "the guest booted again"
    assert ups and ups == sorted(ups) and ups[0] >= before, (before, ups)
    assert after >= before + 2.0
    for n, d in lc.agents.items():
        assert events(d, "boot", marks[n], KERNEL_VM) == [], f"k0 cold-booted on {n}"
    st = status(store, lc, KERNEL_VM)
    assert st is not None and st["node"] == dst
    mig = st.get("migration") or {}
    assert mig.get("source") == src and mig.get("target") == dst, st
    assert mig.get("total_ms") is not None and mig.get("downtime_ms") is not None, st
    assert 0 <= mig["downtime_ms"] <= mig["total_ms"], mig
    TIMINGS["kernel_uptime"] = [before, after]
    TIMINGS["kernel_migration_ms"] = [mig["total_ms"], mig["downtime_ms"]]
