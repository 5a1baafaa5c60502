"""The CLI refuses bad input with exit 2 and a message that names it, never a
traceback: a missing or unreadable file, a name with a trailing newline, a size past its
upper bound; a value past the bounds written into etcd is an invalid key `vmha status`
lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas import Keyspace
from store.etcd import EtcdStore
from tests.conftest import vmha
from tests.harness import EtcdCluster
from tests.unit.builders import spec_value

pytestmark = pytest.mark.integration
KS = Keyspace()


def _refused(proc: object, *words: str) -> None:
    rc, err = proc.returncode, proc.stderr  # type: ignore[attr-defined]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_vm_add_and_edit_with_a_missing_or_unreadable_xml_file(etcd: EtcdCluster,
                                                               tmp_path: Path) -> None:
    missing = tmp_path / "nope.xml"
    _refused(vmha(etcd, "vm", "add", "w", "--memory-mib", "64", "--xml", str(missing)),
             str(missing))
    assert vmha(etcd, "vm", "add", "w", "--memory-mib", "64").returncode == 0
    _refused(vmha(etcd, "vm", "edit", "w", "--xml", str(missing)), str(missing))
    # a directory, and bytes that are not UTF-8 text
    _refused(vmha(etcd, "vm", "edit", "w", "--xml", str(tmp_path)), str(tmp_path))
    binary = tmp_path / "b.xml"
    binary.write_bytes(b"\xff\xfe<domain")
    _refused(vmha(etcd, "vm", "add", "w2", "--memory-mib", "64", "--xml", str(binary)),
             str(binary))


def test_trailing_newline_and_oversize_refused_by_the_cli(etcd: EtcdCluster) -> None:
    _refused(vmha(etcd, "vm", "add", "web\n", "--memory-mib", "64"), "name")
    _refused(vmha(etcd, "vm", "add", "big", "--memory-mib", str(10**30)), "memory_mib")
    _refused(vmha(etcd, "vm", "add", "big", "--memory-mib", str(16 * 1024 * 1024 + 1)),
             "memory_mib")
    _refused(vmha(etcd, "vm", "add", "big", "--memory-mib", "64", "--vcpus",
                  "4097"), "vcpus")
    _refused(vmha(etcd, "vm", "add", "big", "--memory-mib", "64", "--priority",
                  str(10**9)), "priority")
    _refused(vmha(etcd, "vm", "add", "big", "--memory-mib", "64", "--allow-node", "n1\n"),
             "allowed_nodes")
    assert vmha(etcd, "vm", "add", "small", "--memory-mib", "64").returncode == 0
    _refused(vmha(etcd, "vm", "edit", "small", "--memory-mib", str(10**30)), "memory_mib")


def test_out_of_bound_value_in_etcd_is_listed_by_status(etcd: EtcdCluster) -> None:
    store = EtcdStore(etcd.endpoints)
    try:
        store.put(KS.vm_spec("huge"), json.dumps({**spec_value("huge"),
                                                  "memory_mib": 10**30}))
    finally:
        store.close()
    out = vmha(etcd, "--output", "json", "status")
    data = json.loads(out.stdout)
    assert [i["key"] for i in data["invalid"]] == [KS.vm_spec("huge")]
    assert "memory_mib" in data["invalid_keys"][0]


@pytest.mark.parametrize("content", [None, b"\xff\xfe = 1\n", b"name = \n"])
def test_daemon_config_file_missing_unreadable_or_malformed(etcd: EtcdCluster, tmp_path: Path,
                                                            content: bytes | None) -> None:
    f = tmp_path / "agent.toml"
    if content is not None:
        f.write_bytes(content)
    _refused(vmha(etcd, "agent", "--config", str(f), "--name", "n1"), str(f))


@pytest.mark.parametrize(("flag", "value"), [("--memory-mib", str(10**30)),
                                             ("--vcpus", "4097")])
def test_agent_refuses_a_capacity_past_the_bounds(etcd: EtcdCluster, tmp_path: Path,
                                                  flag: str, value: str) -> None:
    _refused(vmha(etcd, "agent", "--name", "n1", "--fake-root", str(tmp_path), flag, value),
             flag[2:].replace("-", "_"))
