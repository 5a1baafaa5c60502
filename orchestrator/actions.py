"""What the leader's planner decides: the actions of one cycle (pure data).

Every action carries the compares that make it safe to apply later; the leader adds its
epoch compare on top (orchestrator.leader).  `orchestrator.planner` re-exports these
names, which is where the leader and the tools import them from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from schemas.models import Placement
from schemas.snapshot import ClusterSnapshot


@dataclass(frozen=True)
class FenceNode:
    node: str
    lease_id: str
    reason: str
    method: str = "self"  # "self": write the record; "external": run the fence device
    expect_mod_revision: int = 0  # the node's (failed) fence record, 0: none
    device: str = ""


@dataclass(frozen=True)
class ClearFence:
    node: str
    fence_mod_revision: int
    reason: str


@dataclass(frozen=True)
class WritePlacement:
    placement: Placement
    expect_mod_revision: int  # 0: the placement key must not exist
    # Lost holders: their registration must still be absent and their fence record unchanged.
    fenced_holders: tuple[tuple[str, int], ...] = ()
    # A decision taken on the VM's status (a node gave up on it): the status unchanged.
    status_mod_revision: int | None = None


@dataclass(frozen=True)
class Wait:
    vm: str
    reason: str


@dataclass(frozen=True)
class ClearMove:
    """An operator's move request is done (or moot): delete it."""

    vm: str
    mod_revision: int
    reason: str


Action = FenceNode | ClearFence | WritePlacement | Wait | ClearMove


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    lost_since: Mapping[str, float]
    summary: str
    # Lost nodes whose liveness key is gone too, first seen so (keyspace 2's liveness
    # fencing; empty when it is off): the caller hands it back next cycle.
    both_gone_since: Mapping[str, float] = field(default_factory=dict)
    # When time alone may next change this plan (monotonic, the `now` it was made with):
    # the end of a fence or liveness window, of revoke_grace_s, a failed fence device's
    # next attempt.  None: only a change in etcd can (or no lost node waits on time).
    recheck_at: float | None = None

    @property
    def writes(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if not isinstance(a, Wait))


def frozen_by_invalid_key(action: Action, snap: ClusterSnapshot) -> str:
    """Why `action` must not be written, or "": a VM or node with a key that did not
    parse is left as it is.  Its spec, placement or registration may exist but be
    unreadable, so a decision would be taken on a guess (a hostile value over a live
    VM's spec must not stop it, one over a node's registration must not fence it)."""
    vm = (action.placement.vm if isinstance(action, WritePlacement)
          else getattr(action, "vm", None))
    if vm is not None and vm in snap.invalid_vms:
        return f"VM {vm} has an invalid key: left as it is until it is fixed"
    node = getattr(action, "node", None)
    if isinstance(action, (FenceNode, ClearFence)) and (
            node in snap.invalid_nodes):
        return f"node {node} has an invalid key: left as it is until it is fixed"
    return ""


def lost_history(told: set[str], lost: Mapping[str, float], snap: ClusterSnapshot
                 ) -> tuple[list[str], list[str], set[str]]:
    """The history of lost nodes for one plan: (nodes back, nodes lost, the nodes whose
    loss is now on record).  `told`: on record before; `lost`: the plan's lost nodes.

    A node whose registration (or fence record) does not parse is unreadable, not gone:
    the planner counts it as lost (its VMs wait, its fence is frozen), but its history is
    left as it is until the key is fixed, so a bad value never records an outage of VMs
    that kept running (`vmha availability` reads `node_lost`)."""
    frozen = snap.invalid_nodes
    now = {n for n in lost if n not in frozen} | (told & frozen)
    back = sorted(n for n in told - now if n in snap.nodes)
    return back, sorted(now - told), now
