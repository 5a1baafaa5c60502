"""The libvirt qemu hook (deploy/libvirt/hooks/qemu), run as libvirtd runs it:
`qemu <domain> <operation> <sub-operation> <extra>` with the domain XML on stdin.

While the fenced marker exists it refuses every start of a domain (prepare, start,
restore) and every incoming migration (migrate), with a non-zero exit and a message on
stderr (libvirtd's error); everything else, and everything while no marker exists, it
allows.  Run under every POSIX shell found here (libvirtd runs it by its #! line)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fencing.marker import DEFAULT_FENCED_MARKER, FencedMarker

HOOK = Path(__file__).resolve().parents[2] / "deploy" / "libvirt" / "hooks" / "qemu"
XML = "<domain type='kvm'><name>{0}</name><metadata/></domain>"
SHELLS = [s for s in ("/bin/sh", "/usr/bin/dash", "/bin/bash", "/usr/bin/busybox")
          if Path(s).exists()]
# (operation, sub-operation) as libvirt passes them
REFUSED = [("prepare", "begin"), ("start", "begin"), ("migrate", "begin"),
           ("restore", "begin")]
ALLOWED = [("started", "begin"), ("stopped", "end"), ("release", "end"),
           ("reconnect", "begin"), ("attach", "begin")]


def install(tmp: Path, marker: Path | None) -> Path:
    """The hook as an operator installs it: the script, and vmha-hook.conf next to it."""
    hooks = tmp / "hooks"
    hooks.mkdir(exist_ok=True)
    shutil.copy2(HOOK, hooks / "qemu")
    if marker is not None:
        (hooks / "vmha-hook.conf").write_text(f"# vmha\nfenced_marker={marker}\n")
    return hooks / "qemu"


def call(hook: Path, shell: str, vm: str, op: str, sub: str) -> subprocess.CompletedProcess[str]:
    argv = ["busybox", "sh"] if shell.endswith("busybox") else [shell]
    return subprocess.run([*argv, str(hook), vm, op, sub, "-"], input=XML.format(vm),
                          capture_output=True, text=True, timeout=10, check=False)


def test_the_shipped_hook_is_executable_and_defaults_to_the_system_marker() -> None:
    assert HOOK.stat().st_mode & 0o111 == 0o111
    text = HOOK.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert f"marker={DEFAULT_FENCED_MARKER}\n" in text


@pytest.mark.parametrize("shell", SHELLS)
def test_refuses_starts_and_incoming_migrations_while_fenced(tmp_path: Path,
                                                             shell: str) -> None:
    marker = FencedMarker(tmp_path / "run" / "fenced")
    hook = install(tmp_path, marker.path)
    for op, sub in REFUSED + ALLOWED:
        r = call(hook, shell, "vm1", op, sub)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), (op, r)
    marker.write("guard", "test")
    for op, sub in REFUSED:
        r = call(hook, shell, "vm1", op, sub)
        assert r.returncode != 0, (op, r)
        # libvirtd puts stderr into its error: say why; stdout stays empty (for
        # `migrate`, libvirt would take non-empty output as the domain's new XML).
        assert r.stdout == "" and "fenced" in r.stderr and str(marker.path) in r.stderr \
            and f"{op} domain vm1" in r.stderr, (op, r)
    for op, sub in ALLOWED:
        r = call(hook, shell, "vm1", op, sub)
        assert (r.returncode, r.stdout) == (0, ""), (op, r)
    marker.remove()
    for op, sub in REFUSED:
        assert call(hook, shell, "vm1", op, sub).returncode == 0, op


def test_refuses_every_domain_not_only_vmha_ones(tmp_path: Path) -> None:
    """A domain defined by hand (no vmha metadata) is refused as well: nothing may start
    on a fenced host."""
    marker = FencedMarker(tmp_path / "fenced")
    hook = install(tmp_path, marker.path)
    marker.write("agent:n1", "test")
    r = subprocess.run(["/bin/sh", str(hook), "by-hand", "start", "begin", "-"],
                       input="<domain type='kvm'><name>by-hand</name></domain>",
                       capture_output=True, text=True, timeout=10, check=False)
    assert r.returncode != 0 and "refusing to start domain by-hand" in r.stderr


def test_without_a_conf_the_hook_watches_the_system_marker(tmp_path: Path) -> None:
    hook = install(tmp_path, None)
    r = call(hook, "/bin/sh", "vm1", "start", "begin")
    # Whatever this machine's /run/vmha/fenced says; the point is which file is read.
    expected = 1 if Path(DEFAULT_FENCED_MARKER).exists() else 0
    assert r.returncode == expected, r
    # A conf naming another file moves the check there.
    other = FencedMarker(tmp_path / "elsewhere")
    other.write("guard", "test")
    (hook.parent / "vmha-hook.conf").write_text(f"fenced_marker={other.path}")  # no newline
    assert call(hook, "/bin/sh", "vm1", "start", "begin").returncode == 1
