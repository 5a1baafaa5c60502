"""The fenced marker and the repeated destroy pass.

A fenced host must run nothing, and one pass of list + destroy does not make it so:
libvirtd keeps accepting work after that pass (a `create()` sent just before the agent
was killed, an incoming migration from a node that has not yet seen this one as lost, a
destroy that failed on "cannot acquire state change lock").  Two things close that:

* the **fenced marker**, a file (`/run/vmha/fenced` on a libvirt host) written by the
  agent or the guard *before* its first destroy and removed only once the agent holds a
  registration again.  While it exists, the libvirt `qemu` hook shipped in
  deploy/libvirt/hooks/qemu refuses every `prepare`, `start`, `restore` and incoming
  `migrate`: libvirtd itself refuses new work.
* **repeated passes**: list + destroy again and again while the marker exists; a failed
  list or destroy is tried again at the next pass.

A pass lists first and checks that the host is still fenced before each destroy: a
domain that the list shows was created before the check, so a domain booted after the
agent removed the marker (it boots only then) is never destroyed by a late pass.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor.base import Hypervisor, HypervisorError

#: Where a libvirt host keeps its marker (systemd's RuntimeDirectory of both units).
DEFAULT_FENCED_MARKER = "/run/vmha/fenced"
#: Pause between two passes: short (a late create runs at most this long), jittered so
#: that the agent's and the guard's passes do not hit libvirtd in lock-step.
PASS_PAUSE_S = (0.05, 0.25)


def default_marker_path(uri: str) -> Path:
    """The marker of the host behind `uri`: one per fake host (many share a machine in
    tests), the system-wide path on a libvirt host."""
    if uri.startswith("fake://"):
        from hypervisor.fake import fake_dir

        return fake_dir(uri) / "fenced"
    return Path(DEFAULT_FENCED_MARKER)


class FencedMarker:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    def write(self, by: str, reason: str) -> None:
        """Atomically: the hook sees the marker whole or not at all.  Raises OSError; the
        caller logs it and destroys anyway (the marker is the second fence, not the first)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"by": by, "pid": os.getpid(), "reason": reason,
                                   "at": time.time()}) + "\n")
        os.replace(tmp, self.path)

    def remove(self) -> bool:
        """True if a marker was there."""
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False


@dataclass
class PassResult:
    destroyed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)   # "name: error" or "list: error"


def destroy_pass(hv: Hypervisor, still_fenced: Callable[[], bool]) -> PassResult:
    """One pass: list, then destroy every active managed domain while still fenced.
    A failed list is reported in `failed` (the next pass lists again)."""
    res = PassResult()
    try:
        domains = hv.list_domains()
    except HypervisorError as exc:
        res.failed.append(f"list: {exc}")
        return res
    for name, dom in domains.items():
        if not (dom.managed and dom.active):
            continue
        if not still_fenced():
            break
        try:
            hv.destroy(name)
            res.destroyed.append(name)
        except HypervisorError as exc:
            res.failed.append(f"{name}: {exc}")
    return res


def pass_pause() -> float:
    return random.uniform(*PASS_PAUSE_S)


def repeat_passes(hv: Hypervisor, still_fenced: Callable[[], bool], stop: threading.Event,
                  on_pass: Callable[[PassResult], None]) -> None:
    """Passes until the host is no longer fenced or `stop` is set; `on_pass` sees every
    pass that destroyed or failed something (the caller logs it)."""
    while still_fenced() and not stop.is_set():
        res = destroy_pass(hv, still_fenced)
        if res.destroyed or res.failed:
            on_pass(res)
        stop.wait(pass_pause())
