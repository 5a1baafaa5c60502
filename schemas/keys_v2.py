"""The etcd key layout of keyspace version 2 (docs/keyspace-v2.md, section 1).

Nothing runs on it yet: `schemas.keys.Keyspace` is the layout in use.  Like it, the
builders do not validate names (a daemon must never raise on a name it read from a
value); `KeyspaceV2.parse` does, and is the one place that says what a key means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from schemas.keys import PrefixKeys, decode_key, valid_name

KeyKind = Literal[
    "version", "config", "leader",
    "spec", "move", "place",  # .../KIND/VM
    "confirm_off", "cordon", "fence",  # .../KIND/NAME
    "assignment",  # .../a/NODE/VM
    "reg", "alive", "leaving",  # .../n/NAME/KIND
    "status",  # .../n/NAME/vm/VM
    "node_event",  # P-history/n/NAME/ID
    "leader_event",  # P-history/o/ID
    "event_v1",  # P-history/ID: keyspace 1's history, merged by readers until it ages out
]

# Event ids as `schemas.events.event_id` makes them: microseconds, the actor with
# anything but letters, digits and `-_.` replaced (`\w` is str.isalnum() plus `_`), and a
# sequence number.  Never a `/`, so an id is one path segment.
EVENT_ID_RE = re.compile(r"[0-9]{17,20}-[\w.-]*-[0-9]{6,12}")

_SINGLES: dict[str, KeyKind] = {"version": "version", "config": "config", "leader": "leader"}
_BY_VM: dict[str, KeyKind] = {"spec": "spec", "move": "move", "place": "place"}
_BY_NODE: dict[str, KeyKind] = {"confirm-off": "confirm_off", "cordon": "cordon",
                                "fence": "fence"}
_NODE_OWN: dict[str, KeyKind] = {"reg": "reg", "alive": "alive", "leaving": "leaving"}


def valid_event_id(event_id: str) -> bool:
    return bool(EVENT_ID_RE.fullmatch(event_id))


@dataclass(frozen=True)
class KeyRefV2:
    """What a key of keyspace 2 means: its kind and the names in it (empty when the kind
    has no such name).  Every name in a `KeyRefV2` is valid (`schemas.keys.valid_name`)."""

    kind: KeyKind
    node: str = ""
    vm: str = ""
    event_id: str = ""


@dataclass(frozen=True)
class UnknownKey:
    """A key that is not one of keyspace 2's, and why.  `kind`, `node` and `vm` say what
    it would have been when only a name in it is wrong (empty otherwise); such a name is
    *not* valid and must never be used to build another key."""

    key: str
    reason: str
    kind: KeyKind | Literal[""] = ""
    node: str = ""
    vm: str = ""
    # Under the prefix or its history: a key to report as invalid, not to skip.
    owned: bool = True


@dataclass(frozen=True)
class KeyspaceV2(PrefixKeys):
    """Keyspace 2 (docs/keyspace-v2.md); `root`, `config` and `leader` as in keyspace 1."""

    # ---- singles ---------------------------------------------------------------------

    @property
    def version(self) -> str:
        """The keyspace marker (`KeyspaceVersion`); absent: keyspace 1."""
        return f"{self.prefix}/version"

    # ---- the directories of keys of one kind (role ranges, watches, paged lists) ----

    @property
    def spec_dir(self) -> str:
        return f"{self.prefix}/spec/"

    @property
    def move_dir(self) -> str:
        return f"{self.prefix}/move/"

    @property
    def place_dir(self) -> str:
        return f"{self.prefix}/place/"

    @property
    def confirm_off_dir(self) -> str:
        return f"{self.prefix}/confirm-off/"

    @property
    def cordon_dir(self) -> str:
        return f"{self.prefix}/cordon/"

    @property
    def fence_dir(self) -> str:
        return f"{self.prefix}/fence/"

    @property
    def assignment_dir(self) -> str:
        return f"{self.prefix}/a/"

    @property
    def node_dir(self) -> str:
        return f"{self.prefix}/n/"

    # ---- per VM ----------------------------------------------------------------------

    def spec(self, vm: str) -> str:
        return f"{self.spec_dir}{vm}"

    def move(self, vm: str) -> str:
        return f"{self.move_dir}{vm}"

    def place(self, vm: str) -> str:
        """The leader's placement: authoritative."""
        return f"{self.place_dir}{vm}"

    # ---- per node, written by others --------------------------------------------------

    def confirm_off(self, node: str) -> str:
        return f"{self.confirm_off_dir}{node}"

    def cordon(self, node: str) -> str:
        return f"{self.cordon_dir}{node}"

    def fence(self, node: str) -> str:
        return f"{self.fence_dir}{node}"

    def assignments(self, node: str) -> str:
        """The prefix of everything `node` is told (the agent's prefix watch)."""
        return f"{self.assignment_dir}{node}/"

    def assignment(self, node: str, vm: str) -> str:
        return f"{self.assignments(node)}{vm}"

    # ---- a node's own prefix ----------------------------------------------------------

    def node_root(self, node: str) -> str:
        """The prefix of everything `node` writes (besides its cordon and history)."""
        return f"{self.node_dir}{node}/"

    def reg(self, node: str) -> str:
        """The registration, on the registration lease; its create_revision is the token."""
        return f"{self.node_root(node)}reg"

    def alive(self, node: str) -> str:
        """The liveness lease's key (section 4)."""
        return f"{self.node_root(node)}alive"

    def leaving(self, node: str) -> str:
        return f"{self.node_root(node)}leaving"

    def statuses(self, node: str) -> str:
        return f"{self.node_root(node)}vm/"

    def status(self, node: str, vm: str) -> str:
        """`vm`'s status as `node` reports it (the current one: `snapshot_v2.current_status`)."""
        return f"{self.statuses(node)}{vm}"

    # ---- history ----------------------------------------------------------------------

    @property
    def history(self) -> str:
        return f"{self.prefix}-history/"

    def node_history(self, node: str) -> str:
        return f"{self.history}n/{node}/"

    def node_event(self, node: str, event_id: str) -> str:
        return f"{self.node_history(node)}{event_id}"

    @property
    def leader_history(self) -> str:
        return f"{self.history}o/"

    def leader_event(self, event_id: str) -> str:
        return f"{self.leader_history}{event_id}"

    # ---- parse ------------------------------------------------------------------------

    def key(self, ref: KeyRefV2) -> str:
        """The key `ref` describes: `parse(key(ref)) == ref` for every `ref` that
        `parse` returns."""
        k, node, vm = ref.kind, ref.node, ref.vm
        by_name = {"version": self.version, "config": self.config, "leader": self.leader}
        if k in by_name:
            return by_name[k]
        if k in ("spec", "move", "place"):
            return {"spec": self.spec, "move": self.move, "place": self.place}[k](vm)
        if k in ("confirm_off", "cordon", "fence", "reg", "alive", "leaving"):
            return {"confirm_off": self.confirm_off, "cordon": self.cordon,
                    "fence": self.fence, "reg": self.reg, "alive": self.alive,
                    "leaving": self.leaving}[k](node)
        if k == "assignment":
            return self.assignment(node, vm)
        if k == "status":
            return self.status(node, vm)
        if k == "node_event":
            return self.node_event(node, ref.event_id)
        if k == "leader_event":
            return self.leader_event(ref.event_id)
        return f"{self.history}{ref.event_id}"  # event_v1

    def parse(self, key: str | bytes) -> KeyRefV2 | UnknownKey:
        """What `key` means, or why it means nothing; never raises, whatever the input
        (bytes that are not UTF-8 become `\\xNN` escapes, which no valid name contains)."""
        if isinstance(key, bytes | bytearray | memoryview):
            text = decode_key(bytes(key))
        elif isinstance(key, str):
            text = key
        else:
            return UnknownKey(repr(key)[:200], f"not a key ({type(key).__name__})",
                              owned=False)
        if text.startswith(self.root):
            return self._parse_state(text, text[len(self.root):].split("/"))
        if text.startswith(self.history):
            return self._parse_history(text, text[len(self.history):].split("/"))
        return UnknownKey(text, "not under the prefix or its history", owned=False)

    def _parse_state(self, key: str, parts: list[str]) -> KeyRefV2 | UnknownKey:
        n = len(parts)
        head = parts[0]
        if n == 1 and head in _SINGLES:
            return KeyRefV2(_SINGLES[head])
        if n == 2 and head in _BY_VM:
            return _named(key, _BY_VM[head], vm=parts[1])
        if n == 2 and head in _BY_NODE:
            return _named(key, _BY_NODE[head], node=parts[1])
        if n == 3 and head == "a":
            return _named(key, "assignment", node=parts[1], vm=parts[2])
        if n == 3 and head == "n" and parts[2] in _NODE_OWN:
            return _named(key, _NODE_OWN[parts[2]], node=parts[1])
        if n == 4 and head == "n" and parts[2] == "vm":
            return _named(key, "status", node=parts[1], vm=parts[3])
        return UnknownKey(key, "not a key of keyspace 2 (unknown kind, or a segment too "
                               "many or too few)")

    def _parse_history(self, key: str, parts: list[str]) -> KeyRefV2 | UnknownKey:
        if len(parts) == 3 and parts[0] == "n":
            ref = _named(key, "node_event", node=parts[1])
            if isinstance(ref, UnknownKey):
                return ref
            return _event(key, "node_event", parts[2], node=parts[1])
        if len(parts) == 2 and parts[0] == "o":
            return _event(key, "leader_event", parts[1])
        if len(parts) == 1:
            return _event(key, "event_v1", parts[0])
        return UnknownKey(key, "not a history key (n/NODE/ID, o/ID or ID)")


def _named(key: str, kind: KeyKind, node: str = "", vm: str = "") -> KeyRefV2 | UnknownKey:
    """`kind` if every name given is valid; else why not (first the node, then the VM)."""
    for what, name, kinds in (("node", node, _NODE_KINDS), ("VM", vm, _VM_KINDS)):
        if kind in kinds and not valid_name(name):
            return UnknownKey(key, f"invalid {what} name {name[:80]!r} in the key (1-63 "
                                   "chars of a-z, 0-9, '.', '_', '-', starting and ending "
                                   "with a letter or digit)", kind, node, vm)
    return KeyRefV2(kind, node=node, vm=vm)


def _event(key: str, kind: KeyKind, event_id: str, node: str = "") -> KeyRefV2 | UnknownKey:
    if not valid_event_id(event_id):
        return UnknownKey(key, f"invalid event id {event_id[:80]!r} in the key", kind, node)
    return KeyRefV2(kind, node=node, event_id=event_id)


_NODE_KINDS = frozenset({"confirm_off", "cordon", "fence", "assignment", "reg", "alive",
                         "leaving", "status", "node_event"})
_VM_KINDS = frozenset({"spec", "move", "place", "assignment", "status"})
