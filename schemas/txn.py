"""The shape of a conditional write, as plain values (no etcd client here).

A decision becomes `(compares, ops)`: etcd applies every op only if every compare
holds at commit time.  Decision code builds these values purely and unit tests read
them; `store.etcd.EtcdStore.txn` is the one place that sends them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CmpTarget = Literal["create", "mod", "version", "value"]
CmpOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True)
class Cmp:
    """Compare `target` of `key` with `value`; a missing key has create/mod revision 0."""

    key: str
    target: CmpTarget
    op: CmpOp
    value: int | str


@dataclass(frozen=True)
class Put:
    key: str
    value: str
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


Op = Put | Delete


@dataclass(frozen=True)
class Txn:
    """One conditional write: `ops` apply only if every compare in `compares` holds."""

    compares: tuple[Cmp, ...]
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class TxnResult:
    """`succeeded=False` means a compare failed: someone else wrote first.  That is a
    normal outcome of a compare-and-swap, not an error."""

    succeeded: bool
    revision: int
