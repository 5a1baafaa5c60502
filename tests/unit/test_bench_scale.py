"""bench.scale's arithmetic: what a phase cost etcd from two /metrics readings, the
keepalives taken out by count, and the acceptance verdicts of results/bench-scale.md."""

from __future__ import annotations

from typing import Any

from bench.scale import domain_xml
from bench.scale_metrics import Scrape, diff, net_of_keepalives
from bench.scale_report import acceptance, markdown
from schemas.models import VmSpec


def _scrape(at: float, sent: float, ka: float, txn: float) -> Scrape:
    return Scrape(at, sent, 0.0, {
        "grpc_server_msg_received_total": {"LeaseKeepAlive": ka, "Txn": txn, "Range": 5},
        "grpc_server_msg_sent_total": {"LeaseKeepAlive": ka, "Txn": txn}})


def test_a_phase_is_the_difference_and_keepalives_go_by_count() -> None:
    p = diff(_scrape(10.0, 1000, 100, 7), _scrape(25.0, 61_000, 1100, 28))
    assert p["seconds"] == 15.0 and p["sent_bytes"] == 60_000
    assert p["requests"] == {"LeaseKeepAlive": 1000, "Txn": 21}  # Range unchanged: left out
    assert net_of_keepalives(p, 41.0) == 60_000 - 41_000


def test_domain_xml_is_the_size_asked_and_a_valid_spec() -> None:
    xml = domain_xml("vm00001", 4096)
    assert len(xml.encode()) == 4096
    VmSpec(name="vm00001", domain_xml=xml, memory_mib=256, vcpus=1)


def _run(nodes: int, idle: float, per_vm: int, recovery: float, **kw: Any) -> dict[str, Any]:
    return {"nodes": nodes, "config": "defaults", "agent_poll_s": 1.0,
            "agents_per_process": 50, "idle": {"sent_bytes_per_s_per_node": idle},
            "crash": {"net_bytes_per_vm": per_vm, "to_running": {"max_s": recovery}},
            "leader_restart": {}, "log_lines": {"message_size": 0}, **kw}


def test_acceptance_holds_each_run_against_the_50_node_run_of_its_settings() -> None:
    runs = {"50": _run(50, 160, 11_000, 19.0), "200": _run(200, 170, 12_000, 20.5),
            "x-1000": {**_run(1000, 0, 0, 0), "config": {"lease_ttl_s": 12}},
            "x-50": {**_run(50, 45, 11_000, 35.0), "config": {"lease_ttl_s": 12}}}
    lines = acceptance(runs)
    rec = [ln for ln in lines if ln.startswith("- run 200: crash → running")]
    assert rec and "**not met**" in rec[0]
    assert any(ln.startswith("- run 200: idle egress") and "**met**" in ln for ln in lines)
    # The 1,000-node run is held against x-50 (same config), not against 50.
    x = [ln for ln in lines if ln.startswith("- run x-1000: crash → running")]
    assert x and "vs 35.00 s" in x[0]
    # The time from the lease's expiry, held against the 50-node run's the same way.
    runs["50"]["crash"]["expiry_to_running"] = {"max_s": 12.0}
    runs["200"]["crash"].update(expiry_to_running={"max_s": 12.8}, lease_expired_after_s=7.7)
    exp = [ln for ln in acceptance(runs) if ln.startswith("- run 200: lease expiry")]
    assert exp and "**met**" in exp[0] and "12.80 s vs 12.00 s" in exp[0]
    runs["200"]["crash"]["expiry_to_running"] = {"max_s": 13.2}
    exp = [ln for ln in acceptance(runs) if ln.startswith("- run 200: lease expiry")]
    assert exp and "**not met**" in exp[0]
    # From both keys gone (the liveness fence window's start), the same way.
    runs["50"]["crash"]["both_gone_to_running"] = {"max_s": 11.9}
    runs["200"]["crash"].update(both_gone_to_running={"max_s": 12.8},
                                liveness_expired_after_s=8.3)
    both = [ln for ln in acceptance(runs) if ln.startswith("- run 200: both keys gone")]
    assert both and "**met**" in both[0] and "12.80 s vs 11.90 s" in both[0]
    assert "went 0.600 s after" in both[0]
    runs["200"]["crash"]["both_gone_to_running"] = {"max_s": 13.0}
    both = [ln for ln in acceptance(runs) if ln.startswith("- run 200: both keys gone")]
    assert both and "**not met**" in both[0]
    stopped = {"50": _run(50, 160, 11_000, 19.0),
               "1000": {"nodes": 1000, "failed": "TimeoutError", "log_lines": {}}}
    assert all("**not measured**" in ln for ln in acceptance(stopped)
               if ln.startswith("- run 1000:") and "**" in ln)
    assert "| 1000 |" in markdown({"runs": stopped})
