"""What the node agent's parts share: its options, one node's view of etcd, its
hypervisor, its clock and its wake-up signal."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from hypervisor.base import Hypervisor
from schemas.keys import Keyspace
from schemas.keys_v2 import KeyspaceV2
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
    # registration and lease (nodeagent.adopt).
    guard_socket: str | None = None
    # The fenced marker (fencing.marker): written before a self-fence's first destroy,
    # removed once the agent holds a registration again; the libvirt hook refuses new
    # domains while it exists.  None: /run/vmha/fenced (fake hosts: <fake dir>/fenced).
    fenced_marker: str | None = None


@dataclass(frozen=True)
class AgentKeys:
    """The keys agent `me` writes, in the keyspace it runs on (its registration, liveness
    key, leave marker, cordon and statuses) and the config it reads."""

    keyspace: Literal[1, 2]
    reg: str
    alive: str
    leaving: str
    cordon: str
    config: str
    _status: Callable[[str], str]

    def status(self, vm: str) -> str:
        """Keyspace 1: the VM's one status key; 2: this node's status of the VM."""
        return self._status(vm)

    @classmethod
    def v1(cls, ks: Keyspace, me: str) -> AgentKeys:
        return cls(1, ks.node(me), ks.alive(me), ks.leaving(me), ks.cordon(me), ks.config,
                   ks.vm_status)

    @classmethod
    def v2(cls, ks: KeyspaceV2, me: str) -> AgentKeys:
        return cls(2, ks.reg(me), ks.alive(me), ks.leaving(me), ks.cordon(me), ks.config,
                   lambda vm: ks.status(me, vm))


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
    # The keyspace the agent runs on, chosen at its start by /vmha/version
    # (nodeagent.keyspace); 1 until then.
    keyspace: Literal[1, 2] = 1

    @property
    def me(self) -> str:
        return self.opts.name

    @property
    def ks(self) -> Keyspace:
        return self.store.keyspace

    @property
    def ks2(self) -> KeyspaceV2:
        return KeyspaceV2(self.store.keyspace.prefix)

    @property
    def keys(self) -> AgentKeys:
        if self.keyspace == 2:
            return AgentKeys.v2(self.ks2, self.me)
        return AgentKeys.v1(self.ks, self.me)
