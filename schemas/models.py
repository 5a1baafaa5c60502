"""JSON models of every value vmha stores in etcd (schema version 1).

Every model has a `schema` field; a reader refuses a value whose version it does
not know rather than guessing.  Models are immutable: a daemon cycle works on one
parsed snapshot and never mutates it.
"""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from typing import Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import SchemaError
from schemas.keys import valid_name

SCHEMA_VERSION = 1

# The largest value vmha parses (and the CLI writes).  Every real value is a few kB (a
# spec's domain XML is the largest); anything bigger is refused unread, so a hostile
# value costs no parse time and no memory beyond etcd's own copy.  docs/keyspace.md.
MAX_VALUE_BYTES = 256 * 1024

M = TypeVar("M", bound="Model")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    schema_: Literal[1] = Field(default=1, alias="schema")

    def to_json(self) -> str:
        """Stable, sorted JSON: `etcdctl get` output should diff cleanly."""
        return json.dumps(self.model_dump(by_alias=True, mode="json"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str, key: str = "<value>") -> Self:
        size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
        if size > MAX_VALUE_BYTES:
            raise SchemaError(key, "", f"value of {size} bytes exceeds the limit of "
                                       f"{MAX_VALUE_BYTES} bytes (not parsed)")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError, MemoryError) as exc:
            # RecursionError: deep nesting; ValueError includes UnicodeDecodeError.
            raise SchemaError(key, "", f"not valid JSON ({type(exc).__name__}: "
                                       f"{str(exc)[:200]})") from None
        if not isinstance(data, dict):
            raise SchemaError(key, "", "expected a JSON object")
        return cls.parse_dict(data, key)

    @classmethod
    def parse_dict(cls, data: dict[str, Any], key: str = "<value>") -> Self:
        version = data.get("schema", SCHEMA_VERSION)
        if type(version) is not int or version != SCHEMA_VERSION:
            shown = repr(version)[:80]
            raise SchemaError(key, "schema", f"unsupported schema version {shown} "
                                             f"(this vmha reads version {SCHEMA_VERSION})")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or ""
            if field == "schema_":
                field = "schema"
            more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
            raise SchemaError(key, field, f"{err['msg']}{more}") from None


def _check_name(value: str, what: str) -> str:
    if not valid_name(value):
        raise ValueError(f"{what} name {value!r} must be 1-63 chars of a-z, 0-9, '.', '_', '-' "
                         "and start and end with a letter or digit")
    return value


class RebalancePolicy(Model):
    """The rebalancer (orchestrator.rebalance); off unless enabled."""

    enabled: bool = False
    interval_s: float = Field(default=300.0, gt=0)
    max_moves: int = Field(default=4, ge=0, le=1000)  # per interval
    min_gain: float = Field(default=0.002, ge=0)  # drop of sum(util^2) per move


class PlacementPolicy(Model):
    """Placement constraints and limits (orchestrator.placement); all optional."""

    memory_overcommit: float = Field(default=1.0, ge=0.1, le=10)
    vcpu_overcommit: float = Field(default=1.0, ge=0.1, le=64)
    reserve_memory_mib: int = Field(default=0, ge=0)  # per node, kept free for the host
    reserve_vcpus: int = Field(default=0, ge=0)
    max_migrations_in_flight: int = Field(default=16, ge=1, le=10000)  # cluster-wide
    admission: Literal["refuse", "warn", "off"] = "warn"  # `vmha vm add` N+1 check
    rebalance: RebalancePolicy = Field(default_factory=lambda: RebalancePolicy())


class FenceDevice(Model):
    """An external fence agent (ClusterLabs convention: key=value lines on stdin).

    `agent` is the argv, e.g. ["/usr/sbin/fence_ipmilan"] or ["python3", "-m",
    "fencing.fence_vmha"] (the built-in libvirt fencer).  In `params` values, "{node}"
    and "{uri}" are replaced by the node's name and its registered libvirt URI."""

    agent: list[str] = Field(min_length=1)
    params: dict[str, str] = {}
    timeout_s: float = Field(default=30.0, gt=0)
    verify: bool = True  # run action=status after a successful off and require "off"


