"""The keys the fault campaign writes and reads, on either keyspace (``--keyspace``).

Keyspace 1 is :class:`schemas.Keyspace`; keyspace 2 (docs/keyspace-v2.md, section 1) is
:class:`schemas.keys_v2.KeyspaceV2`, chosen by the marker ``/vmha/version`` that
:meth:`CampaignKeys.prepare` writes before any daemon starts (what ``vmha keyspace
migrate`` leaves).  Keys are read back only through the layouts' own parsers, never by
splitting them here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bench.fuzz_values import PATTERNS, key_for
from schemas import Keyspace
from schemas.keys_v2 import KeyRefV2, KeyspaceV2
from schemas.models import CONFIG_SCHEMA_KEYSPACE_2, ClusterConfig
from schemas.models_v2 import KeyspaceVersion
from store.etcd import EtcdStore

#: Keyspace 2's hostile-key patterns: every kind of key of section 1, the hostile name
#: standing where a VM or node name goes (config and leader take it as a suffix).
PATTERNS_V2 = ("config", "leader", "spec", "move", "place", "cordon", "fence", "confirm-off",
               "a", "reg", "alive", "leaving", "status", "history-n", "history-o")


@dataclass(frozen=True)
class CampaignKeys:
    """One keyspace's keys for the campaign; ``version`` is 1 or 2."""

    version: int = 1
    v1: Keyspace = field(default_factory=Keyspace)
    v2: KeyspaceV2 = field(default_factory=KeyspaceV2)

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"keyspace {self.version}: only 1 and 2 exist")

    @property
    def layout(self) -> Keyspace | KeyspaceV2:
        """The layout the checkers parse (:class:`lab.invariants.HistoryChecker`)."""
        return self.v2 if self.version == 2 else self.v1

    # ---- keys ------------------------------------------------------------------------

    @property
    def config(self) -> str:
        return self.v1.config  # the same key on both

    @property
    def leader(self) -> str:
        return self.v1.leader  # the same key on both

    def spec(self, vm: str) -> str:
        return self.v2.spec(vm) if self.version == 2 else self.v1.vm_spec(vm)

    def place(self, vm: str) -> str:
        return self.v2.place(vm) if self.version == 2 else self.v1.vm_placement(vm)

    def move(self, vm: str) -> str:
        return self.v2.move(vm) if self.version == 2 else self.v1.vm_move(vm)

    def cordon(self, node: str) -> str:
        return self.v2.cordon(node) if self.version == 2 else self.v1.cordon(node)

    def fence(self, node: str) -> str:
        return self.v2.fence(node) if self.version == 2 else self.v1.fence(node)

    def reg(self, node: str) -> str:
        """The node's registration (its create revision is the agent's token)."""
        return self.v2.reg(node) if self.version == 2 else self.v1.node(node)

    @property
    def reg_scan(self) -> str:
        """The prefix whose keys include every registration."""
        return self.v2.node_dir if self.version == 2 else self.v1.prefix + "/nodes/"

    def reg_node(self, key: str) -> str | None:
        """The node whose registration ``key`` is, or None (another key)."""
        if self.version == 2:
            ref = self.v2.parse(key)
            return ref.node if isinstance(ref, KeyRefV2) and ref.kind == "reg" else None
        ref1 = self.v1.parse(key)
        return ref1.name if ref1 is not None and ref1.kind == "node" else None

    # ---- set-up ----------------------------------------------------------------------

    def config_json(self, cfg: ClusterConfig) -> str:
        """The config as a cluster of this keyspace holds it (`"schema": 2` on keyspace 2,
        as `vmha keyspace migrate` and `vmha config set` write it)."""
        if self.version == 2:
            cfg = cfg.model_copy(update={"schema_": CONFIG_SCHEMA_KEYSPACE_2})
        return cfg.to_json()

    def prepare(self, store: EtcdStore) -> None:
        """Before any daemon starts: on keyspace 2 its marker, state ``done``."""
        if self.version == 2:
            store.put(self.v2.version, KeyspaceVersion(
                keyspace=2, state="done", started_at=time.time(), by="root:campaign",
                tool_version="campaign").to_json())

    def hostile_key(self, pattern_index: int, name: bytes, node: str) -> bytes:
        """A key of this keyspace with the hostile ``name`` in it: keyspace 1's fuzz
        patterns, or on keyspace 2 one of :data:`PATTERNS_V2` (``pattern_index`` is taken
        modulo their number), those of two names with the real ``node`` first."""
        if self.version == 1:
            return key_for(self.v1, PATTERNS[pattern_index % len(PATTERNS)], name)
        pattern = PATTERNS_V2[pattern_index % len(PATTERNS_V2)]
        pre, hist, n = self.v2.prefix.encode(), self.v2.history.encode(), node.encode()
        if pattern in ("config", "leader"):
            return pre + b"/" + pattern.encode() + name
        if pattern in ("spec", "move", "place", "cordon", "fence", "confirm-off"):
            return pre + b"/" + pattern.encode() + b"/" + name
        if pattern == "a":
            return pre + b"/a/" + n + b"/" + name
        if pattern in ("reg", "alive", "leaving"):
            return pre + b"/n/" + name + b"/" + pattern.encode()
        if pattern == "status":
            return pre + b"/n/" + n + b"/vm/" + name
        if pattern == "history-n":
            return hist + b"n/" + n + b"/" + name
        return hist + b"o/" + name

    @property
    def pattern_count(self) -> int:
        return len(PATTERNS_V2) if self.version == 2 else len(PATTERNS)


__all__ = ["PATTERNS_V2", "CampaignKeys"]
