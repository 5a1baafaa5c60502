"""The libvirt adapter against libvirt's test:/// driver (no daemon, no QEMU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

libvirt = pytest.importorskip("libvirt")

from cli.common import default_domain_xml  # noqa: E402
from hypervisor.base import HypervisorError  # noqa: E402
from hypervisor.libvirt_adapter import LibvirtHypervisor  # noqa: E402

NODE_XML = """<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads>
       <active>4</active><mhz>2000</mhz><model>x86_64</model></cpu>
  <memory>8388608</memory>
  <domain type='test'><name>handmade</name><memory>65536</memory><vcpu>1</vcpu>
    <os><type>hvm</type></os></domain>
</node>"""


@pytest.fixture
def hv(tmp_path: Path) -> LibvirtHypervisor:
    f = tmp_path / "node.xml"
    f.write_text(NODE_XML)
    return LibvirtHypervisor(f"test://{f}")


def test_define_boot_list_destroy_undefine(hv: LibvirtHypervisor) -> None:
    doms = hv.list_domains()
    assert doms["handmade"].managed is False  # defined by hand: the agent never touches it
    hv.boot("web", default_domain_xml("web", 64, 1))
    web = hv.list_domains()["web"]
    assert web.state == "running" and web.managed and web.active and not web.incoming
    hv.boot("web", default_domain_xml("web", 64, 1))  # idempotent while running
    hv.destroy("web")
    assert hv.list_domains()["web"].state == "shutoff"
    hv.destroy("web")  # no error when not running
    hv.boot("web", default_domain_xml("web", 64, 1))  # a defined, stopped domain boots again
    assert hv.list_domains()["web"].state == "running"
    with pytest.raises(HypervisorError):
        hv.undefine("web")  # refuses to undefine a running domain
    hv.destroy("web")
    hv.undefine("web")
    assert "web" not in hv.list_domains()
    hv.undefine("web")  # no error when absent


def test_shutdown_capacity_and_errors(hv: LibvirtHypervisor) -> None:
    hv.boot("db", default_domain_xml("db", 128, 2))
    hv.shutdown("db")
    assert hv.list_domains()["db"].state == "shutoff"
    mem, vcpus = hv.capacity()
    assert mem == 8192 and vcpus == 4
    with pytest.raises(HypervisorError):
        hv.boot("bad", "<domain type='test'><name>bad</name></domain>")  # no memory: refused
    assert hv.incoming_stats("db") is None  # the test driver has no job statistics
    with pytest.raises(HypervisorError):
        hv.migrate("nope", "test:///default", "127.0.0.1")
    hv.close()


def test_peer_uri_with_tls_dials_the_target_address_over_qemu_tls() -> None:
    from hypervisor.libvirt_adapter import peer_uri

    unix = "qemu+unix:///system?socket=/run/n2/libvirt-sock"
    assert peer_uri(unix, "10.0.1.12", False) == unix  # plain: the registered URI
    assert peer_uri(unix, "10.0.1.12", True) == "qemu+tls://10.0.1.12/system"
    assert peer_uri("qemu:///system", "fd00::12", True) == "qemu+tls://[fd00::12]/system"
    own = "qemu+tls://n2.example.net:16515/system"
    assert peer_uri(own, "10.0.1.12", True) == own  # a registered qemu+tls URI wins


def test_boot_discards_a_managed_save_image() -> None:
    """libvirt-guests saves guests on host shutdown (managed save); a plain create()
    would restore that stale RAM over a disk that has moved on.  A boot removes the
    image first, says so in a structured event, and boots the guest fresh.  (The test
    driver refuses VIR_DOMAIN_START_FORCE_BOOT and never restores on create: the event
    and the image are what it can show.)  test:///default is one driver instance per
    process, so a second connection sees the adapter's domains."""
    hv = LibvirtHypervisor("test:///default")
    hv.boot("saved", default_domain_xml("saved", 64, 1))
    conn = libvirt.open("test:///default")
    dom = conn.lookupByName("saved")
    dom.managedSave(0)
    assert dom.hasManagedSaveImage(0) == 1 and hv.list_domains()["saved"].state == "shutoff"
    with capture_logs() as logs:
        hv.boot("saved", default_domain_xml("saved", 64, 1))
    assert [e for e in logs if e["event"] == "managed_save_removed"] == [
        {"event": "managed_save_removed", "vm": "saved", "uri": "test:///default",
         "reason": "boot from scratch, never from a saved memory image",
         "log_level": "warning"}]
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert dom.hasManagedSaveImage(0) == 0
    with capture_logs() as logs:  # no image: nothing to remove, nothing said
        hv.destroy("saved")
        hv.boot("saved", default_domain_xml("saved", 64, 1))
    assert not [e for e in logs if e["event"] == "managed_save_removed"]
    hv.destroy("saved")
    hv.undefine("saved")
    conn.close()
    hv.close()
