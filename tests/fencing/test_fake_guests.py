"""The fake hypervisor's guests are processes of their own, so the I1 checker sees a
destroy that did not happen, and a migration is excused only while it is in flight.

These are the negative controls of the ground truth the campaigns check (a checker that
cannot fire proves nothing): a lost destroy, a source that outlives its migration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from hypervisor.fake import (
    FakeHypervisor,
    fake_ground_truth,
    guest_alive,
    guest_processes,
    kill_guests,
    power_off,
    spawn_guest,
)
from lab.invariants import DoubleRunChecker, FakeTruth
from tests.harness import wait_until

XML = "<domain type='qemu'><name>{0}</name><memory unit='MiB'>64</memory></domain>"


def _record(hv: FakeHypervisor, vm: str) -> dict[str, object]:
    import json

    return dict(json.loads((hv.ddir / f"{vm}.json").read_text()))


def test_a_guest_is_a_tagged_process_that_destroy_kills(tmp_path: Path) -> None:
    hv = FakeHypervisor(tmp_path, "n1")
    hv.boot("vm1", XML.format("vm1"))
    guest = _record(hv, "vm1")["guest"]
    assert isinstance(guest, dict) and guest_alive(guest)
    pid = int(guest["pid"])
    assert guest_processes(tmp_path) == {pid: f"{(tmp_path / 'n1').resolve()}/vm1"}
    assert os.getsid(pid) == pid  # a session of its own: no signal to the agent's group
    assert fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
    hv.destroy("vm1")
    assert not guest_alive(guest) and fake_ground_truth(tmp_path) == {}
    assert hv.list_domains()["vm1"].state == "shutoff"


def test_a_reused_pid_is_not_the_guest(tmp_path: Path) -> None:
    hv = FakeHypervisor(tmp_path, "n1")
    hv.boot("vm1", XML.format("vm1"))
    guest = dict(_record(hv, "vm1")["guest"])  # type: ignore[arg-type]
    assert guest_alive(guest)
    assert not guest_alive({**guest, "start": guest["start"] + 1})
    assert not guest_alive({"pid": os.getpid(), "start": 0})


def test_guests_outlive_the_host_process_and_power_off_ends_them(tmp_path: Path) -> None:
    """The old fake's blind spot: its guests died with the host process (the guard), so
    a guard that fired and missed a domain looked like one that destroyed it."""
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        hv = FakeHypervisor(tmp_path, "n1", host_pid=host.pid)
        hv.boot("vm1", XML.format("vm1"))
        host.kill()
        host.wait()
        assert fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
        assert hv.list_domains()["vm1"].active
        assert len(power_off(hv.uri)) == 1
        assert fake_ground_truth(tmp_path) == {}
    finally:
        host.kill()
        host.wait()


def test_negative_control_a_lost_destroy_is_a_double_run(tmp_path: Path) -> None:
    """A host whose destroy reports success but kills nothing: once the VM boots
    elsewhere, I1 reports the double run."""
    n1, n2 = FakeHypervisor(tmp_path, "n1"), FakeHypervisor(tmp_path, "n2")
    checker = DoubleRunChecker(FakeTruth(tmp_path))
    n1.boot("vm1", XML.format("vm1"))
    (n1.dir / "destroy-noop").touch()
    n1.destroy("vm1")  # "fenced"
    assert n1.list_domains()["vm1"].state == "shutoff"  # what libvirt would say
    n2.boot("vm1", XML.format("vm1"))
    checker.sample()
    assert [(v["invariant"], v["vm"], sorted(v["nodes"])) for v in checker.violations] == [
        ("I1", "vm1", ["n1", "n2"])]
    # The same sequence with a destroy that works: nothing to report.
    (n1.dir / "destroy-noop").unlink()
    kill_guests(tmp_path)
    n1.boot("vm2", XML.format("vm2"))
    n1.destroy("vm2")
    n2.boot("vm2", XML.format("vm2"))
    checker.violations.clear()
    checker.sample()
    assert checker.violations == []


def test_a_migration_is_counted_once_while_in_flight_and_on_the_target_after(
        tmp_path: Path) -> None:
    src = FakeHypervisor(tmp_path, "a", migrate_seconds=1.0)
    dst = FakeHypervisor(tmp_path, "b")
    src.boot("vm1", XML.format("vm1"))
    checker = DoubleRunChecker(FakeTruth(tmp_path), interval=0.005).start()
    t = threading.Thread(target=src.migrate, args=("vm1", dst.uri, "127.0.0.1"))
    t.start()
    wait_until(lambda: "vm1" in dst.list_domains(), 5, what="incoming copy")
    assert dst.list_domains()["vm1"].incoming and dst.list_domains()["vm1"].state == "paused"
    assert fake_ground_truth(tmp_path) == {"vm1": ["a"]}
    t.join()
    # The sampler may not have read since the switch-over; stopping it now would race.
    wait_until(lambda: "b" in checker.seen("vm1"), 5, what="a sample of the target")
    checker.stop()
    assert fake_ground_truth(tmp_path) == {"vm1": ["b"]}
    assert "vm1" not in src.list_domains()
    assert checker.violations == [] and checker.seen("vm1") == {"a", "b"}
    assert len(guest_processes(tmp_path)) == 1


def test_negative_control_a_source_that_outlives_its_migration_is_counted(
        tmp_path: Path) -> None:
    """The in-flight excuse ends with the migration: a source QEMU that did not stop at
    the switch-over is a second running copy."""
    src = FakeHypervisor(tmp_path, "a", migrate_seconds=0.1)
    dst = FakeHypervisor(tmp_path, "b")
    src.boot("vm1", XML.format("vm1"))
    (src.dir / "destroy-noop").touch()
    src.migrate("vm1", dst.uri, "127.0.0.1")
    checker = DoubleRunChecker(FakeTruth(tmp_path))
    checker.sample()
    assert [(v["vm"], sorted(v["nodes"])) for v in checker.violations] == [
        ("vm1", ["a", "b"])]


def test_the_incoming_copy_ends_with_the_migrating_process(tmp_path: Path) -> None:
    """A kill of the source's agent mid-migration: the paused copy on the target goes
    (as libvirt drops it), the source's guest runs on, counted once all along."""
    dst = FakeHypervisor(tmp_path, "b")
    code = ("import sys; from pathlib import Path; from hypervisor.fake import FakeHypervisor;"
            "a = FakeHypervisor(Path(sys.argv[1]), 'a', migrate_seconds=60);"
            "a.boot('vm1', sys.argv[2]); a.migrate('vm1', sys.argv[3], '127.0.0.1')")
    mover = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), XML.format("vm1"),
                              dst.uri])
    try:
        wait_until(lambda: "vm1" in dst.list_domains(), 15, what="incoming copy")
        assert fake_ground_truth(tmp_path) == {"vm1": ["a"]}
        mover.send_signal(signal.SIGKILL)
        mover.wait()
        wait_until(lambda: "vm1" not in dst.list_domains(), 5, what="incoming copy gone")
        assert fake_ground_truth(tmp_path) == {"vm1": ["a"]}
        assert len(guest_processes(tmp_path)) == 1
    finally:
        mover.kill()
        mover.wait()


