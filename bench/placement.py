"""Benchmark (not a test): vmha's planner against crm_simulate and hbal on identical clusters.

For each size (nodes x VMs) one generated cluster (bench.placement_gen) and three
scenarios: `fail` (the node with the most VMs is lost and fenced), `drain` (the same node
cordoned) and `rebalance` (full balance of the untouched cluster).  Every engine gets
the same nodes, VMs, sizes, hard anti-affinity groups and current placement:

* vmha: `planner.plan` timed on its first cycle (the decision for the whole failure; a
  drain proceeds in waves, timed per cycle, summed over all cycles), then run to a fixed
  point by orchestrator.simulate; `rebalance` times `rebalance.plan_moves` with no move
  budget (converged) and no migration limits.
* Pacemaker's crm_simulate: an offline CIB (utilization memory/cpu on nodes and
  primitives, placement-strategy=balanced, -INFINITY colocations for anti-affinity, the
  placement in the status section).  fail: the node's node_state offline (stonith
  disabled, so it counts as cleanly down); drain: node standby; rebalance:
  resource-stickiness 0 (stickiness 100 otherwise).  `crm_simulate -R -x FILE`, timed as
  a process (XML parsing included).
* Ganeti's hbal: text backend (ext disk template, so any node can take any instance;
  exclusion tags for anti-affinity; vcpu ratio 1).  fail and drain: `-O NODE
  --evac-mode`; rebalance: plain `hbal`.  `-S` saves the final state, which is read back.

Quality, computed by this script from each engine's final assignment: migrations (VMs
that changed node, not counting the re-placement of the failed node's VMs), VMs left
unplaced, stddev and max of per-node memory utilisation over the nodes in service, and
violations (over capacity or two VMs of one anti-affinity group on one node).

Usage: python -m bench.placement [--sizes 30x300,100x1000,1000x10000,5000x50000] [--timeout 180]
       [--out results/bench-placement.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from bench.placement_gen import Generated, generate
from orchestrator import planner, rebalance, simulate
from orchestrator.placement import Placer

Assignment = dict[str, str | None]


# ---- quality -----------------------------------------------------------------------------

def quality(g: Generated, final: Assignment, out_of_service: set[str],
            failed: set[str]) -> dict[str, Any]:
    cap = {n.name: (n.memory_mib, n.vcpus) for n in g.nodes}
    used = {n.name: [0, 0] for n in g.nodes}
    groups: Counter[tuple[str, str]] = Counter()
    migrations = unplaced = 0
    for vm in g.vms:
        node = final.get(vm.name)
        if node is None:
            unplaced += 1
            continue
        if node != vm.node and vm.node not in failed:
            migrations += 1
        used[node][0] += vm.memory_mib
        used[node][1] += vm.vcpus
        if vm.anti:
            groups[(vm.anti, node)] += 1
    violations = sum(1 for n in used if used[n][0] > cap[n][0] or used[n][1] > cap[n][1])
    violations += sum(c - 1 for c in groups.values() if c > 1)
    violations += sum(1 for vm in g.vms if final.get(vm.name) in out_of_service)
    utils = [used[n][0] / cap[n][0] for n in used if n not in out_of_service]
    mean = sum(utils) / len(utils)
    return {"migrations": migrations, "unplaced": unplaced,
            "util_stddev": round(math.sqrt(sum((u - mean) ** 2 for u in utils) / len(utils)), 4),
            "util_max": round(max(utils), 4), "violations": violations}


def busiest(g: Generated) -> str:
    c = Counter(vm.node for vm in g.vms)
    return min(c, key=lambda n: (-c[n], n))


# ---- vmha --------------------------------------------------------------------------------

def run_vmha(g: Generated, scenario: str, node: str) -> dict[str, Any]:
    snap = g.snapshot()
    initial: Assignment = {vm.name: vm.node for vm in g.vms}
    if scenario == "rebalance":
        placer = Placer.from_snapshot(snap)
        specs = {v: e.value for v, e in snap.specs.items()}
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        moves = rebalance.plan_moves(placer, specs, list(specs), budget=10**9,
                                     min_gain=snap.config.placement.rebalance.min_gain,
                                     per_node_limit=10**9)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        final = dict(initial)
        for mv in moves:
            final[mv.vm] = mv.target
        return {"time_s": round(dt, 4), "cpu_s": round(dc, 4), "cycles": 1,
                **quality(g, final, set(), set())}
    times: list[float] = []
    cpu: list[float] = []

    def clock() -> float:
        return time.perf_counter()

    wall = 1_000_000.0
    if scenario == "fail":
        s = simulate.fail_node(snap, node, snap.revision + 1, wall)
    else:
        s = simulate.drain_node(snap, node, snap.revision + 1, wall)
    cycles = 0
    for _ in range(1000):
        gc.collect()  # the generator's garbage is not the planner's cost
        t0, c0 = clock(), time.process_time()
        result = planner.plan(s, epoch=1, now=wall, wall_time=wall, lost_since={})
        times.append(clock() - t0)
        cpu.append(time.process_time() - c0)
        if not result.writes:
            break
        cycles += 1
        s = simulate.apply_plan(s, result, s.revision + 1, wall)
        wall += 1.0
    final = {vm: (e.value.node if e.value.kind != "pending" else None)
             for vm, e in s.placements.items()}
    out = {"time_s": round(times[0], 4), "cpu_s": round(cpu[0], 4),
           "time_all_cycles_s": round(sum(times[:-1]) or times[0], 4), "cycles": cycles}
    return {**out, **quality(g, final, {node}, {node} if scenario == "fail" else set())}


# ---- Pacemaker ---------------------------------------------------------------------------

def cib(g: Generated, scenario: str, node: str) -> str:
    out = ['<cib crm_feature_set="3.16.2" validate-with="pacemaker-3.9" epoch="1" '
           'num_updates="0" admin_epoch="0" have-quorum="1" dc-uuid="1"><configuration>',
           '<crm_config><cluster_property_set id="cib-bootstrap-options">'
           '<nvpair id="o1" name="placement-strategy" value="balanced"/>'
           '<nvpair id="o2" name="stonith-enabled" value="false"/>'
           '<nvpair id="o3" name="no-quorum-policy" value="ignore"/>'
           '</cluster_property_set></crm_config><nodes>']
    ids = {n.name: i + 1 for i, n in enumerate(g.nodes)}
    for n in g.nodes:
        sb = (f'<instance_attributes id="{n.name}-ia"><nvpair id="{n.name}-sb" name="standby" '
              'value="on"/></instance_attributes>' if scenario == "drain" and n.name == node
              else "")
        out.append(f'<node id="{ids[n.name]}" uname="{n.name}">{sb}<utilization id="{n.name}-u">'
                   f'<nvpair id="{n.name}-um" name="memory" value="{n.memory_mib}"/>'
                   f'<nvpair id="{n.name}-uc" name="cpu" value="{n.vcpus}"/></utilization></node>')
    out.append("</nodes><resources>")
    for vm in g.vms:
        out.append(f'<primitive id="{vm.name}" class="ocf" provider="pacemaker" type="Dummy">'
                   f'<meta_attributes id="{vm.name}-m"><nvpair id="{vm.name}-ma" '
                   'name="allow-migrate" value="true"/></meta_attributes>'
                   f'<utilization id="{vm.name}-u"><nvpair id="{vm.name}-um" name="memory" '
                   f'value="{vm.memory_mib}"/><nvpair id="{vm.name}-uc" name="cpu" '
                   f'value="{vm.vcpus}"/></utilization></primitive>')
    out.append("</resources><constraints>")
    members: dict[str, list[str]] = {}
    for vm in g.vms:
        if vm.anti:
            members.setdefault(vm.anti, []).append(vm.name)
    k = 0
    for vms in members.values():
        for i in range(len(vms)):
            for j in range(i + 1, len(vms)):
                k += 1
                out.append(f'<rsc_colocation id="aa{k}" rsc="{vms[i]}" with-rsc="{vms[j]}" '
                           'score="-INFINITY"/>')
    stick = 0 if scenario == "rebalance" else 100
    out.append('</constraints><rsc_defaults><meta_attributes id="rd"><nvpair id="rd-s" '
               f'name="resource-stickiness" value="{stick}"/></meta_attributes></rsc_defaults>'
               "</configuration><status>")
    by_node: dict[str, list[str]] = {}
    for vm in g.vms:
        by_node.setdefault(vm.node, []).append(vm.name)
    for n in g.nodes:
        down = scenario == "fail" and n.name == node
        state = ('in_ccm="false" crmd="offline" join="down" expected="down"' if down else
                 'in_ccm="true" crmd="online" join="member" expected="member"')
        i = ids[n.name]
        out.append(f'<node_state id="{i}" uname="{n.name}" {state} crm-debug-origin="b">'
                   f'<lrm id="{i}"><lrm_resources>')
        if not down:
            for c, vm_name in enumerate(by_node.get(n.name, []), 1):
                key = f"{c}:1:0:00000000-0000-0000-0000-000000000000"
                out.append(
                    f'<lrm_resource id="{vm_name}" class="ocf" provider="pacemaker" '
                    f'type="Dummy"><lrm_rsc_op id="{vm_name}_last_0" '
                    f'operation_key="{vm_name}_start_0" operation="start" crm-debug-origin="b" '
                    f'crm_feature_set="3.16.2" transition-key="{key}" '
                    f'transition-magic="0:0;{key}" exit-reason="" on_node={quoteattr(n.name)} '
                    'call-id="1" rc-code="0" op-status="0" interval="0" last-rc-change="1" '
                    f'exec-time="0" queue-time="0" op-digest="{DIGEST}"/></lrm_resource>')
        out.append("</lrm_resources></lrm></node_state>")
    out.append("</status></cib>")
    return "\n".join(out)


# Pacemaker's digest of an empty parameter set (what it computes for our Dummy primitives):
# with it the scheduler sees the recorded starts as current and plans no restarts.
DIGEST = "f2317cad3d54cec5d7d7aa7d0bf35cf8"
_CRM_LINE = re.compile(r"\*\s+(Start|Move|Migrate|Recover|Stop)\s+(\S+)\s+\(\s*(.*?)\s*\)")


def run_crm(g: Generated, scenario: str, node: str, tmp: Path, timeout: float) -> dict[str, Any]:
    path = tmp / f"cib-{scenario}.xml"
    path.write_text(cib(g, scenario, node))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(["crm_simulate", "-R", "-x", str(path)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    dt = time.perf_counter() - t0
    if "Transition Summary" not in proc.stdout:
        return {"error": f"crm_simulate rc={proc.returncode}: {proc.stderr.strip()[-300:]}"}
    final: Assignment = {vm.name: vm.node for vm in g.vms}
    if scenario == "fail":
        for vm in g.vms:
            if vm.node == node:
                final[vm.name] = None
    summary = proc.stdout.split("Transition Summary:", 1)[1]
    for m in _CRM_LINE.finditer(summary):
        op, rsc, where = m.groups()
        if op == "Stop":
            final[rsc] = None
        else:
            final[rsc] = where.split("->")[-1].strip()
    return {"time_s": round(dt, 4), **quality(g, final, {node} if scenario != "rebalance"
                                               else set(),
                                               {node} if scenario == "fail" else set())}


# ---- Ganeti ------------------------------------------------------------------------------

def ganeti_text(g: Generated) -> str:
    lines = ["group-01|fake-uuid-01|preferred|", ""]
    used = Counter[str]()
    for vm in g.vms:
        used[vm.node] += vm.memory_mib
    for n in g.nodes:
        lines.append(f"{n.name}|{n.memory_mib}|0|{n.memory_mib - used[n.name]}|10485760|"
                     f"10485760|{n.vcpus}|N|fake-uuid-01|1")
    lines.append("")
    for vm in g.vms:
        tags = f"aa:{vm.anti}" if vm.anti else ""
        lines.append(f"{vm.name}|{vm.memory_mib}|0|{vm.vcpus}|running|Y|{vm.node}||ext|{tags}|1")
    lines += ["", "htools:iextags:aa", ""]
    pol = ("128,1,0,0,1,1|128,1,0,0,1,1;1048576,128,10485760,16,8,12|"
           "diskless,file,sharedfile,plain,blockdev,drbd,rbd,ext|1.0|32.0")
    lines += [f"|{pol}", f"group-01|{pol}"]
    return "\n".join(lines) + "\n"


def read_ganeti_state(text: str) -> Assignment:
    sections = text.split("\n\n")
    out: Assignment = {}
    for line in sections[2].splitlines():
        f = line.split("|")
        if len(f) > 6:
            out[f[0]] = f[6]
    return out


def run_hbal(g: Generated, scenario: str, node: str, tmp: Path,
             timeout: float) -> dict[str, Any]:
    path = tmp / "cluster.data"
    path.write_text(ganeti_text(g))
    save = tmp / f"hbal-{scenario}"
    cmd = ["hbal", "-t", str(path), "-S", str(save), "-C"]
    if scenario != "rebalance":
        cmd += ["-O", node, "--evac-mode"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    dt = time.perf_counter() - t0
    balanced = Path(str(save) + ".balanced")
    if proc.returncode != 0 or not balanced.exists():
        err = (proc.stderr or proc.stdout).strip()[-300:]
        return {"error": f"hbal rc={proc.returncode}: {err}"}
    final = read_ganeti_state(balanced.read_text())
    oos = {node} if scenario != "rebalance" else set()
    return {"time_s": round(dt, 4), **quality(g, final, oos,
                                               {node} if scenario == "fail" else set())}


# ---- driver ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="30x300,100x1000,1000x10000,5000x50000")
    ap.add_argument("--scenarios", default="fail,drain,rebalance")
    ap.add_argument("--engines", default="vmha,crm_simulate,hbal")
    ap.add_argument("--timeout", type=float, default=180.0, help="per peer run (s)")
    ap.add_argument("--crm-max-vms", type=int, default=1000,
                    help="skip crm_simulate above this many VMs (its balanced placement "
                         "strategy grows about cubically: ~2.5 s at 300 VMs, ~21 s at 500)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="results/bench-placement.json")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    engines = args.engines.split(",")
    for size in args.sizes.split(","):
        n_nodes, n_vms = (int(x) for x in size.split("x"))
        g = generate(n_nodes, n_vms, seed=args.seed)
        node = busiest(g)
        base = quality(g, {vm.name: vm.node for vm in g.vms}, set(), set())
        with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm")
                                         else None) as td:
            tmp = Path(td)
            for scenario in args.scenarios.split(","):
                for engine in engines:
                    if engine != "vmha" and shutil.which(engine) is None:
                        res: dict[str, Any] = {"error": f"{engine} not installed"}
                    elif engine == "crm_simulate" and len(g.vms) > args.crm_max_vms:
                        res = {"error": f"skipped above {args.crm_max_vms} VMs (see --timeout "
                                        "result at the largest size run)"}
                    elif engine == "vmha":
                        res = run_vmha(g, scenario, node)
                    elif engine == "crm_simulate":
                        res = run_crm(g, scenario, node, tmp, args.timeout)
                    else:
                        res = run_hbal(g, scenario, node, tmp, args.timeout)
                    row = {"engine": engine, "nodes": n_nodes, "vms": len(g.vms),
                           "scenario": scenario, "node": node if scenario != "rebalance"
                           else None, "before_util_stddev": base["util_stddev"], **res}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    out.write_text(json.dumps(rows, indent=1) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown(rows))
    print(f"wrote {out} and {md}", file=sys.stderr)
    return 0


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| nodes x VMs | scenario | engine | time (s) | migrations | unplaced | "
            "util stddev (before) | util max | violations |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    body = []
    for r in rows:
        if "error" in r:
            body.append(f"| {r['nodes']} x {r['vms']} | {r['scenario']} | {r['engine']} | "
                        f"{r['error']} | | | | | |")
            continue
        t = f"{r['time_s']} (cpu {r['cpu_s']})" if "cpu_s" in r else f"{r['time_s']}"
        body.append(f"| {r['nodes']} x {r['vms']} | {r['scenario']} | {r['engine']} | "
                    f"{t} | {r['migrations']} | {r['unplaced']} | "
                    f"{r['util_stddev']} ({r['before_util_stddev']}) | {r['util_max']} | "
                    f"{r['violations']} |")
    return ("# Placement benchmark\n\nGenerated by `make bench-placement` "
            "(bench/placement.py; method in its docstring).\n\n" + head + "\n".join(body)
            + "\n" + NOTES)


NOTES = """
Notes:

