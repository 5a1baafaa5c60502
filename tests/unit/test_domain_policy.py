"""The domain XML policy (schemas.domain_policy): what a spec's domain XML may ask of the
hypervisor host.  Each refused element is refused by name, an explicit per-VM allowance in
the cluster config lets it pass, host paths are compared after normalisation (no `..`
escape), and XML with a DTD is refused before anything reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.common import default_domain_xml
from schemas import ClusterConfig, SchemaError
from schemas.domain_policy import DomainPolicyError, check_domain_xml, policy_violations
from schemas.models import VmSpec

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
POLICY = ClusterConfig()  # the defaults: storage under /var/lib/libvirt/images


def with_devices(name: str, devices: str = "", top: str = "", root_attrs: str = "") -> str:
    xml = default_domain_xml(name, 64, 1)
    xml = xml.replace("<devices>", f"<devices>{devices}", 1)
    xml = xml.replace("</domain>", f"{top}</domain>", 1)
    return xml.replace("<domain type='qemu'>", f"<domain type='qemu'{root_attrs}>", 1)


def disk(path: str, dtype: str = "file", attr: str = "file") -> str:
    return (f"<disk type='{dtype}' device='disk'><driver name='qemu' type='raw'/>"
            f"<source {attr}='{path}'/><target dev='vda' bus='virtio'/></disk>")


VIRTIOFS_ROOT = ("<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/>"
                 "<source dir='/'/><target dir='hostroot'/></filesystem>")
PCI_HOSTDEV = ("<hostdev mode='subsystem' type='pci' managed='yes'><source>"
               "<address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>"
               "</source></hostdev>")
COMMANDLINE = (f" xmlns:qemu='{QEMU_NS}'",
               "<qemu:commandline><qemu:arg value='-runas'/><qemu:arg value='root'/>"
               "</qemu:commandline>")
CAPABILITIES = (f" xmlns:qemu='{QEMU_NS}'",
                "<qemu:capabilities><qemu:del capability='sandbox'/></qemu:capabilities>")

#: id -> (domain XML of vm "v", the allowance that lets it pass, words the refusal names)
REFUSED: dict[str, tuple[str, str, str]] = {
    "seclabel-none": (with_devices("v", top="<seclabel type='none'/>"), "seclabel",
                      "<seclabel type='none'>"),
    "seclabel-static-root": (
        with_devices("v", top="<seclabel type='static' model='dac' relabel='no'>"
                              "<label>+0:+0</label></seclabel>"),
        "seclabel", "<seclabel type='static'>"),
    "disk-etc-shadow": (with_devices("v", disk("/etc/shadow")), "host-path", "/etc/shadow"),
    "block-device": (with_devices("v", disk("/dev/sda", "block", "dev")), "host-path",
                     "/dev/sda"),
    "virtiofs-root": (with_devices("v", VIRTIOFS_ROOT), "host-path", "<filesystem>"),
    "pci-hostdev": (with_devices("v", PCI_HOSTDEV), "hostdev", "<hostdev>"),
    "qemu-commandline": (with_devices("v", top=COMMANDLINE[1], root_attrs=COMMANDLINE[0]),
                         "qemu:commandline", "qemu:commandline"),
    "qemu-capabilities": (with_devices("v", top=CAPABILITIES[1], root_attrs=CAPABILITIES[0]),
                          "qemu:capabilities", "qemu:capabilities"),
    "dotdot-escape": (
        with_devices("v", disk("/var/lib/libvirt/images/../../../../etc/shadow")),
        "host-path", "(= '/etc/shadow')"),
    "backing-store": (
        with_devices("v", "<disk type='file' device='disk'><source file="
                          "'/var/lib/libvirt/images/v.qcow2'/><backingStore type='file'>"
                          "<format type='raw'/><source file='/root/secret.img'/>"
                          "</backingStore><target dev='vda'/></disk>"),
        "host-path", "/root/secret.img"),
    "relative-path": (with_devices("v", disk("images/v.img")), "host-path", "images/v.img"),
    "custom-emulator": (with_devices("v", "<emulator>/tmp/evil</emulator>"), "emulator",
                        "/tmp/evil"),
    "virtiofs-binary": (
        with_devices("v", "<filesystem type='mount'><driver type='virtiofs'/><binary "
                          "path='/tmp/evil'/><source dir='/var/lib/libvirt/images/share'/>"
                          "<target dir='share'/></filesystem>"),
        "emulator", "<binary path='/tmp/evil'>"),
    "hostdev-interface": (with_devices("v", "<interface type='hostdev'><source><address "
                                            "type='pci' domain='0' bus='4' slot='0' "
                                            "function='1'/></source></interface>"),
                          "hostdev", "<interface type='hostdev'>"),
    "volume-from-unlisted-pool": (
        with_devices("v", "<disk type='volume' device='disk'><source pool='rootfs' "
                          "volume='etc'/><target dev='vda'/></disk>"),
        "host-path", "pool 'rootfs'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_each_element_is_refused_by_name_and_passes_with_its_allowance(case: str) -> None:
    xml, allowance, named = REFUSED[case]
    problems = policy_violations(xml, "v", POLICY)
    assert problems, f"{case}: nothing refused"
    assert any(named in p for p in problems), problems
    with pytest.raises(DomainPolicyError) as err:
        check_domain_xml(xml, "v", POLICY)
    assert "vm v" in str(err.value) and named in str(err.value)
    allowed = POLICY.model_copy(update={"domain_policy_allow": {"v": [allowance]}})
    assert policy_violations(xml, "v", allowed) == []
    # the allowance is the named VM's alone
    other = POLICY.model_copy(update={"domain_policy_allow": {"w": [allowance]}})
    assert policy_violations(xml, "v", other) != []


def test_qemu_namespace_is_recognised_whatever_its_prefix() -> None:
    # the agent re-serialises XML (hypervisor.base.mark_managed): ElementTree renames the
    # prefix to ns0, which libvirt still honours; the policy goes by namespace URI
    xml = with_devices("v", top="<x:commandline><x:arg value='-S'/></x:commandline>",
                       root_attrs=f" xmlns:x='{QEMU_NS}'")
    assert any("qemu:commandline" in p for p in policy_violations(xml, "v", POLICY))
    default_ns = with_devices("v", top=f"<commandline xmlns='{QEMU_NS}'><arg value='-S'/>"
                                       "</commandline>")
    assert any("qemu:commandline" in p for p in policy_violations(default_ns, "v", POLICY))
    from hypervisor.base import mark_managed

    assert any("qemu:commandline" in p
               for p in policy_violations(mark_managed(xml), "v", POLICY))


def test_allowed_storage_and_plain_guests_pass() -> None:
    assert policy_violations(default_domain_xml("v", 64, 1), "v", POLICY) == []
    ok = with_devices("v", disk("/var/lib/libvirt/images/v.qcow2")
                      + "<disk type='network' device='disk'><source protocol='rbd' "
                        "name='pool/v'/><target dev='vdb'/></disk>"
                      + "<emulator>/usr/bin/qemu-system-x86_64</emulator>",
                      top="<seclabel type='dynamic' model='selinux'/>")
    assert policy_violations(ok, "v", POLICY) == []
    shared = POLICY.model_copy(update={"storage_paths": ["/srv/vm"]})
    assert policy_violations(with_devices("v", disk("/srv/vm/a/b.img")), "v", shared) == []
    assert policy_violations(with_devices("v", disk("//srv/vm//a/./b.img")), "v", shared) == []
    assert policy_violations(with_devices("v", disk("//etc/shadow")), "v", shared) != []
    # a prefix is a directory, not a string prefix
    assert policy_violations(with_devices("v", disk("/srv/vmx/b.img")), "v", shared) != []


def test_empty_storage_paths_allows_only_disks_without_a_host_path() -> None:
    none = ClusterConfig(storage_paths=[])
    assert policy_violations(with_devices("v", disk("/var/lib/libvirt/images/a.img")),
                             "v", none) != []
    net = with_devices("v", "<disk type='network' device='disk'><source protocol='nbd' "
                            "name='v'><host name='10.0.0.1'/></source><target dev='vda'/>"
                            "</disk>")
    assert policy_violations(net, "v", none) == []


@pytest.mark.parametrize("xml", [
    "<!DOCTYPE domain [<!ENTITY x SYSTEM 'file:///etc/shadow'>]>"
    "<domain type='qemu'><name>v</name><description>&x;</description></domain>",
    "<!DOCTYPE domain [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;'>]>"
    "<domain type='qemu'><name>v</name><description>&b;</description></domain>",
    "<!DOCTYPE domain><domain type='qemu'><name>v</name></domain>",
])
def test_a_dtd_or_entity_is_refused_before_parsing(xml: str) -> None:
    with pytest.raises(ValueError, match="DTD"):
        VmSpec(name="v", domain_xml=xml, memory_mib=64, vcpus=1)


def test_config_validates_the_policy_fields() -> None:
    for bad in ({"storage_paths": ["relative/dir"]}, {"storage_paths": ["/"]},
                {"domain_policy_allow": {"Bad Name": ["hostdev"]}},
                {"domain_policy_allow": {"v": ["everything"]}}):
        with pytest.raises(SchemaError):
            ClusterConfig.parse_dict(bad)
    cfg = ClusterConfig.parse_dict({"storage_paths": ["/srv/vm/../images/", "/data//vm"]})
    assert cfg.storage_paths == ["/srv/images", "/data/vm"]


def test_lab_guests_pass_the_default_policy_and_its_raw_qemu_guest_does_not(
        tmp_path: Path) -> None:
    from lab.guests import disk_guest_xml, tiny_guest_xml

    assert policy_violations(tiny_guest_xml("t"), "t", POLICY) == []
    xml = disk_guest_xml("d", tmp_path / "d.img", share_rw=True)
    refused = policy_violations(xml, "d", POLICY)
    assert [p.split(" ")[0] for p in refused] == ["<disk", "<qemu:commandline>"]
    lab = POLICY.model_copy(update={"storage_paths": [str(tmp_path.resolve())],
                                    "domain_policy_allow": {"d": ["qemu:commandline"]}})
    assert policy_violations(xml, "d", lab) == []
