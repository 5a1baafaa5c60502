"""The fault campaign's planned migrations, and kills that land in the middle of them
(issue 12), as a mixin of :class:`bench.campaign.Campaign`.

* ``drain``: a busy node's lease revoked (``vmha node drain``, ``etcdctl lease
  revoke``): its agent registers again cordoned and the leader live-migrates its VMs
  away; once it is empty it is uncordoned;
* ``move``: a running VM asked to move to another node (``vmha vm migrate``'s key);
* ``rebalance``: the rebalancer switched on, the busiest node cordoned until empty,
  then uncordoned for the rebalancer to fill again;
* ``move_kill_source`` / ``move_kill_target``: a move, and ``kill -9`` of the source's
  or the target's agent while the copy is in flight (the fake hypervisor's migration
  takes ``migrate_seconds``; the paused incoming copy on the target shows it started);
* ``drain_kill_target``: a drain, and ``kill -9`` of the agent of a node a VM is being
  copied to.

The killed agents are never the guard-service node's (its agent restarts next to a
guard that outlives it: :mod:`bench.campaign_faults`), so each kill fences its node,
which is then a needed self-fence (:data:`bench.campaign_core.CUT_OFF_FAULTS`).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from bench.campaign_core import StepResult
from bench.campaign_keys import CampaignKeys
from lab.localcluster import Daemon, poll_until
from schemas.models import CordonMarker, MoveRequest
from store.etcd import EtcdStore, StoreUnavailable

MOVE_FAULTS = ("drain", "move", "rebalance", "move_kill_source", "move_kill_target",
               "drain_kill_target")
#: Of those, the ones that kill the agent of the step's target node.
MOVE_KILLS = ("move_kill_source", "move_kill_target", "drain_kill_target")
#: How long a planned migration may take to start, and a drain to empty its node.
START_S = 15.0
EMPTY_S = 40.0


class MoveFaults:
    """Needs the campaign's store, rng, agents, nodes, fake root and observers."""

    store: EtcdStore | None
    keys: CampaignKeys
    rng: random.Random
    agents: dict[str, Daemon]
    nodes: list[str]
    svc_node: str
    fake_root: Path
    mid_migration_kills: int
    replaced_by_fault: dict[str, int]

    def truth(self) -> dict[str, list[str]]:
        raise NotImplementedError

    def registrations(self) -> dict[str, int]:
        raise NotImplementedError

    def vms_on(self, n: str) -> list[str]:
        raise NotImplementedError

    def get_json(self, key: str) -> dict[str, Any] | None:
        raise NotImplementedError

    # ---- observation -----------------------------------------------------------------

    def incoming(self) -> dict[str, tuple[str, str]]:
        """VM -> (source, target) of every migration in flight, from the fake's records."""
        out: dict[str, tuple[str, str]] = {}
        for path in self.fake_root.glob("*/domains/*.json"):
            try:
                d = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            inc = d.get("incoming") if isinstance(d, dict) else None
            if isinstance(inc, dict):
                out[path.stem] = (str(inc.get("from")), path.parent.parent.name)
        return out

    def _wait_incoming(self, pick: Any) -> tuple[str, str, str] | None:
        """Until a migration in flight satisfies ``pick(vm, src, dst)``; (vm, src, dst)."""
        found: list[tuple[str, str, str]] = []

        def look() -> bool:
            found[:] = [(vm, s, t) for vm, (s, t) in sorted(self.incoming().items())
                        if pick(vm, s, t)][:1]
            return bool(found)

        poll_until(look, START_S, 0.01)
        return found[0] if found else None

    def _kill_agent(self, rec: StepResult, node: str) -> None:
        reg = self.registrations().get(node)
        if reg is not None:
            self.replaced_by_fault[node] = reg
        self.agents[node].kill()
        self.mid_migration_kills += 1
        rec.target = node

    # ---- requests --------------------------------------------------------------------

    def _request_move(self, rec: StepResult, vm: str, to: str) -> None:
        assert self.store is not None
        self.store.put(self.keys.move(vm), MoveRequest(vm=vm, to=to, by="campaign",
                                                   requested_at=time.time()).to_json())
        rec.notes.append(f"move {vm} -> {to}")

    def _movable(self, sources: list[str], targets: list[str]) -> tuple[str, str] | None:
        """A running VM on one of ``sources`` and another node of ``targets``, at random."""
        pairs = [(vm, t) for vm, ns in sorted(self.truth().items()) if len(ns) == 1
                 and ns[0] in sources for t in targets if t != ns[0]
                 and not self._cordoned(t)]
        return self.rng.choice(pairs) if pairs else None

    def _cordoned(self, node: str) -> bool:
        assert self.store is not None
        try:
            return self.store.get(self.keys.cordon(node)) is not None
        except StoreUnavailable:
            return True

    def _revoke(self, rec: StepResult, node: str) -> bool:
        """``vmha node drain``: the node's lease revoked; whether there was one."""
        assert self.store is not None
        reg = self.get_json(self.keys.reg(node))
        created = self.registrations().get(node)
        if reg is None or created is None:
            rec.notes.append(f"{node} not registered: no drain")
            return False
        self.replaced_by_fault[node] = created
        self.store.revoke_lease(int(str(reg["lease_id"]), 16))
        return True

    def _uncordon_when_empty(self, rec: StepResult, node: str) -> None:
        assert self.store is not None
        if not poll_until(lambda: not self.vms_on(node) and self._cordoned(node), EMPTY_S, 0.1):
            rec.notes.append(f"{node} not empty (or not cordoned) {EMPTY_S} s after its drain")
        self.store.delete(self.keys.cordon(node))

    # ---- faults ----------------------------------------------------------------------

    def _fault_drain(self, rec: StepResult, node: str, i: int) -> None:
        if self._revoke(rec, node):
            self._uncordon_when_empty(rec, node)

    def _fault_move(self, rec: StepResult, node: str, i: int) -> None:
        got = self._movable(self.nodes, self.nodes)
        if got is None:
            rec.notes.append("nothing to move")
            return
        vm, to = got
        rec.target = to
        self._request_move(rec, vm, to)
        if not poll_until(lambda: self.truth().get(vm) == [to], START_S + 10, 0.05):
            rec.notes.append(f"{vm} did not arrive on {to}")

    def _fault_move_kill_source(self, rec: StepResult, node: str, i: int) -> None:
        killable = [n for n in self.nodes if n != self.svc_node]
        got = self._movable(killable, self.nodes)
        if got is None:
            rec.notes.append("nothing to move")
            return
        vm, to = got
        src = self.truth()[vm][0]
        self._request_move(rec, vm, to)
        if self._wait_incoming(lambda v, s, t: v == vm) is None:
            rec.notes.append(f"migration of {vm} never started")
            return
        self._kill_agent(rec, src)

    def _fault_move_kill_target(self, rec: StepResult, node: str, i: int) -> None:
        killable = [n for n in self.nodes if n != self.svc_node]
        got = self._movable(self.nodes, killable)
        if got is None:
            rec.notes.append("nothing to move")
            return
        vm, to = got
        self._request_move(rec, vm, to)
        if self._wait_incoming(lambda v, s, t: v == vm) is None:
            rec.notes.append(f"migration of {vm} never started")
            return
        self._kill_agent(rec, to)

    def _fault_drain_kill_target(self, rec: StepResult, node: str, i: int) -> None:
        # Drain a busy node; kill an agent that is not the drained one's nor the
        # guard-service node's, mid-copy.  The guard-service node is cordoned for the
        # drain's first copies: else the planner may send them all there (it did, and
        # the fault then killed nothing).
        held = node != self.svc_node and self._cordon_for_drain(rec, self.svc_node)
        try:
            if not self._revoke(rec, node):
                return
            killable = {n for n in self.nodes if n not in (self.svc_node, node)}
            got = self._wait_incoming(lambda v, s, t: s == node and t in killable)
            if got is None:
                rec.notes.append(f"no migration away from {node} towards a killable node")
            else:
                self._kill_agent(rec, got[2])
        finally:
            if held:  # the killed target's VMs need somewhere to go
                assert self.store is not None
                self.store.delete(self.keys.cordon(self.svc_node))
        self._uncordon_when_empty(rec, node)

    def _cordon_for_drain(self, rec: StepResult, node: str) -> bool:
        """Cordon ``node`` and wait until its registration says so (what the planner
        reads); whether it was cordoned here (an earlier cordon is left alone)."""
        assert self.store is not None
        if self._cordoned(node):
            return False
        self.store.put(self.keys.cordon(node), CordonMarker(
            node=node, reason="campaign drain_kill_target", by="campaign",
            at=time.time()).to_json())
        if not poll_until(lambda: (self.get_json(self.keys.reg(node)) or {}).get("cordoned"),
                          10.0, 0.05):
            rec.notes.append(f"{node}'s registration did not show its cordon")
        return True

    def _fault_rebalance(self, rec: StepResult, node: str, i: int) -> None:
        assert self.store is not None
        cfg_kv = self.store.get(self.keys.config)
        assert cfg_kv is not None
        cfg = json.loads(cfg_kv.value)
        on = json.loads(json.dumps(cfg))
        on.setdefault("placement", {})["rebalance"] = {
            "enabled": True, "interval_s": 1.0, "max_moves": 4, "min_gain": 0.002}
        busiest = max(self.nodes, key=lambda n: len(self.vms_on(n)))
        rec.target = busiest
        self.store.put(self.keys.config, json.dumps(on))
        try:
            self.store.put(self.keys.cordon(busiest), CordonMarker(
                node=busiest, reason="campaign rebalance", by="campaign",
                at=time.time()).to_json())
            self._uncordon_when_empty(rec, busiest)
            if not poll_until(lambda: self.vms_on(busiest), 20.0, 0.1):
                rec.notes.append(f"the rebalancer moved nothing back onto {busiest}")
        finally:
            self.store.put(self.keys.config, json.dumps(cfg))


__all__ = ["MOVE_FAULTS", "MOVE_KILLS", "MoveFaults"]