def test_a_destroy_on_the_target_fails_the_migration_and_the_source_runs_on(
        tmp_path: Path) -> None:
    src = FakeHypervisor(tmp_path, "a", migrate_seconds=1.0)
    dst = FakeHypervisor(tmp_path, "b")
    src.boot("vm1", XML.format("vm1"))
    errors: list[BaseException] = []

    def move() -> None:
        try:
            src.migrate("vm1", dst.uri, "127.0.0.1")
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)

    t = threading.Thread(target=move)
    t.start()
    wait_until(lambda: "vm1" in dst.list_domains(), 5, what="incoming copy")
    dst.destroy("vm1")  # the target's guard fires mid-migration
    t.join()
    assert errors and "incoming copy on b is gone" in str(errors[0])
    assert fake_ground_truth(tmp_path) == {"vm1": ["a"]}
    assert src.list_domains()["vm1"].active and "vm1" not in dst.list_domains()


def test_a_fenced_fake_host_refuses_boots_and_incoming_migrations(tmp_path: Path) -> None:
    """The fake does what deploy/libvirt/hooks/qemu makes libvirtd do: while the host's
    fenced marker exists, no start and no incoming migration (the campaign's double run:
    a drain migrated a VM into a node 0.4 s after its guard had fired)."""
    from fencing.marker import FencedMarker, default_marker_path
    from hypervisor.base import HypervisorRefused

    src = FakeHypervisor(tmp_path, "a", migrate_seconds=0.05)
    dst = FakeHypervisor(tmp_path, "b")
    src.boot("vm1", XML.format("vm1"))
    marker = FencedMarker(default_marker_path(dst.uri))
    marker.write("guard", "test")
    try:
        src.migrate("vm1", dst.uri, "127.0.0.1")
        raise AssertionError("a migration into a fenced host went through")
    except HypervisorRefused as exc:
        assert "fenced" in str(exc) and "migrate" in str(exc)
    try:
        dst.boot("vm2", XML.format("vm2"))
        raise AssertionError("a boot on a fenced host went through")
    except HypervisorRefused as exc:
        assert "fenced" in str(exc) and "start" in str(exc)
    assert fake_ground_truth(tmp_path) == {"vm1": ["a"]}
    assert "vm1" not in dst.list_domains() and "vm2" not in dst.list_domains()
    assert src.list_domains()["vm1"].active
    marker.remove()  # registered again: work is accepted
    src.migrate("vm1", dst.uri, "127.0.0.1")
    dst.boot("vm2", XML.format("vm2"))
    assert fake_ground_truth(tmp_path) == {"vm1": ["b"], "vm2": ["b"]}


