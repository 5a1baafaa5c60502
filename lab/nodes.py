"""Several independent libvirt "nodes" on one host.

Each node is one root ``libvirtd`` (monolithic daemon) running in its own
mount + UTS namespace.  Inside that namespace the node's own directories are
bind-mounted over the well-known libvirt paths::

    <node dir>/etc    -> /etc/libvirt        (libvirtd.conf, qemu.conf, domain XML)
    <node dir>/run    -> /run/libvirt        (sockets, qemu pid/status files)
    <node dir>/lib    -> /var/lib/libvirt
    <node dir>/cache  -> /var/cache/libvirt
    <node dir>/log    -> /var/log/libvirt

Everything else of the host file system (in particular the lab root, so
every node's socket) stays visible at the same path in every namespace,
which is what lets a source libvirtd open the destination node's URI for
peer-to-peer migration.

Processes are only ever signalled by pid, read from pid files that libvirtd
writes (``<node dir>/libvirtd.pid`` and ``<node dir>/run/qemu/<vm>.pid``;
with ``lockd=True`` also virtlockd's ``<node dir>/virtlockd.pid``),
and the pid's command line is checked before any signal is sent, so a
recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from lab.artifacts import DEFAULT_CACHE

#: Host paths that each node gets a private copy of (node sub-dir -> path).
NODE_MOUNTS: tuple[tuple[str, str], ...] = (
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
)

#: First TCP port of node 0's migration range; each node gets its own block.
MIGRATION_PORT_BASE = 49152
MIGRATION_PORTS_PER_NODE = 64

LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOCKD = "/usr/sbin/virtlockd"

#: Indirect lockd lockspace under the lab root, shared by all nodes (``lockd=True``).
LOCKSPACE_DIR = "lockspace"
UNSHARE = "/usr/bin/unshare"

#: QEMU capability probes shared between nodes (probing takes ~8 s under
#: TCG per node otherwise).  libvirt re-validates the files itself (QEMU
#: binary ctime, libvirt version, host kernel/CPU), so stale ones are harmless.
DEFAULT_CAPS_CACHE = DEFAULT_CACHE / "qemu-capabilities"

NODE_MARKER = ".vmha-lab-node"
ROOT_MARKER = ".vmha-lab-root"

#: Longest AF_UNIX path (sun_path is 108 bytes including the NUL).
_MAX_SOCKET_PATH = 107

_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 10.0
_PID_FILE_TIMEOUT_S = 5.0

_FORBIDDEN_ROOTS = tuple(Path(p) for _, p in NODE_MOUNTS)


class LabError(RuntimeError):
    """A lab node could not be started, stopped or reached."""


@dataclass
class LabNode:
    """One libvirt node of the lab."""

    name: str
    dir: Path
    uri: str
    migration_port_range: tuple[int, int]
    pid: int | None
    index: int = 0
    root: Path = field(default_factory=Path)

    @property
    def socket_path(self) -> Path:
        return self.dir / "run" / "libvirt-sock"

    @property
    def pid_file(self) -> Path:
        return self.dir / "libvirtd.pid"

    @property
    def qemu_run_dir(self) -> Path:
        """``/run/libvirt/qemu`` as seen inside the node."""
        return self.dir / "run" / "qemu"

    @property
    def virtlockd_pid_file(self) -> Path:
        return self.dir / "virtlockd.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "log" / "libvirtd.log"

    @property
    def host_uuid(self) -> str:
        return node_host_uuid(self.root, self.name)


# --------------------------------------------------------------------------
# small process helpers


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live process (zombies count as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return False
    # state is the first field after the ")" that closes comm
    rparen = stat.rfind(b")")
    state = stat[rparen + 2 : rparen + 3]
    return state not in (b"Z", b"X", b"x")


def _pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _pid_matches(pid: int, needle: str) -> bool:
    """True if ``pid`` is alive and its argv[0] mentions ``needle``."""
    if not pid_alive(pid):
        return False
    argv = _pid_cmdline(pid)
    return bool(argv) and needle in os.path.basename(argv[0])


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        pid = int(text)
    except ValueError:
        return None
    return pid if pid > 1 else None


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_dead(pids: list[int], timeout: float) -> list[int]:
    """Wait until every pid is dead; return the ones still alive."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p)]
    return alive


