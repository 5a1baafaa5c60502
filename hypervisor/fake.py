"""FakeHypervisor: a stand-in for libvirt, for decision-logic tests and simulation.

State lives in files under a shared directory so several agent *processes* can
migrate to each other and a test can check ground truth independently of vmha:

    <root>/<node>/host.pid          pid of the process that "is" this host
    <root>/<node>/domains/<vm>.json {"state": ..., "xml": ..., "host_pid": ...}

A domain counts as running only while its host process lives: `kill -9` of the
agent process is a host crash, and its guests die with it (they show as
"crashed" afterwards, as libvirt shows them after a host reboot).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from hypervisor.base import (
    Domain,
    HypervisorRefused,
    HypervisorUnavailable,
    MigrationStats,
    mark_managed,
)

SCHEME = "fake://"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited: treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def fake_dir(uri: str) -> Path:
    """The host directory behind a fake:// URI."""
    if not uri.startswith(SCHEME):
        raise ValueError(f"not a fake hypervisor URI: {uri!r}")
    return Path(uri[len(SCHEME):])


class FakeHypervisor:
    def __init__(self, root: Path, node: str, memory_mib: int = 4096, vcpus: int = 8,
                 migrate_seconds: float = 0.2, host_pid: int | None = None,
                 *, claim: bool = True) -> None:
        """`claim`: this process (or `host_pid`) becomes the host, written to host.pid.
        Without it the handle only looks at and acts on the host (see `attach`)."""
        self.root = Path(root)
        self.node = node
        self.uri = f"{SCHEME}{self.root / node}"
        self.dir = self.root / node
        self.ddir = self.dir / "domains"
        self._memory = memory_mib
        self._vcpus = vcpus
        self._migrate_seconds = migrate_seconds
        # Outgoing migrations of this process: VM -> (wake-up, how it ended early).
        self._jobs: dict[str, tuple[threading.Event, list[str]]] = {}
        if claim:
            self.ddir.mkdir(parents=True, exist_ok=True)
            self.host_pid = host_pid or os.getpid()
            (self.dir / "host.pid").write_text(str(self.host_pid))
        else:
            self.host_pid = host_pid if host_pid is not None else self._recorded_host_pid()

    @classmethod
    def attach(cls, uri: str) -> FakeHypervisor:
        """A handle on an existing fake host that does not claim it: host.pid stays as
        is, so the host's guests keep living exactly as long as its process (the guard
        destroying domains of a host it does not own uses this)."""
        d = fake_dir(uri)
        return cls(d.parent, d.name, memory_mib=0, vcpus=0, migrate_seconds=0.0, claim=False)

    def _recorded_host_pid(self) -> int:
        try:
            return int((self.dir / "host.pid").read_text())
        except (OSError, ValueError):
            return 0  # no host yet: nothing it runs counts as alive

    def adopt_host(self, pid: int) -> None:
        """Make process `pid` (the agent's guard) the host: guests booted from now on
        live as long as it does, independently of the agent process."""
        self.host_pid = pid
        (self.dir / "host.pid").write_text(str(pid))

    def _path(self, name: str) -> Path:
        return self.ddir / f"{name}.json"

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError):
            return None

    def list_domains(self) -> dict[str, Domain]:
        out = {}
        for path in sorted(self.ddir.glob("*.json")):
            d = self._read(path)
            if d is None:
                continue
            state = d["state"]
            if state in ("running", "paused") and not pid_alive(int(d["host_pid"])):
                state = "crashed"
            out[path.stem] = Domain(path.stem, state, True, bool(d.get("incoming", False)))
        return out

    def boot(self, name: str, xml: str) -> None:
        cur = self._read(self._path(name))
        if cur and cur["state"] == "running" and pid_alive(int(cur["host_pid"])):
            return
        self._refuse_as_libvirt(name, xml)
        _write_json(self._path(name), {"state": "running", "xml": mark_managed(xml),
                                       "host_pid": self.host_pid, "booted_at": time.time()})

    def _refuse_as_libvirt(self, name: str, xml: str) -> None:
        """What libvirt's define refuses, refused alike (HypervisorRefused, libvirt's
        words): an unknown domain type, and a UUID another domain on this host has."""
        root = ET.fromstring(xml)
        dtype = root.get("type")
        if dtype is not None and dtype not in ("kvm", "qemu", "test"):
            raise HypervisorRefused(f"unsupported configuration: unknown virt type "
                                    f"'{dtype}' in domain definition")
        text = root.findtext("uuid")
        if text is None:
            return
        mine = str(uuid.UUID(text.strip()))
        for path in sorted(self.ddir.glob("*.json")):
            d = self._read(path)
            other = ET.fromstring(d["xml"]).findtext("uuid") if d else None
            if path.stem != name and other and str(uuid.UUID(other.strip())) == mine:
                raise HypervisorRefused(f"operation failed: domain '{path.stem}' is already "
                                        f"defined with uuid {mine}")

    def shutdown(self, name: str) -> None:
        self.destroy(name)

    def destroy(self, name: str) -> None:
        cur = self._read(self._path(name))
        if cur and cur["state"] != "shutoff":
            cur["state"] = "shutoff"
            _write_json(self._path(name), cur)

    def undefine(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def migrate(self, name: str, target_uri: str, target_address: str, *,
                tls: bool = False, postcopy: bool = False) -> MigrationStats:
        # `tls` changes nothing here: the fake moves a file, no stream crosses a network.
        if not target_uri.startswith(SCHEME):
            raise HypervisorRefused(f"fake hypervisor cannot migrate to {target_uri!r}")
        cur = self._read(self._path(name))
        if not cur or cur["state"] != "running" or not pid_alive(int(cur["host_pid"])):
            raise HypervisorRefused(f"domain {name!r} is not running on {self.node}")
        target_dir = fake_dir(target_uri)
        try:
            target_pid = int((target_dir / "host.pid").read_text())
        except (OSError, ValueError):
            raise HypervisorUnavailable(f"cannot connect to {target_uri}") from None
        if not pid_alive(target_pid):
            raise HypervisorUnavailable(f"cannot connect to {target_uri}: host is down")
        start = time.monotonic()
        self._copy_or_abort(name)
        tdir = target_dir / "domains"
        total_ms = (time.monotonic() - start) * 1000.0
        stats = {"total_ms": round(total_ms, 1), "downtime_ms": 1.0}
        # Switch-over: the destination copy starts before the source copy is removed,
        # exactly one of them "runs" at any instant that a checker can observe, because
        # the checker treats a source file that is still present as the running one
        # only until the destination file exists (see fake_ground_truth()).
        _write_json(tdir / f"{name}.json", {"state": "running", "xml": cur["xml"],
                                            "host_pid": target_pid, "booted_at": time.time(),
                                            "migrated_from": self.node, "migration": stats})
        self._path(name).unlink(missing_ok=True)
        return MigrationStats(stats["total_ms"], stats["downtime_ms"])

    # ---- migration jobs (in this process, as libvirt's job belongs to its caller) -----

    def _copy_or_abort(self, name: str) -> None:
        """The copy takes `migrate_seconds`; `abort_migration` ends it with libvirt's
        error, `start_postcopy` ends it at once (the switch-over follows)."""
        ev, outcome = self._jobs.setdefault(name, (threading.Event(), []))
        try:
            ev.wait(self._migrate_seconds)
        finally:
            self._jobs.pop(name, None)
        if outcome == ["abort"]:
            raise HypervisorRefused("operation aborted: migration out job: canceled by client")

    def abort_migration(self, name: str) -> bool:
        return self._end_job(name, "abort")

    def start_postcopy(self, name: str) -> None:
        if not self._end_job(name, "postcopy"):
            raise HypervisorRefused(f"no migration job of {name!r} runs on {self.node}")

    def _end_job(self, name: str, how: str) -> bool:
        job = self._jobs.get(name)
        if job is None:
            return False
        job[1][:] = [how]
        job[0].set()
        return True

    def incoming_stats(self, name: str) -> MigrationStats | None:
        cur = self._read(self._path(name))
        if not cur or "migration" not in cur:
            return None
        m = cur["migration"]
        return MigrationStats(m.get("total_ms"), m.get("downtime_ms"))

    def capacity(self) -> tuple[int, int]:
        return self._memory, self._vcpus

    def cpu_model(self) -> str:
        return "fake-cpu"

    def close(self) -> None:
        pass


def fake_ground_truth(root: Path) -> dict[str, list[str]]:
    """VM name -> nodes where it really runs, read without any vmha code path.

    A migration's switch-over writes the destination before removing the source,
    so a VM seen on two nodes whose destination copy names the other as
    `migrated_from` is one VM in switch-over, counted once (on the destination)."""
    seen: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    if not Path(root).is_dir():
        return {}
    for node_dir in sorted(Path(root).iterdir()):
        ddir = node_dir / "domains"
        if not ddir.is_dir():
            continue
        for path in ddir.glob("*.json"):
            try:
                d = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                continue
            if d.get("state") == "running" and pid_alive(int(d["host_pid"])):
                seen.setdefault(path.stem, []).append((node_dir.name, d))
    out: dict[str, list[str]] = {}
    for vm, where in seen.items():
        nodes = [n for n, _ in where]
        if len(where) == 2:
            (n1, d1), (n2, d2) = where
            if d2.get("migrated_from") == n1:
                nodes = [n2]
            elif d1.get("migrated_from") == n2:
                nodes = [n1]
        out[vm] = nodes
    return out
