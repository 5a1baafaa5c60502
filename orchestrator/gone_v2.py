"""When the keyspace-2 leader first saw a node's registration and liveness keys gone.

A fence window counts from the moment the leader observed the key gone
(fencing.policy.fence_window).  The planner takes that moment as the `now` of the first
plan without the key; at 1,000 nodes the model is rebuilt (over 40,000 keys) between
the watch handing the deletion over and that plan, so the window started a tenth of a
second or more after the observation.  This records the observation itself: the
leader's clock read right after the watch's changes were drained, so after etcd deleted
the key.

The rule that keeps it safe: a time is kept for a key only while the key has stayed
absent since, as far as the leader can tell.  A change that puts the key again forgets
its time, a listing forgets all of them (changes may have been missed), and the times
are offered to the planner only when no change is waiting to be drained: the model
the planner reads may hold changes newer than the last drain (the watch applies them
meanwhile), and among them a re-registration and a second deletion whose time would
be later than the one recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from schemas.keys_v2 import KeyRefV2, KeyspaceV2
from store.watchstream import Change

_KINDS = ("reg", "alive")


class GoneKeys:
    def __init__(self, ks2: KeyspaceV2) -> None:
        self._ks2 = ks2
        self._at: dict[tuple[str, str], float] = {}  # (kind, node) -> seen gone at

    def forget(self) -> None:
        """A listing or a new term: no change since is known to have been missed."""
        self._at.clear()

    def note(self, changes: Iterable[Change], seen: float) -> None:
        """`changes` were drained from the watch before `seen` (the leader's clock)."""
        for c in changes:
            ref = self._ks2.parse(c.key)
            if not isinstance(ref, KeyRefV2) or ref.kind not in _KINDS:
                continue
            if c.kv is None:
                self._at.setdefault((ref.kind, ref.node), seen)
            else:
                self._at.pop((ref.kind, ref.node), None)

    def seed(self, lost_since: Mapping[str, float], both_gone_since: Mapping[str, float]
             ) -> tuple[dict[str, float], dict[str, float]]:
        """The planner's `lost_since` and `both_gone_since` with the observed times of
        nodes it has no time for yet (its own times stay: they are earlier or equal).
        The planner keeps a time only for a node that is lost in its snapshot."""
        reg = {n: t for (k, n), t in self._at.items() if k == "reg"}
        lost = {**reg, **lost_since}
        both = {n: max(t, lost[n]) for (k, n), t in self._at.items()
                if k == "alive" and n in lost}
        return lost, {**both, **both_gone_since}
