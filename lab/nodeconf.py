"""Layout and configuration of one lab node (see :mod:`lab.nodes` for its life cycle).

Each node is one root ``libvirtd`` (monolithic daemon) running in its own
mount + UTS namespace.  Inside that namespace the node's own directories are
bind-mounted over the well-known libvirt paths::

    <node dir>/etc    -> /etc/libvirt        (libvirtd.conf, qemu.conf, domain XML)
    <node dir>/run    -> /run/libvirt        (sockets, qemu pid/status files)
    <node dir>/lib    -> /var/lib/libvirt
    <node dir>/cache  -> /var/cache/libvirt
    <node dir>/log    -> /var/log/libvirt

This module writes those directories and configuration files, the shell script that
sets the namespace up and execs libvirtd under a reaper, and reads the pid files the
node's processes write.
"""

from __future__ import annotations

import pwd
import shlex
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lab import pki
from lab.artifacts import DEFAULT_CACHE
from lab.procs import pid_alive, pid_cmdline, pid_matches, read_pid

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

#: TLS lab nodes listen on their own loopback address, node index i on ``TLS_NET + i+1``
#: (libvirtd's TLS port 16514 on each): certificates name it, peers dial it.
TLS_NET = "127.77.0."
#: Where libvirt and QEMU look for certificates (the node's ``pki`` dir is mounted there).
PKI_ROOT = "/etc/pki"
QEMU_PKI_DIR = "/etc/pki/qemu"
#: vmha's libvirt qemu hook, installed into every node's /etc/libvirt/hooks: it
#: refuses to start or receive domains while the node's fenced marker exists.
HOOK_SOURCE = Path(__file__).resolve().parents[1] / "deploy" / "libvirt" / "hooks" / "qemu"
FENCED_MARKER = "fenced"

#: Longest AF_UNIX path (sun_path is 108 bytes including the NUL).
MAX_SOCKET_PATH = 107

FORBIDDEN_ROOTS = tuple(Path(p) for _, p in NODE_MOUNTS)


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
    #: TLS variant: the CA (directory name under the lab root) that signs this node's
    #: certificates; None: no TLS listener, plain 127.0.0.1 migrations.
    tls_ca: str | None = None

    @property
    def address(self) -> str:
        """Where peers reach this node (libvirtd's TLS listener, migration streams)."""
        return tls_address(self.index) if self.tls_ca else "127.0.0.1"

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
    def fenced_marker(self) -> Path:
        """The node's fenced marker (fencing.marker), as its agent, its guard and its
        libvirtd's qemu hook see it (the node directory is the same path inside and
        outside the node's namespace)."""
        return self.dir / FENCED_MARKER

    @property
    def log_file(self) -> Path:
        return self.dir / "log" / "libvirtd.log"

    @property
    def host_uuid(self) -> str:
        return node_host_uuid(self.root, self.name)


# --------------------------------------------------------------------------
# configuration


