"""JSON models of every value vmha stores in etcd (schema version 1).

Every model has a `schema` field; a reader refuses a value whose version it does
not know rather than guessing.  Models are immutable: a daemon cycle works on one
parsed snapshot and never mutates it.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.functional_validators import AfterValidator

from schemas.domain_policy import (
    DEFAULT_EMULATORS,
    DEFAULT_STORAGE_PATHS,
    PolicyElement,
    normalised_paths,
    parse_domain_xml,
)
from schemas.errors import SchemaError
from schemas.keys import valid_name
from schemas.secrets import CredentialRef, check_param_key, refuse_control

SCHEMA_VERSION = 1
# The cluster config's "schema" once the cluster runs keyspace 2 (`vmha keyspace migrate`).
CONFIG_SCHEMA_KEYSPACE_2 = 2

# The largest value vmha parses (and the CLI writes).  Every real value is a few kB (a
# spec's domain XML is the largest); anything bigger is refused unread, so a hostile
# value costs no parse time and no memory beyond etcd's own copy.  docs/keyspace.md.
MAX_VALUE_BYTES = 256 * 1024

# Upper bounds on sizes (docs/keyspace.md): far above any real host or guest (QEMU's
# x86 limit is 4096 vCPUs; the largest hosts have a few TiB), low enough that one value
# cannot dominate placement arithmetic (a 10^30 MiB node would attract every VM).
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB
MAX_VCPUS = 4096
MIN_PRIORITY, MAX_PRIORITY = -1_000_000, 1_000_000
MAX_PREFERENCE_WEIGHT = 1_000_000.0

M = TypeVar("M", bound="Model")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    schema_: Literal[1] = Field(default=1, alias="schema")
    # The "schema" values this model reads (only the cluster config has a second one).
    schema_versions: ClassVar[frozenset[int]] = frozenset({SCHEMA_VERSION})
    # The largest value of this model that is parsed; only a value that embeds others
    # (keyspace 2's `Assignment`: a placement and a spec) has a larger one.
    max_value_bytes: ClassVar[int] = MAX_VALUE_BYTES

    def to_json(self) -> str:
        """Stable, sorted JSON: `etcdctl get` output should diff cleanly."""
        return json.dumps(self.model_dump(by_alias=True, mode="json"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str, key: str = "<value>") -> Self:
        size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
        if size > cls.max_value_bytes:
            raise SchemaError(key, "", f"value of {size} bytes exceeds the limit of "
                                       f"{cls.max_value_bytes} bytes (not parsed)")
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
        if type(version) is not int or version not in cls.schema_versions:
            shown = repr(version)[:80]
            known = " or ".join(str(v) for v in sorted(cls.schema_versions))
            raise SchemaError(key, "schema", f"unsupported schema version {shown} "
                                             f"(this vmha reads version {known})")
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


def _check_names(values: Any, what: str) -> Any:
    """Every name in a list (or every key of a dict), as `_check_name`."""
    for v in values:
        _check_name(v, what)
    return values



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
    # A value is text, or {"credential": NAME}: a secret read from the orchestrator's
    # credentials directory when the agent runs, never stored here (schemas.secrets).
    params: dict[str, str | CredentialRef] = {}
    timeout_s: float = Field(default=30.0, gt=0)
    verify: bool = True  # run action=status after a successful off and require "off"

    @field_validator("agent")
    @classmethod
    def _agent(cls, v: list[str]) -> list[str]:
        return [refuse_control(a, "fence agent argument") for a in v]

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, str | CredentialRef]) -> dict[str, str | CredentialRef]:
        for key, value in v.items():
            check_param_key(key)
            if isinstance(value, str):
                refuse_control(value, f"fence parameter {key!r}")
        return v


def _fence_key(key: str) -> str:
    return key if key == "*" else _check_name(refuse_control(key, "fence_devices key"),
                                              "fence_devices node")


FenceKey = Annotated[str, AfterValidator(_fence_key)]


class ClusterConfig(Model):
    """Cluster-wide timing and policy; see fencing.policy for the rules that tie them.

    `"schema": 2` marks the config of a cluster migrated to keyspace 2 (same fields):
    keyspace 2's readers take either, keyspace 1's refuse 2 (`schemas.snapshot`), so a
    daemon that reads keyspace 1 refuses to start on a migrated cluster rather than find
    no VM there and destroy its domains (docs/keyspace-v2.md, section 6)."""

    schema_: Literal[1, 2] = Field(default=1, alias="schema")  # type: ignore[assignment]
    schema_versions: ClassVar[frozenset[int]] = frozenset({1, CONFIG_SCHEMA_KEYSPACE_2})

    # Timing (docs/fencing.md, "Timing rules"; fencing.policy.validate_timing).
    lease_ttl_s: int = Field(default=6, ge=1, le=60)
    keepalive_interval_s: float = Field(default=0.5, gt=0)
    # The deadline of one keepalive round (every lease's answer): a member that does not
    # answer within it is left for the next endpoint at once.
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
    fence_devices: dict[FenceKey, FenceDevice] = {}  # node name (or "*") -> external fence agent
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
    # Domain XML policy (schemas.domain_policy, docs/domain-policy.md): the directories
    # and libvirt pools disks and filesystems may come from (empty: only disks without a
    # host path, e.g. network disks), the emulator binaries a domain may name, and what
    # each VM is explicitly allowed beyond that.
    storage_paths: list[str] = Field(default_factory=lambda: list(DEFAULT_STORAGE_PATHS),
                                     max_length=256)
    storage_pools: list[str] = Field(default=[], max_length=256)
    emulators: list[str] = Field(default_factory=lambda: list(DEFAULT_EMULATORS),
                                 max_length=256)
    domain_policy_allow: dict[str, list[PolicyElement]] = {}

    # Encrypted migration (docs/operator-guide.md, "Encrypted migration"): live migrations
    # use QEMU's native TLS for the guest's memory (VIR_MIGRATE_TLS) and reach the
    # destination's libvirtd over qemu+tls://<migration address>/system, both ends
    # checking certificates.  Off by default: it needs a PKI on every node first; a
    # cluster without it must keep the migration network private.
    migration_tls: bool = False

    @field_validator("storage_paths", "emulators")
    @classmethod
    def _abs_paths(cls, v: list[str]) -> list[str]:
        return normalised_paths(v)

    @field_validator("domain_policy_allow")
    @classmethod
    def _allow_names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return _check_names(v, "VM")  # type: ignore[no-any-return]
    # Live migrations (docs/fencing.md, "Migrations in flight").  The source aborts a
    # migration still running after `migration_timeout_s` (a 64 GiB guest needs about a
    # minute at 10 Gb/s; five times that stays under the agent's 600 s drain deadline,
    # so a stuck migration is retried elsewhere before a drain gives up), or, if the
    # operator allows it, switches it to post-copy (the guest then runs on the target
    # and a loss of either host during the copy loses the guest).
    migration_timeout_s: float = Field(default=300.0, gt=0)
    migration_postcopy_on_timeout: bool = False
    # Drains and external fencing (docs/fencing.md, "Drains never call a fence device"):
    # with fence_policy external/both, a node whose registration vanished is given this
    # long to register again (an agent answers `etcdctl lease revoke` by registering
    # again, cordoned) before its fence device is called.  A node that left with a leave
    # marker (a drain that finished) is never fenced by a device.
    revoke_grace_s: float = Field(default=3.0, ge=0)
    # Keyspace 2 (docs/keyspace-v2.md, section 4; fencing.liveness_fence): how soon the
    # leader may fence a lost node whose liveness key is gone too.  auto: fast when every
    # etcd member is 3.4 >= 3.4.28, 3.5 >= 3.5.11 or >= 3.6.0, else bounded; off: the
    # fence window alone, as on keyspace 1 (which ignores this field).
    liveness_fence: Literal["auto", "fast", "bounded", "off"] = "auto"


class Capacity(Model):
    memory_mib: int = Field(ge=1, le=MAX_MEMORY_MIB)
    vcpus: int = Field(ge=1, le=MAX_VCPUS)


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

    # Both are the node's own strings: a line break in the URI would add lines to a
    # fence agent's stdin where "{uri}" is substituted.
    @field_validator("libvirt_uri", "migration_address")
    @classmethod
    def _no_control(cls, v: str) -> str:
        return refuse_control(v, "registered URI or address")


# The reason of the cordon `vmha node drain` writes on keyspace 2 (its node's agent
# records the drain in the history when it sees it).
DRAIN_REASON = "drain"


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


class LeaveMarker(Model):
    """Written by an agent just before it revokes its own lease on a drain that finished
    (or gave up after destroying every VM): the node runs nothing and left on purpose.
    Not leased; deleted in the transaction of the node's next registration."""

    node: str
    lease_id: str  # the lease it revoked (hex)
    reason: str
    at: float


