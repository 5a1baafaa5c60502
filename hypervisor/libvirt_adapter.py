"""The real hypervisor: libvirt through libvirt-python.

Transient failures (the daemon restarting, a dropped connection) are retried with
tenacity after reconnecting and surface as HypervisorUnavailable once the attempts are
spent; a refusal surfaces as HypervisorRefused.
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt
import structlog
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from hypervisor.base import (
    Domain,
    DomainState,
    HypervisorError,
    HypervisorRefused,
    HypervisorUnavailable,
    MigrationStats,
    is_managed,
    mark_managed,
)

log = structlog.get_logger("vmha.libvirt")

R = TypeVar("R")

_STATES: dict[int, DomainState] = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}

_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_INTERNAL_ERROR,
}

MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


def peer_uri(target_uri: str, target_address: str, tls: bool) -> str:
    """The URI the source libvirtd dials for a peer-to-peer migration.  With TLS it is
    the destination's libvirtd over `qemu+tls`, named by the address its certificate
    carries (docs/operator-guide.md, "Encrypted migration"), unless the destination
    registered a `qemu+tls` URI itself."""
    if not tls or target_uri.startswith("qemu+tls://"):
        return target_uri
    host = f"[{target_address}]" if ":" in target_address else target_address
    return f"qemu+tls://{host}/system"


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler is set; we raise them instead."""


libvirt.registerErrorHandler(_quiet, None)


def _with_uuid(xml: str, uuid: str) -> str:
    """Redefining a domain without a <uuid> would mint a new one, which libvirt refuses
    for a name it already knows: keep the existing one."""
    root = ET.fromstring(xml)
    if root.find("uuid") is None:
        el = ET.Element("uuid")
        el.text = uuid
        root.insert(1, el)
    return ET.tostring(root, encoding="unicode")


def _incoming_job_active(dom: libvirt.virDomain) -> bool:
    """True while the destination still finishes an incoming migration.  libvirt resumes
    the guest before it ends the migration job, and the completed job's statistics
    (downtime, total time) exist only after that: a report in between would carry none.
    While that job runs, libvirt refuses job statistics with OPERATION_UNSUPPORTED."""
    try:
        dom.jobStats(0)
    except libvirt.libvirtError as exc:
        return bool(exc.get_error_code() == libvirt.VIR_ERR_OPERATION_UNSUPPORTED)
    return False


def _start_fresh(dom: libvirt.virDomain, name: str, uri: str) -> None:
    """Start `dom` from scratch, never from a managed-save image: libvirt-guests saves
    guests that way on host shutdown, and a plain create() restores that RAM over a disk
    that another node may have written since.  The image is removed first (and said so),
    then the start asks for a fresh boot as well.  A driver that does not know the flag
    (libvirt's test driver) gets a plain create(), which has nothing left to restore."""
    if dom.hasManagedSaveImage(0):
        dom.managedSaveRemove(0)
        log.warning("managed_save_removed", vm=name, uri=uri,
                    reason="boot from scratch, never from a saved memory image")
    try:
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_FORCE_BOOT)
    except libvirt.libvirtError as exc:
        if (exc.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG,
                                         libvirt.VIR_ERR_NO_SUPPORT)
                or dom.hasManagedSaveImage(0)):
            raise
        dom.create()


