"""A local cluster on the lab: real etcd, lab libvirt nodes with QEMU, vmha daemons.

Like :class:`lab.localcluster.FakeCluster`, but every agent runs the real
hypervisor adapter (``--libvirt-uri``) against its own lab libvirtd (see
:mod:`lab`).  Root only.

:meth:`LabCluster.ground_truth` asks every lab libvirtd directly (libvirt-python,
``listAllDomains`` + ``isActive``), independent of vmha's own code paths.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt

from lab import (
    LabNode,
    crash_node,
    destroy_lab,
    kill_libvirtd,
    pid_alive,
    qemu_pids,
    restart_node,
    start_node,
)
from lab.configs import LAB_CONFIG
from lab.etcdpki import node_user, user
from lab.localcluster import (
    Daemon,
    EtcdCluster,
    guard_socket,
    poll_until,
    start_etcd,
    start_guard_service,
)
from lab.procs import kill_guards_under

if TYPE_CHECKING:
    from lab.etcdpki import EtcdPki
    from store.etcd import EtcdStore, TlsFiles

__all__ = ["LAB_CONFIG", "LabCluster", "child_pids", "kill_with_children"]


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler is set; we handle them."""


libvirt.registerErrorHandler(_quiet, None)

#: Pause reasons of a domain whose guest is in transit between nodes.
_TRANSIT_REASONS = frozenset({libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
                              libvirt.VIR_DOMAIN_PAUSED_STARTING_UP,
                              libvirt.VIR_DOMAIN_PAUSED_POSTCOPY})