class AliveRecord(Model):
    """The key of the agent's liveness lease, a second lease granted with the
    registration's and renewed with it; operators never revoke it.  It tells a revoke by
    an operator (the registration lease only: a drain) from etcd 3.4.23's revocation of
    every lease a paused leader saw expire (both: not a drain).  Leased by that lease."""

    node: str
    lease_id: str  # the liveness lease (hex)
    at: float


class LeaderRecord(Model):
    id: str
    host: str
    pid: int
    lease_id: str
    elected_at: float
    # The orchestrator's release ("" from releases before it was recorded): `vmha
    # keyspace migrate` refuses a leader that cannot freeze for it.
    version: str = ""


class VmSpec(Model):
    """User-declared.  The domain XML's <name> must equal the VM name."""

    name: str
    domain_xml: str
    memory_mib: int = Field(ge=1, le=MAX_MEMORY_MIB)
    vcpus: int = Field(ge=1, le=MAX_VCPUS)
    state: Literal["running", "stopped"] = "running"
    # Placement constraints (orchestrator.placement); all optional.
    priority: int = Field(default=0, ge=MIN_PRIORITY, le=MAX_PRIORITY)  # higher: first
    anti_affinity: list[str] = []  # hard: never on a node with another VM of these groups
    soft_anti_affinity: list[str] = []  # preferred apart
    affinity: list[str] = []  # hard: on the node that holds the other VMs of these groups
    soft_affinity: list[str] = []  # preferred together
    node_preferences: dict[str, Annotated[float, Field(
        ge=-MAX_PREFERENCE_WEIGHT, le=MAX_PREFERENCE_WEIGHT, allow_inf_nan=False)]] = {}
    allowed_nodes: list[str] = []  # hard restriction; empty: any node

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "VM")

    @field_validator("allowed_nodes", "node_preferences")
    @classmethod
    def _nodes(cls, v: Any) -> Any:
        return _check_names(v, "node")

    @field_validator("anti_affinity", "soft_anti_affinity", "affinity", "soft_affinity")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        return _check_names(v, "group")  # type: ignore[no-any-return]

    @model_validator(mode="after")
    def _xml(self) -> VmSpec:
        root = parse_domain_xml(self.domain_xml)
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
    text = parse_domain_xml(domain_xml).findtext("uuid")
    if text is None:
        return None
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        raise ValueError(f"domain_xml <uuid> {text[:60]!r} is not a UUID") from None


# Nodes a placement may list as given up on: one per relocation (`max_relocate` ≤ 100)
# and the first node.
MAX_FAILED_NODES = 101


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
    failed_nodes: list[str] = Field(default=[], max_length=MAX_FAILED_NODES)
    spec_revision: int | None = None

    @field_validator("failed_nodes")
    @classmethod
    def _failed_nodes(cls, v: list[str]) -> list[str]:
        # Each entry names a key an agent then watches (keyspace 2's failure records).
        return _check_names(v, "failed node")  # type: ignore[no-any-return]

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

    @field_validator("vm")
    @classmethod
    def _vm(cls, v: str) -> str:
        return _check_name(v, "VM")

    @field_validator("to")
    @classmethod
    def _to(cls, v: str) -> str:
        return _check_name(v, "node")


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
