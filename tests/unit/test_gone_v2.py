"""orchestrator.gone_v2: the times the keyspace-2 leader saw node keys go, and when
they may start a fence window."""

from __future__ import annotations

from orchestrator.gone_v2 import GoneKeys
from schemas.keys_v2 import KeyspaceV2
from schemas.snapshot import RawKV
from store.watchstream import Change

KS2 = KeyspaceV2()


def gone(key: str, rev: int) -> Change:
    return Change(key, None, rev)


def put(key: str, rev: int) -> Change:
    return Change(key, RawKV(key, b"{}", rev, rev), rev)


def test_a_deletion_seeds_the_node_s_loss_and_both_keys_gone() -> None:
    g = GoneKeys(KS2)
    g.note([gone(KS2.reg("n1"), 10), put(KS2.spec("vm1"), 11)], 100.0)
    g.note([gone(KS2.alive("n1"), 12)], 101.5)
    lost, both = g.seed({}, {})
    assert lost == {"n1": 100.0}
    assert both == {"n1": 101.5}  # gone together only once the second one went


def test_the_planner_s_own_times_stay() -> None:
    g = GoneKeys(KS2)
    g.note([gone(KS2.alive("n1"), 12), gone(KS2.reg("n1"), 13)], 100.0)
    lost, both = g.seed({"n1": 99.0}, {"n1": 99.5})
    assert lost == {"n1": 99.0} and both == {"n1": 99.5}
    # The liveness key seen gone earlier than the node was lost: gone together at the loss.
    lost, both = g.seed({"n1": 104.0}, {})
    assert both == {"n1": 104.0}


def test_a_key_put_again_or_a_listing_forgets_the_time() -> None:
    g = GoneKeys(KS2)
    g.note([gone(KS2.reg("n1"), 10)], 100.0)
    g.note([put(KS2.reg("n1"), 11)], 101.0)  # registered again
    assert g.seed({}, {}) == ({}, {})
    g.note([gone(KS2.reg("n1"), 12)], 102.0)  # and lost again: the second time counts
    assert g.seed({}, {})[0] == {"n1": 102.0}
    # Deleted, put and deleted again within one batch: the batch's time.
    g.note([put(KS2.reg("n1"), 13), gone(KS2.reg("n1"), 14)], 103.0)
    assert g.seed({}, {})[0] == {"n1": 103.0}
    g.forget()
    assert g.seed({}, {}) == ({}, {})


def test_the_first_time_stays_while_the_key_stays_away() -> None:
    g = GoneKeys(KS2)
    g.note([gone(KS2.reg("n1"), 10)], 100.0)
    g.note([gone(KS2.reg("n1"), 10)], 105.0)  # the same event again (a resumed stream)
    assert g.seed({}, {})[0] == {"n1": 100.0}


def test_other_keys_are_ignored() -> None:
    g = GoneKeys(KS2)
    g.note([gone(KS2.spec("vm1"), 10), gone(KS2.fence("n1"), 11), gone("/vmha/odd", 12),
            gone(KS2.leaving("n1"), 13)], 100.0)
    assert g.seed({}, {}) == ({}, {})
