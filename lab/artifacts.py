"""Build the kernel guest's boot artifacts (kernel + initramfs), once.

* kernel: ``/boot/vmlinuz-*`` out of Debian's ``linux-image-<abi>-amd64``
  package, fetched with ``apt-get download`` (the package is not installed).
* initramfs: a gzip'ed newc cpio archive written by this module, holding a
  static busybox (out of Debian's ``busybox-static`` package, likewise only
  downloaded) and an ``/init`` script that prints ``VMHA-UPTIME <seconds>``
  to the console every second.

Everything lands in a cache directory (default :data:`DEFAULT_CACHE`);
later calls return the cached files without touching apt.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

#: Build cache for kernel artifacts and shared QEMU capability probes
#: (override with the environment variable ``VMHA_LAB_CACHE``).
DEFAULT_CACHE = Path(os.environ.get("VMHA_LAB_CACHE") or "/var/cache/vmha-lab")

UPTIME_TAG = "VMHA-UPTIME"
BOOT_TAG = "VMHA-BOOT"

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
STAMP_NAME = "kernel-artifacts.json"

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


class ArtifactError(RuntimeError):
    """The kernel guest artifacts could not be built."""


# --------------------------------------------------------------------------
# cpio (newc) writer


def _cpio_entry(
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


def build_initramfs(busybox: bytes) -> bytes:
    """Gzip'ed newc cpio with busybox and the uptime-printing ``/init``."""
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    for directory in ("bin", "dev", "proc", "sys", "tmp", "root"):
        entries.append((directory, 0o040755, b"", (0, 0)))
    entries.append(("dev/console", 0o020600, b"", (5, 1)))
    entries.append(("dev/ttyS0", 0o020660, b"", (4, 64)))
    entries.append(("dev/null", 0o020666, b"", (1, 3)))
    entries.append(("bin/busybox", 0o100755, busybox, (0, 0)))
    for link in _BUSYBOX_LINKS:
        entries.append((f"bin/{link}", 0o120777, b"busybox", (0, 0)))
    entries.append(("init", 0o100755, INIT_SCRIPT.encode(), (0, 0)))
    raw = io.BytesIO()
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        raw.write(_cpio_entry(name, mode, data, ino=ino, rdev=rdev))
    raw.write(_cpio_entry("TRAILER!!!", 0))
    blob = raw.getvalue()
    blob += b"\0" * (-len(blob) % 512)
    return gzip.compress(blob, compresslevel=6, mtime=0)


# --------------------------------------------------------------------------
# Debian packages


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ArtifactError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def kernel_package() -> str:
    """Name of the versioned kernel package that ``linux-image-amd64`` pulls in."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise ArtifactError(f"cannot resolve {KERNEL_META_PACKAGE} (run apt-get update?)")


def _download(package: str, dest: Path) -> Path:
    """``apt-get download`` a package into ``dest``; retry once after apt-get update."""
    dest.chmod(0o755)
    try:
        _run(["apt-get", "download", "-q", package], cwd=dest)
    except ArtifactError:
        _run(["apt-get", "update", "-q"])
        _run(["apt-get", "download", "-q", package], cwd=dest)
    debs = sorted(dest.glob(f"{package.split('=')[0]}_*.deb"))
    if not debs:
        raise ArtifactError(f"apt-get download {package} produced no .deb in {dest}")
    return debs[-1]


def _extract_member(deb: Path, wanted: str) -> tuple[str, bytes]:
    """Return (member name, content) of the first data member matching ``wanted``.

    ``wanted`` is a path prefix such as ``./boot/vmlinuz-``.
    """
    proc = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    found: tuple[str, bytes] | None = None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and member.name.startswith(wanted):
                    fh = tar.extractfile(member)
                    if fh is not None:
                        found = (member.name, fh.read())
                        break
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()
    if found is None:
        raise ArtifactError(f"{deb.name} has no {wanted}*")
    return found


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def ensure_kernel_artifacts(cache: Path = DEFAULT_CACHE) -> tuple[Path, Path]:
    """Return ``(kernel_path, initrd_path)`` in ``cache``, building them if needed.

    Idempotent and safe against concurrent callers (file lock in ``cache``).
    Needs ``apt-get``/``dpkg-deb`` and access to Debian's package archive
    the first time only.
    """
    cache = Path(cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    kernel = cache / KERNEL_NAME
    initrd = cache / INITRD_NAME
    stamp = cache / STAMP_NAME

    def _fresh() -> bool:
        if not (kernel.is_file() and initrd.is_file() and stamp.is_file()):
            return False
        try:
            meta = json.loads(stamp.read_text())
        except (OSError, ValueError):
            return False
        return bool(meta.get("initrd_format") == INITRD_FORMAT)

    if _fresh():
        return kernel, initrd
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _fresh():
            return kernel, initrd
        with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp_name:
            tmp = Path(tmp_name)
            if not kernel.is_file():
                pkg = kernel_package()
                deb = _download(pkg, tmp)
                _, vmlinuz = _extract_member(deb, "./boot/vmlinuz-")
                _write_atomic(kernel, vmlinuz)
                (cache / "kernel-package.txt").write_text(deb.name + "\n")
            busybox_deb = _download(BUSYBOX_PACKAGE, tmp)
            _, busybox = _extract_member(busybox_deb, "./bin/busybox")
            _write_atomic(initrd, build_initramfs(busybox))
        meta = {
            "initrd_format": INITRD_FORMAT,
            "kernel_package": (cache / "kernel-package.txt").read_text().strip()
            if (cache / "kernel-package.txt").exists()
            else None,
            "busybox_package": busybox_deb.name,
        }
        stamp.write_text(json.dumps(meta, indent=1) + "\n")
    return kernel, initrd


def remove_artifacts(cache: Path = DEFAULT_CACHE) -> None:
    """Delete the cache directory (for tests of the builder itself)."""
    shutil.rmtree(cache, ignore_errors=True)
