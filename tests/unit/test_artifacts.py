"""The lab's guest artifacts: run time only reads the cache; the fetch step fills it.

No network here: the "archive" is a pair of .deb files built on the spot with
``dpkg-deb --build``, handed to the fetch step in place of ``apt-get download``.  Run
time is checked with ``PATH`` pointing at a directory whose ``apt-get``/``apt-cache``/
``dpkg-deb``/``gcc`` only record that they were called, and with ``subprocess`` itself
refusing to start anything.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import fetch as fetch_mod
from lab.artifacts import (
    INITRD_NAME,
    KERNEL_NAME,
    SETUP_COMMAND,
    ArtifactMissing,
    ensure_kernel_artifacts,
)
from lab.fetch import ArchiveUnavailable, fetch, with_retries
from lab.netguest import NIC_MODULES, GuestNet, ensure_net_artifacts, net_guest_xml

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")

RECORDED = ("apt-get", "apt-cache", "dpkg-deb", "gcc", "wget", "curl")

#: Fake NIC modules: only their ``depends=`` tags matter to the fetch step.
MODULES = {
    "virtio_ring": b"",
    "virtio": b"virtio_ring",
    "virtio_pci_modern_dev": b"",
    "virtio_pci": b"virtio,virtio_ring,virtio_pci_modern_dev",
    "failover": b"",
    "net_failover": b"failover",
    "virtio_net": b"net_failover,virtio,virtio_ring",
    "virtio_blk": b"virtio,virtio_ring",  # not needed by the NIC: left out of the cache
}


@pytest.fixture
def recorder(tmp_path: Path) -> Path:
    """A directory of stand-ins that log their name and arguments, then fail."""
    bindir = tmp_path / "recording-bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    for tool in RECORDED:
        script = bindir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexit 1\n')
        script.chmod(0o755)
    return log


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch, recorder: Path) -> Iterator[list[Any]]:
    """PATH at the recorders, and any subprocess at all is refused (and listed)."""
    started: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        started.append(args[0] if args else kwargs.get("args"))
        raise AssertionError(f"run time started a process: {started[-1]}")

    monkeypatch.setenv("PATH", str(recorder.parent / "recording-bin"))
    monkeypatch.setattr(subprocess, "Popen", refuse)
    yield started


def _deb(workdir: Path, name: str, files: dict[str, bytes]) -> Path:
    root = workdir / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: amd64\n"
        "Maintainer: vmha tests <tests@example.org>\nDescription: test package\n")
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    out = workdir / f"{name}_1.0_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root),
                    str(out)], check=True, capture_output=True)
    return out


@pytest.fixture
def archive(tmp_path: Path) -> dict[str, Path]:
    """A kernel package and busybox-static, as the archive would serve them."""
    workdir = tmp_path / "archive"
    workdir.mkdir()
    moddir = "lib/modules/6.1.0-test-amd64/kernel/drivers"
    kernel_files = {"boot/vmlinuz-6.1.0-test-amd64": b"KERNEL" * 100}
    for name, deps in MODULES.items():
        kernel_files[f"{moddir}/{name.replace('_', '-')}.ko"] = (
            b"\x7fELF fake module\0depends=" + deps + b"\0name=" + name.encode() + b"\0")
    return {
        "linux-image-6.1.0-test-amd64": _deb(workdir, "linux-image-6.1.0-test-amd64",
                                             kernel_files),
        "busybox-static": _deb(workdir, "busybox-static", {"bin/busybox": b"BUSYBOX" * 50}),
    }


@pytest.fixture
def filled_cache(tmp_path: Path, archive: dict[str, Path],
                 monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache filled by the fetch step itself (apt and gcc replaced, nothing else)."""
    cache = tmp_path / "cache"
    fetched: list[str] = []

    def download(package: str, dest: Path) -> Path:
        fetched.append(package)
        return Path(shutil.copy2(archive[package], dest))

    monkeypatch.setattr(fetch_mod, "resolve_kernel_package",
                        lambda: "linux-image-6.1.0-test-amd64")
    monkeypatch.setattr(fetch_mod, "download", download)
    monkeypatch.setattr(fetch_mod, "build_udpecho", lambda _workdir: b"UDPECHO")
    done = fetch(cache)
    assert sorted(fetched) == ["busybox-static", "linux-image-6.1.0-test-amd64"]
    assert len(done) == 4, done
    # a second run only checks
    assert fetch(cache) == [] and len(fetched) == 2
    return cache


