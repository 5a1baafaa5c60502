"""etcd roles of keyspace 2 and their exact key ranges (docs/keyspace-v2.md, section 1,
"Roles and their exact ranges"), and etcd's own permission checks on them.

The ranges are what `vmha auth setup` will grant and `vmha auth check` compare; the
checks answer, as etcd 3.4 does (`auth/range_perm_cache.go`, `etcdserver/apply_auth.go`),
whether a role may read or write a key, read a range, or send a transaction.  Pure:
nothing here talks to etcd.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from schemas.errors import SchemaError
from schemas.keys import valid_name
from schemas.keys_v2 import KeyspaceV2
from schemas.txn import Put, Txn

DEFAULT_PREFIX = "/vmha"

# etcd's range end meaning "every key from the start on" (`--from-key`).
FROM_KEY = b"\0"


def as_bytes(key: str | bytes) -> bytes:
    """A key as etcd compares it: its UTF-8 bytes (never raises)."""
    return key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")


def prefix_range_end(prefix: str | bytes) -> bytes:
    """The end of the range of keys starting with `prefix`, as etcd's client computes it
    (`clientv3.GetPrefixRangeEnd`, used by `etcdctl role grant-permission --prefix`):
    the last byte below 0xff plus one, the bytes after it dropped; all 0xff (or empty):
    `FROM_KEY`."""
    end = bytearray(as_bytes(prefix))
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[:i + 1])
    return FROM_KEY


@dataclass(frozen=True)
class KeyRange:
    """One permission's keys: [start, end).  `end` empty: the key `start` alone;
    `FROM_KEY`: every key from `start` on (etcd's encoding of both)."""

    start: bytes
    end: bytes = b""

    @staticmethod
    def key(key: str | bytes) -> KeyRange:
        return KeyRange(as_bytes(key))

    @staticmethod
    def prefix(prefix: str | bytes) -> KeyRange:
        return KeyRange(as_bytes(prefix), prefix_range_end(prefix))

    @property
    def interval(self) -> tuple[bytes, bytes | None]:
        """[begin, end) with None for no end; a single key is [key, key + NUL), as
        etcd's permission cache stores it (`adt.NewBytesAffinePoint`)."""
        if not self.end:
            return self.start, self.start + b"\0"
        if self.end == FROM_KEY:
            return self.start, None
        return self.start, self.end

    def contains(self, key: str | bytes) -> bool:
        begin, end = self.interval
        k = as_bytes(key)
        return begin <= k and (end is None or k < end)

    def __str__(self) -> str:
        start = self.start.decode("utf-8", "backslashreplace")
        if not self.end:
            return f"key {start}"
        end = "(no end)" if self.end == FROM_KEY else self.end.decode("utf-8", "backslashreplace")
        return f"[{start}, {end})"


RoleKind = Literal["orchestrator", "node", "operator", "monitoring"]


@dataclass(frozen=True)
class RoleRef:
    """Which role, independent of the prefix: `RoleRef("node", "n1")` is `node-n1`."""

    kind: RoleKind
    node: str = ""


ORCHESTRATOR = RoleRef("orchestrator")
OPERATOR = RoleRef("operator")
MONITORING = RoleRef("monitoring")


def node_ref(node: str) -> RoleRef:
    return RoleRef("node", node)


@dataclass(frozen=True)
class Role:
    """An etcd role: its name and its grants (etcd's READWRITE and READ permissions)."""

    name: str
    readwrite: tuple[KeyRange, ...]
    read: tuple[KeyRange, ...] = ()

    def can_read(self, key: str | bytes) -> bool:
        return any(r.contains(key) for r in (*self.readwrite, *self.read))

    def can_write(self, key: str | bytes) -> bool:
        return any(r.contains(key) for r in self.readwrite)

    def can_read_range(self, start: str | bytes, end: str | bytes | None) -> bool:
        """A range read (or watch) of [start, end), `end` None for no end: permitted
        only if the granted ranges together cover all of it, as etcd's
        `IntervalTree.Contains` decides.  An empty `end` is etcd's single-key range:
        the one key `start`."""
        if end is not None and not as_bytes(end):
            return self.can_read(start)
        grants = sorted((r.interval for r in (*self.readwrite, *self.read)),
                        key=lambda iv: iv[0])
        want_end = None if end is None else as_bytes(end)
        reach = as_bytes(start)
        for begin, stop in grants:
            if begin > reach:
                break  # a gap: nothing later starts early enough to close it
            if stop is None:
                return True
            reach = max(reach, stop)
            if want_end is not None and reach >= want_end:
                return True
        return False

    def denials(self, txn: Txn) -> list[str]:
        """Why etcd would refuse `txn` from this role (empty: it would not): read
        permission on every compared key, write permission on every put and delete
        (`checkTxnAuth`).  A refused txn applies nothing.  Not modelled, since it
        depends on etcd's state: a put with a lease also needs write permission on every
        key already attached to that lease (`checkLeasePuts`)."""
        out = [f"compare on {c.key} needs read permission"
               for c in txn.compares if not self.can_read(c.key)]
        for op in txn.ops:
            if not self.can_write(op.key):
                verb = "put" if isinstance(op, Put) else "delete"
                out.append(f"{verb} of {op.key} needs write permission")
        return out

    def __str__(self) -> str:
        rw = "; ".join(str(r) for r in self.readwrite) or "-"
        ro = "; ".join(str(r) for r in self.read) or "-"
        return f"{self.name}: readwrite {rw}; read {ro}"


def name_prefix(ks: KeyspaceV2) -> str:
    """What role and user names get in front for a prefix other than /vmha, so that
    several clusters share one etcd: `/lab/a` -> `lab.a.`."""
    if ks.prefix == DEFAULT_PREFIX:
        return ""
    return ks.prefix[1:].replace("/", ".") + "."


def role_name(ks: KeyspaceV2, ref: RoleRef) -> str:
    base = f"node-{ref.node}" if ref.kind == "node" else ref.kind
    return name_prefix(ks) + base


def role(ks: KeyspaceV2, ref: RoleRef) -> Role:
    """The role `ref` for the keyspace `ks`, exactly as the design's table states it."""
    if ref.kind == "node":
        if not valid_name(ref.node):
            # A range built from "n1/x" or "" would cover other nodes' keys.
            raise SchemaError(f"role node-{ref.node[:80]}", "node",
                              "invalid node name (1-63 chars of a-z, 0-9, '.', '_', '-', "
                              "starting and ending with a letter or digit)")
    elif ref.node:
        raise SchemaError(f"role {ref.kind}", "node", "only a node role names a node")
    p, key = KeyRange.prefix, KeyRange.key
    everything = (p(ks.root), p(ks.history))
    name = role_name(ks, ref)
    if ref.kind == "orchestrator":
        return Role(name, (key(ks.leader), p(ks.place_dir), p(ks.assignment_dir),
                           p(ks.fence_dir), p(ks.move_dir), p(ks.confirm_off_dir),
                           p(ks.history)),
                    (p(ks.root),))
    if ref.kind == "node":
        n = ref.node
        return Role(name, (p(ks.node_root(n)), key(ks.cordon(n)), p(ks.node_history(n))),
                    (p(ks.assignments(n)), p(ks.node_dir), p(ks.place_dir), p(ks.spec_dir),
                     key(ks.config), key(ks.version)))
    if ref.kind == "operator":
        return Role(name, (p(ks.spec_dir), p(ks.move_dir), p(ks.cordon_dir),
                           p(ks.confirm_off_dir), key(ks.config)),
                    everything)
    return Role(name, (), everything)  # monitoring


def roles(ks: KeyspaceV2, nodes: Iterable[str]) -> list[Role]:
    """Every role vmha needs for the keyspace `ks` and the nodes `nodes`."""
    return [role(ks, ORCHESTRATOR), role(ks, OPERATOR), role(ks, MONITORING),
            *(role(ks, node_ref(n)) for n in sorted(set(nodes)))]
