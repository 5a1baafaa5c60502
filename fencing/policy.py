"""Pure fencing rules: no I/O, no clock reads (time is passed in).

The self-fencing contract (see docs/fencing.md):

* An agent computes its deadline from the *send* time of the last keepalive that
  etcd acknowledged: ``deadline = sent + lease_ttl - self_fence_safety``.  etcd
  cannot expire the lease before ``received + lease_ttl >= sent + lease_ttl``, so
  an agent that destroys its domains at ``deadline`` has done so strictly before
  the server-side expiry.  An etcd leader change resets lease TTLs; that only
  moves the server-side expiry later, never earlier, so the inequality holds.
* The leader records a node as fenced only after it has *observed* the lease gone
  and then waited ``lease_ttl + fence_margin`` (see `fence_window`): the lease may
  have been revoked rather than expired, and the agent's deadline is at most one
  TTL after the last keepalive it got acknowledged, which precedes the
  observation; the margin covers the time the agent needs to destroy its domains.
  A new leader starts its own wait from its own observation, which can only be
  later.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.models import ClusterConfig, FenceRecord

# etcd (3.4) checks lease expiry every 500 ms; keep at least that much slack.
ETCD_EXPIRY_GRANULARITY_S = 0.5
# Scheduling and the pipe to the guard: an acknowledged renewal reaches the guard a
# little after etcd answered it.
RENEWAL_SLACK_S = 0.25


class UnsafeConfigError(ValueError):
    """The timing settings break the self-fencing contract; refuse to start."""


def validate_timing(cfg: ClusterConfig) -> list[str]:
    """Return every broken timing rule, each as one readable sentence."""
    problems: list[str] = []
    ttl = float(cfg.lease_ttl_s)
    window = ttl - cfg.self_fence_safety_s
    if cfg.self_fence_safety_s < 0.25:
        problems.append(
            f"self_fence_safety_s={cfg.self_fence_safety_s} is below 0.25 s: the agent needs "
            "time to destroy its domains before its lease can expire")
    if window <= 0:
        problems.append(
            f"self_fence_safety_s={cfg.self_fence_safety_s} must be smaller than "
            f"lease_ttl_s={cfg.lease_ttl_s}")
    elif cfg.keepalive_interval_s * 2 > window:
        problems.append(
            f"keepalive_interval_s={cfg.keepalive_interval_s} leaves fewer than two keepalive "
            f"attempts inside the {window:.2f} s before self-fencing "
            "(need keepalive_interval_s * 2 <= lease_ttl_s - self_fence_safety_s)")
    else:
        problems += _renewal_gap_problems(cfg, window)
    if cfg.fence_margin_s < cfg.self_fence_safety_s:
        problems.append(
            f"fence_margin_s={cfg.fence_margin_s} must be at least "
            f"self_fence_safety_s={cfg.self_fence_safety_s}")
    if cfg.fence_margin_s < ETCD_EXPIRY_GRANULARITY_S:
        problems.append(
            f"fence_margin_s={cfg.fence_margin_s} is below etcd's "
            f"{ETCD_EXPIRY_GRANULARITY_S} s lease-expiry granularity")
    if cfg.guard_enabled and window > 0 and cfg.keepalive_interval_s * 2 <= window:
        g = guard_timeout(cfg)
        if g >= window:
            problems.append(
                f"guard_timeout_s={g:.2f} must be below lease_ttl_s - self_fence_safety_s="
                f"{window:.2f}: the guard must fire before the lease can expire")
        if g <= cfg.keepalive_interval_s:
            problems.append(
                f"guard_timeout_s={g:.2f} must exceed keepalive_interval_s="
                f"{cfg.keepalive_interval_s}: the agent pets the guard once per renewal")
    if cfg.fence_policy in ("external", "both") and not cfg.fence_devices:
        problems.append(f"fence_policy={cfg.fence_policy!r} needs at least one entry in "
                        "fence_devices (a node name, or \"*\" for every node)")
    if cfg.fence_retry_max_s < cfg.fence_retry_initial_s:
        problems.append(f"fence_retry_max_s={cfg.fence_retry_max_s} is below "
                        f"fence_retry_initial_s={cfg.fence_retry_initial_s}")
    return problems


def renewal_gap(cfg: ClusterConfig) -> float:
    """The longest time between two acknowledged keepalives that one etcd member's
    fault can cause while the cluster keeps its quorum (docs/fencing.md, "Timing rules").

    The next keepalive is sent one interval after the last acknowledged one; it may
    hang on a member that does not answer (stalled, partitioned, no RST) for its whole
    RPC deadline; the keeper then tries the next endpoint at once.  If the faulty member
    was the raft leader, renewals fail until the others elect a new one, which raft
    bounds by twice the election timeout, and the attempt in flight when it is elected
    may still hang for one more RPC deadline:

        interval + 2 * keepalive_timeout + 2 * election_timeout
    """
    return (cfg.keepalive_interval_s + 2 * cfg.keepalive_timeout_s
            + 2 * cfg.etcd_election_timeout_s)


def _renewal_gap_problems(cfg: ClusterConfig, window: float) -> list[str]:
    """The member-fault rule: a renewal gap (plus slack) fits before the guard fires and
    before the agent's own deadline."""
    problems: list[str] = []
    need = renewal_gap(cfg) + RENEWAL_SLACK_S
    formula = (f"keepalive_interval_s + 2 * keepalive_timeout_s + 2 * etcd_election_timeout_s "
               f"+ {RENEWAL_SLACK_S} = {need:.2f} s")
    if need > window:
        problems.append(
            f"a stalled or partitioned etcd member can delay renewals by {formula}, more "
            f"than lease_ttl_s - self_fence_safety_s={window:.2f} s: the node would fence "
            "itself while etcd keeps its quorum (raise lease_ttl_s)")
    elif cfg.guard_enabled and need > guard_timeout(cfg):
        problems.append(
            f"a stalled or partitioned etcd member can delay renewals by {formula}, more "
            f"than guard_timeout_s={guard_timeout(cfg):.2f}: the guard would fire while etcd "
            "keeps its quorum (raise lease_ttl_s or guard_timeout_s)")
    return problems


