"""The domain XML policy at both gates, on real etcd and the fake hypervisor: `vmha vm
add`/`vm edit` refuse a refused element (exit 2, naming it and the VM), and a spec written
straight into etcd past the CLI is refused by the node agent before it defines anything:
the VM's status carries the error, nothing is defined or started, and the refusal is
retried with backoff like any refused boot.  An element the cluster config allows for
that VM explicitly passes both gates."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import ClusterConfig, Keyspace
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG, make_fake_cluster, vmha
from tests.harness import EtcdCluster
from tests.integration.helpers import domain_record, log_events
from tests.integration.keyspaces import KEYSPACES, ClusterView, mark_keyspace, place_boot
from tests.integration.test_vm_failures import events, spec, status, status_when
from tests.unit.test_domain_policy import PCI_HOSTDEV, REFUSED, with_devices

pytestmark = pytest.mark.integration
KS = Keyspace()

#: the refusals the issue names, each proven at both gates
CASES = ["seclabel-none", "disk-etc-shadow", "virtiofs-root", "pci-hostdev",
         "qemu-commandline", "qemu-capabilities", "dotdot-escape"]
CONFIG = TEST_CONFIG.model_copy(update={
    "failure_backoff_initial_s": 0.3, "failure_backoff_max_s": 1.0,
    "domain_policy_allow": {"gpu": ["hostdev"]}})


def _vm(case: str) -> str:
    return "p-" + case


def _xml(case: str) -> str:
    return REFUSED[case][0].replace("<name>v</name>", f"<name>{_vm(case)}</name>", 1)


def _put_config(etcd: EtcdCluster, cfg: ClusterConfig) -> None:
    store = EtcdStore(etcd.endpoints)
    try:
        store.put(KS.config, cfg.to_json())
    finally:
        store.close()


def test_cli_refuses_each_element_naming_it_and_allows_it_when_configured(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    _put_config(etcd, CONFIG)
    plain = tmp_path / "plain.xml"
    for case in CASES:
        vm, named = _vm(case), REFUSED[case][2]
        f = tmp_path / f"{vm}.xml"
        f.write_text(_xml(case))
        add = vmha(etcd, "vm", "add", vm, "--memory-mib", "64", "--xml", str(f))
        assert add.returncode == 2, (case, add.stdout, add.stderr)
        assert named in add.stderr and f"vm {vm}" in add.stderr, (case, add.stderr)
        assert "Traceback" not in add.stderr
        # edit: an existing VM cannot be given the refused XML either
        plain.write_text(with_devices(vm))
        assert vmha(etcd, "vm", "add", vm, "--memory-mib", "64", "--xml",
                    str(plain)).returncode == 0
        edit = vmha(etcd, "vm", "edit", vm, "--xml", str(f))
        assert edit.returncode == 2 and named in edit.stderr, (case, edit.stderr)
    store = EtcdStore(etcd.endpoints)
    try:  # nothing refused reached etcd
        for case in CASES:
            kv = store.get(KS.vm_spec(_vm(case)))
            assert kv is not None and "<hostdev" not in kv.value.decode()
            assert "/etc/shadow" not in kv.value.decode()
    finally:
        store.close()
    # the config allows a host device for "gpu" alone
    gpu = tmp_path / "gpu.xml"
    gpu.write_text(with_devices("gpu", PCI_HOSTDEV))
    ok = vmha(etcd, "vm", "add", "gpu", "--memory-mib", "64", "--xml", str(gpu))
    assert ok.returncode == 0, ok.stderr
    other = tmp_path / "gpu2.xml"
    other.write_text(with_devices("gpu2", PCI_HOSTDEV))
    refused = vmha(etcd, "vm", "add", "gpu2", "--memory-mib", "64", "--xml", str(other))
    assert refused.returncode == 2 and "<hostdev>" in refused.stderr


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_agent_refuses_specs_written_past_the_cli(etcd: EtcdCluster, tmp_path: Path,
                                                  keyspace: int) -> None:
    fc = make_fake_cluster(etcd, tmp_path, CONFIG, keyspace)
    store = EtcdStore(etcd.endpoints)
    view = ClusterView(etcd.endpoints)  # reads, on the keyspace the marker names
    try:
        fc.start_agent("n1")
        fc.start_orchestrator("o1")
        # Straight into etcd, past the CLI's checks (on the keyspace the marker names).
        for case in CASES:
            assert view.cluster.add_spec(spec(_vm(case), _xml(case))).succeeded
        assert view.cluster.add_spec(spec("gpu", with_devices("gpu", PCI_HOSTDEV))).succeeded
        status_when(view, "gpu", lambda s: s.state == "running", 30, "allowed gpu running")
        for case in CASES:
            vm, named = _vm(case), REFUSED[case][2]
            st = status_when(view, vm, lambda s: bool(s.error) and s.boot_failures >= 2, 30,
                             f"{vm} refused twice")
            assert named in (st.error or "") and "domain policy" in (st.error or ""), st
            assert st.state == "stopped" and st.node == "n1"
            assert st.retry_at is not None and st.failed_at is not None
            assert domain_record(fc.fake_root, "n1", vm) is None  # nothing defined
            assert events(view, vm, "boot") == []  # nothing started
            assert len(events(view, vm, "boot_failed")) == 1  # recorded once
        refusals = log_events(fc.agents["n1"], "domain_policy_refused")
        # logged once per VM, though each was refused at least twice
        assert sorted(r["vm"] for r in refusals) == sorted(_vm(c) for c in CASES)
        assert domain_record(fc.fake_root, "n1", "gpu") is not None
        st_gpu = status(view, "gpu")
        assert st_gpu is not None and not st_gpu.error
        # The operator allows it: the running agent applies the new config (no restart);
        # `vm start` re-arms a VM its node had given up on.
        vm = _vm("pci-hostdev")
        allow = {**CONFIG.domain_policy_allow, vm: ["hostdev"]}
        store.put(KS.config, CONFIG.model_copy(update={"domain_policy_allow": allow})
                  .to_json())
        assert vmha(etcd, "vm", "start", vm).returncode == 0
        status_when(view, vm, lambda s: s.state == "running", 30, f"{vm} allowed, running")
        assert domain_record(fc.fake_root, "n1", vm) is not None
    finally:
        fc.stop()
        store.close()
        view.close()


NODE_XML = """<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads>
       <active>4</active><mhz>2000</mhz><model>x86_64</model></cpu>
  <memory>8388608</memory>
