"""Small QEMU (TCG) guests for the lab, and live migration between nodes.

Two kinds of guest:

* :func:`tiny_guest_xml` - disk-less, kernel-less: only SeaBIOS runs (it
  finds nothing to boot and idles).  32 MiB, ~0.5 % CPU, migrates in ~2 s.
* :func:`kernel_guest_xml` - Debian's kernel plus a busybox initramfs built
  by :func:`lab.artifacts.ensure_kernel_artifacts`; its init
  prints ``VMHA-UPTIME <seconds>`` every second to the serial port, which
  QEMU appends to a host file.  :func:`guest_uptime` reads the last value,
  so a caller can tell a guest that kept running across a migration from
  one that was rebooted.
"""

from __future__ import annotations

import re
import time
import uuid as uuidlib
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt

from lab.artifacts import UPTIME_TAG, ensure_kernel_artifacts

#: Migration flags used by :func:`migrate_live` (peer-to-peer, live).
MIGRATE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)

#: Same, for the client-driven ("managed direct") mode without PEER2PEER.
MIGRATE_FLAGS_DIRECT = MIGRATE_FLAGS & ~libvirt.VIR_MIGRATE_PEER2PEER

#: Where QEMU migration data goes: loopback only.
MIGRATION_ADDRESS = "127.0.0.1"

_UPTIME_RE = re.compile(rb"VMHA-UPTIME (\d+(?:\.\d+)?)")


def _common_devices() -> str:
    return (
        "    <controller type='usb' model='none'/>\n"
        "    <memballoon model='none'/>\n"
    )


def _identity(name: str, uuid: str | None, memory_mib: int) -> str:
    """Name, UUID (a new one unless given), memory and one vCPU."""
    return (f"  <name>{escape(name)}</name>\n"
            f"  <uuid>{escape(uuid or str(uuidlib.uuid4()))}</uuid>\n"
            f"  <memory unit='MiB'>{int(memory_mib)}</memory>\n"
            "  <vcpu>1</vcpu>\n")


def tiny_guest_xml(name: str, memory_mib: int = 32, uuid: str | None = None) -> str:
    """Domain XML of a disk-less guest that only runs its BIOS."""
    return _bios_guest_xml(name, memory_mib, uuid)


def _bios_guest_xml(name: str, memory_mib: int, uuid: str | None, *, root_attrs: str = "",
                    disks: str = "", tail: str = "") -> str:
    return (
        f"<domain type='qemu'{root_attrs}>\n"
        f"{_identity(name, uuid, memory_mib)}"
        "  <os>\n"
        "    <type arch='x86_64' machine='pc'>hvm</type>\n"
        "    <boot dev='hd'/>\n"
        "    <bios useserial='no' rebootTimeout='-1'/>\n"
        "  </os>\n"
        "  <on_poweroff>destroy</on_poweroff>\n"
        "  <on_reboot>restart</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        f"{disks}"
        f"{_common_devices()}"
        "  </devices>\n"
        f"{tail}"
        "</domain>\n"
    )


def make_sparse_disk(path: Path, size_bytes: int = 1 << 20) -> Path:
    """Create (if missing) a sparse raw disk image of ``size_bytes``."""
    disk = Path(path)
    disk.parent.mkdir(parents=True, exist_ok=True)
    if not disk.exists():
        with open(disk, "wb") as fh:
            fh.truncate(size_bytes)
    return disk


def disk_guest_xml(
    name: str,
    disk_path: Path,
    memory_mib: int = 32,
    uuid: str | None = None,
    *,
    share_rw: bool = False,
) -> str:
    """Like :func:`tiny_guest_xml`, plus one raw disk at ``disk_path``.

    The sparse 1 MiB image is created if missing; put it where every node
    sees it at the same path (e.g. ``<lab root>/shared/disk-<name>.img``),
    so that lockd (``start_node(..., lockd=True)``) guards it across nodes.

    All lab nodes share one kernel, so QEMU's own image locking (OFD locks
    on the image) already refuses a second writer, while QEMU starts and
    before libvirt takes the lockd lease (at resume).  ``share_rw=True``
    relaxes QEMU's image locking for this guest (``-global
    ide-hd.share-rw=on``; libvirt still treats the disk as exclusive), so
    that only lockd stands in the way: what is left on real hosts whose
    shared storage does not carry QEMU's locks.
    """
    disk = make_sparse_disk(Path(disk_path)).resolve()
    qemu_ns = " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'" if share_rw else ""
    qemu_args = (
        "  <qemu:commandline>\n"
        "    <qemu:arg value='-global'/>\n"
        "    <qemu:arg value='ide-hd.share-rw=on'/>\n"
        "  </qemu:commandline>\n"
        if share_rw
        else ""
    )
    disks = ("    <disk type='file' device='disk'>\n"
             "      <driver name='qemu' type='raw'/>\n"
             f"      <source file={quoteattr(str(disk))}/>\n"
             "      <target dev='hda' bus='ide'/>\n"
             "    </disk>\n")
    return _bios_guest_xml(name, memory_mib, uuid, root_attrs=qemu_ns, disks=disks,
                           tail=qemu_args)