def guard_timeout(cfg: ClusterConfig) -> float:
    """How long the guard waits without a pet before it fences the host.

    Default: one keepalive interval less than the agent's deadline window
    (lease_ttl - safety - keepalive_interval), but never less than halfway between
    the keepalive interval and that window, so it always lies strictly between them
    when the other rules hold."""
    if cfg.guard_timeout_s is not None:
        return cfg.guard_timeout_s
    window = cfg.lease_ttl_s - cfg.self_fence_safety_s
    ka = cfg.keepalive_interval_s
    return max(window - ka, (window + ka) / 2)


def guard_fire_at(last_pet_at: float, pet_deadline: float, cfg: ClusterConfig) -> float:
    """When the guard fences: its own timeout after the last pet, or the agent's
    self-fence deadline carried in that pet, whichever comes first."""
    return min(last_pet_at + guard_timeout(cfg), pet_deadline)


def fence_retry_delay(cfg: ClusterConfig, attempts: int) -> float:
    """Backoff before the next external fence attempt after `attempts` failures."""
    return float(min(cfg.fence_retry_max_s,
                     cfg.fence_retry_initial_s * 2 ** max(0, attempts - 1)))


def device_for(cfg: ClusterConfig, node: str) -> str | None:
    """The fence_devices key that fences `node` (its own entry, else "*")."""
    if node in cfg.fence_devices:
        return node
    return "*" if "*" in cfg.fence_devices else None


def require_safe_timing(cfg: ClusterConfig) -> None:
    problems = validate_timing(cfg)
    if problems:
        raise UnsafeConfigError("unsafe cluster timing: " + "; ".join(problems))


def self_fence_deadline(last_ack_sent_at: float, cfg: ClusterConfig) -> float:
    """Monotonic time by which an agent that has not renewed must be fenced."""
    return last_ack_sent_at + cfg.lease_ttl_s - cfg.self_fence_safety_s


def revoked_deadline(deadline: float, cfg: ClusterConfig) -> float:
    """How long an agent whose lease was *revoked* (etcd answered: a drain) may keep
    its domains while it registers again, given its self-fence `deadline` (the last
    acknowledged keepalive's send time + TTL - safety).

    The revoke came after that keepalive was acknowledged, and the leader waits its
    `fence_window` from the moment it sees the registration gone, which is later
    still.  So the send time + fence window - safety is as safe as the deadline is
    against an expiry, and it gives a drain whose re-registration meets a slow etcd
    member (a restart, a stall) the guard timeout + margin more, instead of killing the
    VMs it is about to migrate.  An expiry keeps the plain deadline."""
    return deadline + fence_window(cfg) - cfg.lease_ttl_s


def fence_window(cfg: ClusterConfig) -> float:
    """How long after the leader observes a node's lease gone it may call it fenced.

    A full TTL plus the margin: the leader cannot tell an expiry from a revoke
    (`etcdctl lease revoke`, a drain), and after a revoke a stuck agent's deadline
    (last acknowledged keepalive + TTL - safety) can lie up to a TTL later than the
    moment the key disappeared.  The agent keeps honouring that deadline until it
    holds a new registration, so waiting TTL + margin is safe in both cases.

    With the guard enabled the window also includes the guard timeout (rule: fence
    window >= TTL + guard timeout + margin), so that a guard that fires at its own
    timeout after the last pet, not at the deadline, is still covered."""
    return cfg.lease_ttl_s + cfg.fence_margin_s + (guard_timeout(cfg) if cfg.guard_enabled
                                                    else 0.0)


