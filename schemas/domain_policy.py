"""What a VM's domain XML may ask of the hypervisor host (docs/domain-policy.md).

The node agent runs as root and defines whatever XML a spec holds, so a spec writer
would otherwise be root on every node: a disk whose source is /etc/shadow, a virtiofs
share of /, a PCI device, raw QEMU arguments, or confinement turned off.  This module
is the one rule both gates apply: `vmha vm add/edit` before writing a spec, and the agent
before `defineXML` (a spec can be written into etcd past the CLI).

Pure: XML text and the cluster config in, a list of refusals out.  Parsing refuses a
DTD (and with it every entity declaration, internal or external) before ElementTree
sees the text.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, get_args
from xml.parsers import expat

if TYPE_CHECKING:
    from schemas.models import ClusterConfig

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

#: What `domain_policy_allow` may grant one VM (each named in the refusal it lifts).
PolicyElement = Literal["hostdev", "host-path", "qemu:commandline", "qemu:capabilities",
                        "qemu:override", "seclabel", "emulator"]
POLICY_ELEMENTS: tuple[str, ...] = get_args(PolicyElement)

# The default storage directory: libvirt's own default pool (`virsh pool-dumpxml default`).
DEFAULT_STORAGE_PATHS = ["/var/lib/libvirt/images"]
# QEMU and virtiofsd where distributions install them (Debian/Ubuntu, Fedora/RHEL).
DEFAULT_EMULATORS = ["/usr/bin/qemu-system-x86_64", "/usr/bin/qemu-system-aarch64",
                     "/usr/bin/qemu-kvm", "/usr/libexec/qemu-kvm", "/usr/bin/kvm",
                     "/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"]

# Attributes of a <source> (and <mirror>) that name a file, directory, device or socket
# on the host.
_PATH_ATTRS = ("file", "dev", "dir", "path", "socket")


class DomainPolicyError(ValueError):
    """The domain XML asks for something the cluster's policy does not allow."""


def _refuse_dtd(*_: object) -> None:
    raise DomainPolicyError("domain XML with a DTD (<!DOCTYPE>) or an entity declaration "
                            "is refused")


def _canonical(path: str) -> str:
    # normpath keeps a leading "//" (POSIX leaves its meaning open); Linux reads it as "/"
    return "/" + os.path.normpath(path).lstrip("/")


def normalised_paths(paths: list[str]) -> list[str]:
    """Config paths (`storage_paths`, `emulators`): absolute, normalised, never `/`."""
    out = []
    for p in paths:
        if not p.startswith("/"):
            raise ValueError(f"{p!r} is not an absolute path")
        if _canonical(p) == "/":
            raise ValueError("'/' would allow every host path; allow a VM 'host-path' "
                             "in domain_policy_allow instead")
        out.append(_canonical(p))
    return out


def parse_domain_xml(xml: str) -> ET.Element:
    """The root element; ValueError for malformed XML or XML with a DTD.

    A first expat pass with a DOCTYPE handler refuses any DTD: without one no entity can
    be declared, so the second (ElementTree) pass expands nothing and reads no file."""
    pre = expat.ParserCreate()
    pre.StartDoctypeDeclHandler = _refuse_dtd
    pre.EntityDeclHandler = _refuse_dtd
    try:
        pre.Parse(xml, True)
    except expat.ExpatError as exc:
        raise ValueError(f"domain_xml is not well-formed XML: {exc}") from None
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"domain_xml is not well-formed XML: {exc}") from None


def _local(tag: str) -> tuple[str, str]:
    """(namespace URI, local name) of an ElementTree tag."""
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return "", tag


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def _host_path(where: str, path: str, cfg: ClusterConfig) -> Iterator[tuple[str, str]]:
    """A host path outside the configured storage directories (after normalisation, so
    `..` cannot climb out of one)."""
    norm = _canonical(path) if os.path.isabs(path) else path
    if not os.path.isabs(norm) or not _under(norm, cfg.storage_paths):
        shown = f"'{path}'" + (f" (= '{norm}')" if norm != path else "")
        allowed = ", ".join(cfg.storage_paths) or "none configured"
        yield ("host-path", f"{where} source {shown} is outside the storage paths "
                            f"({allowed})")


def _sources(elem: ET.Element, where: str, cfg: ClusterConfig) -> Iterator[tuple[str, str]]:
    """Every host path or storage pool a <disk> or <filesystem> refers to, including its
    backing chain and a block job's mirror."""
    for src in (e for e in elem.iter() if e.tag in ("source", "mirror")):
        for attr in _PATH_ATTRS:
            value = src.get(attr)
            if value is not None:
                yield from _host_path(where, value, cfg)
        pool = src.get("pool")
        if pool is not None and pool not in cfg.storage_pools:
            yield ("host-path", f"{where} source from pool '{pool}', which is not among "
                                f"the storage pools ({', '.join(cfg.storage_pools) or 'none'})")


def _findings(root: ET.Element, cfg: ClusterConfig) -> Iterator[tuple[str, str]]:
    """(rule, what) for everything the policy refuses unless allowed."""
    for elem in root.iter():
        if not isinstance(elem.tag, str):
            continue  # comments and processing instructions
        ns, local = _local(elem.tag)
        if ns == QEMU_NS:
            # libvirt reads these by namespace URI, whatever prefix the XML spells
            rule = f"qemu:{local}"
            if local in ("commandline", "capabilities", "override"):
                yield rule, f"<{rule}> (raw QEMU configuration)"
            continue
        if ns:
            continue
        if local == "hostdev":
            yield "hostdev", f"<hostdev> of type '{elem.get('type', '')}' (a host device)"
        elif local == "interface" and elem.get("type") == "hostdev":
            yield "hostdev", "<interface type='hostdev'> (host PCI device)"
        elif local == "disk" and elem.get("type") == "nvme":
            yield "hostdev", "<disk type='nvme'> (host NVMe device)"
        elif local == "seclabel" and elem.get("type") in ("none", "static"):
            yield "seclabel", (f"<seclabel type='{elem.get('type')}'> (QEMU unconfined or "
                               "under a label the spec chooses)")
        elif local == "disk":
            yield from _sources(elem, f"<disk device='{elem.get('device', 'disk')}'>", cfg)
        elif local == "filesystem":
            yield from _sources(elem, "<filesystem>", cfg)
            binary = elem.find("binary")
            if binary is not None and binary.get("path") is not None:
                path = binary.get("path", "")
                if not os.path.isabs(path) or _canonical(path) not in cfg.emulators:
                    yield "emulator", f"<filesystem> <binary path='{path}'>"
        elif local == "emulator":
            path = (elem.text or "").strip()
            if not os.path.isabs(path) or _canonical(path) not in cfg.emulators:
                yield "emulator", f"<emulator>{path}</emulator> (not among the emulators)"


def policy_violations(xml: str, vm: str, cfg: ClusterConfig) -> list[str]:
    """What `xml` asks for that `cfg` does not allow VM `vm`, one line each naming the
    element and the allowance that would lift it; [] when it passes."""
    allowed = set(cfg.domain_policy_allow.get(vm, ()))
    return [f"{what} [allow with domain_policy_allow {{\"{vm}\": [\"{rule}\"]}}]"
            for rule, what in _findings(parse_domain_xml(xml), cfg) if rule not in allowed]


def check_domain_xml(xml: str, vm: str, cfg: ClusterConfig) -> None:
    """Raise DomainPolicyError naming every refusal (see `policy_violations`)."""
    problems = policy_violations(xml, vm, cfg)
    if problems:
        raise DomainPolicyError(f"domain policy refuses vm {vm}: " + "; ".join(problems))
