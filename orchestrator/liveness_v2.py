"""The keyspace-2 leader's liveness fencing mode (docs/keyspace-v2.md, section 4).

The config's `liveness_fence` decides, except `auto`, which asks every etcd member its
version (`Maintenance.Status`): at election, every PROBE_INTERVAL_S, and whenever the
member list changes (read every MEMBERS_INTERVAL_S).  The asking runs on a thread of its
own, so a stalled member never holds a leader cycle; until the first answer, and after
a failed one, `auto` means `bounded`, the mode that is safe on every etcd.  The rules
themselves are pure (`fencing.liveness_fence`); the planner gets the mode each cycle.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from fencing.liveness_fence import Mode, ModeChoice, resolve_mode
from schemas.models import ClusterConfig
from store.errors import StoreError
from store.etcd import EtcdStore

PROBE_INTERVAL_S = 60.0
MEMBERS_INTERVAL_S = 5.0
STATUS_TIMEOUT_S = 2.0


class LivenessProbe:
    def __init__(self, store: EtcdStore, log: Any, clock: Callable[[], float]) -> None:
        self.store = store
        self.log = log
        self.clock = clock
        self._lock = threading.Lock()
        self._versions: dict[str, str | None] = {}
        self._members: list[tuple[str, list[str]]] | None = None
        self._probed_at: float | None = None
        self._last: ModeChoice | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def elected(self) -> None:
        """A new term: forget the versions (bounded until asked again) and ask now."""
        with self._lock:
            self._versions, self._probed_at, self._members = {}, None, None
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="vmha-liveness-probe")
            self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def mode(self, cfg: ClusterConfig) -> ModeChoice:
        """The mode for this cycle; logged once per change."""
        with self._lock:
            versions = dict(self._versions)
        choice = resolve_mode(cfg.liveness_fence, versions)
        if self._last is None or choice.mode != self._last.mode:
            self.log.info("liveness_fence_mode", mode=choice.mode, setting=cfg.liveness_fence,
                          reason=choice.why)
        self._last = choice
        return choice

    def versions(self) -> dict[str, str | None]:
        with self._lock:
            return dict(self._versions)

    def current(self, cfg: ClusterConfig) -> Mode:
        return self.mode(cfg).mode

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(MEMBERS_INTERVAL_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.probe_once()
            except StoreError as exc:
                # Not known: bounded (the safe reading) until a probe succeeds.
                with self._lock:
                    self._versions, self._members = {}, None
                self.log.warning("etcd_version_probe_failed", error=str(exc),
                                 reason="liveness fencing under auto is bounded until "
                                        "every member's version is known")

    def probe_once(self) -> None:
        """Ask the member list; ask each member's version when the list changed, a
        member did not answer last time, or PROBE_INTERVAL_S passed."""
        members = self.store.members()
        now = self.clock()
        with self._lock:
            due = (members != self._members or self._probed_at is None
                   or None in self._versions.values()
                   or now - self._probed_at >= PROBE_INTERVAL_S)
        if not due:
            return
        versions = self.store.member_versions(members, STATUS_TIMEOUT_S)
        with self._lock:
            changed = versions != self._versions
            self._versions, self._members, self._probed_at = versions, members, now
        if changed:
            self.log.info("etcd_versions", versions=versions)