def _is_transient(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() in _CONNECTION_ERRORS and exc.get_error_domain() in (
        libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_NONE)


class LibvirtHypervisor:
    def __init__(self, uri: str, memory_mib: int | None = None, vcpus: int | None = None) -> None:
        self.uri = uri
        self._lock = threading.RLock()
        self._conn: libvirt.virConnect | None = None
        self._memory = memory_mib
        self._vcpus = vcpus
        self._connect()

    def _connect(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._conn = None
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorUnavailable(f"cannot connect to {self.uri}: {exc}") from exc
            return self._conn

    def _do(self, what: str, fn: Callable[[libvirt.virConnect], R]) -> R:
        @retry(retry=retry_if_exception_type(HypervisorUnavailable),
               stop=stop_after_attempt(3),
               wait=wait_random_exponential(multiplier=0.1, max=1.0), reraise=True)
        def attempt() -> R:
            conn = self._connect()
            try:
                return fn(conn)
            except libvirt.libvirtError as exc:
                if _is_transient(exc):
                    with self._lock:
                        self._conn = None
                    raise HypervisorUnavailable(f"{what} on {self.uri}: {exc}") from exc
                raise HypervisorRefused(f"{what} on {self.uri}: {exc}") from exc

        return attempt()

    def _lookup(self, conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def list_domains(self) -> dict[str, Domain]:
        def run(conn: libvirt.virConnect) -> dict[str, Domain]:
            out = {}
            for dom in conn.listAllDomains(0):
                try:
                    state, reason = dom.state()
                    managed = is_managed(dom.XMLDesc(0))
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # vanished between list and lookup (migrated away)
                    raise
                incoming = ((state == libvirt.VIR_DOMAIN_PAUSED
                             and reason in (libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
                                            libvirt.VIR_DOMAIN_PAUSED_STARTING_UP,
                                            libvirt.VIR_DOMAIN_PAUSED_POSTCOPY))
                            or (state == libvirt.VIR_DOMAIN_RUNNING
                                and reason == libvirt.VIR_DOMAIN_RUNNING_MIGRATED
                                and _incoming_job_active(dom)))
                mapped = _STATES.get(state, "other")
                if (state == libvirt.VIR_DOMAIN_SHUTOFF
                        and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED):
                    mapped = "crashed"  # QEMU died (kill -9, OOM): not a destroy or poweroff
                out[dom.name()] = Domain(dom.name(), mapped, managed, incoming)
            return out
        return self._do("list domains", run)

    def boot(self, name: str, xml: str) -> None:
        def run(conn: libvirt.virConnect) -> None:
            dom = self._lookup(conn, name)
            if dom is not None and dom.isActive():
                return
            xml_ = _with_uuid(xml, dom.UUIDString()) if dom is not None else xml
            dom = conn.defineXML(mark_managed(xml_))
            _start_fresh(dom, name, self.uri)
        self._do(f"boot {name}", run)

    def shutdown(self, name: str) -> None:
        def run(conn: libvirt.virConnect) -> None:
            dom = self._lookup(conn, name)
            if dom is not None and dom.isActive():
                dom.shutdown()
        self._do(f"shutdown {name}", run)

    def destroy(self, name: str) -> None:
        def run(conn: libvirt.virConnect) -> None:
            dom = self._lookup(conn, name)
            if dom is None:
                return
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise
        self._do(f"destroy {name}", run)

    def undefine(self, name: str) -> None:
        def run(conn: libvirt.virConnect) -> None:
            dom = self._lookup(conn, name)
            if dom is None:
                return
            if dom.isActive():
                raise HypervisorRefused(f"refusing to undefine running domain {name}")
            dom.undefine()
        self._do(f"undefine {name}", run)

    def migrate(self, name: str, target_uri: str, target_address: str, *,
                tls: bool = False, postcopy: bool = False) -> MigrationStats:
        dconnuri = peer_uri(target_uri, target_address, tls)
        # TLS: QEMU encrypts the stream and checks the peer's certificate against the
        # host of the migration URI (the target address).
        flags = (MIGRATE_FLAGS | (libvirt.VIR_MIGRATE_TLS if tls else 0)
                 | (libvirt.VIR_MIGRATE_POSTCOPY if postcopy else 0))

        def run(conn: libvirt.virConnect) -> MigrationStats:
            dom = self._lookup(conn, name)
            if dom is None or not dom.isActive():
                raise HypervisorRefused(f"domain {name} is not running on {self.uri}")
            # The destination listens on the migration address given per call: libvirt
            # refuses a loopback `migration_address` in qemu.conf.
            params: dict[str, Any] = {
                libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{target_address}",
                libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: target_address,
            }
            dom.migrateToURI3(dconnuri, params, flags)
            return MigrationStats(None, None)
        # Never retried here: a half-done migration must be re-planned, not replayed.
        # Its own connection: while migrateToURI3 blocks on a shared one, other calls on
        # it (the agent's domain list, abortJob) can hang until the migration ends.
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorUnavailable(f"cannot connect to {self.uri}: {exc}") from exc
        try:
            return run(conn)
        except libvirt.libvirtError as exc:
            kind = HypervisorUnavailable if _is_transient(exc) else HypervisorRefused
            raise kind(f"migrate {name} to {dconnuri}: {exc}") from exc
        finally:
            try:
                conn.close()
            except libvirt.libvirtError as exc:
                log.debug("close_failed", error=str(exc))

    def abort_migration(self, name: str) -> bool:
        def run(conn: libvirt.virConnect) -> bool:
            dom = self._lookup(conn, name)
            if dom is None:
                return False
            try:
                dom.abortJob()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                    return False  # "no job is active on the domain": it already ended
                raise
            return True
        return self._do(f"abort migration of {name}", run)

    def start_postcopy(self, name: str) -> None:
        def run(conn: libvirt.virConnect) -> None:
            dom = self._lookup(conn, name)
            if dom is None:
                raise HypervisorRefused(f"domain {name} is not on {self.uri}")
            dom.migrateStartPostCopy(0)
        self._do(f"post-copy of {name}", run)

    def incoming_stats(self, name: str) -> MigrationStats | None:
        def run(conn: libvirt.virConnect) -> MigrationStats | None:
            dom = self._lookup(conn, name)
            if dom is None:
                return None
            try:
                # KEEP_COMPLETED: libvirt otherwise discards the statistics once read, so
                # a report retried after a lost status race would carry none.
                stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                                     | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)
            except libvirt.libvirtError:
                return None  # drivers without job statistics (test driver)
            if not stats or "time_elapsed" not in stats:
                return None
            return MigrationStats(float(stats.get("time_elapsed", 0)),
                                  float(stats["downtime"]) if "downtime" in stats else None)
        return self._do(f"job stats {name}", run)

    def capacity(self) -> tuple[int, int]:
        if self._memory is not None and self._vcpus is not None:
            return self._memory, self._vcpus
        info = self._do("node info", lambda c: c.getInfo())
        return self._memory or int(info[1]), self._vcpus or int(info[2])

    def cpu_model(self) -> str:
        try:
            caps = ET.fromstring(self._do("capabilities", lambda c: c.getCapabilities()))
        except (HypervisorError, ET.ParseError):
            return ""
        return caps.findtext("./host/cpu/model") or ""

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except libvirt.libvirtError as exc:
                    log.debug("close_failed", error=str(exc))
                self._conn = None
