"""The lab's one download step: every artifact the lab needs, into its cache.

``VMHA_LAB=1 bash scripts/setup.sh`` runs it (``python -m lab.fetch [--cache DIR]``),
outside any network namespace.  It downloads Debian's kernel package and
``busybox-static`` with ``apt-get download`` (nothing is installed; bounded, jittered
retries, refreshing the package lists between attempts) and builds what can be built
now: the kernel guest's initramfs, the network guest's NIC modules (extracted, in load
order) and its static ``udpecho`` program, and the network initramfs for the default
guest address.  Everything else — the lab, the demo, ``vmha bench outage`` (inside a
network namespace with no route to an archive) and the tests — only reads the cache
(:mod:`lab.artifacts`, :mod:`lab.netguest`).

Idempotent: with everything in place a second run checks files and downloads nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from lab.artifacts import (
    BUSYBOX_NAME,
    BUSYBOX_PACKAGE,
    BUSYBOX_PACKAGE_FILE,
    DEFAULT_CACHE,
    KERNEL_META_PACKAGE,
    KERNEL_NAME,
    KERNEL_PACKAGE_FILE,
    ArtifactError,
    ArtifactMissing,
    build_kernel_initrd,
    cache_lock,
    kernel_fresh,
    write_atomic,
)
from lab.netguest import (
    NET_DIR,
    NET_PIECES_FORMAT,
    NET_PIECES_STAMP,
    NIC_MODULES,
    PROBE_MAGIC,
    UDPECHO_C,
    UDPECHO_NAME,
    GuestNet,
    ensure_net_artifacts,
    load_net_pieces,
    module_order,
)

log = structlog.get_logger("vmha.lab.fetch")

T = TypeVar("T")

#: Tries per apt step before its error stands, and the cap of the jittered back-off.
ATTEMPTS = 5
MAX_WAIT_S = 30.0


class ArchiveUnavailable(ArtifactError):
    """Temporary: apt could not reach the archive, or its lists name what it no longer has."""


# ---- apt, with retries -------------------------------------------------------------------


def apt(cmd: list[str], cwd: Path | None = None) -> str:
    """Run an apt command; a failure is temporary (network, stale lists)."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{cmd[0]} not found: the lab needs a Debian system") from exc
    if proc.returncode != 0:
        raise ArchiveUnavailable(
            f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("fetch.retry", what=what, attempt=state.attempt_number, error=str(exc))
    return before_sleep


def with_retries(what: str, fn: Callable[[], T], attempts: int = ATTEMPTS,
                 max_wait_s: float = MAX_WAIT_S) -> T:
    """``fn()``, retried on :class:`ArchiveUnavailable` with jittered exponential back-off.

    From the second try on the package lists are refreshed first: stale lists name
    versions the archive no longer serves."""
    retrying = Retrying(stop=stop_after_attempt(attempts),
                        wait=wait_random_exponential(multiplier=1, max=max_wait_s),
                        retry=retry_if_exception_type(ArchiveUnavailable), reraise=True,
                        before_sleep=_log_retry(what))
    for attempt in retrying:
        with attempt:
            if attempt.retry_state.attempt_number > 1:
                apt(["apt-get", "update", "-q"])
            return fn()
    raise AssertionError("unreachable: tenacity re-raises the last error")


def resolve_kernel_package() -> str:
    """Name of the versioned kernel package that ``linux-image-amd64`` pulls in."""
    for line in apt(["apt-cache", "depends", KERNEL_META_PACKAGE]).splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise ArchiveUnavailable(f"cannot resolve {KERNEL_META_PACKAGE} (no package lists?)")


def download(package: str, dest: Path) -> Path:
    """``apt-get download`` a package into ``dest``; the .deb's path."""
    apt(["apt-get", "download", "-q", package], cwd=dest)
    debs = sorted(dest.glob(f"{package.split('=')[0]}_*.deb"))
    if not debs:
        raise ArchiveUnavailable(f"apt-get download {package} produced no .deb in {dest}")
    return debs[-1]


# ---- extracting and building ---------------------------------------------------------------


def scan_deb(deb: Path, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """Content of every regular file of ``deb``'s data whose member name ``keep`` accepts."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and keep(member.name):
                    fh = tar.extractfile(member)
                    if fh is not None:
                        out[member.name] = fh.read()
    except tarfile.TarError as exc:
        raise ArtifactError(f"cannot read {deb.name}: {exc}") from exc
    finally:
        proc.stdout.close()
        rc = proc.wait()
    if rc != 0:
        raise ArtifactError(f"dpkg-deb --fsys-tarfile {deb.name} failed ({rc})")
    return out


def _module_name(member: str) -> str:
    return member.rsplit("/", 1)[-1][:-3].replace("-", "_")


def _nic_related(member: str) -> bool:
    base = member.rsplit("/", 1)[-1]
    return base.endswith(".ko") and ("virtio" in base or "failover" in base)


def build_udpecho(workdir: Path) -> bytes:
    src = workdir / "udpecho.c"
    src.write_text(UDPECHO_C)
    exe = workdir / UDPECHO_NAME
    proc = subprocess.run(["gcc", "-static", "-O2", f"-DMAGIC={PROBE_MAGIC:#x}u", "-o",
                           str(exe), str(src)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ArtifactError(f"gcc -static udpecho failed (libc6-dev installed?): "
                            f"{proc.stderr.strip()}")
    return exe.read_bytes()


# ---- the steps ---------------------------------------------------------------------------


def kernel_pieces_current(cache: Path) -> bool:
    """The kernel and the NIC modules of that same kernel package are cached."""
    if not (cache / KERNEL_NAME).is_file():
        return False
    try:
        load_net_pieces(cache)
    except ArtifactMissing:
        return False
    return True


def fetch_kernel(cache: Path, tmp: Path) -> str:
    """The kernel and its NIC modules, out of one download of the kernel package."""
    package = with_retries("resolve the kernel package", resolve_kernel_package)
    deb = with_retries(f"download {package}", lambda: download(package, tmp))
    files = scan_deb(deb, lambda m: m.startswith("./boot/vmlinuz-") or _nic_related(m))
    kernels = sorted(m for m in files if m.startswith("./boot/vmlinuz-"))
    if not kernels:
        raise ArtifactError(f"{deb.name} has no ./boot/vmlinuz-*")
    modules = {_module_name(m): data for m, data in files.items() if _nic_related(m)}
    order = module_order(modules, NIC_MODULES)
    mod_dir = cache / NET_DIR / "modules"
    shutil.rmtree(mod_dir, ignore_errors=True)
    mod_dir.mkdir(parents=True)
    for name in order:
        write_atomic(mod_dir / f"{name}.ko", modules[name])
    write_atomic(cache / KERNEL_NAME, files[kernels[0]])
    write_atomic(cache / KERNEL_PACKAGE_FILE, (deb.name + "\n").encode())
    stamp = {"format": NET_PIECES_FORMAT, "kernel_package": deb.name, "modules": order}
    write_atomic(cache / NET_DIR / NET_PIECES_STAMP, (json.dumps(stamp, indent=1)
                                                      + "\n").encode())
    deb.unlink()
    return f"kernel and NIC modules ({', '.join(order)}) from {deb.name}"


def fetch_busybox(cache: Path, tmp: Path) -> str:
    deb = with_retries(f"download {BUSYBOX_PACKAGE}", lambda: download(BUSYBOX_PACKAGE, tmp))
    files = scan_deb(deb, lambda m: m == "./bin/busybox")
    if "./bin/busybox" not in files:
        raise ArtifactError(f"{deb.name} has no ./bin/busybox")
    write_atomic(cache / BUSYBOX_NAME, files["./bin/busybox"], 0o755)
    write_atomic(cache / BUSYBOX_PACKAGE_FILE, (deb.name + "\n").encode())
    deb.unlink()
    return f"busybox from {deb.name}"


def fetch(cache: Path = DEFAULT_CACHE) -> list[str]:
    """Download and build whatever is missing from ``cache``; return what was done."""
    cache = Path(cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    with cache_lock(cache), tempfile.TemporaryDirectory(dir=cache, prefix="fetch-") as name:
        tmp = Path(name)
        tmp.chmod(0o755)  # apt-get download writes as its unprivileged sandbox user
        kernel_changed = not kernel_pieces_current(cache)
        if kernel_changed:
            done.append(fetch_kernel(cache, tmp))
        if not (cache / BUSYBOX_NAME).is_file():
            done.append(fetch_busybox(cache, tmp))
        if not (cache / NET_DIR / UDPECHO_NAME).is_file():
            write_atomic(cache / NET_DIR / UDPECHO_NAME, build_udpecho(tmp), 0o755)
            done.append("built udpecho (gcc -static)")
        if kernel_changed or not kernel_fresh(cache):
            build_kernel_initrd(cache)
            done.append("built the kernel guest's initramfs")
    # the network guest's initramfs for the default address (others are assembled on use)
    ensure_net_artifacts(GuestNet("default"), cache)
    return done


def main(argv: list[str] | None = None) -> int:
    from telemetry.logs import setup

    parser = argparse.ArgumentParser(
        prog="python -m lab.fetch",
        description="Download and build every artifact the lab needs into its cache "
                    "(run by `VMHA_LAB=1 bash scripts/setup.sh`; root).")
    parser.add_argument("--cache", default=os.environ.get("VMHA_LAB_CACHE") or
                        str(DEFAULT_CACHE), help="cache directory (env VMHA_LAB_CACHE)")
    args = parser.parse_args(argv)
    setup("console")
    try:
        done = fetch(Path(args.cache))
    except ArtifactError as exc:
        print(f"lab.fetch: {exc}", file=sys.stderr)
        return 1
    print(f"lab artifacts in {args.cache}: "
          + ("; ".join(done) if done else "all present, nothing fetched"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