class ClusterConfig(Model):
    """Cluster-wide timing and policy; see fencing.policy for the rules that tie them."""

    # Timing (docs/fencing.md, "Timing rules"; fencing.policy.validate_timing).
    lease_ttl_s: int = Field(default=6, ge=1, le=60)
    keepalive_interval_s: float = Field(default=0.5, gt=0)
    # The deadline of one keepalive RPC: a member that does not answer within it is
    # left for the next endpoint at once.
    keepalive_timeout_s: float = Field(default=0.5, gt=0)
    # etcd's --election-timeout (its default, 1000 ms): a stalled leader is replaced
    # within twice that, and renewals wait for the new one.
    etcd_election_timeout_s: float = Field(default=1.0, gt=0)
    self_fence_safety_s: float = Field(default=1.0, gt=0)
    fence_margin_s: float = Field(default=2.0, gt=0)
    stop_timeout_s: float = Field(default=30.0, ge=0)
    max_migrations_per_node: int = Field(default=2, ge=1, le=64)
    history_retention_s: float = Field(default=7 * 86400.0, gt=0)
    history_max_events: int = Field(default=10000, ge=10)
    placement: PlacementPolicy = Field(default_factory=lambda: PlacementPolicy())
    # Fencing (see docs/fencing.md and fencing.policy for the rules that tie these).
    guard_enabled: bool = True
    guard_timeout_s: float | None = Field(default=None, gt=0)  # None: ttl - safety - keepalive
    fence_policy: Literal["self", "external", "both"] = "self"
    fence_devices: dict[str, FenceDevice] = {}  # node name (or "*") -> external fence agent
    fence_retry_initial_s: float = Field(default=1.0, gt=0)
    fence_retry_max_s: float = Field(default=30.0, gt=0)
    # Failures (docs/design.md, "Failures are bounded"): a boot the hypervisor refuses is
    # retried on its node with exponential backoff, at most this many times; a guest that
    # dies under its agent is restarted in place up to `max_restart` times (Proxmox's
    # max_restart); then the leader relocates it, to at most `max_relocate` other nodes
    # (Proxmox's max_relocate, Pacemaker's migration-threshold), then marks it failed.
    max_boot_failures_per_node: int = Field(default=3, ge=1, le=100)
    max_restart: int = Field(default=1, ge=0, le=100)
    max_relocate: int = Field(default=1, ge=0, le=100)
    failure_backoff_initial_s: float = Field(default=1.0, gt=0)
    failure_backoff_max_s: float = Field(default=60.0, gt=0)
    # A VM that runs this long after its last failure has its counts forgotten
    # (Pacemaker's failure-timeout).
    failure_reset_s: float = Field(default=600.0, gt=0)


class Capacity(Model):
    memory_mib: int = Field(ge=1)
    vcpus: int = Field(ge=1)


class CpuInfo(Model):
    model: str = ""
    vendor: str = ""


class AgentInfo(Model):
    pid: int
    hostname: str
    version: str


class NodeRegistration(Model):
    """Leased: disappears when the node's agent stops renewing (or is revoked)."""

    name: str
    lease_id: str  # hex, as `etcdctl lease revoke` takes it
    libvirt_uri: str
    migration_address: str
    capacity: Capacity
    cpu: CpuInfo = CpuInfo()
    # Live migration only between nodes of one group; default: derived from cpu.model.
    migration_group: str | None = None
    cordoned: bool = False
    agent: AgentInfo
    registered_at: float

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "node")

    @field_validator("lease_id")
    @classmethod
    def _lease(cls, v: str) -> str:
        int(v, 16)
        return v


class CordonMarker(Model):
    """Not leased: a cordoned node stays cordoned until an operator says otherwise."""

    node: str
    reason: str
    by: str
    at: float


class FenceRecord(Model):
    """Written by the leader once a lost node is known to run nothing any more."""

    node: str
    lease_id: str
    method: Literal["self", "external", "manual"]
    outcome: Literal["success", "failed"]
    reason: str
    epoch: int
    duration_s: float
    fenced_at: float
    attempts: int = 1
    device: str = ""  # the fence agent that ran (external), or who confirmed (manual)

    @property
    def fenced(self) -> bool:
        """Only a successful fence lets the node's VMs boot elsewhere."""
        return self.outcome == "success"


class LeaderRecord(Model):
    id: str
    host: str
    pid: int
    lease_id: str
    elected_at: float


class VmSpec(Model):
    """User-declared.  The domain XML's <name> must equal the VM name."""

    name: str
    domain_xml: str
    memory_mib: int = Field(ge=1)
    vcpus: int = Field(ge=1)
    state: Literal["running", "stopped"] = "running"
    # Placement constraints (orchestrator.placement); all optional.
    priority: int = 0  # higher is placed (and restarted) first
    anti_affinity: list[str] = []  # hard: never on a node with another VM of these groups
    soft_anti_affinity: list[str] = []  # preferred apart
    affinity: list[str] = []  # hard: on the node that holds the other VMs of these groups
    soft_affinity: list[str] = []  # preferred together
    node_preferences: dict[str, float] = {}  # node -> weight (negative: avoid)
    allowed_nodes: list[str] = []  # hard restriction; empty: any node

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "VM")

    @model_validator(mode="after")
    def _xml(self) -> VmSpec:
        try:
            root = ET.fromstring(self.domain_xml)
        except ET.ParseError as exc:
            raise ValueError(f"domain_xml is not well-formed XML: {exc}") from None
        if root.tag != "domain":
            raise ValueError(f"domain_xml root element is <{root.tag}>, expected <domain>")
        name = root.findtext("name")
        if name != self.name:
            raise ValueError(f"domain_xml <name> is {name!r}, expected {self.name!r}")
        domain_uuid(self.domain_xml)  # a malformed <uuid> is refused here, not by libvirt
        return self


