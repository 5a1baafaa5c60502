"""The parts of the agent's cycle that differ on keyspace 2 (docs/keyspace-v2.md,
section 3, "Agent"): the snapshot comes from its node view (`nodeagent.view_v2`, one
watch of its own keys, a thread waking the agent on each change) instead of a read of
the whole prefix; status writes are guarded against that view
(`nodeagent.writes_v2.CycleStatuses`); and after each pass the agent deletes its own
statuses of VMs it neither is assigned nor holds a domain of, but the record of why vmha
gave up on a VM here, kept while the VM's placement names this node in `failed_nodes`
(`nodeagent.writes_v2.keeps_record`).

`NodeAgent` selects this by `/vmha/version` (`nodeagent.keyspace`); everything else
(registration, leases, guard, drain, self-fence, the plan and its execution) is the
same code on either keyspace, with the keys of `AgentContext.keys`.
"""

from __future__ import annotations

import random
import threading
import time

from nodeagent.context import AgentContext
from nodeagent.view_v2 import NodeWatch, assignments_of
from nodeagent.writes_v2 import (
    AgentWrites,
    CycleStatuses,
    cleanups,
    keeps_record,
    own_status_mods,
)
from schemas.models import Model, Placement, VmStatus
from schemas.snapshot import ClusterSnapshot, InvalidKey
from schemas.snapshot_v2 import ParsedKV, node_snapshot, parse_kv
from store.history import HistoryWriter
from store.paging import KeyRange

# How long a cycle waits for the view to show the agent's own last write.  Only to save
# a write: a cycle planning on a view without it would send the same report again, and
# etcd would refuse it (its compare no longer holds).
CATCH_UP_S = 0.5
# Every RESYNC_S (jittered by a tenth, so that nodes started together spread out) the
# agent checks its watch against etcd (keys and revisions only) and lists its keys again
# if they differ: a check of the watch, not a path it relies on.
RESYNC_S = 300.0


class AgentV2:
    """Agent `ctx.me`'s node view, status guards and clean-up on keyspace 2."""

    def __init__(self, ctx: AgentContext, **watch_opts: float) -> None:
        self.ctx = ctx
        ks = ctx.ks2
        self.watch = NodeWatch(ctx.store, ks, ctx.me, **watch_opts)
        self.writes = AgentWrites(ctx.store, ks, ctx.me)
        self.statuses = CycleStatuses(self.writes)
        self._own: dict[str, int] = {}
        self._assigned: frozenset[str] = frozenset()
        self._kept: dict[str, int] = {}  # VM -> own status revision last logged as kept
        self._pump: threading.Thread | None = None
        self.next_resync = 0.0  # ctx.clock() time of the next check of the watch
        self.checks = 0  # periodic checks of the watch done (tests)
        # Node events under the node's own history prefix (its role writes only there).
        ctx.history = HistoryWriter(ctx.store, ctx.history.actor,
                                    key=lambda event_id: ks.node_event(ctx.me, event_id))

    def snapshot(self, token: int) -> ClusterSnapshot:
        """The cycle's snapshot from the node view (listed again first if the watch
        failed or never listed), once it shows our registration `token` and our last
        write, or after CATCH_UP_S; raises StoreUnavailable or ViewNotReady."""
        if not self.watch.ready or self.ctx.clock() >= self.next_resync:
            resync = self.watch.ready
            if not resync or not self._watch_checked():
                self.watch.start()
                self.ctx.log.info("node_watch_listed", revision=self.watch.state.revision,
                                  keys=len(self.watch.own_kvs()), resync=resync)
            self.next_resync = self.ctx.clock() + RESYNC_S * random.uniform(0.9, 1.1)  # noqa: S311
        if self._pump is None:
            self._pump = threading.Thread(target=self.watch.pump,
                                          args=(self.ctx.wake, self.ctx.stopped),
                                          daemon=True, name=f"vmha-view-{self.ctx.me}")
            self._pump.start()
        self._catch_up(max(token, self.writes.last_revision))
        managed = sorted(n for n, d in self.ctx.hv.list_domains().items() if d.managed)
        view = self.watch.view(managed)
        snap = node_snapshot(self.ctx.ks2, view)
        self._own = own_status_mods(self.ctx.ks2, self.ctx.me, view.kvs)
        self._assigned = frozenset(assignments_of(self.ctx.ks2, self.ctx.me, view.kvs))
        self.statuses.seen(snap, self._own)
        return snap

    def _watch_checked(self) -> bool:
        """The periodic check of the watch: a keys-only listing at the view's revision
        (store.watchmodel.verify), a tenth of a full one with domain XML in the values;
        1,000 agents started together otherwise list everything within a minute every
        RESYNC_S.  True: the view holds what etcd does."""
        same = self.watch.state.verify()
        self.checks += 1
        if not same:
            self.ctx.log.warning("node_watch_differs", node=self.ctx.me,
                                 revision=self.watch.state.revision,
                                 reason="the keys-only check found keys or revisions the "
                                        "view does not hold: listing again")
        return same

    def _catch_up(self, revision: int) -> None:
        until = time.monotonic() + CATCH_UP_S
        while self.watch.state.revision < revision and time.monotonic() < until:
            if self.ctx.stopped.wait(0.005):
                return

    def clean_up(self, token: int) -> None:
        """Delete our own statuses of VMs with neither an assignment nor a domain here
        (section 1, "Clean-up"), but the records of why vmha gave up on a VM here while
        its placement says so; each delete compared on what the view saw."""
        domains = self.ctx.hv.list_domains()
        # An assignment key that does not parse still counts: its VM is left alone.
        held = self._assigned | {vm for vm in self._own if self._assignment_key(vm)}
        for vm, mod in cleanups(self._own, held, domains):
            if self._record_kept(vm):
                if self._kept.get(vm) != mod:  # logged once a version, not every pass
                    self._kept[vm] = mod
                    self.ctx.log.info("status_kept", vm=vm, reason="why vmha gave up on "
                                      "it here: its placement names this node in "
                                      "failed_nodes (or is not read yet)")
                continue
            self._kept.pop(vm, None)
            done = self.writes.cleanup(token, vm, mod)
            self.ctx.log.info("status_cleaned_up", vm=vm, written=done,
                              reason="no assignment and no domain here")

    def _assignment_key(self, vm: str) -> bool:
        return self.watch.state.get(self.ctx.ks2.assignment(self.ctx.me, vm)) is not None

    def _record_kept(self, vm: str) -> bool:
        """Our status of `vm` counts failures and its placement, as the watch holds it,
        names us among the nodes given up on; or the placement is not watched yet (the
        next view watches it: decided then), or does not parse (its VM is left alone)."""
        ks, me = self.ctx.ks2, self.ctx.me
        status = self._parsed(ks.status(me, vm))
        if not isinstance(status, VmStatus) or not (status.boot_failures or status.crashes):
            return False
        if KeyRange.key(ks.place(vm)) not in self.watch.peers:
            return True
        placement = self._parsed(ks.place(vm))
        if placement is not None and not isinstance(placement, Placement):
            return True
        return keeps_record(me, status, placement)

    def _parsed(self, key: str) -> Model | InvalidKey | None:
        """The watched key's value, its report if it does not parse, None if absent."""
        kv = self.watch.state.get(key)
        res = parse_kv(self.ctx.ks2, kv) if kv is not None else None
        if res is None:
            return None
        return res.entry.value if isinstance(res, ParsedKV) else res.invalid

    def close(self) -> None:
        self.watch.close()
