"""Failures are visible and bounded (issue 11, item 4): the pure parts.

The agent's plan holds a refused boot back until its retry time and gives up on the node
after `max_boot_failures_per_node`; a guest that dies under a running agent is a crash
(restarted in place up to `max_restart`); the leader relocates a VM its node gave up on
(up to `max_relocate` nodes), then marks it failed with the reason.  The stories end to
end are scenarios (tests/scenarios/boot-refused-*, crash-loop-*).
"""

from __future__ import annotations

from typing import Any

import pytest

from cli.history import outages
from hypervisor.base import Domain
from nodeagent.plan import Boot, Crashed, Report, plan
from orchestrator import planner
from orchestrator.txn_builder import placement as placement_txn
from schemas.events import Event
from schemas.keys import Keyspace
from schemas.models import (
    ClusterConfig,
    Placement,
    VmSpec,
    VmStatus,
    domain_uuid,
    failure_backoff,
    gave_up,
)
from tests.unit.builders import boot, cluster, running, status

NOW = 1_700_000_100.0
CFG = {"max_boot_failures_per_node": 3, "max_restart": 1, "max_relocate": 1,
       "failure_backoff_initial_s": 1.0, "failure_backoff_max_s": 8.0}


def agent(snap_kw: dict[str, Any], domains: list[Domain], now: float = NOW) -> list[Any]:
    snap = cluster(nodes=["a", "b", "c"], specs=["vm1"], config=CFG, **snap_kw)
    return plan("a", snap, {d.name: d for d in domains}, frozenset(), now=now)


# ---- backoff and the give-up verdict (pure helpers in schemas) -----------------------------


def test_backoff_is_exponential_and_capped() -> None:
    cfg = ClusterConfig.model_validate(CFG)
    assert [failure_backoff(cfg, n) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 8, 8, 8]


def test_gave_up_says_why_and_where() -> None:
    cfg = ClusterConfig.model_validate(CFG)
    st = VmStatus(vm="vm1", node="a", state="stopped", since=1.0, boot_failures=3,
                  error="domain 'vm1' is already defined with uuid x")
    why = gave_up(st, cfg)
    assert why is not None and "3 boot failures on a" in why and "already defined" in why
    assert gave_up(st.model_copy(update={"boot_failures": 2}), cfg) is None
    crashed = VmStatus(vm="vm1", node="a", state="crashed", since=1.0, crashes=2)
    assert "crashed 2 times on a" in (gave_up(crashed, cfg) or "")
    assert gave_up(crashed.model_copy(update={"crashes": 1}), cfg) is None


# ---- the agent's plan --------------------------------------------------------------------


def test_refused_boot_waits_for_its_retry_time() -> None:
    st = status("a", "stopped", "p1", boot_failures=1, error="refused", retry_at=NOW + 2)
    kw = dict(placements={"vm1": boot("a")}, statuses={"vm1": st})
    assert agent(kw, []) == []
    assert [type(a) for a in agent(kw, [], now=NOW + 2)] == [Boot]


def test_node_gives_up_after_max_boot_failures() -> None:
    st = status("a", "stopped", "p1", boot_failures=3, error="refused", retry_at=NOW - 5)
    assert agent(dict(placements={"vm1": boot("a")}, statuses={"vm1": st}), []) == []


def test_failures_under_an_older_placement_do_not_hold_a_new_one() -> None:
    st = status("a", "stopped", "p0", boot_failures=3, error="refused", retry_at=NOW + 50)
    acts = agent(dict(placements={"vm1": boot("a")}, statuses={"vm1": st}), [])
    assert [type(a) for a in acts] == [Boot]


@pytest.mark.parametrize("state", ["crashed", "shutoff", None])
def test_guest_dead_under_running_agent_is_a_crash(state: str | None) -> None:
    doms = [Domain("vm1", state)] if state else []  # type: ignore[arg-type]
    acts = agent(dict(placements={"vm1": boot("a")}, statuses={"vm1": running("a", "p1")}),
                 doms)
    assert len(acts) == 1 and isinstance(acts[0], Crashed)
    assert (acts[0].vm, acts[0].placement_id) == ("vm1", "p1")
    # Only a QEMU death counts towards max_restart: a domain shut off (this node's own
    # self-fence or guard destroyed it, or the guest powered off) or gone does not.
    assert acts[0].counted == (state == "crashed")


def test_crash_restarted_in_place_after_backoff_then_given_up() -> None:
    crashed = status("a", "crashed", "p1", crashes=1, retry_at=NOW + 1)
    kw = dict(placements={"vm1": boot("a")}, statuses={"vm1": crashed})
    assert agent(kw, [Domain("vm1", "crashed")]) == []
    assert [type(a) for a in agent(kw, [Domain("vm1", "crashed")], now=NOW + 1)] == [Boot]
    again = status("a", "crashed", "p1", crashes=2, retry_at=NOW - 1)
    assert agent(dict(placements={"vm1": boot("a")}, statuses={"vm1": again}),
                 [Domain("vm1", "crashed")]) == []


def test_running_report_keeps_counts_until_reset_window() -> None:
    st = running("a", "p1", crashes=1, failed_at=NOW - 10)
    kw = dict(placements={"vm1": boot("a")}, statuses={"vm1": st})
    assert agent(kw, [Domain("vm1", "running")]) == []
    later = agent(kw, [Domain("vm1", "running")], now=NOW + 600)
    assert len(later) == 1 and isinstance(later[0], Report) and later[0].reset_failures


# ---- the leader: relocate, then mark failed ---------------------------------------------