# --------------------------------------------------------------------------
# configuration


def node_host_uuid(root: Path, name: str) -> str:
    """Stable, per-node host UUID (libvirt refuses to migrate between equal ones)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"vmha-lab:{root.resolve()}:{name}"))


def node_hostname(name: str) -> str:
    """UTS host name of a node (resolvable inside the node only)."""
    return f"vmha-lab-{name}"


def migration_port_range(index: int) -> tuple[int, int]:
    low = MIGRATION_PORT_BASE + index * MIGRATION_PORTS_PER_NODE
    return low, low + MIGRATION_PORTS_PER_NODE - 1


def node_uri(node_dir: Path) -> str:
    return f"qemu+unix:///system?socket={node_dir / 'run' / 'libvirt-sock'}"


def _libvirtd_conf(host_uuid: str) -> str:
    return "\n".join(
        [
            "# generated by vmha lab (lab/nodes.py)",
            "listen_tls = 0",
            "listen_tcp = 0",
            'unix_sock_dir = "/run/libvirt"',
            'unix_sock_group = "root"',
            'unix_sock_ro_perms = "0777"',
            'unix_sock_rw_perms = "0770"',
            'unix_sock_admin_perms = "0700"',
            'auth_unix_ro = "none"',
            'auth_unix_rw = "none"',
            f'host_uuid = "{host_uuid}"',
            "log_level = 3",
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"',
            "keepalive_interval = 5",
            "keepalive_count = 5",
            "",
        ]
    )


def _qemu_conf(ports: tuple[int, int], lockd: bool = False) -> str:
    return "\n".join(
        [
            "# generated by vmha lab (lab/nodes.py)",
            'user = "root"',
            'group = "root"',
            "dynamic_ownership = 0",
            "remember_owner = 0",
            'security_driver = "none"',
            "namespaces = [ ]",
            "cgroup_controllers = [ ]",
            'stdio_handler = "file"',
            'lock_manager = "lockd"' if lockd else 'lock_manager = "nop"',
            f"migration_port_min = {ports[0]}",
            f"migration_port_max = {ports[1]}",
            'vnc_listen = "127.0.0.1"',
            'spice_listen = "127.0.0.1"',
            "vnc_auto_unix_socket = 0",
            "set_process_name = 1",
            "",
        ]
    )


def _qemu_lockd_conf(lockspace: Path) -> str:
    return "\n".join(
        [
            "# generated by vmha lab (lab/nodes.py)",
            "auto_disk_leases = 1",
            f'file_lockspace_dir = "{lockspace}"',
            "",
        ]
    )


def _virtlockd_conf() -> str:
    return "\n".join(
        [
            "# generated by vmha lab (lab/nodes.py)",
            "log_level = 3",
            'log_outputs = "3:file:/var/log/libvirt/virtlockd.log"',
            "",
        ]
    )


def _ensure_qemu_user() -> None:
    """libvirt's QEMU driver insists that its build-time user exists."""
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                "/var/lib/libvirt",
                "--shell",
                "/usr/sbin/nologin",
                "libvirt-qemu",
            ],
            check=True,
            capture_output=True,
        )


def _check_root(root: Path) -> None:
    for forbidden in _FORBIDDEN_ROOTS:
        if root == forbidden or forbidden in root.parents:
            raise LabError(f"lab root {root} must not lie under {forbidden}")


def _prepare_node_dir(
    node_dir: Path, name: str, index: int, root: Path, lockd: bool = False
) -> None:
    node_dir.mkdir(parents=True, exist_ok=True)
    (node_dir / NODE_MARKER).write_text(f"{name} {index}\n")
    for sub, _ in NODE_MOUNTS:
        (node_dir / sub).mkdir(exist_ok=True)
    for sub in ("log/qemu", "lib/qemu", "cache/qemu", "run/qemu", "etc/qemu"):
        (node_dir / sub).mkdir(parents=True, exist_ok=True)
    etc = node_dir / "etc"
    # client-side defaults from the host (libvirt.conf, libvirt-admin.conf)
    for host_file in ("libvirt.conf", "libvirt-admin.conf"):
        src = Path("/etc/libvirt") / host_file
        if src.is_file() and not (etc / host_file).exists():
            shutil.copy2(src, etc / host_file)
    hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").is_file() else ""
    (node_dir / "hosts").write_text(
        hosts.rstrip("\n") + f"\n127.0.1.1\t{node_hostname(name)}\n"
    )
    (etc / "libvirtd.conf").write_text(_libvirtd_conf(node_host_uuid(root, name)))
    (etc / "qemu.conf").write_text(_qemu_conf(migration_port_range(index), lockd))
    if lockd:
        lockspace = root / LOCKSPACE_DIR
        lockspace.mkdir(exist_ok=True)
        (etc / "qemu-lockd.conf").write_text(_qemu_lockd_conf(lockspace))
        (etc / "virtlockd.conf").write_text(_virtlockd_conf())


