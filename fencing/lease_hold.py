"""The guard service holds the node's lease across an agent restart.

A restarted agent must pet the guard before the guard's timeout runs out, counted from
the old process's last pet (4.5 s with the defaults).  Python's start-up, imports and
the first etcd round trip fit in that on an idle host, but not always on a loaded one:
the guard then destroys every VM of a node whose lease never lapsed.  So while no agent
process is attached, the guard service renews the lease itself, for at most
``restart_grace_s``, exactly as the agent would (`fencing.lease.LeaseKeeper`: the same
deadline arithmetic, counted from the send of each acknowledged keepalive).  Each
renewal acts as a pet.  The hold ends when an agent pets again, when the grace is
over (the guard then fires at its usual time after the last renewal), or when etcd
says the lease is gone.

Safety is the agent's argument unchanged: a renewal etcd acknowledged keeps the lease
alive at least ``ttl`` after it was sent, the guard fires at the latest ``ttl -
safety`` after that send, and the leader cannot fence the node while the lease lives.
A guard cut off from etcd renews nothing and fires on time.

The agent's liveness lease (nodeagent.liveness) is held the same way, beside the
registration's: a node whose agent restarts keeps both, so "liveness lease expired =>
the node self-fenced" stays true.  Only the registration lease's renewals pet the guard.

The agent tells the guard which leases to hold, once per registration (and again when
its liveness lease is replaced):

    lease <lease id, hex> <ttl> <self_fence_safety> <keepalive_interval> <keepalive_timeout>
    alive <liveness lease id, hex>

The `alive` line is separate so that a guard without it still holds the registration
lease (it logs the line as a bad message), and one with it still takes `lease` alone
from an agent that has no liveness lease.

An agent on keyspace 2 adds a line `paired`: both leases are then renewed in one round
and a renewal pets only when both were acknowledged (`fencing.lease`, `partner`), so
the deadline is the minimum over both, as the agent's own (docs/keyspace-v2.md,
section 4).  A guard of an older release logs `paired` as a bad message and holds the
two leases apart, with the registration lease's deadline.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from fencing.lease import LeaseKeeper, LeaseStore
from schemas.models import ClusterConfig


@dataclass(frozen=True)
class LeaseTerms:
    """What the guard needs to renew the agent's lease the way the agent does."""

    lease_id: int
    ttl_s: float
    safety_s: float
    interval_s: float
    timeout_s: float
    alive_id: int = 0  # the liveness lease; 0: none
    paired: bool = False  # keyspace 2: both renewed in one round, the deadline the minimum

    def line(self) -> str:
        """The message: the `lease` line, then the `alive` line if there is one (and
        `paired` after it on keyspace 2)."""
        lease = (f"lease {self.lease_id:x} {self.ttl_s:g} {self.safety_s:g} "
                 f"{self.interval_s:g} {self.timeout_s:g}")
        if not self.alive_id:
            return lease
        return f"{lease}\nalive {self.alive_id:x}" + ("\npaired" if self.paired else "")

    def with_alive(self, args: list[str]) -> LeaseTerms:
        """The arguments after `alive`; ValueError unless one lease id."""
        if len(args) != 1 or int(args[0], 16) <= 0:
            raise ValueError(f"alive takes one lease id, got {' '.join(args)!r}")
        return dataclasses.replace(self, alive_id=int(args[0], 16))

    def with_paired(self) -> LeaseTerms:
        """After a `paired` line."""
        return dataclasses.replace(self, paired=True)

    @classmethod
    def parse(cls, args: list[str]) -> LeaseTerms:
        """The arguments after `lease`; ValueError when they are not five sane numbers."""
        if len(args) != 5:
            raise ValueError(f"lease takes 5 arguments, got {len(args)}")
        lease_id = int(args[0], 16)
        ttl, safety, interval, timeout = (float(a) for a in args[1:])
        if lease_id <= 0 or not 0 < safety < ttl or interval <= 0 or timeout <= 0:
            raise ValueError(f"lease terms out of range: {' '.join(args)}")
        return cls(lease_id, ttl, safety, interval, timeout)

    @classmethod
    def of(cls, lease_id: int, cfg: ClusterConfig, alive_id: int = 0,
           paired: bool = False) -> LeaseTerms:
        return cls(lease_id, float(cfg.lease_ttl_s), cfg.self_fence_safety_s,
                   cfg.keepalive_interval_s, cfg.keepalive_timeout_s, alive_id,
                   paired and alive_id != 0)

    def config(self) -> ClusterConfig:
        # Only the fields the keeper reads; the cluster's own rules were checked by the
        # agent that sent these terms.
        return ClusterConfig().model_copy(update={
            "lease_ttl_s": self.ttl_s, "self_fence_safety_s": self.safety_s,
            "keepalive_interval_s": self.interval_s, "keepalive_timeout_s": self.timeout_s})


class LeaseHold:
    """Renews the leases of `terms` until stopped; `on_renewed(deadline)` after each
    acknowledged renewal of the registration lease, with the self-fence deadline that
    renewal allows."""

    def __init__(self, store: LeaseStore, terms: LeaseTerms, deadline: float,
                 on_renewed: Callable[[float], None], on_gone: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.terms = terms
        self.renewals = 0
        self._on_renewed = on_renewed
        self._on_gone = on_gone
        cfg = terms.config()
        # Start from the deadline the last pet carried: never later than what the agent
        # itself had earned.
        granted = deadline - (terms.ttl_s - terms.safety_s)
        paired = terms.paired and terms.alive_id != 0
        self.keeper = LeaseKeeper(store, cfg, terms.lease_id, granted,
                                  on_gone=lambda _before: self._on_gone(),
                                  on_deadline=lambda: None, on_renewed=self._renewed,
                                  clock=clock, name="guard-hold",
                                  partner=terms.alive_id if paired else 0)
        # The liveness lease fences nothing: renewed, its deadline not watched; if it is
        # gone the agent grants a new one when it adopts the registration.
        self.alive = (LeaseKeeper(store, cfg, terms.alive_id, granted,
                                  on_gone=lambda _before: None, on_deadline=None,
                                  clock=clock, name="guard-hold-alive")
                      if terms.alive_id and not paired else None)

    def start(self) -> LeaseHold:
        self.keeper.start()
        if self.alive is not None:
            self.alive.start()
        return self

    def stop(self) -> None:
        self.keeper.stop()
        if self.alive is not None:
            self.alive.stop()

    def _renewed(self) -> None:
        self.renewals += 1
        self._on_renewed(self.keeper.deadline)
