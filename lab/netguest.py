"""A network-reachable kernel guest for the lab, and the network namespace it lives in.

The plain kernel guest (:mod:`lab.artifacts`) has no NIC driver: Debian's
kernel builds them as modules.  This module assembles a second initramfs (cached next to
the first one) that carries

* the virtio NIC modules and their dependencies, in load order (read from each
  module's ``depends=`` tag, out of the same ``linux-image`` package as the kernel);
* ``udpecho``: a tiny static C program (built with ``gcc -static``) that answers
  every probe datagram and puts into the answer how many probes of the current stream
  it has received so far, so a prober can tell which direction lost a packet;
* an ``/init`` that loads the modules, gives ``eth0`` a static address (IPv6 off),
  starts ``udpecho`` and then prints its uptime every second, like the plain guest.

The modules and ``udpecho`` are extracted and built by the fetch step (:mod:`lab.fetch`,
run by setup) into ``<cache>/net/``; this module only assembles cached files, since it
runs inside a network namespace with no route to a package archive.

:func:`net_guest_xml` is the plain guest's XML plus one virtio NIC on a Linux bridge.
The bridge lives in a network namespace that :func:`create_netns` makes (no uplink):
the lab's libvirtd daemons must run in that namespace, so that their taps land there
and migrations use the namespace's loopback.  Root only.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lab.artifacts import (
    BOOT_TAG,
    BUSYBOX_NAME,
    DEFAULT_CACHE,
    KERNEL_NAME,
    KERNEL_PACKAGE_FILE,
    UPTIME_TAG,
    ArtifactError,
    base_entries,
    cache_lock,
    ensure_kernel_artifacts,
    missing_error,
    pack_initramfs,
    require,
    write_atomic,
)
from lab.guests import kernel_guest_xml

#: Bump when the network initramfs changes.
NET_INITRD_FORMAT = 1
NET_INITRD_NAME = "initrd-net.img"
NET_STAMP_NAME = "net-artifacts.json"
#: Where the fetch step puts the pieces (``modules/<name>.ko``, ``udpecho``, a stamp).
NET_DIR = "net"
NET_PIECES_STAMP = "pieces.json"
UDPECHO_NAME = "udpecho"
#: Bump when the cached pieces change (the fetch step then fetches them again).
NET_PIECES_FORMAT = 1

#: UDP port of the guest's echo program; the probe header's magic number.
ECHO_PORT = 7777
PROBE_MAGIC = 0x564D4841  # "VMHA"
#: A sequence number that asks for the count only (it is not counted itself).
QUERY_SEQ = 0xFFFFFFFF

#: NIC modules the guest needs; their dependencies are added automatically.
NIC_MODULES = ("virtio_pci", "virtio_net")

UDPECHO_C = r"""
/* udpecho: answer every probe; report how many probes of the stream arrived. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7777;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    int rcvbuf = 1 << 20;
    struct sockaddr_in addr;
    unsigned char buf[2048];
    uint32_t stream = 0, count = 0;
    if (s < 0) return 1;
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) != 0) return 1;
    for (;;) {
        struct sockaddr_in from;
        socklen_t fromlen = sizeof from;
        uint32_t magic, sid, seq, c;
        ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&from, &fromlen);
        if (n < 16) continue;
        memcpy(&magic, buf, 4);
        memcpy(&sid, buf + 4, 4);
        memcpy(&seq, buf + 8, 4);
        if (ntohl(magic) != MAGIC) continue;
        if (ntohl(sid) != stream) { stream = ntohl(sid); count = 0; }
        if (ntohl(seq) != 0xFFFFFFFFu) count++;
        c = htonl(count);
        memcpy(buf + 12, &c, 4);
        sendto(s, buf, (size_t)n, 0, (struct sockaddr *)&from, fromlen);
    }
}
"""


@dataclass(frozen=True)
class GuestNet:
    """Addresses of the namespace's bridge and of the guest."""

    netns: str
    bridge: str = "vmhabr0"
    bridge_mac: str = "52:54:00:ff:00:01"
    host_ip: str = "10.255.0.1"
    guest_ip: str = "10.255.0.2"
    guest_mac: str = "52:54:00:ff:00:02"
    prefix_len: int = 24


def _init_script(modules: list[str], net: GuestNet) -> str:
    lines = [
        "#!/bin/busybox sh",
        "/bin/busybox mount -t proc proc /proc",
        "/bin/busybox mount -t sysfs sysfs /sys",
        "export PATH=/bin",
    ]
    lines += [f"insmod /lib/modules/{m}.ko" for m in modules]
    lines += [
        "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
        "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
        "ip link set lo up",
        "n=0",
        "while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done",
        "echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6",
        "ip link set eth0 up",
        f"ip addr add {net.guest_ip}/{net.prefix_len} dev eth0",
        f"/bin/udpecho {ECHO_PORT} &",
        f'echo "{BOOT_TAG}"',
        "while :; do",
        "  read up idle < /proc/uptime",
        f'  echo "{UPTIME_TAG} $up"',
        "  sleep 1",
        "done",
        "",
    ]
    return "\n".join(lines)


def module_order(mods: dict[str, bytes], wanted: tuple[str, ...]) -> list[str]:
    """Dependencies first (from each module's ``depends=`` tag)."""
    deps: dict[str, list[str]] = {}
    for name, blob in mods.items():
        m = re.search(rb"depends=([A-Za-z0-9_,-]*)\0", blob)
        deps[name] = [d.replace("-", "_") for d in (m.group(1).decode().split(",") if m else [])
                      if d]
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in stack or name not in deps:
            raise ArtifactError(f"cannot resolve kernel module {name} ({stack})")
        for dep in deps[name]:
            visit(dep, (*stack, name))
        order.append(name)

    for w in wanted:
        visit(w, ())
    return order


def build_net_initramfs(busybox: bytes, modules: dict[str, bytes], order: list[str],
                        udpecho: bytes, net: GuestNet) -> bytes:
    dirs = ("bin", "dev", "proc", "sys", "tmp", "root", "lib", "lib/modules")
    links = ("sh", "mount", "sleep", "cat", "echo", "insmod", "ip", "poweroff")
    entries = base_entries(busybox, dirs, links)
    entries.append(("bin/udpecho", 0o100755, udpecho, (0, 0)))
    for name in order:
        entries.append((f"lib/modules/{name}.ko", 0o100644, modules[name], (0, 0)))
    entries.append(("init", 0o100755, _init_script(order, net).encode(), (0, 0)))
    return pack_initramfs(entries)


@dataclass(frozen=True)
class NetPieces:
    """What the fetch step caches for the network guest."""

    kernel_package: str
    order: list[str]
    modules: dict[str, bytes]
    udpecho: bytes


def load_net_pieces(cache: Path) -> NetPieces:
    """The cached NIC modules (for the cached kernel) and udpecho; never downloads."""
    stamp = f"{NET_DIR}/{NET_PIECES_STAMP}"
    try:
        meta = json.loads((cache / stamp).read_text())
    except (OSError, ValueError):
        raise missing_error(cache, [stamp]) from None
    kernel_pkg = (cache / KERNEL_PACKAGE_FILE).read_text().strip() \
        if (cache / KERNEL_PACKAGE_FILE).is_file() else None
    if meta.get("format") != NET_PIECES_FORMAT or meta.get("kernel_package") != kernel_pkg:
        raise missing_error(cache, [stamp], why="out of date")
    order = [str(m) for m in meta.get("modules", [])]
    files = [f"{NET_DIR}/modules/{m}.ko" for m in order] + [f"{NET_DIR}/{UDPECHO_NAME}"]
    require(cache, *files)
    return NetPieces(kernel_package=str(kernel_pkg), order=order,
                     modules={m: (cache / NET_DIR / "modules" / f"{m}.ko").read_bytes()
                              for m in order},
                     udpecho=(cache / NET_DIR / UDPECHO_NAME).read_bytes())


def ensure_net_artifacts(net: GuestNet, cache: Path = DEFAULT_CACHE) -> tuple[Path, Path]:
    """``(kernel, network initramfs)`` in ``cache``, assembled once per guest address.

    Only from cached files (see :mod:`lab.fetch`): it runs inside network namespaces
    without a route to any archive.  A missing piece raises
    :class:`lab.artifacts.ArtifactMissing`, naming the setup command.
    """
    kernel, _ = ensure_kernel_artifacts(cache)
    cache = Path(cache).resolve()
    initrd = cache / NET_INITRD_NAME
    stamp = cache / NET_STAMP_NAME
    pieces = load_net_pieces(cache)
    want = {"format": NET_INITRD_FORMAT, "guest_ip": net.guest_ip, "prefix": net.prefix_len,
            "kernel_package": pieces.kernel_package}

    def fresh() -> bool:
        try:
            meta = json.loads(stamp.read_text())
        except (OSError, ValueError):
            return False
        return initrd.is_file() and all(meta.get(k) == v for k, v in want.items())

    if fresh():
        return kernel, initrd
    require(cache, BUSYBOX_NAME)
    with cache_lock(cache):
        if fresh():
            return kernel, initrd
        busybox = (cache / BUSYBOX_NAME).read_bytes()
        write_atomic(initrd, build_net_initramfs(busybox, pieces.modules, pieces.order,
                                                 pieces.udpecho, net))
        write_atomic(stamp, (json.dumps({**want, "modules": pieces.order}, indent=1)
                             + "\n").encode())
    assert kernel.name == KERNEL_NAME
    return kernel, initrd


def net_guest_xml(name: str, net: GuestNet, console_log: Path, cache: Path = DEFAULT_CACHE,
                  memory_mib: int = 96) -> str:
    """The kernel guest's XML with the network initramfs and a virtio NIC on the bridge."""
    _, initrd = ensure_net_artifacts(net, cache)
    xml = kernel_guest_xml(name, cache, console_log, memory_mib=memory_mib)
    xml = re.sub(r"<initrd>[^<]*</initrd>", f"<initrd>{initrd}</initrd>", xml)
    nic = ("    <interface type='bridge'>\n"
           f"      <source bridge='{net.bridge}'/>\n"
           f"      <mac address='{net.guest_mac}'/>\n"
           "      <model type='virtio'/>\n"
           "    </interface>\n")
    return xml.replace("  </devices>\n", nic + "  </devices>\n")


# ---- the namespace ------------------------------------------------------------------------


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def create_netns(net: GuestNet) -> None:
    """A new network namespace with loopback up and the guests' bridge (no uplink)."""
    _ip("netns", "add", net.netns)
    try:
        def inside(*args: str) -> None:
            _ip("netns", "exec", net.netns, "ip", *args)

        for key in ("all", "default"):
            subprocess.run(["ip", "netns", "exec", net.netns, "sysctl", "-q", "-w",
                            f"net.ipv6.conf.{key}.disable_ipv6=1"], check=True,
                           capture_output=True)
        inside("link", "set", "lo", "up")
        inside("link", "add", net.bridge, "address", net.bridge_mac, "type", "bridge")
        inside("link", "set", net.bridge, "type", "bridge", "forward_delay", "0", "stp_state",
               "0")
        inside("addr", "add", f"{net.host_ip}/{net.prefix_len}", "dev", net.bridge)
        inside("link", "set", net.bridge, "up")
    except BaseException:
        delete_netns(net.netns)
        raise


def delete_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def current_netns_name() -> str | None:
    """Name of the ``ip netns`` namespace this process runs in, if any."""
    try:
        mine = Path("/proc/self/ns/net").stat().st_ino
    except OSError:
        return None
    for entry in sorted(Path("/run/netns").glob("*")) if Path("/run/netns").is_dir() else []:
        try:
            if entry.stat().st_ino == mine:
                return entry.name
        except OSError:
            continue
    return None
