"""The lab: several independent libvirt nodes with small QEMU (TCG) guests on one host.

Root only.  See :mod:`lab.nodeconf` for the node layout, :mod:`lab.nodes` for the
nodes' life cycle and :mod:`lab.guests` for the guests and live migration.
"""

from lab.artifacts import DEFAULT_CACHE, ArtifactError, ensure_kernel_artifacts
from lab.guests import (
    MIGRATE_FLAGS,
    MIGRATE_FLAGS_DIRECT,
    MIGRATION_ADDRESS,
    guest_uptime,
    kernel_guest_xml,
    migrate_live,
    tiny_guest_xml,
    wait_guest_uptime,
)
from lab.nodeconf import LabError, LabNode
from lab.nodes import (
    crash_node,
    destroy_lab,
    kill_libvirtd,
    lab_nodes,
    node_pids,
    qemu_pids,
    restart_node,
    start_node,
    stop_node,
)
from lab.procs import pid_alive

__all__ = [
    "DEFAULT_CACHE",
    "MIGRATE_FLAGS",
    "MIGRATE_FLAGS_DIRECT",
    "MIGRATION_ADDRESS",
    "ArtifactError",
    "LabError",
    "LabNode",
    "crash_node",
    "destroy_lab",
    "ensure_kernel_artifacts",
    "guest_uptime",
    "kernel_guest_xml",
    "kill_libvirtd",
    "lab_nodes",
    "migrate_live",
    "node_pids",
    "pid_alive",
    "qemu_pids",
    "restart_node",
    "start_node",
    "stop_node",
    "tiny_guest_xml",
    "wait_guest_uptime",
]
