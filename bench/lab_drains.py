"""Drains never call a fence device, on the lab with real QEMU guests (issue 12, item 3).

A lab of three nodes (libvirtd + QEMU/TCG guests each, one etcd, two orchestrators)
runs as ``vmha lab up`` starts it (etcd auth on, keyspace 2), with ``fence_policy =
external`` and a fence agent that logs every call before it runs the built-in fencer.
Then, round after round over the nodes:

* a drain by lease revoke (root's ``etcdctl lease revoke`` of the node's registration;
  the operator's role may not revoke leases): the agent
  registers again, cordoned, and live-migrates its guests away; the node is uncordoned;
* an agent restart: SIGTERM (drain by live migration, leaving marker, revoke, exit 0),
  started again, uncordoned.

After every step the fence agent's log must be empty, and after the last one too, past
the revoke grace and the fence window; no guest may run twice (I1 on libvirt's own
view, sampled every 20 ms).  The control: the agent of the busiest node is SIGKILLed
(its guard destroys the guests), and the same log must then show the call for it.

``make bench-lab-drains`` runs 20 + 20 (the issue's count) and writes
results/lab-drains-external.json; tests/lab/test_lab_drains.py runs one round of each.

Usage: python -m bench.lab_drains --rounds 20 --out results/lab-drains-external.json
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fencing.policy import fence_window
from lab import tiny_guest_xml
from lab.cluster import LabCluster
from lab.invariants import DoubleRunChecker, LabTruth
from lab.labview import reader, reg_key, revoke_registration, wait_registered
from lab.labview import vmha as lab_vmha
from lab.localcluster import wait_until
from schemas import ClusterConfig, NodeRegistration
from schemas.keys_v2 import KeyspaceV2
from schemas.models import FenceDevice
from store.etcd import EtcdStore

KS = KeyspaceV2()
VMS = tuple(f"vm{i}" for i in range(4))


def logging_fence_agent(workdir: Path) -> tuple[list[str], Path]:
    """A fence agent that appends its parameters to a log, then runs the built-in one."""
    log = workdir / "fence-calls.log"
    script = workdir / "fence_logged.sh"
    script.write_text("#!/bin/sh\nin=$(cat)\n"
                      f"printf '%s\\n--\\n' \"$in\" >> '{log}'\n"
                      f"printf '%s\\n' \"$in\" | exec '{sys.executable}' -m fencing.fence_vmha\n")
    script.chmod(0o755)
    return ["/bin/sh", str(script)], log


def fence_calls(log: Path) -> list[str]:
    """The `off` calls in the log, each as the uri it named (the node's libvirt URI)."""
    if not log.exists():
        return []
    out = []
    for block in log.read_text().split("--\n"):
        params = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
        if params.get("action") == "off":
            out.append(params.get("uri", ""))
    return out


def external_config(workdir: Path) -> tuple[ClusterConfig, Path]:
    """The shipped defaults, but `fence_policy = external` with the logging agent."""
    agent, log = logging_fence_agent(workdir)
    return ClusterConfig().model_copy(update={
        "fence_policy": "external",
        "fence_devices": {"*": FenceDevice(agent=agent, params={"uri": "{uri}"},
                                           timeout_s=20)}}), log


def vmha(lc: LabCluster, *args: str) -> None:
    """`vmha ARGS` as the operator."""
    r = lab_vmha(lc, *args)
    if r.returncode != 0:
        raise RuntimeError(f"vmha {' '.join(args)}: {r.stderr}")


def registration(lc: LabCluster, store: EtcdStore,
                 node: str) -> tuple[int, NodeRegistration] | None:
    kv = store.get(reg_key(lc, node))
    return (kv.create_revision, NodeRegistration.from_json(kv.value)) if kv else None


def all_running(lc: LabCluster) -> bool:
    truth = lc.ground_truth()
    return all(len(truth.get(vm, [])) == 1 for vm in VMS)


def drained(lc: LabCluster, node: str) -> bool:
    return not lc.node_domains(node) and all_running(lc)


def uncordon(lc: LabCluster, store: EtcdStore, node: str) -> None:
    store.delete(KS.cordon(node))  # the operator's `vmha node uncordon`
    wait_until(lambda: (r := registration(lc, store, node)) is not None and not r[1].cordoned,
               30, 0.05, f"{node} uncordoned")


def revoke_drain(lc: LabCluster, store: EtcdStore, node: str) -> None:
    before = registration(lc, store, node)
    assert before is not None, f"{node} not registered"
    revoke_registration(lc, node)
    wait_until(lambda: (r := registration(lc, store, node)) is not None and r[0] != before[0]
               and r[1].cordoned, 30, 0.05, f"{node} registered again, cordoned")
    wait_until(lambda: drained(lc, node), 60, 0.05, f"{node} drained")
    uncordon(lc, store, node)


def restart(lc: LabCluster, store: EtcdStore, node: str) -> None:
    agent = lc.agents[node]
    agent.signal(signal.SIGTERM)
    assert agent.proc is not None
    rc = agent.proc.wait(90)
    if rc != 0:
        raise AssertionError(f"{node}'s agent exited {rc} after SIGTERM:\n"
                             f"{agent.log_text()[-3000:]}")
    if not drained(lc, node):
        raise AssertionError(f"{node} exited with guests left: {lc.ground_truth()}")
    lc.start_agent(node)
    wait_until(lambda: registration(lc, store, node) is not None, 30, 0.05,
               f"{node} registered")
    if store.get(KS.leaving(node)) is not None:
        raise AssertionError(f"{node}'s leaving marker outlived its new registration")
    uncordon(lc, store, node)


@contextmanager
def lab_with_guests(workdir: Path, cfg: ClusterConfig) -> Iterator[tuple[LabCluster,
                                                                       EtcdStore]]:
    lc = LabCluster(workdir / "lab", workdir / "logs", auth=True)
    try:
        lc.start(cfg.to_json())
        store = reader(lc)
        try:
            wait_registered(lc, store)  # the guests spread over every node
            for vm in VMS:
                xml = workdir / f"{vm}.xml"
                xml.write_text(tiny_guest_xml(vm))
                vmha(lc, "vm", "add", vm, "--memory-mib", "32", "--xml", str(xml))
            wait_until(lambda: all_running(lc), 60, 0.1, "all guests running")
            yield lc, store
        finally:
            store.close()
    finally:
        lc.stop()


def run(rounds: int, workdir: Path) -> dict[str, Any]:
    """`rounds` revoke drains and `rounds` restarts, then the control; the counts."""
    cfg, log = external_config(workdir)
    out: dict[str, Any] = {"rounds": rounds, "guests": len(VMS), "fence_policy": "external",
                           "revoke_drains": 0, "restarts": 0, "calls_during_drains": [],
                           "fence_records": [], "double_runs": [], "step_s": [],
                           "guests_moved": []}
    with lab_with_guests(workdir, cfg) as (lc, store):
        nodes = sorted(lc.nodes)
        checker = DoubleRunChecker(LabTruth(lc), interval=0.02)
        started = time.monotonic()
        with checker.running():
            for kind, step in (("revoke_drains", revoke_drain), ("restarts", restart)):
                for i in range(rounds):
                    node = nodes[i % len(nodes)]
                    on_node = sum(node in ns for ns in lc.ground_truth().values())
                    t0 = time.monotonic()
                    step(lc, store, node)
                    out["step_s"].append(round(time.monotonic() - t0, 2))
                    out["guests_moved"].append(on_node)
                    out[kind] += 1
                    out["calls_during_drains"] = fence_calls(log)
                    if out["calls_during_drains"]:
                        raise AssertionError(f"{kind} {i + 1}: fence calls "
                                             f"{out['calls_during_drains']}")
            # Past every grace and fence window the last of them started.
            time.sleep(cfg.revoke_grace_s + fence_window(cfg) + 1.0)
            out["calls_during_drains"] = fence_calls(log)
            out["fence_records"] = [kv.key for kv in store.get_prefix(KS.root + "fence/")]
            out["drains_s"] = round(time.monotonic() - started, 1)
            # The control: a node really lost gets its call through the same log.
            truth = lc.ground_truth()
            victim = max(nodes, key=lambda n: sum(n in ns for ns in truth.values()))
            lc.agents[victim].kill()
            wait_until(lambda: any(f"/{victim}/" in uri for uri in fence_calls(log)), 90, 0.1,
                       f"a fence call for {victim}")
            wait_until(lambda: all_running(lc), 90, 0.1, "its guests running elsewhere")
            out["control"] = {"victim": victim, "calls": fence_calls(log)}
        out["double_runs"] = [str(v) for v in checker.violations]
        out["i1_samples"] = checker.samples
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="drains and restarts, each")
    ap.add_argument("--out", type=Path, default=Path("results/lab-drains-external.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vmha-lab-drains-") as tmp:
        res = run(args.rounds, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    ok = not res["calls_during_drains"] and not res["fence_records"] and not res["double_runs"]
    print(json.dumps({k: v for k, v in res.items() if k not in ("step_s", "guests_moved")},
                     indent=2))
    print(f"guests live-migrated per step: {res['guests_moved']} "
          f"(total {sum(res['guests_moved'])})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