def test_a_migration_killed_as_it_starts_is_never_a_double_run(tmp_path: Path) -> None:
    """The campaign's I1 double run (30 ms, seed 304): the migrating agent was killed
    right after the target's incoming copy was written and before the source named the
    migration, so nothing excused the paused copy.  Here the migrating process dies
    right after its last write of the start (the incoming copy), and is left a zombie
    (not reaped) so the copy lives on while the ground truth is read."""
    code = ("import os, sys; from pathlib import Path; import hypervisor.fake as f;"
            "a = f.FakeHypervisor(Path(sys.argv[1]), 'a', migrate_seconds=60);"
            "a.boot('vm1', sys.argv[2]); real = f._write_json\n"
            "def die_after_incoming(path, data):\n"
            "    real(path, data)\n"
            "    if data.get('incoming'): os._exit(9)\n"
            "f._write_json = die_after_incoming\n"
            "a.migrate('vm1', sys.argv[3], '127.0.0.1')")
    dst = FakeHypervisor(tmp_path, "b")
    mover = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), XML.format("vm1"),
                              dst.uri])
    try:
        os.waitid(os.P_PID, mover.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
        assert "vm1" in dst.list_domains(), "the incoming copy lives while its job's pid does"
        assert fake_ground_truth(tmp_path) == {"vm1": ["a"]}
    finally:
        mover.kill()
        mover.wait()
        kill_guests(tmp_path)


def test_a_guest_is_findable_by_its_tag_as_soon_as_spawn_returns(tmp_path: Path) -> None:
    """A CI run's failure: the guest's pid was alive but /proc/<pid>/cmdline still
    empty, so `guest_processes` (and with it `power_off` and the teardown) missed a
    guest just booted.  The kernel closes the exec status pipe (Popen returns) before
    it has set up the new program's argument area.  Busy processes widen that window,
    as the suite's other worker does."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 2)]
    try:
        missed = []
        for i in range(200):
            tag = f"{tmp_path.resolve()}/n1/vm{i}"
            pid = int(spawn_guest(tag)["pid"])
            # Read at once (a scan of /proc would give the child time to finish).
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(f"vmha-fake-guest {tag}".encode()):
                    missed.append(i)
            kill_guests(tmp_path)
        assert missed == [], f"{len(missed)} of 200 guests without their tag yet"
        tag = f"{tmp_path.resolve()}/n1/last"
        pid = int(spawn_guest(tag)["pid"])
        assert guest_processes(tmp_path) == {pid: tag}
    finally:
        for p in busy:
            p.kill()
            p.wait()
        kill_guests(tmp_path)
