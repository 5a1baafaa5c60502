"""Several independent libvirt "nodes" on one host: their life cycle.

Each node is one root ``libvirtd`` in its own mount + UTS namespace, with its
own directories bind-mounted over libvirt's paths (the layout: :mod:`lab.nodeconf`).

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

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import libvirt

from lab.nodeconf import (
    DEFAULT_CAPS_CACHE,
    LOCKSPACE_DIR,
    MAX_SOCKET_PATH,
    NODE_MARKER,
    NODE_MOUNTS,
    PKI_ROOT,
    REAPER,
    ROOT_MARKER,
    UNSHARE,
    LabError,
    LabNode,
    check_root,
    ensure_qemu_user,
    make_node,
    namespace_script,
    prepare_node_dir,
    reaper_pid,
    running_pid,
    virtlockd_pid,
)
from lab.pki import lab_ca_dirs
from lab.procs import pid_alive, pid_cmdline, pid_matches, read_pid, send_signal, wait_dead

_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 10.0
_PID_FILE_TIMEOUT_S = 5.0


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
                pid = read_pid(node_dir / "run" / "qemu" / f"{dom.name()}.pid")
                if pid is None or not pid_matches(pid, "qemu"):
                    stale.append(dom.name())
            if not stale:
                return
            if time.monotonic() >= deadline:
                raise LabError(f"libvirtd at {uri} still reports dead guests {stale} as active")
            time.sleep(0.05)
    finally:
        conn.close()


# --------------------------------------------------------------------------
# public API


def start_node(
    root: Path,
    name: str,
    index: int,
    *,
    caps_cache: Path | None = DEFAULT_CAPS_CACHE,
    lockd: bool = True,
    tls_ca: str | None = None,
) -> LabNode:
    """Start (or find already running) lab node ``name`` under ``root``.

    ``index`` selects the node's migration port block; use a distinct index
    per node of one lab.  Idempotent: a running node is returned as is.
    When this call starts libvirtd it returns once the daemon answers on
    its socket and has settled the state of guests it remembers (after a
    crash: shut off).  ``caps_cache`` shares QEMU capability probes between
    nodes (``None``: every node probes QEMU itself, ~8 s each under TCG).
    ``lockd`` (on by default: the second line below fencing, docs/fencing.md)
    turns on libvirt's lockd lock manager: a ``virtlockd`` per node (in its
    namespace) with automatic disk leases in the indirect lockspace
    ``<root>/lockspace`` shared by all nodes.  Every node also gets vmha's
    libvirt qemu hook, watching the marker ``<node dir>/fenced``.  ``tls_ca`` names a CA of
    the lab (created under ``root`` on first use, :mod:`lab.pki`): the node gets
    certificates it signs, listens for libvirt peers over TLS on its own loopback
    address (:attr:`LabNode.address`) and its QEMU migrates over TLS; nodes of
    different CAs refuse each other.
    """
    if os.geteuid() != 0:
        raise LabError("lab nodes need root")
    root = Path(root).resolve()
    check_root(root)
    if not name or "/" in name or name.startswith("."):
        raise LabError(f"bad node name {name!r}")
    node_dir = root / name
    if len(str(node_dir / "run" / "libvirt-sock-admin")) > MAX_SOCKET_PATH:
        raise LabError(f"lab root {root} is too long for AF_UNIX socket paths")

    running = running_pid(node_dir)
    if running is not None and _socket_ready(node_dir / "run" / "libvirt-sock"):
        return make_node(root, name, index, running, tls_ca)
    if running is not None:
        # alive but not answering: give it a moment (e.g. still starting)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline and pid_alive(running):
            if _socket_ready(node_dir / "run" / "libvirt-sock"):
                return make_node(root, name, index, running, tls_ca)
            time.sleep(0.05)
        raise LabError(f"libvirtd {running} of node {name} does not answer")

    if not root.exists():
        root.mkdir(parents=True)
        (root / ROOT_MARKER).touch()  # destroy_lab removes only what it created
    ensure_qemu_user()
    for _, target in NODE_MOUNTS:
        Path(target).mkdir(parents=True, exist_ok=True)
    prepare_node_dir(node_dir, name, index, root, lockd, tls_ca)
    if tls_ca is not None:
        Path(PKI_ROOT).mkdir(parents=True, exist_ok=True)  # the mount point
    if caps_cache is not None:
        _seed_caps(node_dir, Path(caps_cache))
    pid_file = node_dir / "libvirtd.pid"
    pid_file.unlink(missing_ok=True)
    old_vl = virtlockd_pid(node_dir)
    if old_vl is not None:  # left over from a stop/crash of libvirtd alone
        send_signal(old_vl, signal.SIGKILL)
        wait_dead([old_vl], _STOP_TIMEOUT_S)
    (node_dir / "virtlockd.pid").unlink(missing_ok=True)

    script = namespace_script(node_dir, name, pid_file, lockd, tls=tls_ca is not None)
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
        pid = read_pid(pid_file) or pid
        if pid is not None and not pid_alive(pid):
            break
        if pid is None and time.monotonic() > started + _PID_FILE_TIMEOUT_S:
            break
        if pid is not None and _socket_ready(node_dir / "run" / "libvirt-sock"):
            node = make_node(root, name, index, pid, tls_ca)
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
        pid = read_pid(pid_file)
        if pid is not None and pid_matches(pid, "qemu"):
            result[pid_file.stem] = pid
    return result


def node_pids(node: LabNode) -> list[int]:
    """Live pids belonging to ``node``: libvirtd, its guests' QEMUs, the reaper."""
    pids: list[int] = []
    lv = running_pid(node.dir)
    if lv is not None:
        pids.append(lv)
    pids.extend(qemu_pids(node).values())
    vl = virtlockd_pid(node.dir)
    if vl is not None:
        pids.append(vl)
    reaper = reaper_pid(node.dir)
    if reaper is not None:
        pids.append(reaper)
    return pids


