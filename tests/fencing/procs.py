"""Processes a fencing test starts (stand-in agents, guards), killed when the test ends,
also when it fails before the guard did that."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

_STARTED: list[subprocess.Popen[bytes]] = []


def popen(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, **kwargs)
    _STARTED.append(proc)
    return proc


def stop_started() -> None:
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def fired_then_released(g: subprocess.Popen[bytes], host_dir: Path, within: float = 5.0) -> int:
    """Wait until guard `g` fired (its fenced marker <host_dir>/fenced appeared), check it
    stays (it destroys again until the node registers again), then remove the marker as
    the node's re-registered agent would, and return the guard's exit status."""
    from tests.harness import wait_until

    marker = host_dir / "fenced"
    wait_until(lambda: marker.exists() or g.poll() is not None, within, interval=0.01,
               what="guard fired")
    assert g.poll() is None, "a guard that fired stays until its node registers again"
    marker.unlink()
    return g.wait(10)


def service_fired(g: subprocess.Popen[bytes], host_dir: Path, within: float = 5.0) -> None:
    """Wait until guard service `g` fired (its fenced marker appeared); it stays."""
    from tests.harness import wait_until

    marker = host_dir / "fenced"
    wait_until(lambda: marker.exists() or g.poll() is not None, within, interval=0.01,
               what="guard fired")
    assert g.poll() is None, "a guard that fired stays until its node registers again"


def service_released_and_stopped(g: subprocess.Popen[bytes], host_dir: Path) -> int:
    """Remove the marker as the node's re-registered agent would: the guard serves on,
    unarmed, so a stop ends it; its exit status."""
    (host_dir / "fenced").unlink()
    g.terminate()  # deferred while it is fenced, done once it sees the marker gone
    return g.wait(10)
