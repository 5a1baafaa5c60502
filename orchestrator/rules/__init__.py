"""The leader's planner as small rules over an explicit per-cycle state (pure).

`run_cycle` builds the state for one snapshot and applies, in this order:

1. `cluster.fence_lost_nodes`       fence lost nodes per the fence policy
2. `cluster.clear_done_moves`       delete operator move requests that are done or moot
3. `cluster.clear_returned_fences`  delete the fence record of a node that came back
4. `cluster.plan_cold_batch`        exact search for the cold boots of a small instance
5. `cluster.decide_vms`             every running VM by priority, through `vm.VM_RULES`:
   operator_move, stay_failed, relocate_failing, release_arrived_source, steady_boot,
   steady_migration, migration_source_lost,
   migration_to_lost_target, wait_unfenced,
   keep_on_source, hand_off, cold_boot (the first that decides ends the VM's turn)
6. `cluster.rebalance_quiet_cluster` a few balancing moves when nothing else happens

The actions of the plan come out in that order.  See docs/design.md for the reasoning.
"""

from __future__ import annotations

from orchestrator.rules.cluster import CYCLE_RULES
from orchestrator.rules.state import CycleInput, CycleState
from orchestrator.rules.vm import VM_RULES

__all__ = ["CYCLE_RULES", "VM_RULES", "CycleInput", "CycleState", "run_cycle"]


def run_cycle(inp: CycleInput) -> CycleState:
    st = CycleState.start(inp)
    for rule in CYCLE_RULES:
        rule(st)
    return st