def _finish_reaper(reaper: int | None) -> list[int]:
    """The reaper exits once its children are gone; make sure it did."""
    if reaper is None:
        return []
    if wait_dead([reaper], _STOP_TIMEOUT_S) and REAPER in pid_cmdline(reaper):
        send_signal(reaper, signal.SIGKILL)
    return wait_dead([reaper], _STOP_TIMEOUT_S)


def _kill_virtlockd(node_dir: Path) -> list[int]:
    """SIGKILL the node's virtlockd (if ``lockd=True``), by pid; return survivors."""
    vl = virtlockd_pid(node_dir)
    if vl is None:
        return []
    send_signal(vl, signal.SIGKILL)
    return wait_dead([vl], _STOP_TIMEOUT_S)


def stop_node(node: LabNode) -> None:
    """Stop libvirtd of ``node`` and its guests' QEMU processes, by pid.

    The node's directory (configuration, persistent domain definitions)
    is kept, so :func:`start_node` brings the node back.
    """
    _stop_processes(node, graceful=True)


def crash_node(node: LabNode) -> None:
    """Simulate a host crash: SIGKILL libvirtd and all its guests' QEMUs."""
    _stop_processes(node, graceful=False)


def _stop_processes(node: LabNode, *, graceful: bool) -> None:
    """libvirtd first (SIGTERM then SIGKILL when ``graceful``, else SIGKILL), then QEMU."""
    guests = list(qemu_pids(node).values())
    reaper = reaper_pid(node.dir)
    lv = running_pid(node.dir)
    if lv is not None:
        if graceful:
            send_signal(lv, signal.SIGTERM)
            if wait_dead([lv], _STOP_TIMEOUT_S):
                send_signal(lv, signal.SIGKILL)
        else:
            send_signal(lv, signal.SIGKILL)
    for pid in guests:
        if pid_matches(pid, "qemu"):  # the pid may have been reaped and reused meanwhile
            send_signal(pid, signal.SIGKILL)
    leftover = wait_dead(([lv] if lv else []) + guests, _STOP_TIMEOUT_S)
    leftover += _kill_virtlockd(node.dir)
    leftover += _finish_reaper(reaper)
    node.pid = None
    if leftover:
        what = "did not die" if graceful else "survived SIGKILL"
        raise LabError(f"node {node.name}: processes {leftover} {what}")


def kill_libvirtd(node: LabNode) -> int | None:
    """SIGKILL only ``node``'s libvirtd (its guests' QEMUs keep running); return its pid.

    What a libvirtd crash looks like: a migration it takes part in fails, and
    :func:`start_node` brings a new libvirtd up that reconnects to the guests.
    """
    lv = running_pid(node.dir)
    if lv is None:
        return None
    send_signal(lv, signal.SIGKILL)
    if wait_dead([lv], _STOP_TIMEOUT_S):
        raise LabError(f"node {node.name}: libvirtd {lv} survived SIGKILL")
    node.pid = None
    return lv


def restart_node(
    node: LabNode, *, caps_cache: Path | None = DEFAULT_CAPS_CACHE, lockd: bool = True
) -> LabNode:
    """Start ``node`` again (after :func:`stop_node` or :func:`crash_node`)."""
    if running_pid(node.dir) is not None:
        stop_node(node)
    fresh = start_node(node.root, node.name, node.index, caps_cache=caps_cache, lockd=lockd,
                       tls_ca=node.tls_ca)
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
        nodes.append(make_node(root, name, index, running_pid(root / name)))
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
    if not any(node_pids(n) for n in lab_nodes(root)):
        for ca in lab_ca_dirs(root):
            shutil.rmtree(ca, ignore_errors=True)
    marker = root / ROOT_MARKER
    if marker.exists():
        marker.unlink()
        try:
            root.rmdir()
        except OSError:
            marker.touch()  # not empty: keep it marked as ours
    if errors:
        raise LabError("; ".join(errors))
