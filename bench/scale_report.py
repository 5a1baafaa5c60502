"""`results/bench-scale.md` from `results/bench-scale.json` (bench.scale's runs), with
the acceptance lines of docs/keyspace-v2.md, section 7, part 8."""

from __future__ import annotations

from typing import Any

from bench.common import md_table

IDLE_BUDGET_B_PER_S = 2000
MOVE_BUDGET_B_PER_VM = 50_000
RECOVERY_SLACK_S = 1.0


def _get(d: Any, *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _kb(x: Any) -> str:
    return "–" if x is None else f"{x / 1000:.1f}"


def _s(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}" if x < 1 else f"{x:.2f}"


def _req(p: Any) -> str:
    req = _get(p, "requests") or {}
    keep = {k: v for k, v in req.items() if k not in ("LeaseKeepAlive",)}
    return ", ".join(f"{k} {v}" for k, v in keep.items()) or "–"


def _cpu(p: Any) -> str:
    c = _get(p, "cpu_per_s") or {}
    return (f"etcd {c.get('etcd', 0):.2f}, agents {c.get('agent_hosts', 0):.2f}, "
            f"leader {c.get('leader', 0):.2f}, other {c.get('other_processes', 0):.2f} "
            f"(load {c.get('loadavg_1m', 0)})")


def _order(key: str) -> tuple[str, int]:
    label, _, n = key.rpartition("-")
    return label, int(n)


def _base(runs: dict[str, Any], r: dict[str, Any], measure: str = "to_running") -> Any:
    """The 50-node run with the same config and agent settings as `r`: its crash →
    running (or lease expiry → running) is the figure `r`'s is held against."""
    for other in runs.values():
        if other.get("nodes") == 50 and all(other.get(k) == r.get(k) for k in (
                "config", "agent_poll_s", "agents_per_process", "agents_nice")):
            return _get(other, "crash", measure, "max_s")
    return None


def _gap(r: dict[str, Any]) -> float | None:
    lease, alive = (_get(r, "crash", f"{w}_expired_after_s") for w in ("lease", "liveness"))
    return None if lease is None or alive is None else round(alive - lease, 3)


def _cfg(r: dict[str, Any]) -> str:
    c = r.get("config")
    cfg = "default" if c in (None, "defaults") else ", ".join(f"{k} {v}" for k, v in c.items())
    return (f"{cfg}; agent poll {r.get('agent_poll_s', 1.0)} s, "
            f"{r.get('agents_per_process')} agents a process"
            + (f" at nice {r['agents_nice']}" if r.get("agents_nice") else ""))


def acceptance(runs: dict[str, Any]) -> list[str]:
    lines = []
    for n, r in sorted(runs.items(), key=lambda kv: _order(kv[0])):
        base = _base(runs, r)
        idle = _get(r, "idle", "sent_bytes_per_s_per_node")
        per_vm = _get(r, "crash", "net_bytes_per_vm")
        rec = _get(r, "crash", "to_running", "max_s")
        exp, exp_base = _get(r, "crash", "expiry_to_running", "max_s"), _base(
            runs, r, "expiry_to_running")
        both, both_base = _get(r, "crash", "both_gone_to_running", "max_s"), _base(
            runs, r, "both_gone_to_running")
        size_errors = _get(r, "log_lines", "message_size")
        checks = [
            ("idle egress ≤ 2 kB/s per node", idle is not None and idle <= IDLE_BUDGET_B_PER_S,
             f"{idle} B/s"),
            ("crash ≤ 50 kB per VM moved", per_vm is not None and per_vm <= MOVE_BUDGET_B_PER_VM,
             f"{_kb(per_vm)} kB"),
            ("crash → running within 1 s of 50 nodes'",
             rec is not None and base is not None and rec <= base + RECOVERY_SLACK_S,
             f"{_s(rec)} s vs {_s(base)} s"),
            # Less the spread no node count causes: the kill falls anywhere in a
            # keepalive interval, so the lease expires up to one interval early.
            ("lease expiry → running within 1 s of 50 nodes'",
             exp is not None and exp_base is not None and exp <= exp_base + RECOVERY_SLACK_S,
             f"{_s(exp)} s vs {_s(exp_base)} s; the lease expired "
             f"{_s(_get(r, 'crash', 'lease_expired_after_s'))} s after the kill"),
            # And less etcd's own lag between deleting the node's two keys (their leases
            # are renewed together, but each revoke is its own proposal): the liveness
            # fence window starts when both are gone.
            ("both keys gone → running within 1 s of 50 nodes'",
             both is not None and both_base is not None
             and both <= both_base + RECOVERY_SLACK_S,
             f"{_s(both)} s vs {_s(both_base)} s; the liveness key went "
             f"{_s(_gap(r))} s after the registration"),
            ("no message-size error", size_errors == 0 and "leader_restart" in r,
             f"{size_errors} log lines, a new leader's full list "
             f"{'done' if 'leader_restart' in r else 'not reached'}"),
        ]
        for what, ok, got in checks:
            verdict = "met" if ok else "not measured" if "failed" in r else "not met"
            lines.append(f"- run {n}: {what}: **{verdict}** ({got})")
        if "failed" in r:
            lines.append(f"- run {n}: the run stopped early: {r['failed']}")
    return lines


def markdown(data: dict[str, Any]) -> str:
    runs = data.get("runs", {})
    order = sorted(runs, key=_order)
    rows = []
    for n in order:
        r = runs[n]
        rows.append([
            n, r.get("vms"), _cfg(r),
            _get(r, "idle", "sent_bytes_per_s_per_node"),
            _get(r, "idle", "bytes_per_keepalive"),
            _kb(_get(r, "crash", "sent_bytes")), _kb(_get(r, "crash", "net_bytes_per_vm")),
            f"{_s(_get(r, 'crash', 'to_running', 'p50_s'))} / "
            f"{_s(_get(r, 'crash', 'to_running', 'max_s'))}",
            _kb(_get(r, "drain", "net_bytes_per_vm")),
            _s(_get(r, "drain", "to_running", "max_s")),
            f"{_s(_get(r, 'idle', 'leader_cycles', 'p50_s'))} / "
            f"{_s(_get(r, 'idle', 'leader_cycles', 'p99_s'))}",
            f"{_s(_get(r, 'crash', 'leader_cycles', 'p50_s'))} / "
            f"{_s(_get(r, 'crash', 'leader_cycles', 'p99_s'))}",
        ])
    out = ["# bench-scale: keyspace 2 at 50, 200 and 1,000 nodes", "",
           "`make bench-scale` (`bench/scale.py`): 3 etcd members on loopback, the real "
           "`NodeAgent` in processes of several (each agent with its own etcd client) on the "
           "record-only fake hypervisor, the leader in its own process, 10 VMs a node, "
           "domain XML of 4 kB, the config of each run (below).  etcd numbers from its "
           "members' `/metrics`, summed; *net* = less the lease keepalives at the idle "
           "phase's bytes per keepalive answer.", "",
           *md_table(["run", "VMs", "config", "idle B/s/node", "B/keepalive", "crash kB (raw)",
                      "crash kB/VM (net)", "crash→running p50 / max s",
                      "drain kB/VM (net)", "drain s", "leader cycle idle p50 / p99 s",
                      "leader cycle crash p50 / p99 s"], rows),
           "", "## Acceptance", "", *acceptance(runs), "", "## Requests and CPU by phase", ""]
    for n in order:
        r = runs[n]
        out.append(f"**{n} nodes** (started {r.get('started')}):")
        out.append("")
        for ph in ("register", "boot", "idle", "crash", "drain", "leader_restart"):
            p = r.get(ph)
            if not p:
                continue
            ka = _get(p, "requests", "LeaseKeepAlive")
            extra = (f"; keys under /vmha/n/ at its end: {p['keys']}" if ph == "register"
                     else "")
            if p.get("metrics_error"):
                extra += f"; etcd's /metrics did not answer: {p['metrics_error']}"
            out.append(f"- {ph}: {p.get('seconds')} s, etcd sent {_kb(p.get('sent_bytes'))} kB, "
                       f"requests: {_req(p)}; keepalives {ka}; CPU s/s: {_cpu(p)}{extra}")
        boot = r.get("boot") or {}
        lr = r.get("leader_restart") or {}
        if boot:
            out.append(f"- every VM running {boot.get('running_after_s')} s after the leader "
                       f"started; boot's leader cycles p50/p99/max "
                       f"{_get(boot, 'leader_cycles', 'p50_s')} / "
                       f"{_get(boot, 'leader_cycles', 'p99_s')} / "
                       f"{_get(boot, 'leader_cycles', 'max_s')} s")
        if lr:
            out.append(f"- a new leader's first cycle (paged list of {lr.get('keys')} keys, "
                       f"model, plan): {lr.get('first_cycle_s')} s, "
                       f"{lr.get('first_cycle_after_start_s')} s after its start")
        if r.get("crash"):
            out.append(f"- fence record {_get(r, 'crash', 'fence_recorded_after_s')} s after "
                       "the crash")
        out.append(f"- log lines: {r.get('log_lines')}")
        out.append("")
    return "\n".join(out) + "\n"


__all__ = ["acceptance", "markdown"]