#: Runs inside the node's namespaces: detaches, becomes a child subreaper,
#: runs libvirtd in the foreground and reaps it and every QEMU it
#: daemonizes (they re-parent here instead of to pid 1).  libvirt waits for
#: a killed QEMU's pid to vanish, so prompt reaping matters when pid 1 is
#: slow to reap (as in some containers/micro-VMs): it saves ~1.5 s per
#: migration or destroy there.  Exits when no child is left.
_REAPER = """
import ctypes, os, signal, sys
pid_file, argv = sys.argv[1], sys.argv[2:]
if os.fork():
    os._exit(0)
os.setsid()
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
with open(pid_file + ".tmp", "w") as fh:
    fh.write(f"{os.getpid()}\\n")
os.replace(pid_file + ".tmp", pid_file)
child = os.fork()
if child == 0:
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    os.execv(argv[0], argv)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        continue
"""


def _namespace_script(node_dir: Path, name: str, pid_file: Path, lockd: bool = False) -> str:
    lines = [
        "set -e",
        f"hostname {shlex.quote(node_hostname(name))}",
        # libvirtd resolves its own hostname (getHostname, migration cookies);
        # without an entry that is a DNS timeout of several seconds each time.
        f"if [ -f /etc/hosts ]; then mount --bind {shlex.quote(str(node_dir / 'hosts'))}"
        " /etc/hosts; fi",
    ]
    for sub, target in NODE_MOUNTS:
        lines.append(f"mount --bind {shlex.quote(str(node_dir / sub))} {target}")
    # Guests of all nodes would share the host's cgroup tree (and collide on
    # names): hide it so that libvirt runs without cgroups.
    lines.append("umount -R -l /sys/fs/cgroup 2>/dev/null || true")
    if lockd:
        # virtlockd daemonizes itself; its socket lands in this node's
        # /run/libvirt (virtlockd-sock), where the node's libvirtd looks.
        vl = [
            VIRTLOCKD,
            "-d",
            "-f",
            str(node_dir / "etc" / "virtlockd.conf"),
            "-p",
            str(node_dir / "virtlockd.pid"),
        ]
        lines.append(" ".join(shlex.quote(a) for a in vl))
    argv = [
        sys.executable or "/usr/bin/python3",
        "-I",
        "-c",
        _REAPER,
        str(node_dir / "reaper.pid"),
        LIBVIRTD,
        "-f",
        str(node_dir / "etc" / "libvirtd.conf"),
        "--pid-file",
        str(pid_file),
    ]
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines)