</node>"""


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_agent_on_libvirt_test_driver_defines_nothing_the_policy_refuses(
        etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> None:
    """libvirt's test driver defines and starts a PCI <hostdev> or a disk on /etc/shadow
    without complaint: only the agent's gate keeps them out."""
    import threading

    from hypervisor.libvirt_adapter import LibvirtHypervisor
    from nodeagent.agent import AgentOptions, NodeAgent
    from tests.unit.test_domain_policy import disk

    node = tmp_path / "node.xml"
    node.write_text(NODE_XML)
    hv = LibvirtHypervisor(f"test://{node}")
    mark_keyspace(etcd.endpoints, keyspace)
    store = EtcdStore(etcd.endpoints)
    view = ClusterView(etcd.endpoints)
    store.put(KS.config, CONFIG.to_json())
    xmls = {"gpu": with_devices("gpu", PCI_HOSTDEV), "gpu2": with_devices("gpu2", PCI_HOSTDEV),
            "shadow": with_devices("shadow", disk("/etc/shadow"))}
    for i, (vm, xml) in enumerate(sorted(xmls.items())):
        place_boot(store, keyspace, vm, "n1", f"p{i}", spec(vm, xml))
    agent = NodeAgent(store, hv, AgentOptions(name="n1", poll_interval_s=0.2))
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        status_when(view, "gpu", lambda s: s.state == "running", 20, "allowed gpu running")
        for vm, named in (("gpu2", "<hostdev>"), ("shadow", "'/etc/shadow'")):
            st = status_when(view, vm, lambda s: bool(s.error), 20, f"{vm} refused")
            assert "domain policy refuses vm " + vm in (st.error or "")
            assert named in (st.error or "") and st.state == "stopped"
        status_when(view, "gpu2", lambda s: s.boot_failures >= 2, 20, "gpu2 retried")
        domains = hv.list_domains()
        assert domains["gpu"].active and "gpu2" not in domains and "shadow" not in domains
    finally:
        agent.stopped.set()
        agent.wake.set()
        t.join(5)
        store.close()
        view.close()


def test_vm_check_lists_specs_the_policy_refuses(etcd: EtcdCluster, tmp_path: Path) -> None:
    """Before an upgrade or a stricter config: which declared VMs would be refused."""
    import json

    from tests.unit.test_domain_policy import disk

    store = EtcdStore(etcd.endpoints)
    try:
        store.put(KS.config, CONFIG.to_json())
        store.put(KS.vm_spec("srv"), spec("srv", with_devices("srv", disk("/srv/vm/a.img")))
                  .to_json())
        store.put(KS.vm_spec("plain"), spec("plain", with_devices("plain")).to_json())
    finally:
        store.close()
    out = vmha(etcd, "--output", "json", "vm", "check")
    assert out.returncode == 2, out.stderr
    rows = {r["vm"]: r for r in json.loads(out.stdout)}
    assert rows["plain"]["allowed"] and not rows["srv"]["allowed"]
    assert "'/srv/vm/a.img'" in rows["srv"]["refused"][0]
    cfg = tmp_path / "cluster.toml"
    cfg.write_text('storage_paths = ["/var/lib/libvirt/images", "/srv/vm"]\n')
    ok = vmha(etcd, "vm", "check", "--file", str(cfg))
    assert ok.returncode == 0 and "srv" in ok.stdout and "ok" in ok.stdout, ok.stderr
