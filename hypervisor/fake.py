"""FakeHypervisor: a stand-in for libvirt, for decision-logic tests and simulation.

State lives in files under a shared directory so several agent *processes* can
migrate to each other and a test can check ground truth independently of vmha:

    <root>/<node>/host.pid          pid of the process that "is" this host's libvirtd
    <root>/<node>/domains/<vm>.json {"state": ..., "xml": ..., "guest": {"pid", "start"}}

Every running domain is a real process of its own, its guest (`sleep infinity`, with
`vmha-fake-guest <root>/<node>/<vm>` as its argv[0], in a session of its own): started
by boot and by an incoming migration, killed by destroy, shutdown and the end of an
outgoing migration, and nothing else.  A domain runs exactly while its guest process
lives (the record's pid *and* its start time, so a reused pid does not count): a
destroy that does not happen leaves a process running that any checker sees.  Neither
the agent's nor the guard's exit ends a guest, as neither ends a QEMU; a node losing
power is :func:`power_off`.

A live migration starts a paused *incoming* copy on the destination whose process
exits when the migrating process does (libvirt drops an incoming domain whose source
went away); at the switch-over the source's guest is killed and then the destination
resumed, under both hosts' locks (a destroy on either side never interleaves with it).
`migrate_seconds` is how long the copy takes, so a fault can land in the middle of it.

**Record-only** (`record_only=True`, for benchmarks at scale: 10,000 `sleep` guests
would need about 5 GB): a domain has no process of its own; its guest record names
the host's process (host.pid), so it runs while that process lives and stops when a
destroy or a migration's end marks the record stopped, or when the host process dies
(the node losing power).  Everything else (records, locks, migrations, refusals) is
the same code.

`<root>/<node>/destroy-noop` (a fault injection for the negative controls of the
checkers): this host's destroys, and the source side of its switch-overs, leave the
guest process running while they report success.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
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
#: argv[0] of every fake guest process: the tag, then <root>/<node>/<vm>.
GUEST_TAG = "vmha-fake-guest"
_SLEEP = shutil.which("sleep") or "/bin/sleep"
_SH = shutil.which("sh") or "/bin/sh"
#: An incoming copy lives while the migrating process does (polled by its shell).
_INCOMING_SCRIPT = 'while kill -0 "$1" 2>/dev/null; do sleep 0.05; done'
#: Guest processes this process started, kept to reap them (no zombies).
_children: dict[int, subprocess.Popen[bytes]] = {}


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


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[19])


def guest_alive(guest: Any) -> bool:
    """Whether a record's guest process still lives: its pid with the start time it had
    (a pid reused by another process does not count), not a zombie.  A record-only
    guest lives while its host process does, unless it was stopped."""
    if not isinstance(guest, dict) or guest.get("stopped"):
        return False
    try:
        st = _stat(int(guest["pid"]))
        return st is not None and st[0] not in ("Z", "X", "x") and st[1] == int(guest["start"])
    except (KeyError, TypeError, ValueError):
        return False


def _reap() -> None:
    for pid, p in list(_children.items()):
        if p.poll() is not None:
            del _children[pid]


def _spawn(argv: list[str], executable: str) -> dict[str, int]:
    _reap()
    p = subprocess.Popen(argv, executable=executable, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    _children[p.pid] = p
    _wait_for_argv0(p.pid, argv[0].encode())
    st = _stat(p.pid)
    return {"pid": p.pid, "start": st[1] if st else -1}


def _wait_for_argv0(pid: int, argv0: bytes) -> None:
    """Return once the child carries its tag in /proc.  Popen returns when the exec is
    past its point of no return, before the kernel has set up the new program's
    arguments: a /proc scan in between (a power-off, a teardown) saw an empty cmdline
    and missed the guest.  A few microseconds normally; bounded by 5 s."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0", 1)[0] == argv0:
                    return
        except OSError:
            return  # gone already: nothing to find
        time.sleep(0.0005)
    raise HypervisorUnavailable(f"fake guest {pid} did not start {argv0!r} within 5 s")