def domain_uuid(domain_xml: str) -> str | None:
    """The domain's <uuid>, canonical (lower case, dashed); None if the XML has none
    (libvirt then mints one on each node).  Raises ValueError for a malformed one."""
    text = ET.fromstring(domain_xml).findtext("uuid")
    if text is None:
        return None
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        raise ValueError(f"domain_xml <uuid> {text[:60]!r} is not a UUID") from None


class Placement(Model):
    """Written only by the leader, in a transaction fenced by its epoch.

    kind:
      boot     the node boots the VM (all earlier holders are fenced or stopped)
      migrate  from_node live-migrates the VM to node; if it does not run there,
               from_node acknowledges the hand-off and node boots it
      pending  no node can take it now; reason says why
      failed   vmha gave up (boot refused or crashed too often on `failed_nodes`);
               reason says why; it stays so until the spec changes (`spec_revision`)
    """

    id: str
    vm: str
    node: str | None
    kind: Literal["boot", "migrate", "pending", "failed"]
    from_node: str | None = None
    epoch: int
    reason: str
    scores: dict[str, float] = {}
    decided_at: float
    # Nodes given up on for this VM (relocations so far), and for kind "failed" the
    # spec's mod_revision when it was marked: a changed spec is tried afresh.
    failed_nodes: list[str] = []
    spec_revision: int | None = None

    @model_validator(mode="after")
    def _shape(self) -> Placement:
        if self.kind in ("pending", "failed") and self.node is not None:
            raise ValueError(f"a {self.kind} placement has no node")
        if self.kind not in ("pending", "failed") and self.node is None:
            raise ValueError(f"a {self.kind} placement needs a node")
        if self.kind == "migrate" and not self.from_node:
            raise ValueError("a migrate placement needs from_node")
        return self


class MigrationStats(Model):
    total_ms: float | None = None
    downtime_ms: float | None = None
    source: str
    target: str


VmState = Literal["running", "paused", "stopped", "migrating", "crashed"]


class MoveRequest(Model):
    """Operator intent (`vmha vm migrate VM --to NODE`): live-migrate a running VM.

    The leader honours it when the target may take the VM (capacity, constraints,
    migration group, migration slots) and deletes it once the VM runs there."""

    vm: str
    to: str
    by: str
    requested_at: float


class VmStatus(Model):
    """Written only by agents, in a transaction fenced by their registration."""

    vm: str
    node: str
    state: VmState
    placement_id: str | None = None
    since: float
    error: str | None = None
    failed_target: str | None = None
    migration: MigrationStats | None = None
    # Failures of this VM under this placement (kept while `placement_id` stays, and
    # forgotten after `failure_reset_s` of running): boots the hypervisor refused, guests
    # that died under the agent; when it failed last and when the agent tries again.
    boot_failures: int = Field(default=0, ge=0)
    crashes: int = Field(default=0, ge=0)
    failed_at: float | None = None
    retry_at: float | None = None
    # The create revision of the writer's registration (the one its transaction compared
    # against): lets a history check tell a stale agent's write from a current one.
    registration: int | None = None


RUNNING_STATES: frozenset[str] = frozenset({"running", "paused", "migrating"})


def failure_backoff(cfg: ClusterConfig, failures: int) -> float:
    """Seconds before the next try after the n-th failure: exponential, capped."""
    exp = min(max(failures, 1) - 1, 32)  # bounded exponent: no overflow on a huge count
    return float(min(cfg.failure_backoff_max_s, cfg.failure_backoff_initial_s * 2 ** exp))


def gave_up(status: VmStatus, cfg: ClusterConfig) -> str | None:
    """Why the status's node gives up on the VM (None: it keeps trying).  The agent
    stops booting it and the leader relocates it, both by this one rule."""
    why = f": {status.error}" if status.error else ""
    if status.boot_failures >= cfg.max_boot_failures_per_node:
        return (f"{status.boot_failures} boot failures on {status.node} "
                f"(max_boot_failures_per_node {cfg.max_boot_failures_per_node}){why}")
    if status.crashes > cfg.max_restart:
        return (f"crashed {status.crashes} times on {status.node} "
                f"(max_restart {cfg.max_restart}){why}")
    return None
