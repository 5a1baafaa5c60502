"""The node agent's membership: its leased registration, its guard, and what the
lease's fate means.

* revoked while etcd answers (an operator's `etcdctl lease revoke`): drain: cordon
  the node and register again with a new lease; unless the liveness lease is gone too
  (etcd revoked both itself, nodeagent.liveness): register again, no drain;
* not renewed before its deadline: self-fence (destroy every managed domain), then
  register again once etcd answers;
* its registration changes only through compare-and-swap on the registration's
  create_revision, the agent's fencing token.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from fencing.guard import GuardClient
from fencing.guard_client import SocketGuardClient
from fencing.lease import LeaseKeeper
from fencing.lease_hold import LeaseTerms
from fencing.policy import guard_timeout, require_safe_timing, revoked_deadline
from nodeagent import reregister
from nodeagent.adopt import adopt
from nodeagent.context import AgentContext
from nodeagent.cordon import write_cordon
from nodeagent.keyspace import read_config, stale_claims_rewritten
from nodeagent.liveness import Liveness
from nodeagent.reregister import VERSION as VERSION
from nodeagent.selffence import LeaseFlags, SelfFence
from schemas.errors import TemporaryError
from schemas.models import ClusterConfig, LeaveMarker
from schemas.snapshot import ClusterSnapshot
from schemas.txn import Cmp, Delete, Put
from store.etcd import LeaseNotFound, StoreUnavailable
from telemetry import metrics


class NotRegistered(TemporaryError):
    """The agent holds no registration right now (it is registering again)."""


@dataclass
class Registration:
    lease_id: int
    create_revision: int
    keeper: LeaseKeeper
    cordoned: bool


class Membership:
    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.cfg = ClusterConfig()
        self.reg: Registration | None = None
        self.flags = LeaseFlags()
        self.guard: GuardClient | SocketGuardClient | None = None
        # Keepers of leases given up: they keep the old deadline until a new lease holds.
        self._old_keepers: list[LeaseKeeper] = []
        self.fence = SelfFence(ctx, self.flags)
        self.alive = Liveness(ctx, self._on_alive_gone)
        self.facts: reregister.HostFacts | None = None  # of the last registration
        self.revoked: reregister.Revoked | None = None  # keyspace 2: not classified yet
        # Held by whoever replaces the registration: the cycle thread, or the thread that
        # found the lease revoked (keyspace 2, nodeagent.reregister); one at a time.
        self.owner = threading.RLock()
        self.classifying = threading.Lock()  # one thread tells a revoke at a time

    @property
    def log(self) -> Any:
        return self.ctx.log

    # ---- set-up ------------------------------------------------------------------------

    def load_config(self) -> ClusterConfig:
        cfg = read_config(self.ctx)
        require_safe_timing(cfg)
        self.cfg = cfg
        return cfg

    def current(self) -> Registration:
        """The registration held now; NotRegistered while the agent registers again."""
        reg = self.reg
        if reg is None:
            raise NotRegistered(f"{self.ctx.me} holds no registration right now")
        return reg

    def register(self) -> bool:
        """Grant a lease and write the leased registration (after any old one is gone).

        False if another writer created the registration between our read and our
        write: a lost race, not an outage; the next cycle tries again."""
        store, keys = self.ctx.store, self.ctx.keys
        key = keys.reg
        if self.ctx.opts.guard_socket and adopt(self, key):
            return True
        self._wait_old_registration_gone(key)
        if self.ctx.keyspace == 2 and not stale_claims_rewritten(self.ctx):
            return False
        facts = self.facts = reregister.host_facts(self.ctx)  # before the lease is granted
        sent = self.ctx.clock()
        lease_id = store.grant_lease(self.cfg.lease_ttl_s)
        alive_id = self.alive.grant(self.cfg)
        cordoned = store.get(keys.cordon) is not None
        reg = reregister.registration(self.ctx, lease_id, cordoned, facts)
        try:
            # A leave marker of an earlier drain goes with the new registration.
            res = store.txn([Cmp(key, "create", "==", 0)], [Put(key, reg.to_json(), lease_id),
                                                            self.alive.put(alive_id),
                                                            Delete(keys.leaving)])
        except LeaseNotFound:
            # Granting and writing took longer than the TTL (etcd slow, or this host
            # overloaded): not an outage and not a bug; the next cycle starts afresh.
            self.log.warning("registration_lease_expired", lease=f"{lease_id:x}",
                             took_s=round(self.ctx.clock() - sent, 3))
            return False
        if not res.succeeded:
            store.revoke_lease(lease_id)
            store.revoke_lease(alive_id)
            self.log.info("registration_race_lost", revision=res.revision,
                          reason="another writer created this node's registration first; "
                                 "registering again once it is gone")
            return False
        self.hold_new(lease_id, alive_id, res.revision, sent, cordoned)
        self.log.info("registered", lease=f"{lease_id:x}", liveness_lease=f"{alive_id:x}",
                      revision=res.revision, cordoned=cordoned, ttl=self.cfg.lease_ttl_s)
        return True

    def hold_new(self, lease_id: int, alive_id: int, create_revision: int, sent: float,
                 cordoned: bool) -> None:
        """Keep both leases renewed from now on; they were last acknowledged for `sent`.
        Keyspace 2: in one round, the deadline the minimum of both (fencing.lease)."""
        ks2 = self.ctx.keyspace == 2
        keeper = LeaseKeeper(self.ctx.store, self.cfg, lease_id, sent,
                             on_gone=lambda before: self.on_lease_gone(lease_id, before),
                             on_deadline=self.self_fence, on_renewed=self._on_renewed,
                             unavailable=StoreUnavailable,
                             clock=self.ctx.clock, name=f"agent-{self.ctx.me}",
                             partner=alive_id if ks2 else 0,
                             on_partner_gone=self.alive.partner_gone if ks2 else None)
        self.reg = Registration(lease_id, create_revision, keeper, cordoned)
        self.alive.hold(alive_id, sent, self.cfg, pair=keeper if ks2 else None)
        keeper.start()
        self.flags.revoked = self.flags.expired = self.flags.alive_gone = False
        self.fence.end("registered")
        for old in self._old_keepers:
            old.stop()
        self._old_keepers.clear()
        self._announce()
        self.pet_guard()
        metrics.notify("READY=1\nSTATUS=registered, reconciling")

    def _announce(self) -> None:
        """Tell the guard service which leases to hold while no agent is attached."""
        if self.guard is not None and self.cfg.guard_enabled and self.reg is not None:
            self.guard.announce(LeaseTerms.of(self.reg.lease_id, self.cfg, self.alive.lease_id,
                                              paired=self.ctx.keyspace == 2))

    def _wait_old_registration_gone(self, key: str) -> None:
        waited = False
        while not self.ctx.stopped.is_set():
            old = self.ctx.store.get(key)
            if old is None:
                return
            if not waited:
                self.log.info("waiting_for_old_registration", lease=f"{old.lease:x}",
                              reason="a registration for this node is still leased; it must "
                                     "expire before this agent can take over")
                waited = True
            self.ctx.stopped.wait(0.2)

    def renew(self, exiting: bool) -> Registration | None:
        """The start of a cycle: register if needed; on a revoke (or SIGTERM) cordon the
        node; after a revoke or an expiry register again.  None: not registered yet.
        Keyspace 2 registers again after a revoke on the thread that found it
        (nodeagent.reregister); this only classifies what that left."""
        with self.owner:
            if self.reg is None:
                self.load_config()
                self.register()
            reg = self.reg
        if reg is None:
            return None
        # Read the keeper thread's flags once: a revoke flagged between two reads
        # would re-register the node without its cordon (a drain that drains nothing).
        revoked, expired = self.flags.revoked, self.flags.expired
        reregister.classify(self)  # keyspace 2: a revoke still to classify (etcd did not answer)
        again = revoked or expired
        if (revoked or self.flags.alive_gone) and not expired:
            revoked, again = self._revoked_by_whom(reg, revoked)
        if revoked or (exiting and not reg.cordoned):
            self.cordon("lease revoked (drain)" if revoked else
                        "agent stopping (SIGTERM): drain")
        if again:
            with self.owner:
                if self.reg is not reg:
                    return self.reg  # registered again meanwhile (keyspace 2's revoke)
                # The old keeper keeps watching the old deadline until we hold a new lease.
                self.keep_old_deadline(reg.keeper)
                self.reg = None
                if not self.register():
                    return None
        return self.reg

    def _revoked_by_whom(self, reg: Registration, revoked: bool) -> tuple[bool, bool]:
        """A lease found gone while etcd answers: (drain, register again)."""
        if not revoked and not reg.keeper.valid():
            return False, False  # past the deadline: an expiry, handled as one
        who = self.alive.who_revoked(reg.lease_id, reg.create_revision, self.cfg,
                                     classify=self.ctx.keyspace == 1)
        self.flags.alive_gone = False  # after: if etcd did not answer, ask again next cycle
        if who == "replaced":
            self._announce()
        elif who == "gone" or (who == "operator" and not revoked):
            # Before the registration's keeper saw it.  Keyspace 2: registers again now,
            # then tells (nodeagent.reregister).
            self.on_lease_gone(reg.lease_id, True)
        return who == "operator", who in ("operator", "etcd")

    def keep_old_deadline(self, keeper: LeaseKeeper) -> None:
        self._old_keepers.append(keeper)

    def visible(self, snap: ClusterSnapshot, reg: Registration) -> bool:
        """True if the snapshot shows our own registration (not an older or newer one)."""
        mine = snap.nodes.get(self.ctx.me)
        if mine is not None and mine.create_revision == reg.create_revision:
            return True
        # Our key vanished (the watch woke us): ask etcd about the lease now rather than
        # at the next keepalive, so a drain starts at once.
        if reg.keeper.valid() and self.ctx.store.keepalive(reg.lease_id) <= 0:
            reg.keeper.found_gone()  # unless the keeper told it meanwhile
            self.ctx.wake.set()
        self.log.info("registration_not_visible", revision=snap.revision)
        return False

    def leave(self, reg: Registration, reason: str) -> None:
        """Drained (or every domain destroyed) and exiting: say so with a leave marker,
        then give the lease back so the node is gone at once.  The marker tells the
        leader the node left on purpose and runs nothing: no fence device is called for
        it (docs/fencing.md).  Written only while our registration holds."""
        keys, me = self.ctx.keys, self.ctx.me
        marker = LeaveMarker(node=me, lease_id=f"{reg.lease_id:x}", reason=reason,
                             at=time.time())
        res = self.ctx.store.txn([Cmp(keys.reg, "create", "==", reg.create_revision)],
                                 [Put(keys.leaving, marker.to_json())])
        self.log.info("leaving", reason=reason, marker_written=res.succeeded)
        # Stopped first: a keeper that found the lease revoked would register again.
        reg.keeper.stop()
        self.ctx.store.revoke_lease(reg.lease_id)
        self.alive.give_back()

    def stop(self) -> None:
        with self.owner:  # after a registration under way (nodeagent.reregister)
            if self.reg is not None:
                self.reg.keeper.stop()
        self.alive.stop()

    # ---- lease callbacks (keeper threads) ----------------------------------------------

    def on_lease_gone(self, lease_id: int, before_deadline: bool) -> None:
        if before_deadline and self.ctx.keyspace == 2:
            # No pet, no later deadline while unregistered (the leader's bounded window
            # relies on it): registered again at once, on this thread.
            reregister.on_revoked(self, lease_id)
            return
        reg = self.reg
        if reg is None or reg.lease_id != lease_id:
            return  # an old lease's keeper reporting late: already handled
        if before_deadline:
            # etcd answered, so we are alive: the leader's fence window, counted from
            # after the revoke, lets the VMs run a little longer than the old deadline
            # while we register again (a slow etcd member must not turn a drain into
            # an outage); the guard and the old keeper hold them to that, no longer.
            until = revoked_deadline(reg.keeper.deadline, self.cfg)
            reg.keeper.extend_deadline(until)
            self.pet_guard(until, timeout=until - self.ctx.clock())
            self.flags.revoked = True
            self.log.warning("lease_revoked", reason="lease gone while etcd answers: a drain "
                                                     "unless the liveness lease is gone too")
        else:
            self.flags.expired = True
        self.ctx.wake.set()

    def _on_alive_gone(self) -> None:
        self.flags.alive_gone = True
        self.ctx.wake.set()

    def pet_guard(self, deadline: float | None = None, timeout: float | None = None) -> None:
        """Tell the guard the agent is alive and holds its lease until `deadline`; it
        fires `timeout` (default: the guard timeout) after this pet if none follows."""
        reg = self.reg
        if self.guard is None or not self.cfg.guard_enabled or reg is None:
            return
        if not self.guard.pet(deadline if deadline is not None else reg.keeper.deadline,
                              guard_timeout(self.cfg) if timeout is None else timeout):
            self.log.error("guard_lost", reason="cannot reach the guard process")
            self.ctx.wake.set()

    def _on_renewed(self) -> None:
        self.pet_guard()
        reg = self.reg
        if reg is not None and reg.keeper.last_renew_latency_s is not None:
            metrics.LEASE_RENEW_SECONDS.labels(who="agent").observe(
                reg.keeper.last_renew_latency_s)
        # etcd answered and the lease still exists after we self-fenced (an etcd
        # leader change reset its TTL): nobody can have fenced this node, resume.  The
        # registration is the same one, still held: as good as a new one for the marker.
        if self.flags.fenced:
            self.fence.end("lease still valid in etcd")
            self.log.warning("resumed_after_self_fence", reason="lease still valid in etcd")
            self.ctx.wake.set()

    def self_fence(self) -> None:
        """Destroy every managed domain: the lease may be about to expire on the server
        (the marker first, then passes until a registration is held: nodeagent.selffence)."""
        self.fence.start()
        self.ctx.wake.set()

    def acting_allowed(self) -> bool:
        reg = self.reg
        return reg is not None and reg.keeper.valid() and not self.flags.fenced

    # ---- guard -------------------------------------------------------------------------

    def start_guard(self) -> None:
        hv, opts = self.ctx.hv, self.ctx.opts
        fake = hv.uri.startswith("fake://")
        if opts.guard_socket:
            # The guard service (vmha-guard.service): on the fake hypervisor it is the
            # host already, and the guests it runs outlive this process.
            self.guard = SocketGuardClient(opts.guard_socket, self.ctx.me)
        else:
            # A never-armed fake guard is the host of guests that outlive the agent (the
            # negative control of the fault campaign): let it linger a while.
            self.guard = GuardClient(hv.uri, linger_s=300.0 if fake else 0.0,
                                     watchdog=opts.watchdog,
                                     fenced_marker=str(self.fence.marker.path))
        adopt = getattr(hv, "adopt_host", None)
        if adopt is not None:
            adopt(self.guard.pid)
        self.log.info("guard_started", pid=self.guard.pid, watchdog=self.ctx.opts.watchdog)

    def guard_gone(self) -> bool:
        return self.guard is not None and not self.guard.alive()

    def disarm_guard(self) -> None:
        if self.guard is not None:
            self.guard.disarm()

    def release_for_restart(self) -> None:
        """Restart in place: leave the lease, the registration and the armed guard to
        the next agent process, which adopts them (`adopt`) before the guard's deadline."""
        if self.guard is not None:
            self.guard.close()
        self.log.warning("restarting_in_place", reason="lease and guard left to the next "
                                                       "agent process")

    # ---- cordon (nodeagent.cordon) ----------------------------------------------------

    def cordon(self, reason: str) -> None:
        write_cordon(self.ctx, reason)
        if self.reg is not None:
            self.reg.cordoned = True