def child_pids(pid: int) -> list[int]:
    """Live children of ``pid`` (e.g. the guard process an agent starts)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            data = stat.read_bytes()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] not in (b"Z", b"X"):
            out.append(int(stat.parent.name))
    return out


def kill_with_children(d: Daemon) -> None:
    """SIGKILL a daemon and the processes it started (an agent's guard), by pid."""
    if not d.alive():
        return
    kids = child_pids(d.pid)
    d.kill()
    for pid in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    poll_until(lambda: not any(pid_alive(pid) for pid in kids), 10)


@dataclass
class LabCluster:
    """etcd + lab libvirt nodes + one agent per node + orchestrators, as processes."""

    root: Path
    workdir: Path
    node_names: tuple[str, ...] = ("n1", "n2", "n3")
    prefix: str = "/vmha"
    agent_memory_mib: int = 1024
    agent_vcpus: int = 8
    #: etcd members (1 or 3) and where their data lives (default: a fresh dir on /dev/shm)
    etcd_members: int = 1
    etcd_dir: Path | None = None
    #: called after each process this cluster starts (``vmha lab up`` saves its state)
    on_change: Callable[[], None] | None = None
    etcd: EtcdCluster | None = None
    nodes: dict[str, LabNode] = field(default_factory=dict)
    agents: dict[str, Daemon] = field(default_factory=dict)
    orchestrators: dict[str, Daemon] = field(default_factory=dict)
    #: each node's guard as its own process (`vmha guard`, as vmha-guard.service runs
    #: it), started before the node's agent and outliving it
    guard_service: bool = False
    guards: dict[str, Daemon] = field(default_factory=dict)
    guard_extra: tuple[str, ...] = ()  # more options of each guard service
    #: TLS variant (lab.pki): every node gets certificates of the lab's CA ("lab"), a
    #: libvirtd TLS listener and QEMU migration TLS on its own loopback address; give
    #: the cluster config `migration_tls` to use it.  `tls_ca_of` signs some nodes by
    #: another CA instead (name -> CA name): the others do not trust them.
    tls: bool = False
    tls_ca_of: dict[str, str] = field(default_factory=dict)
    #: etcd with auth on (docs/keyspace-v2.md, section 5): TLS with client certificates
    #: of the lab's etcd CA (lab.etcdpki), the cluster on keyspace 2 (the marker written
    #: before any daemon starts) and `vmha auth setup` run as root; each agent and guard
    #: logs in as its node's user, each orchestrator as `orchestrator`.  Off: keyspace 1
    #: on plain etcd, as the lab tests and benchmarks written for it expect (they read
    #: keyspace 1's keys); `vmha lab up` and the demo turn it on (`up --no-auth`: off).
    auth: bool = False
    _conns: dict[str, libvirt.virConnect] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- life cycle ----------------------------------------------------------------------

    def start(self, config_json: str | None = None, orchestrators: int = 2) -> LabCluster:
        """Start etcd, the lab nodes, (write ``config_json``), agents and orchestrators."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.etcd = start_etcd(self.etcd_members, self.etcd_dir,
                                   tls=self.pki.server(["127.0.0.1"]) if self.pki else None)
            self._changed()
            for index, name in enumerate(self.node_names):
                self.nodes[name] = start_node(self.root, name, index,
                                              tls_ca=self.tls_ca(name))
                self._changed()
            if config_json is not None:
                store = self.store()
                try:
                    store.put(f"{self.prefix}/config", config_json)
                finally:
                    store.close()
            if self.auth:
                self.setup_auth()
            for name in self.node_names:
                self.start_agent(name)
            for i in range(1, orchestrators + 1):
                self.start_orchestrator(f"o{i}")
        except BaseException:
            self.stop()
            raise
        return self

    # ---- etcd auth ---------------------------------------------------------------------

    @property
    def pki(self) -> EtcdPki | None:
        """The lab's etcd CA (None: etcd without TLS or auth)."""
        from lab.etcdpki import EtcdPki

        return EtcdPki(self.root) if self.auth else None

    def credential(self, user: str) -> TlsFiles | None:
        """The TLS files etcd user ``user`` logs in with (None without auth)."""
        return self.pki.client(user) if self.pki else None

    def store(self, user: str = "root") -> EtcdStore:
        """A store on the lab's etcd as ``user`` (the caller closes it)."""
        from store.etcd import EtcdStore

        return EtcdStore(self.endpoints, tls=self.credential(user))

    def setup_auth(self) -> None:
        """Keyspace 2 and `vmha auth setup` as root for every node (lab.labauth)."""
        from lab.labauth import enable_auth

        assert self.pki is not None
        enable_auth(self.endpoints, self.prefix, self.pki, self.node_names,
                    self.workdir / "auth-setup.log")

    def tls_ca(self, name: str) -> str | None:
        """The CA that signs node ``name`` (None: the plain, TLS-less variant)."""
        return self.tls_ca_of.get(name, "lab") if self.tls else None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    @property
    def endpoints(self) -> str:
        assert self.etcd is not None
        return self.etcd.endpoints

    def common(self, user: str = "root") -> list[str]:
        """``vmha``'s global options for the lab's etcd, logged in as ``user`` with auth."""
        from lab.etcdpki import cli_flags

        tls = self.credential(user)
        return ["--etcd", self.endpoints, "--prefix", self.prefix,
                *(cli_flags(tls) if tls else [])]

    def guard_socket(self, name: str) -> Path:
        return guard_socket(self.workdir, name)

    def start_guard(self, name: str) -> Daemon:
        """Start node ``name``'s guard service unless it runs; wait for its socket."""
        node = self.nodes[name]
        d = start_guard_service(self.guards, self.workdir, name,
                                ["--libvirt-uri", node.uri,
                                 "--fenced-marker", str(node.fenced_marker)],
                                tuple(self.common(node_user(name, self.prefix))), self.guard_extra)
        self._changed()
        return d

    def start_agent(self, name: str) -> Daemon:
        """Start (or start again) the agent of lab node ``name``; its log is appended to."""
        node = self.nodes[name]
        extra: list[str] = []
        if self.guard_service:
            self.start_guard(name)
            extra = ["--guard-socket", str(self.guard_socket(name))]
        d = Daemon(name, [*self.common(node_user(name, self.prefix)), "agent", "--name", name,
                          "--libvirt-uri", node.uri,
                          "--memory-mib", str(self.agent_memory_mib), "--vcpus",
                          str(self.agent_vcpus), "--migration-address", node.address,
                          "--fenced-marker", str(node.fenced_marker),
                          "--log-format", "json", *extra], self.workdir / f"agent-{name}.log")
        self.agents[name] = d.start()
        self._changed()
        return d

    def start_orchestrator(self, name: str) -> Daemon:
        d = Daemon(name, [*self.common(user("orchestrator", self.prefix)), "orchestrator",
                          "--name", name, "--log-format", "json"],
                   self.workdir / f"orch-{name}.log")
        self.orchestrators[name] = d.start()
        self._changed()
        return d

    def crash_node(self, name: str) -> None:
        """SIGKILL the node's libvirtd and guests (its agent is left alone)."""
        self._drop_conn(name)
        crash_node(self.nodes[name])

    def crash_host(self, name: str) -> None:
        """A host crash: kill -9 the node's agent (and its guard), libvirtd and guests."""
        for daemons in (self.agents, self.guards):
            if name in daemons:
                kill_with_children(daemons[name])
        self.crash_node(name)

    def kill_libvirtd(self, name: str) -> int | None:
        """SIGKILL only the node's libvirtd (guests and agent keep running)."""
        self._drop_conn(name)
        return kill_libvirtd(self.nodes[name])

    def start_libvirtd(self, name: str) -> LabNode:
        """Start the node's libvirtd again after :meth:`kill_libvirtd` (guests kept)."""
        self._drop_conn(name)
        node = self.nodes[name]
        self.nodes[name] = start_node(node.root, node.name, node.index, tls_ca=node.tls_ca)
        return self.nodes[name]

    def restart_node(self, name: str) -> LabNode:
        self._drop_conn(name)
        self.nodes[name] = restart_node(self.nodes[name])
        return self.nodes[name]

    def stop(self) -> None:
        """Kill every daemon by pid, then tear the lab and etcd down."""
        for d in [*self.agents.values(), *self.orchestrators.values(), *self.guards.values()]:
            with contextlib.suppress(Exception):  # tear-down goes on regardless
                kill_with_children(d)
        # A guard that fired destroys until its node registers again: one whose agent
        # was killed earlier outlives it.
        kill_guards_under(self.root)
        with self._lock:
            for conn in self._conns.values():
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
            self._conns.clear()
        try:
            destroy_lab(self.root)
        finally:
            if self.etcd is not None:
                self.etcd.stop()

    # ---- ground truth --------------------------------------------------------------------

    def _drop_conn(self, name: str) -> None:
        with self._lock:
            conn = self._conns.pop(name, None)
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _conn(self, name: str) -> libvirt.virConnect | None:
        with self._lock:
            conn = self._conns.get(name)
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except libvirt.libvirtError:
                    pass
                self._conns.pop(name, None)
            try:
                conn = libvirt.open(self.nodes[name].uri)
            except libvirt.libvirtError:
                return None  # libvirtd down (crashed node): it runs nothing
            self._conns[name] = conn
            return conn

    def node_domains(self, name: str) -> dict[str, str]:
        """Every domain libvirt of node ``name`` lists: ``running``, ``migrating`` or
        ``inactive``.  Active counts only if the domain's QEMU process (pid file of
        the node, checked by :func:`lab.qemu_pids`) is alive, too.

        ``migrating`` is an active domain whose CPUs are paused for a live migration
        (the destination while the memory streams in, the source during the switch-over)
        or while it starts up: its guest executes nowhere else but not here either.
        """
        conn = self._conn(name)
        if conn is None:
            return {}
        out: dict[str, str] = {}
        qemu = qemu_pids(self.nodes[name])
        try:
            for dom in conn.listAllDomains(0):
                try:
                    if not dom.isActive():
                        out[dom.name()] = "inactive"
                        continue
                    state, reason = dom.state()
                    if dom.name() not in qemu:
                        # A restarted libvirtd reports guests from its status files as
                        # running until it notices their QEMU is gone: no QEMU, no guest.
                        qemu = qemu_pids(self.nodes[name])
                        if dom.name() not in qemu:
                            out[dom.name()] = "inactive"
                            continue
                    out[dom.name()] = ("migrating" if state == libvirt.VIR_DOMAIN_PAUSED
                                       and reason in _TRANSIT_REASONS else "running")
                except libvirt.libvirtError:
                    continue  # vanished between list and query (migrated away)
        except libvirt.libvirtError:
            self._drop_conn(name)
            return {}
        return out

    def ground_truth(self, include_migrating: bool = False) -> dict[str, list[str]]:
        """VM name -> lab nodes whose libvirtd reports it active (and its QEMU runs).

        Domains paused for a live migration (see :meth:`node_domains`) count only with
        ``include_migrating``.
        """
        truth: dict[str, list[str]] = {}
        for name in self.node_names:
            for vm, state in self.node_domains(name).items():
                if state == "running" or (include_migrating and state == "migrating"):
                    truth.setdefault(vm, []).append(name)
        return {vm: sorted(nodes) for vm, nodes in sorted(truth.items())}