@dataclass(frozen=True)
class FenceVerdict:
    fenced: bool
    reason: str
    remaining_s: float = 0.0


def self_fence_verdict(lost_observed_at: float, now: float, cfg: ClusterConfig) -> FenceVerdict:
    """Has a node whose lease the leader saw disappear at `lost_observed_at` fenced itself?"""
    waited = now - lost_observed_at
    window = fence_window(cfg)
    if waited >= window:
        return FenceVerdict(True, f"lease gone for {waited:.2f} s >= fence window {window:.2f} s; "
                                  "the agent self-fenced before its lease expired")
    return FenceVerdict(False, f"lease gone for {waited:.2f} s, waiting for the fence window "
                               f"({window:.2f} s)", window - waited)


@dataclass(frozen=True)
class FenceDecision:
    """What the leader does about one lost node now: method None means wait."""

    method: str | None  # "self" (write the record) | "external" (run the fence agent)
    reason: str
    device: str = ""
    # A wait (method None): seconds after which time alone may change the decision;
    # None when only a change in etcd can (a record, a registration, a confirm-off).
    recheck_s: float | None = None


def fence_decision(cfg: ClusterConfig, node: str, lost_observed_at: float, now: float,
                   wall_time: float, record: FenceRecord | None, *,
                   left: bool = False, liveness: FenceVerdict | None = None) -> FenceDecision:
    """The cluster's fence policy applied to one lost node (no fence success yet).

    self:     the self-fence record after the fence window.
    external: run the node's fence device once the node has had `revoke_grace_s` to
              register again (a drain by lease revoke re-registers at once); a failure
              is recorded and retried with backoff; the VMs wait until a success (or
              `vmha node confirm-off`).
    both:     external first; once the fence window has passed, self-fencing is trusted.

    `left`: the node's agent wrote a leave marker before revoking its own lease (a drain
    that finished): no device is ever called; the self-fence record follows the fence
    window, whatever the policy (docs/fencing.md, "Drains never call a fence device").

    `liveness`: keyspace 2's verdict on the node's liveness key as well
    (`fencing.liveness_fence.liveness_verdict`); wherever self-fencing is trusted, the
    earlier of the two verdicts decides (both are safe).
    """
    verdict = self_fence_verdict(lost_observed_at, now, cfg)
    if liveness is not None and (liveness.fenced or (not verdict.fenced and
                                                     liveness.remaining_s < verdict.remaining_s)):
        verdict = liveness
    # Until the self-fencing verdict turns (None: it has, or it is not trusted).
    self_s = None if verdict.fenced else verdict.remaining_s
    if left:
        return FenceDecision("self" if verdict.fenced else None,
                             f"node left after a drain (leave marker); {verdict.reason}",
                             recheck_s=self_s)
    dev = device_for(cfg, node)
    waited = now - lost_observed_at
    both = self_s if cfg.fence_policy == "both" else None
    if (cfg.fence_policy in ("external", "both") and dev is not None
            and waited < cfg.revoke_grace_s):
        return FenceDecision(None, f"lease gone for {waited:.2f} s; waiting revoke_grace_s="
                                   f"{cfg.revoke_grace_s:g} s for a drained or restarting agent "
                                   "to register again before calling the fence device", dev,
                             recheck_s=_earlier(cfg.revoke_grace_s - waited, both))
    if cfg.fence_policy in ("external", "both") and dev is not None:
        if cfg.fence_policy == "both" and verdict.fenced:
            return FenceDecision("self", verdict.reason + " (external fencing did not succeed "
                                 "first; self-fencing trusted)")
        if record is not None and record.outcome == "failed":
            due = record.fenced_at + fence_retry_delay(cfg, record.attempts)
            if wall_time < due:
                return FenceDecision(None, f"external fence failed {record.attempts} time(s) "
                                           f"({record.reason}); next attempt in "
                                           f"{due - wall_time:.1f} s", dev,
                                     recheck_s=_earlier(due - wall_time, both))
        return FenceDecision("external", f"lease gone; fencing with device {dev!r}", dev)
    if cfg.fence_policy == "external":
        return FenceDecision(None, f"fence_policy=external but no fence device for {node}; "
                                   f"confirm by hand: vmha node confirm-off {node}")
    if verdict.fenced:
        return FenceDecision("self", verdict.reason)
    return FenceDecision(None, verdict.reason, recheck_s=self_s)


def _earlier(a: float, b: float | None) -> float:
    return a if b is None else min(a, b)
