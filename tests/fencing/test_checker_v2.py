"""The campaign's checkers on keyspace 2's layout (``--keyspace 2``): the I3 history
checker, the I4 pending check and the registrations the I2 settling reads find the
keys of docs/keyspace-v2.md, section 1, and flag what they flag on keyspace 1."""

from __future__ import annotations

import json
import time

import pytest

from bench.campaign_core import CampaignCore
from bench.campaign_keys import PATTERNS_V2, CampaignKeys
from cli.common import default_domain_xml
from lab.invariants import FakeTruth, HistoryChecker, classify, visibly_pending
from schemas import ClusterConfig, Keyspace
from schemas.keys_v2 import KeyRefV2, KeyspaceV2, UnknownKey
from schemas.models import FenceRecord, Placement, VmSpec, VmStatus
from schemas.models_v2 import Assignment, KeyspaceVersion
from schemas.txn import Put
from store.etcd import EtcdStore
from tests.harness import EtcdCluster

KS2 = KeyspaceV2()


def placement(epoch: int, node: str = "n1", vm: str = "v") -> Placement:
    return Placement(id="p", vm=vm, node=node, kind="boot", epoch=epoch, reason="t",
                     decided_at=0.0)


def assignment(epoch: int, node: str = "n1") -> str:
    return Assignment(vm="v", spec_revision=1, placement=placement(epoch, node),
                      spec=VmSpec(name="v", domain_xml=default_domain_xml("v", 64, 1),
                                  memory_mib=64, vcpus=1)).to_json()


def status(node: str, state: str = "running", registration: int | None = None) -> str:
    return VmStatus(vm="v", node=node, state=state, since=0.0,  # type: ignore[arg-type]
                    registration=registration).to_json()


def fence(epoch: int) -> str:
    return FenceRecord(node="n9", lease_id="1", method="self", outcome="success", reason="t",
                       epoch=epoch, duration_s=0.0, fenced_at=0.0).to_json()


# ---- pure: what the checkers make of each layout's keys --------------------------------

@pytest.mark.parametrize(("key", "want"), [
    ("/vmha/leader", ("leader", "")),
    ("/vmha/n/n1/reg", ("node", "n1")),
    ("/vmha/place/web1", ("vm_placement", "")),
    ("/vmha/a/n2/web1", ("assignment", "n2")),
    ("/vmha/fence/n4", ("fence", "n4")),
    ("/vmha/n/n3/vm/web1", ("vm_status", "n3")),
    ("/vmha/n/n1/alive", None),            # liveness lease: not a registration
    ("/vmha/spec/web1", None),
    ("/vmha/nodes/n1", None),              # keyspace 1's registration means nothing here
    ("/vmha/vms/web1/placement", None),
    ("/vmha/n/N1/reg", None),              # an invalid name is never followed
    ("/vmha-history/n/n1/01767229200310000-agent_n1-000004", None),
])
def test_keyspace_2_keys_are_classified_by_its_parser(key: str, want: tuple[str, str] | None
                                                      ) -> None:
    assert classify(KS2, key) == want


@pytest.mark.parametrize(("key", "want"), [
    ("/vmha/leader", ("leader", "")),
    ("/vmha/nodes/n1", ("node", "n1")),
    ("/vmha/vms/v/placement", ("vm_placement", "")),
    ("/vmha/vms/v/status", ("vm_status", "")),
    ("/vmha/fence/n1", ("fence", "")),
    ("/vmha/n/n1/reg", None),
])
def test_keyspace_1_classification_is_unchanged(key: str, want: tuple[str, str] | None
                                                ) -> None:
    assert classify(Keyspace(), key) == want


def test_campaign_keys_follow_the_layout() -> None:
    k1, k2 = CampaignKeys(1), CampaignKeys(2)
    assert (k1.spec("v"), k1.place("v"), k1.move("v"), k1.reg("n1")) == (
        "/vmha/vms/v/spec", "/vmha/vms/v/placement", "/vmha/vms/v/move", "/vmha/nodes/n1")
    assert (k2.spec("v"), k2.place("v"), k2.move("v"), k2.reg("n1"), k2.fence("n1"),
            k2.cordon("n1")) == ("/vmha/spec/v", "/vmha/place/v", "/vmha/move/v",
                                 "/vmha/n/n1/reg", "/vmha/fence/n1", "/vmha/cordon/n1")
    assert k2.reg_node("/vmha/n/n1/reg") == "n1" and k2.reg_node("/vmha/n/n1/alive") is None
    assert k2.reg_node("/vmha/n/n1/vm/reg") is None and k1.reg_node("/vmha/nodes/n1") == "n1"
    assert json.loads(k2.config_json(ClusterConfig()))["schema"] == 2
    assert json.loads(k1.config_json(ClusterConfig()))["schema"] == 1
    with pytest.raises(ValueError, match="only 1 and 2"):
        CampaignKeys(3)


