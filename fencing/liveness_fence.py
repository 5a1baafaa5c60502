"""Liveness-lease fencing (docs/keyspace-v2.md, section 4): pure rules, time passed in.

On keyspace 2 each agent holds two leases, renewed in one keepalive round: the
registration lease (`/vmha/n/X/reg`, which an operator revokes to drain the node) and
the liveness lease (`/vmha/n/X/alive`, which nobody revokes).  A lost node whose
liveness key is gone as well has, but for two cases, not renewed for a TTL and has
fenced itself, so the leader's fence window may be shorter than keyspace 1's
(`fencing.policy.fence_window`).  The window is counted from the leader's first
observation of *both* keys absent, and chosen by the config's `liveness_fence`:

* `fast`: `fence_margin_s`.  The agent's self-fence deadline is the minimum over both
  leases of (last acknowledged send + TTL - safety), so whichever lease expired, the
  agent and its guard started destroying `safety` before it did.  Unsafe only when both
  leases are revoked while the agent lives: root revoking both (never do that), or an
  etcd with the stale-leader revocation bug (#12528: fixed in 3.4.28, 3.5.11, 3.6.0).
* `bounded`: safe on every etcd.  While its registration is gone the agent never pets
  its guard, so the guard fires at most `guard_timeout` after the last pet, which
  follows the last acknowledged round's send (the deletion can only come after it) by
  at most one keepalive deadline (both keepalives go out together on the keepalive
  stream; the window keeps two deadlines, as when they were sent one after the other),
  and no later than that pet's deadline (that send + TTL - safety).  The window is that bound
  plus `fence_margin_s`; with the guard disabled, the agent's own deadline (TTL -
  safety) plus the margin.
* `off`: keyspace 1's window (`fencing.policy.fence_window`).
* `auto` (default): `fast` when every etcd member reports a version without the bug,
  else `bounded` (`resolve_mode`; a member that did not answer counts as old).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from fencing.policy import FenceVerdict, guard_timeout
from schemas.models import ClusterConfig

Mode = Literal["fast", "bounded", "off"]

# The first release of each etcd minor line with the stale-leader revocation fixed
# (etcd #12528, #15247); every minor line after 3.5 has it from its start.
FIXED_IN = {(3, 4): 28, (3, 5): 11}
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


def version_fixed(version: str | None) -> bool:
    """True if an etcd server of `version` ("3.5.12") never revokes leases it saw
    expire while its process was paused; None or an unreadable version: False."""
    m = _VERSION.match(version or "")
    if m is None:
        return False
    major, minor, patch = (int(g) for g in m.groups())
    if (major, minor) in FIXED_IN:
        return patch >= FIXED_IN[(major, minor)]
    return (major, minor) > (3, 5)


@dataclass(frozen=True)
class ModeChoice:
    mode: Mode
    why: str


def resolve_mode(setting: str, versions: Mapping[str, str | None]) -> ModeChoice:
    """The mode a `liveness_fence` setting means given each member's reported version
    (endpoint -> version, None: no answer).  Only `auto` reads the versions."""
    if setting in ("fast", "bounded", "off"):
        return ModeChoice(setting, f"liveness_fence={setting} in the config")  # type: ignore[arg-type]
    if not versions:
        return ModeChoice("bounded", "auto: no etcd member's version known")
    old = sorted(f"{ep} ({v or 'no answer'})" for ep, v in versions.items()
                 if not version_fixed(v))
    if old:
        return ModeChoice("bounded", "auto: etcd member(s) " + ", ".join(old)
                          + " may revoke leases after a stall (etcd #12528; fixed in "
                            "3.4.28, 3.5.11, 3.6.0)")
    return ModeChoice("fast", "auto: every etcd member is "
                      + ", ".join(sorted(f"{v}" for v in versions.values() if v)))


def liveness_window(cfg: ClusterConfig, mode: Mode) -> float | None:
    """How long after the first observation of both keys absent the node counts as
    fenced; None under `off` (keyspace 1's window applies)."""
    if mode == "fast":
        return cfg.fence_margin_s
    if mode == "bounded":
        own = cfg.lease_ttl_s - cfg.self_fence_safety_s
        if cfg.guard_enabled:
            own = min(2 * cfg.keepalive_timeout_s + guard_timeout(cfg), own)
        return own + cfg.fence_margin_s
    return None


def window_formula(mode: Mode, cfg: ClusterConfig) -> str:
    if mode == "fast":
        return "fence_margin_s"
    if cfg.guard_enabled:
        return ("min(2 x keepalive_timeout_s + guard timeout, lease_ttl_s - "
                "self_fence_safety_s) + fence_margin_s")
    return "lease_ttl_s - self_fence_safety_s + fence_margin_s"


def liveness_verdict(both_gone_at: float | None, now: float, cfg: ClusterConfig,
                     mode: Mode) -> FenceVerdict | None:
    """The verdict of the liveness rule for a node whose registration and liveness keys
    the leader first saw both absent at `both_gone_at` (None: the liveness key is
    there); None when the rule does not apply."""
    window = liveness_window(cfg, mode)
    if window is None or both_gone_at is None:
        return None
    waited = now - both_gone_at
    what = (f"liveness fence {mode}: registration and liveness keys gone for {waited:.2f} s"
            f", window {window:.2f} s = {window_formula(mode, cfg)}")
    if waited >= window:
        return FenceVerdict(True, f"{what}; the agent self-fenced")
    return FenceVerdict(False, f"{what}; waiting", window - waited)


def track_both_gone(lost: Mapping[str, float], alive: Sequence[str] | Mapping[str, object],
                    prev: Mapping[str, float], now: float) -> dict[str, float]:
    """When the leader first saw each lost node's liveness key absent too (lost nodes:
    `lost`, registration absent; `alive`: the nodes whose liveness key is present)."""
    return {n: prev.get(n, now) for n in sorted(lost) if n not in alive}