def spawn_guest(tag: str) -> dict[str, int]:
    """A running guest: `sleep infinity` named `vmha-fake-guest <tag>`."""
    return _spawn([f"{GUEST_TAG} {tag}", "infinity"], _SLEEP)


def spawn_incoming(tag: str, job_pid: int) -> dict[str, int]:
    """A paused incoming copy: lives as long as process `job_pid` (the migration)."""
    return _spawn([f"{GUEST_TAG} {tag}", "-c", _INCOMING_SCRIPT, "incoming", str(job_pid)],
                  _SH)


def record_guest(host_pid: int) -> dict[str, Any]:
    """A record-only guest: no process of its own, it runs while the host process
    `host_pid` does (see the module's docstring)."""
    st = _stat(host_pid)
    return {"pid": host_pid, "start": st[1] if st else -1, "record_only": True}


def kill_guest(guest: Any) -> None:
    """SIGKILL a record's guest process (if it is still that process) and wait until it
    is gone, so a destroy that returned left nothing running.  A record-only guest is
    marked stopped in place (its host process is not touched); the caller writes the
    record."""
    if not guest_alive(guest):
        return
    if guest.get("record_only"):
        guest["stopped"] = True
        return
    pid = int(guest["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    p = _children.pop(pid, None)
    if p is not None:
        p.wait(5)
        return
    deadline = time.monotonic() + 5.0
    while guest_alive(guest) and time.monotonic() < deadline:
        time.sleep(0.001)


def guest_processes(under: Path | None = None) -> dict[int, str]:
    """Live fake guest processes (pid -> their <root>/<node>/<vm>), all of them or those
    whose root lies under `under`; found by their argv[0] in /proc."""
    prefix = f"{GUEST_TAG} ".encode()
    base = str(Path(under).resolve()) + "/" if under is not None else ""
    out: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0]
        except OSError:
            continue
        if argv0.startswith(prefix):
            where = argv0[len(prefix):].decode(errors="replace")
            if where.startswith(base) and pid_alive(int(entry.name)):
                out[int(entry.name)] = where
    return out


def kill_guests(under: Path) -> list[int]:
    """SIGKILL every fake guest whose root lies under `under` (a test's or a campaign's
    teardown: guests outlive the daemons by design); the pids killed."""
    pids = sorted(guest_processes(under))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        p = _children.pop(pid, None)
        if p is not None:
            p.wait(5)
    return pids


def power_off(uri: str) -> list[int]:
    """The node behind `uri` loses power: every guest it runs dies at once."""
    d = fake_dir(uri)
    return kill_guests(d) if d.is_dir() else []


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _refuse_if_fenced(host_dir: Path, operation: str, name: str) -> None:
    """What deploy/libvirt/hooks/qemu makes libvirtd do on a fenced host: refuse every
    start and incoming migration while the fenced marker exists (fencing.marker puts a
    fake host's marker at ``<host dir>/fenced``).  Without it a migration that reached
    a host just after its guard fired ran there, as on a libvirt host without the hook."""
    marker = host_dir / "fenced"
    # `<host dir>/no-hook`: a host without the hook (the repeated destroy passes are
    # then the only line; their tests start work on a fenced host this way).
    if marker.exists() and not (host_dir / "no-hook").exists():
        raise HypervisorRefused(f"Hook script execution failed: internal error: Child "
                                f"process (/etc/libvirt/hooks/qemu {name} {operation} begin -) "
                                f"unexpected exit status 1: vmha: this host is fenced "
                                f"({marker} exists): refusing to {operation} domain {name}")


def fake_dir(uri: str) -> Path:
    """The host directory behind a fake:// URI."""
    if not uri.startswith(SCHEME):
        raise ValueError(f"not a fake hypervisor URI: {uri!r}")
    return Path(uri[len(SCHEME):])


@contextlib.contextmanager
def _locked(*dirs: Path, shared: bool = False) -> Iterator[None]:
    """Hold the hosts' locks (in one global order): a destroy never interleaves with a
    migration's start or switch-over, and a reader holding them shared sees no half of
    one.  A process that dies drops its locks."""
    files = []
    try:
        for d in sorted({Path(x).resolve() for x in dirs}):
            d.mkdir(parents=True, exist_ok=True)
            f = open(d / ".lock", "a")  # noqa: SIM115 - closed in finally
            files.append(f)
            fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        for f in reversed(files):
            f.close()


class FakeHypervisor:
    def __init__(self, root: Path, node: str, memory_mib: int = 4096, vcpus: int = 8,
                 migrate_seconds: float = 0.2, host_pid: int | None = None,
                 *, claim: bool = True, record_only: bool = False) -> None:
        """`claim`: this process (or `host_pid`) becomes the host, written to host.pid.
        Without it the handle only looks at and acts on the host (see `attach`).
        `record_only`: guests without processes (see the module's docstring)."""
        self.root = Path(root)
        self.node = node
        self.uri = f"{SCHEME}{self.root / node}"
        self.dir = self.root / node
        self.ddir = self.dir / "domains"
        self._memory = memory_mib
        self._vcpus = vcpus
        self._migrate_seconds = migrate_seconds
        self.record_only = record_only
        # Record-only: each record as last parsed, by (inode, mtime, size); records are
        # replaced whole (os.replace), so an unchanged key is an unchanged record.  A
        # thousand agents in one box list their domains every second: parsing every
        # record again would be the fake's cost, not the agent's.
        self._parsed: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
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
        is (the guard destroying domains of a host it does not own uses this)."""
        d = fake_dir(uri)
        return cls(d.parent, d.name, memory_mib=0, vcpus=0, migrate_seconds=0.0, claim=False)

    def _recorded_host_pid(self) -> int:
        try:
            return int((self.dir / "host.pid").read_text())
        except (OSError, ValueError):
            return 0  # no host yet: it accepts no work

    def adopt_host(self, pid: int) -> None:
        """Make process `pid` (the agent's guard) the host's libvirtd: it accepts work
        (boots, incoming migrations) while that process lives."""
        self.host_pid = pid
        (self.dir / "host.pid").write_text(str(pid))

    def _path(self, name: str) -> Path:
        return self.ddir / f"{name}.json"

    def _tag(self, name: str, node_dir: Path | None = None) -> str:
        return f"{(node_dir or self.dir).resolve()}/{name}"

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError):
            return None

    def _destroy_lost(self, node_dir: Path | None = None) -> bool:
        return ((node_dir or self.dir) / "destroy-noop").exists()

    def _read_listed(self, path: Path) -> dict[str, Any] | None:
        """A record for list_domains (never changed by it): parsed again only if its
        file changed, in record-only mode."""
        if not self.record_only:
            return self._read(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        hit = self._parsed.get(path.name)
        if hit is not None and hit[0] == key:
            return hit[1]
        d = self._read(path)
        if d is not None:
            self._parsed[path.name] = (key, d)
        return d

    def list_domains(self) -> dict[str, Domain]:
        out = {}
        memo: dict[tuple[Any, ...], bool] = {}  # record-only guests share their host's pid
        paths = sorted(self.ddir.glob("*.json"))
        if self.record_only:
            names = {p.name for p in paths}
            for gone in [n for n in list(self._parsed) if n not in names]:
                self._parsed.pop(gone, None)  # other threads (migrations) list too
        for path in paths:
            d = self._read_listed(path)
            if d is None:
                continue
            g = d.get("guest")
            if self.record_only and isinstance(g, dict):
                gk = (g.get("pid"), g.get("start"), g.get("stopped"))
                if gk not in memo:
                    memo[gk] = guest_alive(g)
                alive = memo[gk]
            else:
                alive = guest_alive(g)
            if d.get("incoming"):
                if alive:  # a dead incoming copy is gone, as libvirt drops it
                    out[path.stem] = Domain(path.stem, "paused", True, True)
                continue
            state = d["state"]
            if state in ("running", "paused") and not alive:
                state = "crashed"
            out[path.stem] = Domain(path.stem, state, True, False)
        return out

    def boot(self, name: str, xml: str) -> None:
        cur = self._read(self._path(name))
        if cur and guest_alive(cur.get("guest")):
            if cur.get("incoming"):
                raise HypervisorRefused(f"operation failed: domain '{name}' is being "
                                        "migrated in")
            if cur["state"] == "running":
                return
        self._refuse_as_libvirt(name, xml)
        _refuse_if_fenced(self.dir, "start", name)
        # A host whose libvirtd is down starts nothing: the domain shows as crashed.
        guest = self._guest(name, self.dir, self.host_pid) if pid_alive(self.host_pid) else None
        _write_json(self._path(name), {"state": "running", "xml": mark_managed(xml),
                                       "guest": guest, "booted_at": time.time()})

    def _guest(self, name: str, node_dir: Path, host_pid: int) -> dict[str, Any]:
        """A running guest of `name` on the host at `node_dir` (process `host_pid`)."""
        if self.record_only:
            return record_guest(host_pid)
        return spawn_guest(self._tag(name, node_dir))

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
        with _locked(self.dir):
            cur = self._read(self._path(name))
            if cur is None:
                return
            marked = bool(cur.get("guest") and cur["guest"].get("record_only")
                          and guest_alive(cur["guest"]))
            if not self._destroy_lost():
                kill_guest(cur.get("guest"))
            if cur.get("incoming"):
                # Destroying an incoming copy fails its migration; nothing is left here.
                self._path(name).unlink(missing_ok=True)
            elif cur["state"] != "shutoff" or marked:  # a record-only guest stops on write
                cur["state"] = "shutoff"
                _write_json(self._path(name), cur)

    def undefine(self, name: str) -> None:
        cur = self._read(self._path(name))
        if cur and guest_alive(cur.get("guest")) and not cur.get("incoming"):
            # libvirt keeps a running domain (transient) until it is destroyed.
            cur["state"] = "running"
            cur["transient"] = True
            _write_json(self._path(name), cur)
            return
        self._path(name).unlink(missing_ok=True)

    def migrate(self, name: str, target_uri: str, target_address: str, *,
                tls: bool = False, postcopy: bool = False) -> MigrationStats:
        # `tls` changes nothing here: the fake moves a file, no stream crosses a network.
        if not target_uri.startswith(SCHEME):
            raise HypervisorRefused(f"fake hypervisor cannot migrate to {target_uri!r}")
        cur = self._read(self._path(name))
        if (not cur or cur["state"] != "running" or cur.get("incoming")
                or not guest_alive(cur.get("guest"))):
            raise HypervisorRefused(f"domain {name!r} is not running on {self.node}")
        target_dir = fake_dir(target_uri)
        try:
            target_pid = int((target_dir / "host.pid").read_text())
        except (OSError, ValueError):
            raise HypervisorUnavailable(f"cannot connect to {target_uri}") from None
        if not pid_alive(target_pid):
            raise HypervisorUnavailable(f"cannot connect to {target_uri}: host is down")
        tpath = target_dir / "domains" / f"{name}.json"
        mid = uuid.uuid4().hex[:12]
        start = time.monotonic()
        with _locked(self.dir, target_dir):
            there = self._read(tpath)
            if there and guest_alive(there.get("guest")):
                raise HypervisorRefused(f"operation failed: domain '{name}' is already "
                                        f"active on {target_dir.name}")
            _refuse_if_fenced(target_dir, "migrate", name)
            # The source names the migration before its incoming copy exists: a
            # process killed between the two writes (the flock goes with it) must not
            # leave an incoming copy that nothing excuses, which the ground truth
            # would count as a second running copy (a paused copy never runs).
            cur["outgoing"] = {"to": target_dir.name, "id": mid}
            _write_json(self._path(name), cur)
            # A record-only incoming copy lives while this (the migrating) process does.
            incoming = (record_guest(os.getpid()) if self.record_only
                        else spawn_incoming(self._tag(name, target_dir), os.getpid()))
            _write_json(tpath, {"state": "paused", "xml": cur["xml"], "guest": incoming,
                                "incoming": {"from": self.node, "id": mid},
                                "booted_at": time.time()})
        try:
            self._copy_or_abort(name)
            total_ms = (time.monotonic() - start) * 1000.0
            stats = {"total_ms": round(total_ms, 1), "downtime_ms": 1.0}
            self._switch_over(name, tpath, mid, stats, target_pid)
        except BaseException:
            self._abandon(name, tpath, mid)
            raise
        return MigrationStats(stats["total_ms"], stats["downtime_ms"])

    def _switch_over(self, name: str, tpath: Path, mid: str, stats: dict[str, float],
                     target_pid: int) -> None:
        """Stop the source, then resume the destination: never both running."""
        target_dir = tpath.parent.parent
        with _locked(self.dir, target_dir):
            there = self._read(tpath)
            if (not there or (there.get("incoming") or {}).get("id") != mid
                    or not guest_alive(there.get("guest"))):
                raise HypervisorUnavailable(f"migration of {name!r} failed: the incoming "
                                            f"copy on {target_dir.name} is gone")
            cur = self._read(self._path(name))
            if not cur or not guest_alive(cur.get("guest")):
                raise HypervisorRefused(f"domain {name!r} died during its migration")
            lost = self._destroy_lost()
            if not lost:
                kill_guest(cur.get("guest"))
            resumed = self._guest(name, target_dir, target_pid)
            _write_json(tpath, {"state": "running", "xml": there["xml"], "guest": resumed,
                                "booted_at": time.time(), "migrated_from": self.node,
                                "migration": stats})
            kill_guest(there.get("guest"))
            if lost:  # the source QEMU did not stop: it keeps running, un-excused
                del cur["outgoing"]
                _write_json(self._path(name), cur)
            else:
                self._path(name).unlink(missing_ok=True)

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

    def _abandon(self, name: str, tpath: Path, mid: str) -> None:
        """A migration that did not switch over: its incoming copy goes, the source runs on."""
        with _locked(self.dir, tpath.parent.parent):
            there = self._read(tpath)
            if there and (there.get("incoming") or {}).get("id") == mid:
                kill_guest(there.get("guest"))
                tpath.unlink(missing_ok=True)
            cur = self._read(self._path(name))
            if cur and (cur.get("outgoing") or {}).get("id") == mid:
                del cur["outgoing"]
                _write_json(self._path(name), cur)

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
    """VM name -> nodes where it really runs: a node counts while the VM's guest process
    there lives, read without any vmha code path.

    One exception: a paused incoming copy is not a second instance while the source's
    record names the same migration (the copy never ran, and it ends with the job or
    becomes the only running copy at the switch-over).  Once the migration ends there
    is nothing left to excuse: a source process that outlives it is counted."""
    live: dict[str, dict[str, dict[str, Any]]] = {}
    if not Path(root).is_dir():
        return {}
    nodes = [d for d in sorted(Path(root).iterdir()) if (d / "domains").is_dir()]
    # Read under the hosts' locks, shared: a read never straddles a migration's start
    # or switch-over (one node read before it, the other after).
    with _locked(*nodes, shared=True):
        for node_dir in nodes:
            for path in (node_dir / "domains").glob("*.json"):
                try:
                    d = json.loads(path.read_text())
                except (FileNotFoundError, ValueError):
                    continue
                if isinstance(d, dict) and guest_alive(d.get("guest")):
                    live.setdefault(path.stem, {})[node_dir.name] = d
    out: dict[str, list[str]] = {}
    for vm, where in live.items():
        running: list[str] = []
        for n, d in sorted(where.items()):
            inc = d.get("incoming") or {}
            src = where.get(str(inc.get("from", "")))
            if inc and src is not None and (src.get("outgoing") or {}).get("id") == inc.get("id"):
                continue  # in flight: counted on its source
            running.append(n)
        if running:
            out[vm] = running
    return out
