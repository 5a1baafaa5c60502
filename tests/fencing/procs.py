"""Processes a fencing test starts (stand-in agents, guards), killed when the test ends,
also when it fails before the guard did that."""

from __future__ import annotations

import subprocess
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
