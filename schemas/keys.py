"""The etcd key layout.  Keys are part of the user interface: keep them stable.

See docs/keyspace.md for the operator's view of the same table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


def valid_name(name: str) -> bool:
    return bool(NAME_RE.fullmatch(name))


def decode_key(raw: bytes | str) -> str:
    """A key as etcd returns it (bytes), as text that never raises: bytes that are not
    UTF-8 become `\\xNN` escapes.  A backslash is never part of a valid name, so such a
    key can only ever classify as an invalid key, never as another node's or VM's."""
    if isinstance(raw, str):
        return raw
    return bytes(raw).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class KeyRef:
    """What a key means: its kind and the node or VM it belongs to."""

    kind: str
    name: str = ""


@dataclass(frozen=True)
class PrefixKeys:
    """What every version of the key layout shares: the prefix and its top keys."""

    prefix: str = "/vmha"

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError(f"prefix must start with '/' and not end with '/': {self.prefix!r}")

    @property
    def root(self) -> str:
        return self.prefix + "/"

    @property
    def config(self) -> str:
        return f"{self.prefix}/config"

    @property
    def leader(self) -> str:
        return f"{self.prefix}/leader"


@dataclass(frozen=True)
class Keyspace(PrefixKeys):
    """Keyspace 1 (docs/keyspace.md)."""

    def node(self, name: str) -> str:
        return f"{self.prefix}/nodes/{name}"

    def cordon(self, name: str) -> str:
        return f"{self.prefix}/cordon/{name}"

    def fence(self, name: str) -> str:
        return f"{self.prefix}/fence/{name}"

    def leaving(self, name: str) -> str:
        return f"{self.prefix}/leaving/{name}"

    def alive(self, name: str) -> str:
        """The agent's liveness lease (docs/fencing.md, "Leases revoked by etcd itself")."""
        return f"{self.prefix}/alive/{name}"

    def vm_spec(self, name: str) -> str:
        return f"{self.prefix}/vms/{name}/spec"

    def vm_placement(self, name: str) -> str:
        return f"{self.prefix}/vms/{name}/placement"

    def vm_move(self, name: str) -> str:
        return f"{self.prefix}/vms/{name}/move"

    def vm_status(self, name: str) -> str:
        return f"{self.prefix}/vms/{name}/status"

    @property
    def history(self) -> str:
        """Event history lives beside the state, not in it: the per-cycle snapshot of
        `root` stays small however long the history grows."""
        return f"{self.prefix}-history/"

    def event(self, event_id: str) -> str:
        return f"{self.history}{event_id}"

    def parse(self, key: str) -> KeyRef | None:
        """Classify a key under the prefix; None for keys vmha does not own."""
        if not key.startswith(self.root):
            return None
        parts = key[len(self.root):].split("/")
        if parts == ["config"]:
            return KeyRef("config")
        if parts == ["leader"]:
            return KeyRef("leader")
        if parts == ["version"]:
            # The keyspace marker (docs/keyspace-v2.md, section 6): absent on keyspace 1;
            # a daemon of keyspace 1 that sees it freezes.
            return KeyRef("version")
        if len(parts) == 2 and parts[0] in ("nodes", "cordon", "fence", "leaving",
                                                 "alive"):
            return KeyRef({"nodes": "node", "cordon": "cordon", "fence": "fence",
                           "leaving": "leaving", "alive": "alive"}[parts[0]], parts[1])
        if len(parts) == 3 and parts[0] == "vms" and parts[2] in ("spec", "placement", "status",
                                                                      "move"):
            return KeyRef("vm_" + parts[2], parts[1])
        return None
