"""The contract in etcd: key layout, JSON models and their validation.

Nothing in this package performs I/O; daemons and the CLI parse every value they
read from etcd through it, so a malformed value becomes a `SchemaError` naming the
key and the field instead of an exception deep inside a daemon.
"""

from schemas.errors import SchemaError
from schemas.keys import Keyspace
from schemas.keys_v2 import KeyspaceV2
from schemas.models import (
    MAX_VALUE_BYTES,
    SCHEMA_VERSION,
    AliveRecord,
    Capacity,
    ClusterConfig,
    CordonMarker,
    FenceRecord,
    LeaderRecord,
    LeaveMarker,
    NodeRegistration,
    Placement,
    VmSpec,
    VmStatus,
)
from schemas.models_v2 import Assignment, ConfirmOff, KeyspaceVersion
from schemas.snapshot import ClusterSnapshot, Entry

__all__ = [
    "MAX_VALUE_BYTES",
    "SCHEMA_VERSION",
    "Assignment",
    "Capacity",
    "ClusterConfig",
    "ClusterSnapshot",
    "ConfirmOff",
    "CordonMarker",
    "Entry",
    "FenceRecord",
    "Keyspace",
    "KeyspaceV2",
    "KeyspaceVersion",
    "LeaderRecord",
    "AliveRecord",
    "LeaveMarker",
    "NodeRegistration",
    "Placement",
    "SchemaError",
    "VmSpec",
    "VmStatus",
]
