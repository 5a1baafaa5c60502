"""The kernel guest's boot artifacts (kernel + initramfs), from the lab's cache only.

Nothing here downloads.  The cache directory (:data:`DEFAULT_CACHE`, or the
environment variable ``VMHA_LAB_CACHE``) is filled once by the fetch step,
:mod:`lab.fetch`, which ``VMHA_LAB=1 bash scripts/setup.sh`` runs outside any network
namespace; the builders here only assemble cached files, so they also work inside the
outage bench's namespace, which has no route to a package archive.  A missing piece
raises :class:`ArtifactMissing`, naming that command.

The cache holds:

* ``vmlinuz``: Debian's kernel, out of ``linux-image-<abi>-amd64`` (the .deb's name in
  ``kernel-package.txt``);
* ``busybox``: a static busybox, out of ``busybox-static`` (``busybox-package.txt``);
* ``initrd.img``: a gzip'ed newc cpio archive with that busybox and an ``/init`` that
  prints ``VMHA-UPTIME <seconds>`` to the console every second
  (``kernel-artifacts.json`` is its stamp);
* ``net/``: the network guest's pieces (:mod:`lab.netguest`): the NIC modules of that
  kernel and the static ``udpecho`` program; ``initrd-net.img`` is assembled from them
  (per guest address, see ``net-artifacts.json``);
* ``qemu-capabilities/``: QEMU probes shared by the lab's libvirt nodes (:mod:`lab.nodes`).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

#: Build cache for kernel artifacts and shared QEMU capability probes
#: (override with the environment variable ``VMHA_LAB_CACHE``).
DEFAULT_CACHE = Path(os.environ.get("VMHA_LAB_CACHE") or "/var/cache/vmha-lab")

#: The one command that fills the cache (and installs the lab's packages).
SETUP_COMMAND = "VMHA_LAB=1 bash scripts/setup.sh"

UPTIME_TAG = "VMHA-UPTIME"
BOOT_TAG = "VMHA-BOOT"

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

KERNEL_NAME = "vmlinuz"
BUSYBOX_NAME = "busybox"
INITRD_NAME = "initrd.img"
STAMP_NAME = "kernel-artifacts.json"
KERNEL_PACKAGE_FILE = "kernel-package.txt"
BUSYBOX_PACKAGE_FILE = "busybox-package.txt"

#: Bump when the initramfs content changes, to force a rebuild.
INITRD_FORMAT = 1

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
export PATH=/bin
echo "{BOOT_TAG}"
while :; do
  read up idle < /proc/uptime
  echo "{UPTIME_TAG} $up"
  sleep 1
done
"""

_BUSYBOX_LINKS = ("sh", "mount", "sleep", "cat", "echo", "poweroff", "reboot")

#: An initramfs entry: (path, mode, content, device numbers).
Entry = tuple[str, int, bytes, tuple[int, int]]


class ArtifactError(RuntimeError):
    """The lab's guest artifacts could not be found or built (permanent unless a subclass
    says otherwise: retrying the same step will not help)."""


class ArtifactMissing(ArtifactError):
    """A piece is not in the cache: only the fetch step (:data:`SETUP_COMMAND`) adds it."""


def missing_error(cache: Path, missing: list[str], why: str = "missing") -> ArtifactMissing:
    return ArtifactMissing(
        f"the lab's guest artifacts are {why} in {cache} ({', '.join(missing)}): run "
        f"`{SETUP_COMMAND}` (it downloads them; nothing downloads at run time)")


