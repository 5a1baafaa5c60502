"""The fake hypervisor's record-only mode (for benchmarks at scale): no guest process,
a guest runs while its host process does, and destroy, migration and power loss end
it exactly as they end a guest process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hypervisor.fake import FakeHypervisor, fake_ground_truth, guest_processes

XML = "<domain type='qemu'><name>{0}</name><memory unit='MiB'>64</memory></domain>"


def _record(hv: FakeHypervisor, vm: str) -> dict[str, object]:
    return dict(json.loads((hv.ddir / f"{vm}.json").read_text()))


def test_boot_destroy_undefine_without_a_process(tmp_path: Path) -> None:
    hv = FakeHypervisor(tmp_path, "n1", record_only=True)
    hv.boot("vm1", XML.format("vm1"))
    assert guest_processes(tmp_path) == {}, "no guest process"
    assert hv.list_domains()["vm1"].state == "running"
    assert fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
    hv.destroy("vm1")
    assert hv.list_domains()["vm1"].state == "shutoff"
    assert fake_ground_truth(tmp_path) == {}
    hv.boot("vm1", XML.format("vm1"))  # booted again, then destroyed while shut off
    hv.destroy("vm1")
    hv.destroy("vm1")
    hv.undefine("vm1")
    assert hv.list_domains() == {}


def test_migration_moves_the_record(tmp_path: Path) -> None:
    n1 = FakeHypervisor(tmp_path, "n1", record_only=True, migrate_seconds=0.01)
    n2 = FakeHypervisor(tmp_path, "n2", record_only=True)
    n1.boot("vm1", XML.format("vm1"))
    n1.migrate("vm1", n2.uri, "127.0.0.1")
    assert fake_ground_truth(tmp_path) == {"vm1": ["n2"]}
    assert "vm1" not in n1.list_domains() and n2.list_domains()["vm1"].state == "running"
    assert guest_processes(tmp_path) == {}


def test_the_host_process_dying_is_a_power_loss(tmp_path: Path) -> None:
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        hv = FakeHypervisor(tmp_path, "n1", host_pid=host.pid, record_only=True)
        hv.boot("vm1", XML.format("vm1"))
        assert _record(hv, "vm1")["guest"] == {"pid": host.pid, "record_only": True,
                                               "start": _record(hv, "vm1")["guest"]["start"]}  # type: ignore[index]
        assert fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
    finally:
        host.kill()
        host.wait()
    assert fake_ground_truth(tmp_path) == {}
    assert hv.list_domains()["vm1"].state == "crashed"