def test_hostile_keys_of_keyspace_2_lie_in_its_layout() -> None:
    """Each pattern with a valid name is the key of its kind; with a hostile one, a key
    the parser refuses (never another node's key, never outside the prefix)."""
    k2 = CampaignKeys(2)
    kinds = set()
    for i in range(k2.pattern_count):
        ref = KS2.parse(k2.hostile_key(i, b"fz1", "n1"))
        if PATTERNS_V2[i] in ("config", "leader", "history-n", "history-o"):
            # The name as a suffix or as an event id: refused, yet under the prefix.
            assert isinstance(ref, UnknownKey) and ref.owned
            continue
        assert isinstance(ref, KeyRefV2), (PATTERNS_V2[i], ref)
        kinds.add(ref.kind)
        assert ref.node in ("", "n1", "fz1") and ref.vm in ("", "fz1")
        bad = KS2.parse(k2.hostile_key(i, b"fz/\xff\n", "n1"))
        assert isinstance(bad, UnknownKey) and bad.owned, (PATTERNS_V2[i], bad)
    assert kinds == {"spec", "move", "place", "cordon", "fence", "confirm_off", "assignment",
                     "reg", "alive", "leaving", "status"}


# ---- against etcd ----------------------------------------------------------------------

@pytest.mark.integration
def test_keyspace_2_stale_writes_are_flagged(etcd: EtcdCluster) -> None:
    store = EtcdStore(etcd.endpoints)
    hc = HistoryChecker(EtcdStore(etcd.endpoints), KS2)
    hc.ensure()
    try:
        epoch = store.put(KS2.leader, json.dumps({"id": "a"}))
        store.put(KS2.place("v"), placement(epoch).to_json())             # fine
        store.put(KS2.assignment("n1", "v"), assignment(epoch))           # fine
        reg = store.put(KS2.reg("n1"), json.dumps({"name": "n1"}))
        store.put(KS2.status("n1", "v"), status("n1", registration=reg))  # fine
        assert hc.caught_up() and hc.violations == [], hc.violations
        store.delete(KS2.leader)
        store.put(KS2.place("v"), placement(epoch).to_json())             # stale epoch
        store.put(KS2.assignment("n2", "v"), assignment(epoch, "n2"))     # not the placement
        store.put(KS2.fence("n9"), fence(epoch))                          # stale epoch
        store.delete(KS2.reg("n1"))
        store.put(KS2.status("n1", "v"), status("n1", registration=reg))  # stale agent
        # The stale-claim rewrite before a new registration: allowed while unregistered.
        store.put(KS2.status("n1", "v"), status("n1", "stopped"))
        # ... but a running claim without a registration is not.
        store.put(KS2.status("n1", "w"), status("n1"))
        # Keyspace 1's keys mean nothing on keyspace 2; a hostile value is skipped.
        store.put(Keyspace().vm_placement("v"), placement(epoch).to_json())
        store.client.put(KS2.place("y"), b"[" * 5000 + b"]" * 5000)
        assert hc.caught_up()
        whys = sorted(v["why"] for v in hc.violations)
        assert sum(f"epoch {epoch} was not the leader" in w for w in whys) == 2, whys
        assert sum("assignment to n2 differs from the placement" in w for w in whys) == 1
        assert sum("status from n1 while not registered" in w for w in whys) == 2, whys
        assert len(whys) == 5, whys
        assert hc.checked["assignment"] == 2 and hc.checked["stale_claim_rewrite"] == 1
    finally:
        store.close()
        hc.store.close()


@pytest.mark.integration
def test_keyspace_2_status_keys_belong_to_the_node_in_the_key(etcd: EtcdCluster) -> None:
    """A status under n2's prefix is n2's write, whatever node its value names: judged by
    n2's registration (the daemons refuse such a value; the checker must not be fooled
    into judging it by n1's)."""
    store = EtcdStore(etcd.endpoints)
    hc = HistoryChecker(EtcdStore(etcd.endpoints), KS2)
    hc.ensure()
    try:
        old = store.put(KS2.reg("n1"), json.dumps({"name": "n1"}))
        store.delete(KS2.reg("n1"))
        new = store.put(KS2.reg("n1"), json.dumps({"name": "n1"}))
        store.put(KS2.status("n1", "v"), status("n1", registration=new))  # fine
        store.put(KS2.status("n1", "v"), status("n1", registration=old))  # stale writer
        store.put(KS2.status("n2", "v"), status("n1", registration=new))  # n2: unregistered
        assert hc.caught_up()
        assert [v["why"] for v in hc.violations] == [
            f"status from n1 under registration {old} while {new} was current",
            "status from n2 while not registered"]
    finally:
        store.close()
        hc.store.close()