def leader(snap_kw: dict[str, Any]) -> list[planner.Action]:
    snap = cluster(nodes=["a", "b", "c"], specs=["vm1"], config=CFG, **snap_kw)
    return list(planner.plan(snap, epoch=1, now=0.0, wall_time=NOW, lost_since={}).writes)


def test_leader_relocates_vm_its_node_gave_up_on() -> None:
    st = status("a", "stopped", "p1", boot_failures=3, error="refused", mod=77)
    (w,) = leader(dict(placements={"vm1": boot("a")}, statuses={"vm1": st}))
    assert isinstance(w, planner.WritePlacement)
    p = w.placement
    assert p.kind == "boot" and p.node in ("b", "c") and p.failed_nodes == ["a"]
    assert "3 boot failures on a" in p.reason
    assert w.status_mod_revision == 77
    txn = placement_txn(Keyspace(), w, 1)
    assert any(c.key == Keyspace().vm_status("vm1") and c.value == 77 for c in txn.compares)


def test_leader_marks_failed_after_max_relocate() -> None:
    st = status("b", "crashed", "p1", crashes=2, error="guest died")
    (w,) = leader(dict(placements={"vm1": boot("b", failed_nodes=["a"])},
                       statuses={"vm1": st}))
    assert isinstance(w, planner.WritePlacement)
    p = w.placement
    assert p.kind == "failed" and p.node is None and p.failed_nodes == ["a", "b"]
    assert "crashed 2 times on b" in p.reason and "max_relocate 1" in p.reason


def test_failed_vm_stays_failed_until_its_spec_changes() -> None:
    failed = {"kind": "failed", "node": None, "id": "p2", "failed_nodes": ["a", "b"],
              "spec_revision": 12}
    st = status("b", "crashed", "p1", crashes=2)
    # specs get revision 10+: with nodes a, b, c and the config first, vm1's spec is 14.
    assert leader(dict(placements={"vm1": {**failed, "spec_revision": 14}},
                       statuses={"vm1": st})) == []
    (w,) = leader(dict(placements={"vm1": failed}, statuses={"vm1": st}))
    assert isinstance(w, planner.WritePlacement) and w.placement.kind == "boot"
    assert w.placement.failed_nodes == []


def test_running_vm_is_never_relocated_for_old_failures() -> None:
    st = running("a", "p1", boot_failures=3, error="old")
    assert leader(dict(placements={"vm1": boot("a")}, statuses={"vm1": st})) == []


# ---- schema: domain identity, failed placements ---------------------------------------------


def test_domain_uuid_is_normalised_and_checked() -> None:
    xml = ("<domain type='kvm'><name>w</name><uuid>6B1F2C4D-0000-4000-8000-00000000000A"
           "</uuid></domain>")
    assert domain_uuid(xml) == "6b1f2c4d-0000-4000-8000-00000000000a"
    assert domain_uuid("<domain type='kvm'><name>w</name></domain>") is None
    with pytest.raises(ValueError, match="uuid"):
        VmSpec(name="w", domain_xml="<domain><name>w</name><uuid>nope</uuid></domain>",
               memory_mib=1, vcpus=1)


def test_failed_placement_has_no_node() -> None:
    with pytest.raises(ValueError):
        Placement(id="x", vm="v", node="a", kind="failed", epoch=1, reason="r", decided_at=1)
    Placement(id="x", vm="v", node=None, kind="failed", epoch=1, reason="r", decided_at=1)


# ---- availability counts a crash as an outage ---------------------------------------------


def ev(i: int, at: float, kind: str, **kw: Any) -> Event:
    return Event(id=f"{i:017d}-x-{i:06d}", at=at, kind=kind, actor="agent:a",  # type: ignore[arg-type]
                 **kw)


def test_crash_is_an_outage_until_the_next_boot() -> None:
    events = [ev(1, 10.0, "boot", vm="vm1", node="a"),
              ev(2, 50.0, "crash", vm="vm1", node="a", reason="guest died"),
              ev(3, 52.5, "boot", vm="vm1", node="a")]
    assert outages(events, 0.0, 100.0) == {"vm1": [(50.0, 52.5, "crash")]}


# ---- the CLI: domain identity and the error column --------------------------------------


def test_identity_clash_names_the_other_vm_and_ignores_itself() -> None:
    from cli.vm import _error, identity_clash
    from tests.unit.builders import KS, raw, spec_value

    u = "6b1f2c4d-1111-4222-8333-444455556666"

    def with_uuid(name: str, uid: str) -> dict[str, Any]:
        v = spec_value(name)
        v["domain_xml"] = v["domain_xml"].replace("</name>", f"</name><uuid>{uid}</uuid>")
        return v

    snap = cluster(extra=[raw(KS.vm_spec("web1"), with_uuid("web1", u), 20)])
    web2 = VmSpec.model_validate(with_uuid("web2", u.upper()))
    assert "already used by vm/web1" in (identity_clash(snap, web2) or "")
    web1 = VmSpec.model_validate(with_uuid("web1", u))
    assert identity_clash(snap, web1) is None  # its own UUID
    assert identity_clash(snap, VmSpec.model_validate(spec_value("web3"))) is None  # none
    st = VmStatus(vm="v", node="a", state="stopped", since=1.0, error="refused",
                  boot_failures=2)
    assert _error(None, st) == "refused (2 boot failures)"
    failed = Placement(id="x", vm="v", node=None, kind="failed", epoch=1, reason="gave up",
                       decided_at=1)
    assert _error(failed, st) == "failed: gave up"
