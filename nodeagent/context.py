"""What the node agent's parts share: its options, one node's view of etcd, its
hypervisor, its clock and its wake-up signal."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypervisor.base import Hypervisor
from schemas.keys import Keyspace
from store.etcd import EtcdStore
from store.history import HistoryWriter


@dataclass
class AgentOptions:
    name: str
    migration_address: str = "127.0.0.1"
    poll_interval_s: float = 1.0
    migration_retry_backoff_s: float = 3.0
    # Start the guard process (fencing.guard) in run(); armed only if the cluster config
    # says guard_enabled.  On the fake hypervisor the guard process is the host.  None:
    # only when run() is called on the main thread, i.e. the agent owns its process (the
    # guard SIGKILLs that process; an agent run in a test's thread must not have one).
    guard: bool | None = None
    watchdog: str | None = None  # e.g. /dev/watchdog, armed by the guard
    # The guard service's socket (vmha guard, fencing.guard_server): attach to it instead
    # of starting a guard of our own; a restarted agent then takes over its predecessor's
    # registration and lease (nodeagent.membership.Membership.adopt).
    guard_socket: str | None = None
    # The fenced marker (fencing.marker): written before a self-fence's first destroy,
    # removed once the agent holds a registration again; the libvirt hook refuses new
    # domains while it exists.  None: /run/vmha/fenced (fake hosts: <fake dir>/fenced).
    fenced_marker: str | None = None


@dataclass
class AgentContext:
    store: EtcdStore
    hv: Hypervisor
    opts: AgentOptions
    clock: Callable[[], float]
    wake: threading.Event      # set to run the next cycle at once
    stopped: threading.Event   # set to end run()
    history: HistoryWriter
    log: Any                   # a structlog logger bound to this node

    @property
    def me(self) -> str:
        return self.opts.name

    @property
    def ks(self) -> Keyspace:
        return self.store.keyspace