- Same generated cluster for every engine per size (seed 1): node sizes 64/128/256 GiB
  with 32/64/96 vCPUs, five VM sizes scaled to fill about 65 % of memory, 10 % of the VMs
  in hard anti-affinity groups of three.  `fail` and `drain` act on the node with the most
  VMs.  Utilisation = memory used / memory of the node, over the nodes still in service.
- vmha `time` is one `planner.plan` call (the first cycle: for `fail` every displaced VM
  is placed in it; a drain goes in waves of `max_migrations_per_node` = 2, and
  `time_all_cycles_s` in the JSON sums all waves); for `rebalance` it is
  `rebalance.plan_moves` run to convergence with no move budget or migration limit.
  Peer times are process wall times (parsing included).
- `fail` and `drain` do not rebalance, so their stddev stays near the starting value;
  `migrations` counts live migrations (the failed node's VMs are boots, not migrations).
- crm_simulate uses placement-strategy=balanced; its scheduler time grows about
  cubically with the number of resources (about 0.6 s at 150, 3-4 s at 300, 21 s at 500
  primitives; over 180 s at 1,000, and with resource-stickiness 0 (full rebalance) over
  180 s already at 300).  Sizes above --crm-max-vms are skipped.
- hbal balances a combination of metrics (memory, vCPUs, disk, N+1 ...), not memory
  utilisation alone, so its memory stddev can rise while its own score falls.
"""


if __name__ == "__main__":
    sys.exit(main())
