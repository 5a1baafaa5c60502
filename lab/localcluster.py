"""A local cluster: real etcd servers and vmha daemons as processes.

Used by the demo, the benchmarks and the tests.

etcd runs as Debian's `etcd` binary on free loopback ports with its data on
/dev/shm; nothing here mocks it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from lab.procs import kill_guards_under

if TYPE_CHECKING:
    from lab.etcdpki import EtcdPki
    from schemas.acl import RoleKind
    from store.etcd import EtcdStore, TlsFiles

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
T = TypeVar("T")


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _poll(pred: Callable[[], T], timeout: float, interval: float) -> tuple[bool, T]:
    deadline = time.monotonic() + timeout
    while True:
        last = pred()
        if last or time.monotonic() >= deadline:
            return bool(last), last
        time.sleep(interval)


def poll_until(pred: Callable[[], T], timeout: float, interval: float = 0.05) -> T | None:
    """Call ``pred`` every ``interval`` s until it returns something true, and return
    that; ``None`` once ``timeout`` s have passed.  The one polling loop of the lab, the
    benchmarks, the scripts and the tests (a timeout here is an outcome, not an error)."""
    ok, last = _poll(pred, timeout, interval)
    return last if ok else None


def wait_until(pred: Callable[[], T], timeout: float, interval: float = 0.05,
               what: str = "condition") -> T:
    """:func:`poll_until`, where a timeout is an error (``TimeoutError`` naming ``what``
    and the last value ``pred`` returned)."""
    ok, last = _poll(pred, timeout, interval)
    if not ok:
        raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
    return last


@dataclass(frozen=True)
class EtcdServerTls:
    """etcd serving clients TLS only, each with a certificate of ``cacert``'s CA
    (``--client-cert-auth``: with auth on, its CN is the etcd user); ``probe`` is the
    client credential the readiness check uses (lab.etcdpki makes all of them)."""

    cacert: str
    cert: str
    key: str
    probe: TlsFiles


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    # Where the member listens, and the network namespace it runs in (lab.etcdnet);
    # by default loopback in this process's namespace.
    host: str = "127.0.0.1"
    netns: str | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


@dataclass
class EtcdCluster:
    members: list[EtcdMember]
    base: Path
    _state: str = "new"
    tls: EtcdServerTls | None = None

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start_member(self, m: EtcdMember) -> None:
        m.data_dir.mkdir(parents=True, exist_ok=True)
        scheme = "https" if self.tls else "http"
        cmd = [ETCD_BIN, "--name", m.name, "--data-dir", str(m.data_dir),
               "--listen-client-urls", f"{scheme}://{m.endpoint}",
               "--advertise-client-urls", f"{scheme}://{m.endpoint}",
               "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
               "--initial-cluster", self._initial_cluster(),
               "--initial-cluster-state", "new", "--initial-cluster-token", self.base.name,
               "--heartbeat-interval", "50", "--election-timeout", "500",
               # A member that rejoins (restart, end of a stall) must not force an
               # election with its higher term: pre-vote is etcd 3.5's default, off in
               # 3.4 (docs/fencing.md, "etcd settings").
               "--pre-vote",
               "--log-level", "warn", "--logger", "zap"]
        if self.tls is not None:
            cmd += ["--cert-file", self.tls.cert, "--key-file", self.tls.key,
                    "--trusted-ca-file", self.tls.cacert, "--client-cert-auth"]
        if m.netns is not None:  # `ip netns exec` execs etcd: m.proc is etcd itself
            cmd = ["ip", "netns", "exec", m.netns, *cmd]
        log = open(m.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        m.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def wait_ready(self, timeout: float = 15.0) -> None:
        from store.etcd import EtcdStore, StoreUnavailable

        store = EtcdStore(self.endpoints, retry_budget=0.5,
                          tls=self.tls.probe if self.tls else None)

        def ready() -> bool:
            try:
                store.revision()
                return True
            except StoreUnavailable:
                return False

        try:
            wait_until(ready, timeout, 0.05, "etcd ready")
        finally:
            store.close()

    def kill_member(self, m: EtcdMember, sig: int = signal.SIGKILL) -> None:
        if m.proc and m.proc.poll() is None:
            m.proc.send_signal(sig)
            m.proc.wait(10)

    def restart_member(self, m: EtcdMember) -> None:
        self.kill_member(m)
        self.start_member(m)

    def stop(self) -> None:
        for m in self.members:
            self.kill_member(m)
        shutil.rmtree(self.base, ignore_errors=True)


def start_etcd(members: int = 1, base: Path | None = None,
               places: list[tuple[str, str]] | None = None,
               tls: EtcdServerTls | None = None) -> EtcdCluster:
    """``places``: each member's (address, network namespace), one namespace each, where
    it listens on etcd's usual ports; by default free loopback ports here.  ``tls``:
    clients speak TLS with a client certificate (peers stay plain, on loopback)."""
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    base = base or Path(tempfile.mkdtemp(prefix="vmha-etcd-", dir=shm))
    ports = free_ports(2 * members) if places is None else [2379, 2380] * members
    ms = [EtcdMember(f"m{i}", ports[2 * i], ports[2 * i + 1], base / f"m{i}",
                     base / f"m{i}.log") for i in range(members)]
    for m, (host, netns) in zip(ms, places or [], strict=False):
        m.host, m.netns = host, netns
    cluster = EtcdCluster(ms, base, tls=tls)
    try:
        for m in ms:
            cluster.start_member(m)
        cluster.wait_ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class Daemon:
    name: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "vmha", *self.args],
                                     stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def guard_socket(workdir: Path, name: str) -> Path:
    return workdir / f"guard-{name}.sock"


def start_guard_service(guards: dict[str, Daemon], workdir: Path, name: str,
                        hypervisor_args: list[str], etcd_args: tuple[str, ...] = (),
                        extra: tuple[str, ...] = ()) -> Daemon:
    """Start node ``name``'s guard as its own process (`vmha guard`, as the
    vmha-guard unit runs it) unless it runs; wait for its socket."""
    running = guards.get(name)
    if running is not None and running.alive():
        return running
    sock = guard_socket(workdir, name)
    sock.unlink(missing_ok=True)
    # With etcd options (as vmha-guard.service has them) it holds the lease for a
    # restarting agent (fencing.lease_hold).
    hold = ["--hold-lease"] if etcd_args else []
    d = Daemon(f"guard-{name}", [*etcd_args, "guard", *hypervisor_args, "--socket", str(sock),
                                 *hold, "--log-format", "json", *extra],
               workdir / f"guard-{name}.log")
    guards[name] = d.start()
    wait_until(lambda: sock.exists() or not d.alive(), 15, what=f"guard of {name} up")
    return d


@dataclass
class FakeCluster:
    """etcd + agents on the fake hypervisor + orchestrators, as separate processes."""

    etcd: EtcdCluster
    workdir: Path
    prefix: str = "/vmha"
    agents: dict[str, Daemon] = field(default_factory=dict)
    orchestrators: dict[str, Daemon] = field(default_factory=dict)
    # Each node's guard as its own process (`vmha guard`, as vmha-guard.service runs
    # it), started before the node's agent and outliving it; else each agent starts
    # its own guard.
    guard_service: bool = False
    guards: dict[str, Daemon] = field(default_factory=dict)
    guard_extra: tuple[str, ...] = ()  # more options of each guard service
    #: etcd with auth on (lab.labauth): each daemon logs in with its certificate of this
    #: CA, agents and guards as their node's user, orchestrators as `orchestrator`
    pki: EtcdPki | None = None

    @property
    def fake_root(self) -> Path:
        return self.workdir / "hv"

    def common(self) -> list[str]:
        return ["--etcd", self.etcd.endpoints, "--prefix", self.prefix]

    def common_as(self, user: str) -> list[str]:
        """:meth:`common`, logged in as etcd user ``user`` when auth is on."""
        if self.pki is None:
            return self.common()
        from lab.etcdpki import cli_flags

        return [*self.common(), *cli_flags(self.pki.client(user))]

    def user(self, kind: RoleKind, node: str = "") -> str:
        """The etcd user of role ``kind`` (lab.etcdpki.user) on this cluster's prefix."""
        from lab.etcdpki import user

        return user(kind, self.prefix, node)

    def guard_socket(self, name: str) -> Path:
        return guard_socket(self.workdir, name)

    def start_guard(self, name: str) -> Daemon:
        """Start node ``name``'s guard service unless it runs; wait for its socket."""
        return start_guard_service(self.guards, self.workdir, name,
                                   ["--fake-root", str(self.fake_root), "--name", name],
                                   tuple(self.common_as(self.user("node", name))), self.guard_extra)

    def start_agent(self, name: str, memory_mib: int = 4096, vcpus: int = 8,
                    migrate_seconds: float = 0.2, extra: tuple[str, ...] = ()) -> Daemon:
        if self.guard_service:
            self.start_guard(name)
            extra = ("--guard-socket", str(self.guard_socket(name)), *extra)
        d = Daemon(name, [*self.common_as(self.user("node", name)), "agent", "--name", name,
                          "--fake-root", str(self.fake_root), "--memory-mib", str(memory_mib),
                          "--vcpus", str(vcpus), "--fake-migrate-seconds", str(migrate_seconds),
                          "--log-format", "json", *extra], self.workdir / f"agent-{name}.log")
        self.agents[name] = d.start()
        return d

    def start_orchestrator(self, name: str, extra: tuple[str, ...] = ()) -> Daemon:
        d = Daemon(name, [*self.common_as(self.user("orchestrator")), "orchestrator", "--name",
                          name, "--log-format", "json", *extra],
                   self.workdir / f"orch-{name}.log")
        self.orchestrators[name] = d.start()
        return d

    def stop(self) -> None:
        for d in [*self.agents.values(), *self.orchestrators.values(), *self.guards.values()]:
            d.kill()
        # The agents' own guards: armed ones would fire and destroy until a registration
        # that never comes.
        kill_guards_under(self.fake_root)
        # The fake's guests are processes of their own that outlive every daemon.
        from hypervisor.fake import kill_guests

        kill_guests(self.fake_root)


@contextlib.contextmanager
def running_fake_cluster(config_json: str, workdir: Path,
                         orchestrators: tuple[str, ...] = ("o1", "o2"),
                         nodes: tuple[str, ...] = ("n1", "n2", "n3"),
                         migrate_seconds: float = 0.2) -> Iterator[tuple[FakeCluster, EtcdStore]]:
    """A one-member etcd with ``config_json`` as the cluster config, an agent per node on
    the fake hypervisor and the orchestrators; yields the cluster and a store on its
    etcd, and stops all of it (``workdir`` stays)."""
    from store.etcd import EtcdStore

    etcd = start_etcd(1)
    fc = FakeCluster(etcd, workdir)
    store = EtcdStore(etcd.endpoints)
    try:
        store.put(f"{fc.prefix}/config", config_json)
        for n in nodes:
            fc.start_agent(n, migrate_seconds=migrate_seconds)
        for o in orchestrators:
            fc.start_orchestrator(o)
        yield fc, store
    finally:
        fc.stop()
        store.close()
        etcd.stop()