def _cpio_files(initrd: Path) -> dict[str, bytes]:
    """Path -> content of a gzip'ed newc cpio archive."""
    blob = gzip.decompress(initrd.read_bytes())
    out: dict[str, bytes] = {}
    pos = 0
    while True:
        header = blob[pos:pos + 110]
        assert header[:6] == b"070701", header
        namesize = int(header[94:102], 16)
        filesize = int(header[54:62], 16)
        name = blob[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = blob[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4


def test_empty_cache_names_the_setup_command_and_runs_nothing(
        tmp_path: Path, recorder: Path, no_subprocess: list[Any]) -> None:
    cache = tmp_path / "empty"
    net = GuestNet("vmha-test")
    for builder in (lambda: ensure_kernel_artifacts(cache),
                    lambda: ensure_net_artifacts(net, cache),
                    lambda: net_guest_xml("g", net, tmp_path / "console.log", cache)):
        with pytest.raises(ArtifactMissing) as err:
            builder()
        assert SETUP_COMMAND in str(err.value), err.value
        assert "VMHA_LAB=1 bash scripts/setup.sh" in str(err.value)
    cache.mkdir()
    with pytest.raises(ArtifactMissing, match="scripts/setup.sh"):
        ensure_kernel_artifacts(cache)
    assert no_subprocess == []
    assert not recorder.exists(), recorder.read_text()


def test_kernel_cached_but_net_pieces_missing_still_names_setup(
        filled_cache: Path, recorder: Path, no_subprocess: list[Any]) -> None:
    shutil.rmtree(filled_cache / "net")
    with pytest.raises(ArtifactMissing, match="scripts/setup.sh"):
        ensure_net_artifacts(GuestNet("vmha-test", guest_ip="10.255.0.7"), filled_cache)
    assert no_subprocess == [] and not recorder.exists()


def test_filled_cache_builds_the_net_initramfs_without_apt(
        filled_cache: Path, recorder: Path, no_subprocess: list[Any]) -> None:
    # the fetch step left the kernel, busybox and the NIC pieces; assemble per address
    (filled_cache / INITRD_NAME).unlink()
    kernel, initrd = ensure_kernel_artifacts(filled_cache)
    assert kernel == filled_cache.resolve() / KERNEL_NAME
    assert _cpio_files(initrd)["bin/busybox"] == b"BUSYBOX" * 50
    net = GuestNet("vmha-test", guest_ip="10.255.0.7")
    kernel, net_initrd = ensure_net_artifacts(net, filled_cache)
    assert kernel.read_bytes() == b"KERNEL" * 100
    files = _cpio_files(net_initrd)
    assert files["bin/udpecho"] == b"UDPECHO"
    assert files["bin/busybox"] == b"BUSYBOX" * 50
    init = files["init"].decode()
    assert "ip addr add 10.255.0.7/24 dev eth0" in init
    loaded = [line.split("/")[-1][:-3] for line in init.splitlines()
              if line.startswith("insmod ")]
    assert set(NIC_MODULES) <= set(loaded) and "virtio_blk" not in loaded
    for i, module in enumerate(loaded):  # every dependency is loaded before its user
        deps = [d for d in MODULES[module].decode().split(",") if d]
        assert all(d in loaded[:i] for d in deps), (module, loaded)
        assert files[f"lib/modules/{module}.ko"].startswith(b"\x7fELF")
    xml = net_guest_xml("g", net, filled_cache / "g.console.log", filled_cache)
    assert f"<initrd>{net_initrd}</initrd>" in xml and "<mac address=" in xml
    assert no_subprocess == []
    assert not recorder.exists(), recorder.read_text()


def test_downloads_retry_after_refreshing_the_lists_then_give_up(
        recorder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (recorder.parent / "recording-bin" / "apt-get").write_text(
        f'#!/bin/sh\necho "apt-get $*" >> {recorder}\nexit 0\n')
    monkeypatch.setenv("PATH", str(recorder.parent / "recording-bin") + os.pathsep
                       + os.environ.get("PATH", ""))
    tries: list[int] = []

    def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise ArchiveUnavailable("archive unreachable")
        return "ok"

    assert with_retries("flaky", flaky, attempts=5, max_wait_s=0.01) == "ok"
    assert len(tries) == 3
    assert recorder.read_text().splitlines() == ["apt-get update -q"] * 2

    def down() -> str:
        tries.append(1)
        raise ArchiveUnavailable("archive unreachable")

    tries.clear()
    with pytest.raises(ArchiveUnavailable):
        with_retries("down", down, attempts=3, max_wait_s=0.01)
    assert len(tries) == 3