class _Core(CampaignCore):
    """Only the observation half of the campaign (no daemons)."""


@pytest.mark.integration
def test_keyspace_2_registrations_pending_and_marker(etcd: EtcdCluster, tmp_path: object
                                                     ) -> None:
    store = EtcdStore(etcd.endpoints)
    keys = CampaignKeys(2)
    core = _Core(1, 1, 1.0, False, FakeTruth(tmp_path), keys)  # type: ignore[arg-type]
    core.store = store
    try:
        keys.prepare(store)
        marker = store.get(KS2.version)
        assert marker is not None and KeyspaceVersion.from_json(marker.value).state == "done"
        r1 = store.put(KS2.reg("n1"), json.dumps({"name": "n1"}))
        store.put(KS2.alive("n1"), json.dumps({"name": "n1"}))
        store.put(KS2.status("n1", "reg"), status("n1"))  # a VM named "reg"
        r2 = store.put(KS2.reg("n2"), json.dumps({"name": "n2"}))
        store.put(Keyspace().node("n3"), json.dumps({"name": "n3"}))  # keyspace 1's
        assert core.registrations() == {"n1": r1, "n2": r2}
        epoch = store.put(KS2.leader, json.dumps({"id": "o1"}))
        assert core.leader() == "o1" and core.leader_rev() == epoch
        pending = Placement(id="p", vm="big", node=None, kind="pending", epoch=epoch,
                            reason="fits nowhere", decided_at=time.time())
        store.put(KS2.place("big"), pending.to_json())
        assert visibly_pending(store, "big", keys.layout)
        assert not visibly_pending(store, "big")  # keyspace 1's key is not there
    finally:
        store.close()


@pytest.mark.integration
def test_every_key_of_one_transaction_is_checked(etcd: EtcdCluster) -> None:
    """Keyspace 2's leader writes a placement and its assignments in one transaction:
    one revision for all of them.  Each is checked, not only the first the watch
    delivers (the checker skipped the rest as already seen), and an assignment is
    judged against the placement at its revision."""
    store = EtcdStore(etcd.endpoints)
    hc = HistoryChecker(EtcdStore(etcd.endpoints), KS2)
    hc.ensure()
    try:
        epoch = store.put(KS2.leader, json.dumps({"id": "a"}))
        store.txn([], [Put(KS2.place("v"), placement(epoch).to_json()),
                       Put(KS2.assignment("n1", "v"), assignment(epoch))])
        assert hc.caught_up() and hc.violations == [], hc.violations
        assert hc.checked["placement"] == 1 and hc.checked["assignment"] == 1, hc.checked
        store.delete(KS2.leader)
        stale = store.txn([], [Put(KS2.place("v"), placement(epoch, "n2").to_json()),
                               Put(KS2.assignment("n2", "v"), assignment(epoch, "n2")),
                               Put(KS2.fence("n9"), fence(epoch))]).revision
        assert hc.caught_up()
        # The placement's stale epoch is flagged; its assignment matches it.
        assert sorted(v["key"] for v in hc.violations) == [
            KS2.fence("n9"), KS2.place("v")], hc.violations
        assert {v["revision"] for v in hc.violations} == {stale}
        # An assignment naming a node its placement does not, or of another placement.
        hc.violations.clear()
        store.txn([], [Put(KS2.assignment("n3", "v"), assignment(epoch, "n2"))])
        store.txn([], [Put(KS2.assignment("n1", "v"), assignment(epoch, "n1"))])
        # A new leader's repair: the assignment as the placement is, epoch and all.
        store.put(KS2.leader, json.dumps({"id": "b"}))
        store.put(KS2.assignment("n2", "v"), assignment(epoch, "n2"))
        assert hc.caught_up()
        assert [v["why"] for v in hc.violations] == [
            f"assignment to n3, which the placement at {stale + 1} does not name",
            f"assignment to n1 differs from the placement at {stale + 2}"], hc.violations
    finally:
        store.close()
        hc.store.close()
