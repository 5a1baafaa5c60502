"""Prometheus metrics of agents and the leader, and systemd readiness.

Each daemon serves /metrics on `--metrics-listen HOST:PORT` (off by default).
"""

from __future__ import annotations

import structlog
from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = structlog.get_logger("vmha.metrics")

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Live migration times, in seconds (Prometheus wants base units): 5 ms .. 30 s.
_MIGRATION = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SLOW = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300)

LEASE_RENEW_SECONDS = Histogram(
    "vmha_lease_renew_seconds", "Round-trip time of a successful lease keepalive",
    ["who"], buckets=_FAST)
LEADER_EPOCH = Gauge("vmha_leader_epoch", "Epoch of this orchestrator's term (0: not leader)")
IS_LEADER = Gauge("vmha_is_leader", "1 while this orchestrator is the leader")
VMS_BY_STATE = Gauge("vmha_vms", "VMs by reported state (leader's view)", ["state"])
NODE_VMS = Gauge("vmha_node_domains", "Managed domains on this node by state", ["state"])
PLACEMENT_CYCLE_SECONDS = Histogram(
    "vmha_placement_decision_seconds", "Time the leader's planner took for one cycle",
    buckets=_FAST)
PLACEMENTS = Counter("vmha_placements_total", "Placements written", ["kind", "written"])
MIGRATION_TOTAL_SECONDS = Histogram("vmha_migration_total_seconds",
                                    "Live migration total time (job stats)",
                                    buckets=_MIGRATION)
MIGRATION_DOWNTIME_SECONDS = Histogram("vmha_migration_downtime_seconds",
                                       "Live migration downtime (job stats)",
                                       buckets=_MIGRATION)
MIGRATIONS = Counter("vmha_migrations_total", "Outgoing live migrations", ["outcome"])
FENCES = Counter("vmha_fences_total", "Fence operations", ["method", "outcome"])
FENCE_SECONDS = Histogram("vmha_fence_seconds", "From lease loss observed to fence recorded",
                          ["method"], buckets=_SLOW)
INCIDENT_SECONDS = Histogram(
    "vmha_incident_seconds",
    "Per lost node: detect (lease gone) -> fence -> VM running elsewhere",
    ["phase"], buckets=_SLOW)
BOOTS = Counter("vmha_boots_total", "Domains booted by this agent")
SELF_FENCES = Counter("vmha_self_fences_total", "Domains destroyed by self-fencing")
INVALID_KEYS = Gauge("vmha_invalid_keys",
                     "Keys under the prefix that did not parse in this daemon's last snapshot "
                     "(ignored; `vmha status` lists them)")
CYCLE_ERRORS = Counter("vmha_cycle_errors_total",
                       "Daemon cycles ended by an unexpected error (logged with traceback, "
                       "retried with backoff)")


def serve(listen: str | None) -> None:
    if not listen:
        return
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1")
    log.info("metrics_listening", listen=listen)


def notify(state: str) -> None:
    """sd_notify for Type=notify units; a no-op outside systemd."""
    import os

    if not os.environ.get("NOTIFY_SOCKET"):
        return
    import sdnotify

    sdnotify.SystemdNotifier().notify(state)
