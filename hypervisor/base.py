"""The hypervisor interface the agent reconciles against.

Two implementations: `hypervisor.libvirt_adapter.LibvirtHypervisor` (the real one) and
`hypervisor.fake.FakeHypervisor` (a fake for decision-logic tests and
simulation; it says so in its name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from schemas.errors import PermanentError, TemporaryError, VmhaError

DomainState = Literal["running", "paused", "shutoff", "crashed", "other"]

MANAGED_NS = "urn:vmha:1"


class HypervisorError(VmhaError):
    """A hypervisor operation failed; the subclass says whether retrying can help.
    Callers that only log and go on catch this base."""


class HypervisorRefused(HypervisorError, PermanentError):
    """The hypervisor answered and refused the operation: the same request fails again
    until the state changes (the domain is not running, the XML is invalid...)."""


class HypervisorUnavailable(HypervisorError, TemporaryError):
    """The hypervisor could not be reached (temporary; retried)."""


@dataclass(frozen=True)
class Domain:
    name: str
    state: DomainState
    managed: bool = True
    # Paused on the destination while a live migration streams in.
    incoming: bool = False

    @property
    def active(self) -> bool:
        return self.state in ("running", "paused")


@dataclass(frozen=True)
class MigrationStats:
    total_ms: float | None
    downtime_ms: float | None


class Hypervisor(Protocol):
    uri: str

    def list_domains(self) -> dict[str, Domain]: ...

    def boot(self, name: str, xml: str) -> None:
        """Define (persistently) from `xml` and start.  Idempotent for a running domain."""

    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI)."""

    def destroy(self, name: str) -> None:
        """Power off at once.  No error if it is not running."""

    def undefine(self, name: str) -> None:
        """Remove the definition.  No error if it does not exist."""

    def migrate(self, name: str, target_uri: str, target_address: str, *,
                tls: bool = False, postcopy: bool = False) -> MigrationStats:
        """Live-migrate to the target (peer-to-peer), persisting it there and
        undefining it here.  On error the domain still runs here.  `tls`: the peer
        connection and the migration stream are encrypted and both ends' certificates
        checked (cluster option `migration_tls`).  `postcopy`: allow a later
        `start_postcopy` (libvirt's VIR_MIGRATE_POSTCOPY)."""

    def abort_migration(self, name: str) -> bool:
        """Abort the outgoing migration job of `name` (libvirt abortJob): the `migrate`
        call in flight then fails and the domain keeps running here.  False if no job
        runs (it already ended)."""

    def start_postcopy(self, name: str) -> None:
        """Switch the running migration of `name` to post-copy: the guest resumes on the
        target at once and its memory follows (the migration must allow it)."""

    def incoming_stats(self, name: str) -> MigrationStats | None:
        """Statistics of the last completed incoming migration of `name`, if known."""

    def capacity(self) -> tuple[int, int]:
        """(memory MiB, vCPUs) this node offers."""

    def cpu_model(self) -> str: ...

    def close(self) -> None: ...


def mark_managed(xml: str) -> str:
    """Add vmha's marker to a domain's <metadata>, so the agent can tell its own
    domains from ones an operator defined by hand (those it never touches)."""
    import xml.etree.ElementTree as ET

    ET.register_namespace("vmha", MANAGED_NS)
    root = ET.fromstring(xml)
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    if meta.find(f"{{{MANAGED_NS}}}managed") is None:
        ET.SubElement(meta, f"{{{MANAGED_NS}}}managed")
    return ET.tostring(root, encoding="unicode")


def is_managed(xml: str) -> bool:
    return MANAGED_NS in xml