def kernel_guest_xml(
    name: str,
    cache: Path,
    console_log: Path,
    memory_mib: int = 96,
    uuid: str | None = None,
) -> str:
    """Domain XML of a Linux guest whose serial console goes to ``console_log``.

    Builds the kernel/initramfs into ``cache`` first if needed.  The console
    file is opened in append mode, so the migration destination's QEMU
    continues the same file instead of truncating it.  ``console_log`` and
    ``cache`` must be visible to every node (i.e. not under the per-node
    bind-mounted libvirt paths).  Below 96 MiB the guest resets during boot.
    """
    kernel, initrd = ensure_kernel_artifacts(Path(cache))
    console = Path(console_log).resolve()
    console.parent.mkdir(parents=True, exist_ok=True)
    cmdline = "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off"
    return (
        "<domain type='qemu'>\n"
        f"{_identity(name, uuid, memory_mib)}"
        "  <os>\n"
        "    <type arch='x86_64' machine='pc'>hvm</type>\n"
        f"    <kernel>{escape(str(kernel))}</kernel>\n"
        f"    <initrd>{escape(str(initrd))}</initrd>\n"
        f"    <cmdline>{escape(cmdline)}</cmdline>\n"
        "  </os>\n"
        "  <features><acpi/></features>\n"
        "  <on_poweroff>destroy</on_poweroff>\n"
        "  <on_reboot>destroy</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        "    <serial type='file'>\n"
        f"      <source path={quoteattr(str(console))} append='on'/>\n"
        "      <target port='0'/>\n"
        "    </serial>\n"
        f"{_common_devices()}"
        "  </devices>\n"
        "</domain>\n"
    )


def guest_uptime(console_log: Path) -> float | None:
    """Last uptime (seconds) the kernel guest printed to ``console_log``."""
    try:
        with open(console_log, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 4096))
            tail = fh.read()
    except OSError:
        return None
    matches = _UPTIME_RE.findall(tail)
    if not matches:
        return None
    return float(matches[-1])


def wait_guest_uptime(console_log: Path, minimum: float = 0.0, timeout: float = 60.0) -> float:
    """Wait until the guest reports an uptime >= ``minimum``; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = guest_uptime(console_log)
        if value is not None and value >= minimum:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"no {UPTIME_TAG} >= {minimum} in {console_log} after {timeout}s (last: {value})"
            )
        time.sleep(0.2)


def _job_ms(stats: dict[str, int]) -> tuple[float | None, float | None]:
    total = stats.get(libvirt.VIR_DOMAIN_JOB_TIME_ELAPSED)
    down = stats.get(libvirt.VIR_DOMAIN_JOB_DOWNTIME)
    return (
        float(total) if total is not None else None,
        float(down) if down is not None else None,
    )


def _completed_stats(dom: libvirt.virDomain) -> dict[str, int]:
    try:
        # KEEP_COMPLETED: reading them must not discard them for vmha's agent
        stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                             | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)
    except libvirt.libvirtError:
        return {}
    return stats or {}


def migrate_live(
    src_uri: str,
    dst_uri: str,
    vm_name: str,
    *,
    peer2peer: bool = True,
    bandwidth_mib_s: int | None = None,
) -> dict[str, float | None]:
    """Live-migrate ``vm_name`` from ``src_uri`` to ``dst_uri``.

    Peer-to-peer (default): the source libvirtd itself opens ``dst_uri``
    (``migrateToURI3``).  Otherwise the client drives both sides
    (``migrate3``).  Either way QEMU's data stream goes to
    ``tcp://127.0.0.1`` on a port of the destination node's range, the
    domain is made persistent on the destination and undefined on the
    source.

    Returns ``{'total_ms', 'downtime_ms', 'wall_ms'}``: total and downtime
    from the completed-job statistics (source side, else destination side),
    wall-clock duration of the call.
    """
    params: dict[str, object] = {
        libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{MIGRATION_ADDRESS}",
        libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: MIGRATION_ADDRESS,
    }
    if bandwidth_mib_s is not None:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib_s)
    src = libvirt.open(src_uri)
    dst = libvirt.open(dst_uri)
    try:
        dom = src.lookupByName(vm_name)
        started = time.monotonic()
        if peer2peer:
            dom.migrateToURI3(dst_uri, params, MIGRATE_FLAGS)
        else:
            dom.migrate3(dst, params, MIGRATE_FLAGS_DIRECT)
        wall_ms = (time.monotonic() - started) * 1000.0
        # The source's domain is undefined by now; the destination keeps
        # the completed job's statistics.  Look domains up via listings so
        # no "domain not found" error is raised (and logged by libvirt).
        total: float | None = None
        down: float | None = None
        for conn in (dst, src):
            found = [d for d in conn.listAllDomains() if d.name() == vm_name]
            if not found:
                continue
            t, d = _job_ms(_completed_stats(found[0]))
            total = total if total is not None else t
            down = down if down is not None else d
            if total is not None and down is not None:
                break
        return {"total_ms": total, "downtime_ms": down, "wall_ms": wall_ms}
    finally:
        dst.close()
        src.close()
