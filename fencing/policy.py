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

from schemas.models import ClusterConfig

# etcd (3.4) checks lease expiry every 500 ms; keep at least that much slack.
ETCD_EXPIRY_GRANULARITY_S = 0.5


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
    if cfg.fence_margin_s < cfg.self_fence_safety_s:
        problems.append(
            f"fence_margin_s={cfg.fence_margin_s} must be at least "
            f"self_fence_safety_s={cfg.self_fence_safety_s}")
    if cfg.fence_margin_s < ETCD_EXPIRY_GRANULARITY_S:
        problems.append(
            f"fence_margin_s={cfg.fence_margin_s} is below etcd's "
            f"{ETCD_EXPIRY_GRANULARITY_S} s lease-expiry granularity")
    return problems


def require_safe_timing(cfg: ClusterConfig) -> None:
    problems = validate_timing(cfg)
    if problems:
        raise UnsafeConfigError("unsafe cluster timing: " + "; ".join(problems))


def self_fence_deadline(last_ack_sent_at: float, cfg: ClusterConfig) -> float:
    """Monotonic time by which an agent that has not renewed must be fenced."""
    return last_ack_sent_at + cfg.lease_ttl_s - cfg.self_fence_safety_s


def fence_window(cfg: ClusterConfig) -> float:
    """How long after the leader observes a node's lease gone it may call it fenced.

    A full TTL plus the margin: the leader cannot tell an expiry from a revoke
    (`etcdctl lease revoke`, a drain), and after a revoke a stuck agent's deadline
    (last acknowledged keepalive + TTL - safety) can lie up to a TTL later than the
    moment the key disappeared.  The agent keeps honouring that deadline until it
    holds a new registration, so waiting TTL + margin is safe in both cases."""
    return cfg.lease_ttl_s + cfg.fence_margin_s


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
