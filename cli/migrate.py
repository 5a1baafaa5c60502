"""The I/O of `vmha keyspace migrate` (docs/keyspace-v2.md, section 6; the plan is
`schemas.migration`'s).

Each step reads etcd and does what is still to do, so the command resumes wherever an
earlier run stopped: the marker `/vmha/version` says which steps are left, and the copy,
the switch and the clean-up compare what each key holds with what it must hold.

    check    agents and leader of a release that freezes; config parses; keyspace 2 empty
    freeze   marker `migrating`: the leader stops, the agents write nothing
    copy     keyspace 1's keys to keyspace 2 (txns of <= 64 ops, create==0 or mod==seen)
    switch   marker `switching`: each agent moves its registration with its leases
    clean    marker `cleaning` (no rollback from here); config "schema": 2; the copy
             checked once more; keyspace 1's copied keys deleted (mod==copied)
    done     marker `done`: the daemons run keyspace 2
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas import migration as mig
from schemas.errors import SchemaError
from schemas.keys_v2 import KeyRefV2, KeyspaceV2
from schemas.models_v2 import RELEASE, KeyspaceVersion
from schemas.snapshot import RawKV
from schemas.txn import Cmp, Delete, Put, Txn
from store.etcd import EtcdStore

# Copy passes before giving up: the first copies the specs, the second the assignments
# made with their revisions; a third finds nothing to do.  More means someone writes.
MAX_PASSES = 5


class MigrationError(Exception):
    """The migration cannot go on now (a refusal, or daemons that do not follow)."""


@dataclass(frozen=True)
class View:
    """Everything under the prefix at one revision, sorted out for the migration."""

    revision: int
    v1: mig.V1State
    have: dict[str, RawKV]  # keyspace 2's owned keys
    v2_regs: dict[str, RawKV]  # `n/N/reg`: agents on keyspace 2
    marker: RawKV | None
    leader: RawKV | None
    config: RawKV | None

    @property
    def state(self) -> str | None:
        """The marker's state; None when absent.  Raises MigrationError if it does not
        parse (nothing guesses a keyspace)."""
        if self.marker is None:
            return None
        try:
            return KeyspaceVersion.from_json(self.marker.value, self.marker.key).state
        except SchemaError as exc:
            raise MigrationError(f"the keyspace marker does not parse ({exc}); every "
                                 "daemon waits: fix or delete it by hand") from None

    def v2_specs(self, ks: KeyspaceV2) -> dict[str, RawKV]:
        return {k[len(ks.spec_dir):]: kv for k, kv in self.have.items()
                if k.startswith(ks.spec_dir)}


@dataclass
class Migration:
    store: EtcdStore
    by: str
    wait_s: float = 60.0
    poll_s: float = 0.5
    say: Callable[[str], None] = print
    # Called after each step (tests stop the tool there, as a kill would).
    after_step: Callable[[str], None] = lambda _step: None
    writes: list[str] = field(default_factory=list)  # what was written, for the report

    @property
    def ks2(self) -> KeyspaceV2:
        return KeyspaceV2(self.store.keyspace.prefix)

    # ---- reading ------------------------------------------------------------------------

    def read(self) -> View:
        ks2 = self.ks2
        kvs: list[RawKV] = []
        revision = 0
        for page in self.store.list_pages(ks2.root):
            kvs.extend(page.kvs)
            revision = page.revision
        have = {kv.key: kv for kv in kvs if mig.owned(ks2, kv.key)}
        regs = {}
        for kv in kvs:
            ref = ks2.parse(kv.key)
            if isinstance(ref, KeyRefV2) and ref.kind == "reg":
                regs[ref.node] = kv
        singles = {kv.key: kv for kv in kvs if kv.key in (ks2.version, ks2.leader, ks2.config)}
        return View(revision, mig.read_v1(self.store.keyspace, revision, kvs), have, regs,
                    singles.get(ks2.version), singles.get(ks2.leader), singles.get(ks2.config))

    def plan(self, view: View) -> tuple[mig.Diff, int]:
        want, pending = mig.want_v2(self.ks2, view.v1, view.v2_specs(self.ks2))
        return mig.diff(want, view.have), pending

    def refusals(self, view: View) -> mig.Refusals:
        d, _ = self.plan(view)
        return mig.check(view.v1, view.leader, view.config, d, started=view.marker is not None)

    # ---- the steps ----------------------------------------------------------------------

    def run(self) -> None:
        view = self.read()
        left = mig.steps_left(view.state)
        if not left:
            self.say("keyspace 2: the migration is done; nothing to do")
            return
        for step in left:
            getattr(self, f"step_{step}")()
            self.after_step(step)

    def step_check(self) -> None:
        why = self.refusals(self.read()).messages
        if why:
            raise MigrationError("refusing to migrate: " + "; ".join(why))
        self.say("check: ok")

    def step_freeze(self) -> None:
        view = self.read()
        if view.marker is None:
            self._send("marker migrating", Txn(
                (Cmp(self.ks2.version, "create", "==", 0),),
                (Put(self.ks2.version, self._marker("migrating", None)),)))
        self._wait("the leader to stop (it stops when it sees the marker)", self._leader)
        self.say("freeze: marker migrating; no leader; agents write nothing")

    def step_copy(self, delete_extras: bool = True) -> None:
        """Keyspace 2's owned keys made to hold what keyspace 1 says.  `delete_extras`
        False once the clean-up started: keyspace 1's deleted keys would make their
        copies look extra."""
        for _ in range(MAX_PASSES):
            d, pending = self.plan(self.read())
            if not delete_extras:
                d = mig.Diff(d.create, d.update, (), d.same)
            if d.empty and not pending:
                self.say("copy: keyspace 2 holds keyspace 1's keys")
                return
            for txn in mig.sync_txns(d):
                if not self._send(f"copy ({len(txn.ops)} ops)", txn, must=False):
                    break  # a key changed since the read: read again
        raise MigrationError(f"the copy did not settle after {MAX_PASSES} passes: something "
                             "still writes keyspace 2's keys")

    def step_switch(self) -> None:
        self._set_marker("switching", ("migrating",))
        self._wait("every agent to move its registration to keyspace 2", self._on_keyspace_1)
        self.say("switch: every registered agent is on keyspace 2")

    def step_clean(self) -> None:
        self._set_marker("cleaning", ("switching",))
        view = self.read()
        cfg = mig.config_schema_2(view.config.value if view.config else None)
        if view.config is None or view.config.value != cfg.encode():
            mod = view.config.mod_revision if view.config else 0
            self._send('config "schema": 2', Txn((Cmp(self.ks2.config, "mod", "==", mod),),
                                                (Put(self.ks2.config, cfg),)))
        for _ in range(MAX_PASSES):
            # An agent that registered on keyspace 1 meanwhile moves by itself.
            self._wait("every agent to move its registration to keyspace 2",
                       self._on_keyspace_1)
            # Writes of keyspace 1 that landed after the copy (an agent that had not
            # seen the marker yet) reach keyspace 2 before their source goes.
            self.step_copy(delete_extras=False)
            txns = mig.clean_txns(self.read().v1)
            if not txns:
                self.say("clean: keyspace 1's copied keys deleted")
                return
            for txn in txns:
                if not self._send(f"clean ({len(txn.ops)} deletes)", txn, must=False):
                    break
        raise MigrationError(f"keyspace 1's keys still change after {MAX_PASSES} passes")

    def step_done(self) -> None:
        self._set_marker("done", ("cleaning",))
        self.say("done: the cluster runs keyspace 2")

    def rollback(self) -> None:
        """Back to keyspace 1 before the clean-up: the agents move back, keyspace 2's
        copies go, then the marker."""
        state = self.read().state
        if state is None:
            self.say("no migration under way: nothing to roll back")
            return
        if state in ("cleaning", "done"):
            raise MigrationError(f"the migration is past its switch ({state}): keyspace 1's "
                                 "keys are being deleted or gone, so it cannot be rolled "
                                 "back; run `vmha keyspace migrate` to finish it")
        self._set_marker("migrating", ("switching", "migrating"))
        self._wait("every agent to move its registration back to keyspace 1",
                   self._on_keyspace_2)
        for _ in range(MAX_PASSES):
            view = self.read()
            if not view.have:
                break
            for txn in mig.rollback_txns(view.have):
                self._send(f"rollback ({len(txn.ops)} deletes)", txn, must=False)
        view = self.read()
        if view.have:
            raise MigrationError("keyspace 2's keys still change: rollback not finished")
        if view.marker is not None:
            self._send("marker deleted", Txn((Cmp(self.ks2.version, "mod", "==",
                                                  view.marker.mod_revision),),
                                             (Delete(self.ks2.version),)))
        self.say("rollback: keyspace 2's copies and the marker deleted; the daemons run "
                 "keyspace 1 again")

    # ---- helpers ------------------------------------------------------------------------

    def _marker(self, state: str, old: RawKV | None) -> str:
        started, by = time.time(), self.by
        if old is not None:
            prev = KeyspaceVersion.from_json(old.value, old.key)
            started, by = prev.started_at, prev.by
        return mig.marker_json(state, by, RELEASE, started)

    def _set_marker(self, state: str, allowed_from: tuple[str, ...]) -> None:
        view = self.read()
        now = view.state
        if now == state:
            return
        if now not in allowed_from:
            raise MigrationError(f"the marker says {now!r}, not {' or '.join(allowed_from)}")
        if view.marker is None:
            raise MigrationError("the marker is gone: no migration under way")
        self._send(f"marker {state}", Txn(
            (Cmp(self.ks2.version, "mod", "==", view.marker.mod_revision),),
            (Put(self.ks2.version, self._marker(state, view.marker)),)))

    def _send(self, what: str, txn: Txn, must: bool = True) -> bool:
        res = self.store.txn(txn.compares, txn.ops)
        if res.succeeded:
            self.writes.append(what)
        elif must:
            raise MigrationError(f"{what}: etcd changed under the tool (a compare failed); "
                                 "run the command again")
        return res.succeeded

    # What the waits read: only the keys they are about, not the whole prefix.

    def _leader(self) -> list[str]:
        kv = self.store.get(self.ks2.leader)
        return [] if kv is None else [leader_name(kv)]

    def _on_keyspace_1(self) -> list[str]:
        nodes = self.store.keyspace.node("")
        return sorted(k[len(nodes):] for page in self.store.list_pages(nodes, keys_only=True)
                      for k in (kv.key for kv in page.kvs))

    def _on_keyspace_2(self) -> list[str]:
        out = []
        for page in self.store.list_pages(self.ks2.node_dir, keys_only=True):
            for kv in page.kvs:
                ref = self.ks2.parse(kv.key)
                if isinstance(ref, KeyRefV2) and ref.kind == "reg":
                    out.append(ref.node)
        return sorted(out)

    def _wait(self, what: str, laggards: Callable[[], list[str]]) -> None:
        """Until `laggards()` is empty, naming them every 5 s."""
        until = time.monotonic() + self.wait_s
        told = 0.0
        while True:
            names = laggards()
            if not names:
                return
            now = time.monotonic()
            if now >= until:
                raise MigrationError(
                    f"waited {self.wait_s:g} s for {what}; still waiting for: "
                    f"{', '.join(names)}. Nothing is lost: run the command again to go on "
                    "(or `vmha keyspace migrate --rollback` before the clean-up)")
            if now - told >= 5.0:
                self.say(f"waiting for {what}: {', '.join(names)}")
                told = now
            time.sleep(self.poll_s)



def leader_name(kv: RawKV) -> str:
    """How the tool names the leader record `kv` (it may not parse)."""
    try:
        data: Any = json.loads(kv.value)
        return f"leader {data.get('id')} on {data.get('host')} (pid {data.get('pid')})"
    except (ValueError, AttributeError, RecursionError):
        return "a leader whose record does not parse"