def _socket_ready(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(str(path))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def _node_caps_dir(node_dir: Path) -> Path:
    return node_dir / "cache" / "qemu" / "capabilities"


def _seed_caps(node_dir: Path, caps_cache: Path) -> None:
    target = _node_caps_dir(node_dir)
    if not caps_cache.is_dir() or any(target.glob("*.xml")):
        return
    target.mkdir(parents=True, exist_ok=True)
    for src in caps_cache.glob("*.xml"):
        shutil.copy2(src, target / src.name)


def _publish_caps(node_dir: Path, uri: str, caps_cache: Path) -> None:
    """Probe QEMU once (if this node has not) and share the result."""
    if any(caps_cache.glob("*.xml")):
        return
    conn = libvirt.open(uri)
    try:
        conn.getCapabilities()
        conn.getDomainCapabilities(None, "x86_64", None, "qemu", 0)
    finally:
        conn.close()
    caps_cache.mkdir(parents=True, exist_ok=True)
    for src in _node_caps_dir(node_dir).glob("*.xml"):
        tmp = caps_cache / (src.name + f".tmp{os.getpid()}")
        shutil.copy2(src, tmp)
        os.replace(tmp, caps_cache / src.name)


def _settle(node_dir: Path, uri: str, timeout: float = _START_TIMEOUT_S) -> None:
    """Wait until libvirtd has noticed that guests it remembers are gone.

    After a restart libvirtd reports domains from its status files as
    running until its background reconnect to their QEMU monitor fails;
    callers of :func:`start_node` should see the settled state instead.
    """
    conn = libvirt.open(uri)
    try:
        deadline = time.monotonic() + timeout
        while True:
            stale = []
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                pid = _read_pid(node_dir / "run" / "qemu" / f"{dom.name()}.pid")
                if pid is None or not _pid_matches(pid, "qemu"):
                    stale.append(dom.name())
            if not stale:
                return
            if time.monotonic() >= deadline:
                raise LabError(f"libvirtd at {uri} still reports dead guests {stale} as active")
            time.sleep(0.05)
    finally:
        conn.close()


def _make_node(root: Path, name: str, index: int, pid: int | None) -> LabNode:
    node_dir = root / name
    return LabNode(
        name=name,
        dir=node_dir,
        uri=node_uri(node_dir),
        migration_port_range=migration_port_range(index),
        pid=pid,
        index=index,
        root=root,
    )


def _reaper_pid(node_dir: Path) -> int | None:
    pid = _read_pid(node_dir / "reaper.pid")
    if pid is not None and pid_alive(pid) and _REAPER in _pid_cmdline(pid):
        return pid
    return None


def _virtlockd_pid(node_dir: Path) -> int | None:
    pid = _read_pid(node_dir / "virtlockd.pid")
    if pid is not None and _pid_matches(pid, "virtlockd"):
        return pid
    return None


def _running_pid(node_dir: Path) -> int | None:
    pid = _read_pid(node_dir / "libvirtd.pid")
    if pid is not None and _pid_matches(pid, "libvirtd"):
        return pid
    return None


# --------------------------------------------------------------------------
# public API


def start_node(
    root: Path,
    name: str,
    index: int,
    *,
    caps_cache: Path | None = DEFAULT_CAPS_CACHE,
    lockd: bool = False,
) -> LabNode:
    """Start (or find already running) lab node ``name`` under ``root``.

    ``index`` selects the node's migration port block; use a distinct index
    per node of one lab.  Idempotent: a running node is returned as is.
    When this call starts libvirtd it returns once the daemon answers on
    its socket and has settled the state of guests it remembers (after a
    crash: shut off).  ``caps_cache`` shares QEMU capability probes between
    nodes (``None``: every node probes QEMU itself, ~8 s each under TCG).
    ``lockd=True`` turns on libvirt's lockd lock manager: a ``virtlockd``
    per node (in its namespace) with automatic disk leases in the indirect
    lockspace ``<root>/lockspace`` shared by all nodes.
    """
    if os.geteuid() != 0:
        raise LabError("lab nodes need root")
    root = Path(root).resolve()
    _check_root(root)
    if not name or "/" in name or name.startswith("."):
        raise LabError(f"bad node name {name!r}")
    node_dir = root / name
    if len(str(node_dir / "run" / "libvirt-sock-admin")) > _MAX_SOCKET_PATH:
        raise LabError(f"lab root {root} is too long for AF_UNIX socket paths")

    running = _running_pid(node_dir)
    if running is not None and _socket_ready(node_dir / "run" / "libvirt-sock"):
        return _make_node(root, name, index, running)
    if running is not None:
        # alive but not answering: give it a moment (e.g. still starting)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline and pid_alive(running):
            if _socket_ready(node_dir / "run" / "libvirt-sock"):
                return _make_node(root, name, index, running)
            time.sleep(0.05)
        raise LabError(f"libvirtd {running} of node {name} does not answer")

    if not root.exists():
        root.mkdir(parents=True)
        (root / ROOT_MARKER).touch()  # destroy_lab removes only what it created
    _ensure_qemu_user()
    for _, target in NODE_MOUNTS:
        Path(target).mkdir(parents=True, exist_ok=True)
    _prepare_node_dir(node_dir, name, index, root, lockd)
    if caps_cache is not None:
        _seed_caps(node_dir, Path(caps_cache))
    pid_file = node_dir / "libvirtd.pid"
    pid_file.unlink(missing_ok=True)
    old_vl = _virtlockd_pid(node_dir)
    if old_vl is not None:  # left over from a stop/crash of libvirtd alone
        _signal(old_vl, signal.SIGKILL)
        _wait_dead([old_vl], _STOP_TIMEOUT_S)
    (node_dir / "virtlockd.pid").unlink(missing_ok=True)

    script = _namespace_script(node_dir, name, pid_file, lockd)
    start_log = node_dir / "log" / "start.log"
    with open(start_log, "ab") as log:
        proc = subprocess.run(
            [UNSHARE, "--mount", "--uts", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            timeout=_START_TIMEOUT_S,
            check=False,
        )
    if proc.returncode != 0:
        raise LabError(
            f"libvirtd of node {name} failed to start (rc={proc.returncode}); "
            f"see {start_log} and {node_dir / 'log' / 'libvirtd.log'}"
        )
    started = time.monotonic()
    deadline = started + _START_TIMEOUT_S
    pid: int | None = None
    while time.monotonic() < deadline:
        pid = _read_pid(pid_file) or pid
        if pid is not None and not pid_alive(pid):
            break
        if pid is None and time.monotonic() > started + _PID_FILE_TIMEOUT_S:
            break
        if pid is not None and _socket_ready(node_dir / "run" / "libvirt-sock"):
            node = _make_node(root, name, index, pid)
            _settle(node_dir, node.uri)
            if caps_cache is not None:
                _publish_caps(node_dir, node.uri, Path(caps_cache))
            return node
        time.sleep(0.05)
    if pid is None or not pid_alive(pid):
        raise LabError(
            f"node {name}: libvirtd (pid {pid}) exited during start-up; "
            f"see {node_dir / 'log' / 'libvirtd.log'}"
        )
    raise LabError(f"node {name}: libvirtd (pid {pid}) not ready after {_START_TIMEOUT_S}s")


def qemu_pids(node: LabNode) -> dict[str, int]:
    """Live QEMU processes of ``node``'s guests, by domain name."""
    result: dict[str, int] = {}
    run = node.qemu_run_dir
    if not run.is_dir():
        return result
    for pid_file in sorted(run.glob("*.pid")):
        if pid_file.name == "driver.pid":
            continue
        pid = _read_pid(pid_file)
        if pid is not None and _pid_matches(pid, "qemu"):
            result[pid_file.stem] = pid
    return result


def node_pids(node: LabNode) -> list[int]:
    """Live pids belonging to ``node``: libvirtd, its guests' QEMUs, the reaper."""
    pids: list[int] = []
    lv = _running_pid(node.dir)
    if lv is not None:
        pids.append(lv)
    pids.extend(qemu_pids(node).values())
    vl = _virtlockd_pid(node.dir)
    if vl is not None:
        pids.append(vl)
    reaper = _reaper_pid(node.dir)
    if reaper is not None:
        pids.append(reaper)
    return pids


def _finish_reaper(reaper: int | None) -> list[int]:
    """The reaper exits once its children are gone; make sure it did."""
    if reaper is None:
        return []
    if _wait_dead([reaper], _STOP_TIMEOUT_S) and _REAPER in _pid_cmdline(reaper):
        _signal(reaper, signal.SIGKILL)
    return _wait_dead([reaper], _STOP_TIMEOUT_S)


def _kill_virtlockd(node_dir: Path) -> list[int]:
    """SIGKILL the node's virtlockd (if ``lockd=True``), by pid; return survivors."""
    vl = _virtlockd_pid(node_dir)
    if vl is None:
        return []
    _signal(vl, signal.SIGKILL)
    return _wait_dead([vl], _STOP_TIMEOUT_S)


def stop_node(node: LabNode) -> None:
    """Stop libvirtd of ``node`` and its guests' QEMU processes, by pid.

    The node's directory (configuration, persistent domain definitions)
    is kept, so :func:`start_node` brings the node back.
    """
    guests = list(qemu_pids(node).values())
    reaper = _reaper_pid(node.dir)
    lv = _running_pid(node.dir)
    if lv is not None:
        _signal(lv, signal.SIGTERM)
        if _wait_dead([lv], _STOP_TIMEOUT_S):
            _signal(lv, signal.SIGKILL)
    for pid in guests:
        if _pid_matches(pid, "qemu"):
            _signal(pid, signal.SIGKILL)
    leftover = _wait_dead(([lv] if lv else []) + guests, _STOP_TIMEOUT_S)
    leftover += _kill_virtlockd(node.dir)
    leftover += _finish_reaper(reaper)
    node.pid = None
    if leftover:
        raise LabError(f"node {node.name}: processes {leftover} did not die")


def crash_node(node: LabNode) -> None:
    """Simulate a host crash: SIGKILL libvirtd and all its guests' QEMUs."""
    guests = list(qemu_pids(node).values())
    reaper = _reaper_pid(node.dir)
    lv = _running_pid(node.dir)
    if lv is not None:
        _signal(lv, signal.SIGKILL)
    for pid in guests:
        _signal(pid, signal.SIGKILL)
    leftover = _wait_dead(([lv] if lv else []) + guests, _STOP_TIMEOUT_S)
    leftover += _kill_virtlockd(node.dir)
    leftover += _finish_reaper(reaper)
    node.pid = None
    if leftover:
        raise LabError(f"node {node.name}: processes {leftover} survived SIGKILL")


def kill_libvirtd(node: LabNode) -> int | None:
    """SIGKILL only ``node``'s libvirtd (its guests' QEMUs keep running); return its pid.

    What a libvirtd crash looks like: a migration it takes part in fails, and
    :func:`start_node` brings a new libvirtd up that reconnects to the guests.
    """
    lv = _running_pid(node.dir)
    if lv is None:
        return None
    _signal(lv, signal.SIGKILL)
    if _wait_dead([lv], _STOP_TIMEOUT_S):
        raise LabError(f"node {node.name}: libvirtd {lv} survived SIGKILL")
    node.pid = None
    return lv


def restart_node(
    node: LabNode, *, caps_cache: Path | None = DEFAULT_CAPS_CACHE, lockd: bool = False
) -> LabNode:
    """Start ``node`` again (after :func:`stop_node` or :func:`crash_node`)."""
    if _running_pid(node.dir) is not None:
        stop_node(node)
    fresh = start_node(node.root, node.name, node.index, caps_cache=caps_cache, lockd=lockd)
    node.pid = fresh.pid
    return fresh


def lab_nodes(root: Path) -> list[LabNode]:
    """Nodes whose directories exist under ``root`` (running or not)."""
    root = Path(root).resolve()
    nodes: list[LabNode] = []
    if not root.is_dir():
        return nodes
    for marker in sorted(root.glob(f"*/{NODE_MARKER}")):
        try:
            name, index_text = marker.read_text().split()
            index = int(index_text)
        except (OSError, ValueError):
            continue
        nodes.append(_make_node(root, name, index, _running_pid(root / name)))
    return nodes


def destroy_lab(root: Path) -> None:
    """Stop every node under ``root`` and remove the directories it created.

    The per-node mounts live only in the nodes' namespaces, which vanish
    with their last process, so nothing is mounted on the host.  Other
    content of ``root`` (for example a cache directory) is left alone; the
    root itself is removed when the lab created it and it is then empty.
    """
    root = Path(root).resolve()
    errors: list[str] = []
    for node in lab_nodes(root):
        try:
            stop_node(node)
        except LabError as exc:
            errors.append(str(exc))
    for node in lab_nodes(root):
        if not node_pids(node):
            shutil.rmtree(node.dir, ignore_errors=True)
    lockspace = root / LOCKSPACE_DIR
    if lockspace.is_dir() and not any(node_pids(n) for n in lab_nodes(root)):
        shutil.rmtree(lockspace, ignore_errors=True)
    marker = root / ROOT_MARKER
    if marker.exists():
        marker.unlink()
        try:
            root.rmdir()
        except OSError:
            marker.touch()  # not empty: keep it marked as ours
    if errors:
        raise LabError("; ".join(errors))