def node_host_uuid(root: Path, name: str) -> str:
    """Stable, per-node host UUID (libvirt refuses to migrate between equal ones)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"vmha-lab:{root.resolve()}:{name}"))


def node_hostname(name: str) -> str:
    """UTS host name of a node (resolvable inside the node only)."""
    return f"vmha-lab-{name}"


def tls_address(index: int) -> str:
    return f"{TLS_NET}{index + 1}"


def migration_port_range(index: int) -> tuple[int, int]:
    low = MIGRATION_PORT_BASE + index * MIGRATION_PORTS_PER_NODE
    return low, low + MIGRATION_PORTS_PER_NODE - 1


def node_uri(node_dir: Path) -> str:
    return f"qemu+unix:///system?socket={node_dir / 'run' / 'libvirt-sock'}"


def _tls_listen_conf(address: str | None, allowed_dn: str) -> list[str]:
    if address is None:
        return ["listen_tls = 0"]
    # A peer must present a certificate of the lab's CA whose subject matches.
    return [
        "listen_tls = 1",
        f'listen_addr = "{address}"',
        'auth_tls = "none"',
        "tls_no_verify_certificate = 0",
        "tls_no_sanity_certificate = 0",
        f'tls_allowed_dn_list = ["{allowed_dn}"]',
    ]


def _libvirtd_conf(host_uuid: str, tls_address_: str | None = None,
                   allowed_dn: str = "") -> str:
    return "\n".join(
        [
            "# generated by vmha lab (lab/nodeconf.py)",
            *_tls_listen_conf(tls_address_, allowed_dn),
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


def _qemu_tls_conf() -> list[str]:
    # QEMU's native TLS for migration streams, both ends checking the peer's certificate.
    return [
        f'default_tls_x509_cert_dir = "{QEMU_PKI_DIR}"',
        "default_tls_x509_verify = 1",
        f'migrate_tls_x509_cert_dir = "{QEMU_PKI_DIR}"',
        "migrate_tls_x509_verify = 1",
    ]


def _qemu_conf(ports: tuple[int, int], lockd: bool = False, tls: bool = False) -> str:
    return "\n".join(
        [
            "# generated by vmha lab (lab/nodeconf.py)",
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
            *(_qemu_tls_conf() if tls else []),
            "",
        ]
    )


def _qemu_lockd_conf(lockspace: Path) -> str:
    return "\n".join(
        [
            "# generated by vmha lab (lab/nodeconf.py)",
            "auto_disk_leases = 1",
            f'file_lockspace_dir = "{lockspace}"',
            "",
        ]
    )


def _virtlockd_conf() -> str:
    return "\n".join(
        [
            "# generated by vmha lab (lab/nodeconf.py)",
            "log_level = 3",
            'log_outputs = "3:file:/var/log/libvirt/virtlockd.log"',
            "",
        ]
    )


def ensure_qemu_user() -> None:
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


def check_root(root: Path) -> None:
    for forbidden in FORBIDDEN_ROOTS:
        if root == forbidden or forbidden in root.parents:
            raise LabError(f"lab root {root} must not lie under {forbidden}")


def prepare_node_dir(
    node_dir: Path, name: str, index: int, root: Path, lockd: bool = False,
    tls_ca: str | None = None,
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
    address = tls_address(index) if tls_ca else None
    (etc / "libvirtd.conf").write_text(
        _libvirtd_conf(node_host_uuid(root, name), address, pki.ALLOWED_DN))
    (etc / "qemu.conf").write_text(_qemu_conf(migration_port_range(index), lockd,
                                              tls=tls_ca is not None))
    if tls_ca is not None and address is not None:
        ca = pki.ca_dir(root, tls_ca)
        pki.ensure_ca(ca, f"vmha lab CA {tls_ca}")
        pki.install_node_pki(node_dir / "pki", ca, name, address, node_hostname(name))
    install_hook(etc, node_dir / FENCED_MARKER)
    if lockd:
        lockspace = root / LOCKSPACE_DIR
        lockspace.mkdir(exist_ok=True)
        (etc / "qemu-lockd.conf").write_text(_qemu_lockd_conf(lockspace))
        (etc / "virtlockd.conf").write_text(_virtlockd_conf())


def install_hook(etc: Path, marker: Path) -> None:
    """The operator guide's install step, for one node: the hook as
    ``/etc/libvirt/hooks/qemu`` (libvirtd looks for hooks only when it starts) and
    ``vmha-hook.conf`` naming the node's own marker (/run is the host's, shared by
    every lab node)."""
    if not HOOK_SOURCE.is_file():
        raise LabError(f"libvirt hook {HOOK_SOURCE} is missing (the lab runs from a "
                       "source checkout)")
    hooks = etc / "hooks"
    hooks.mkdir(exist_ok=True)
    shutil.copyfile(HOOK_SOURCE, hooks / "qemu")
    (hooks / "qemu").chmod(0o755)
    (hooks / "vmha-hook.conf").write_text(f"fenced_marker={marker}\n")


#: Runs inside the node's namespaces: detaches, becomes a child subreaper,
#: runs libvirtd in the foreground and reaps it and every QEMU it
#: daemonizes (they re-parent here instead of to pid 1).  libvirt waits for
#: a killed QEMU's pid to vanish, so prompt reaping matters when pid 1 is
#: slow to reap (as in some containers/micro-VMs): it saves ~1.5 s per
#: migration or destroy there.  Exits when no child is left.
REAPER = """
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


def namespace_script(node_dir: Path, name: str, pid_file: Path, lockd: bool = False,
                     tls: bool = False) -> str:
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
    if tls:
        lines.append(f"mount --bind {shlex.quote(str(node_dir / 'pki'))} {PKI_ROOT}")
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
        REAPER,
        str(node_dir / "reaper.pid"),
        LIBVIRTD,
        "-f",
        str(node_dir / "etc" / "libvirtd.conf"),
        "--pid-file",
        str(pid_file),
        # without socket activation libvirtd opens its TLS listener only when told to
        *(["--listen"] if tls else []),
    ]
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# nodes and the pid files of their processes


def make_node(root: Path, name: str, index: int, pid: int | None,
              tls_ca: str | None = None) -> LabNode:
    node_dir = root / name
    return LabNode(
        name=name,
        dir=node_dir,
        uri=node_uri(node_dir),
        migration_port_range=migration_port_range(index),
        pid=pid,
        index=index,
        root=root,
        tls_ca=tls_ca,
    )


def reaper_pid(node_dir: Path) -> int | None:
    pid = read_pid(node_dir / "reaper.pid")
    if pid is not None and pid_alive(pid) and REAPER in pid_cmdline(pid):
        return pid
    return None


def virtlockd_pid(node_dir: Path) -> int | None:
    pid = read_pid(node_dir / "virtlockd.pid")
    if pid is not None and pid_matches(pid, "virtlockd"):
        return pid
    return None


def running_pid(node_dir: Path) -> int | None:
    pid = read_pid(node_dir / "libvirtd.pid")
    if pid is not None and pid_matches(pid, "libvirtd"):
        return pid
    return None