def require(cache: Path, *names: str) -> None:
    """Raise :class:`ArtifactMissing` unless every file ``names`` is in ``cache``."""
    missing = [n for n in names if not (cache / n).is_file()]
    if missing:
        raise missing_error(cache, missing)


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Exclusive lock on the cache against concurrent builders (other processes too)."""
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# cpio (newc) writer


def cpio_entry(
    name: str,
    mode: int,
    data: bytes = b"",
    ino: int = 0,
    rdev: tuple[int, int] = (0, 0),
) -> bytes:
    name_b = name.encode() + b"\0"
    fields = (
        ino,  # c_ino
        mode,  # c_mode
        0,  # c_uid
        0,  # c_gid
        1 if not (mode & 0o040000) else 2,  # c_nlink
        0,  # c_mtime
        len(data),  # c_filesize
        0,  # c_devmajor
        0,  # c_devminor
        rdev[0],  # c_rdevmajor
        rdev[1],  # c_rdevminor
        len(name_b),  # c_namesize
        0,  # c_check
    )
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + name_b
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def base_entries(busybox: bytes, dirs: tuple[str, ...], links: tuple[str, ...]) -> list[Entry]:
    """Directories, console devices, busybox and its applet links."""
    entries: list[Entry] = [(d, 0o040755, b"", (0, 0)) for d in dirs]
    entries.append(("dev/console", 0o020600, b"", (5, 1)))
    entries.append(("dev/ttyS0", 0o020660, b"", (4, 64)))
    entries.append(("dev/null", 0o020666, b"", (1, 3)))
    entries.append(("bin/busybox", 0o100755, busybox, (0, 0)))
    entries += [(f"bin/{link}", 0o120777, b"busybox", (0, 0)) for link in links]
    return entries


def pack_initramfs(entries: list[Entry]) -> bytes:
    """Gzip'ed newc cpio of ``entries`` (reproducible: no timestamps)."""
    raw = io.BytesIO()
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        raw.write(cpio_entry(name, mode, data, ino=ino, rdev=rdev))
    raw.write(cpio_entry("TRAILER!!!", 0))
    blob = raw.getvalue()
    blob += b"\0" * (-len(blob) % 512)
    return gzip.compress(blob, compresslevel=6, mtime=0)


def build_initramfs(busybox: bytes) -> bytes:
    """Gzip'ed newc cpio with busybox and the uptime-printing ``/init``."""
    entries = base_entries(busybox, ("bin", "dev", "proc", "sys", "tmp", "root"),
                           _BUSYBOX_LINKS)
    entries.append(("init", 0o100755, INIT_SCRIPT.encode(), (0, 0)))
    return pack_initramfs(entries)


# --------------------------------------------------------------------------
# the kernel guest, from the cache


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def kernel_fresh(cache: Path) -> bool:
    """``vmlinuz`` and an ``initrd.img`` of the current format are in ``cache``."""
    if not ((cache / KERNEL_NAME).is_file() and (cache / INITRD_NAME).is_file()):
        return False
    try:
        meta = json.loads((cache / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("initrd_format") == INITRD_FORMAT)


def build_kernel_initrd(cache: Path) -> None:
    """Write ``initrd.img`` and its stamp from the cached busybox (caller holds the lock)."""
    busybox = cache / BUSYBOX_NAME
    write_atomic(cache / INITRD_NAME, build_initramfs(busybox.read_bytes()))
    meta = {
        "initrd_format": INITRD_FORMAT,
        "kernel_package": _read_text(cache / KERNEL_PACKAGE_FILE),
        "busybox_package": _read_text(cache / BUSYBOX_PACKAGE_FILE),
    }
    write_atomic(cache / STAMP_NAME, (json.dumps(meta, indent=1) + "\n").encode())


def ensure_kernel_artifacts(cache: Path = DEFAULT_CACHE) -> tuple[Path, Path]:
    """Return ``(kernel_path, initrd_path)`` in ``cache``.

    Assembles the initramfs from the cached busybox if it is missing or of an older
    format; never downloads.  Raises :class:`ArtifactMissing` (naming
    :data:`SETUP_COMMAND`) when the kernel or busybox is not cached.  Safe against
    concurrent callers (file lock in ``cache``).
    """
    cache = Path(cache).resolve()
    kernel = cache / KERNEL_NAME
    initrd = cache / INITRD_NAME
    if kernel_fresh(cache):
        return kernel, initrd
    require(cache, KERNEL_NAME, BUSYBOX_NAME)
    with cache_lock(cache):
        if not kernel_fresh(cache):
            build_kernel_initrd(cache)
    return kernel, initrd


def remove_artifacts(cache: Path = DEFAULT_CACHE) -> None:
    """Delete the cache directory (for tests of the builder itself)."""
    shutil.rmtree(cache, ignore_errors=True)
