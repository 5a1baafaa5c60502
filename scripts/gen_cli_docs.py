"""Regenerate docs/cli/*.md: each page shows a command's --help and a real run of it
against a live local cluster (real etcd, fake hypervisor).  `make docs`."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hypervisor.fake import fake_ground_truth
from lab.configs import FAST_CONFIG
from lab.localcluster import FakeCluster, running_fake_cluster, wait_until
from schemas import ClusterConfig, Keyspace
from store.etcd import EtcdStore

OUT = Path(__file__).resolve().parents[1] / "docs" / "cli"
KS = Keyspace()
#: The tests' short lease timings, so that the run takes seconds; but the production stop
#: timeout, which `vmha config show` prints on its page.
DOCS_CONFIG = FAST_CONFIG.model_copy(update={"stop_timeout_s": ClusterConfig().stop_timeout_s})

# (page name, summary, [example command lines]); run in this order.
PAGES: list[tuple[str, str, list[list[str]]]] = [
    ("vm-add", "Declare a VM (its spec).", [["vm", "add", "web1", "--memory-mib", "512"],
                                           ["vm", "add", "Bad_Name", "--memory-mib", "512"]]),
    ("vm-list", "Desired state, placement and reported state of every VM.", [["vm", "list"]]),
    ("vm-check", "Which VMs the domain XML policy refuses (docs/domain-policy.md).",
     [["vm", "check"]]),
    ("status", "One screen: leader and epoch, nodes, VMs, invalid keys (in JSON also the "
     "statuses superseded on keyspace 2).", [["status"]]),
    ("node-list", "Nodes with state, lease, TTL left and free capacity.", [["node", "list"]]),
    ("node-show", "One node in detail.", [["node", "show", "n1"]]),
    ("vm-show", "One VM: spec, placement and why, status, recent events.",
     [["vm", "show", "web1"]]),
    ("node-drain", "Move a node's VMs away: keyspace 1 revokes its lease (as `etcdctl lease "
     "revoke`), keyspace 2 cordons it (`--revoke`: the lease revoke, root's); --wait shows "
     "progress.",
     [["node", "drain", "n1", "--wait", "--timeout", "30"]]),
    ("node-uncordon", "Make a cordoned node schedulable again.", [["node", "uncordon", "n1"]]),
    ("node-cordon", "Mark a node unschedulable; its VMs live-migrate away.",
     [["node", "cordon", "n3", "--reason", "firmware update"], ["node", "uncordon", "n3"]]),
    ("vm-migrate", "Ask the leader to live-migrate a running VM to a node.",
     [["vm", "migrate", "web1", "--to", "n3", "--wait"]]),
    ("vm-stop", "Set the desired state to stopped.", [["vm", "stop", "web2"]]),
    ("vm-edit", "Change memory, vCPUs or the domain XML (effective at next boot).",
     [["vm", "edit", "web2", "--memory-mib", "768"]]),
    ("vm-start", "Set the desired state to running.", [["vm", "start", "web2"]]),
    ("vm-remove", "Delete a VM's spec; its node destroys and undefines it (keyspace 2: only "
     "the version read).",
     [["vm", "remove", "web3"]]),
    ("history", "The event history, filtered by VM, node, kind or time (keyspace 2: the "
     "agents' and the leader's, merged).",
     [["history", "--limit", "12"], ["-o", "json", "history", "--kind", "migration",
                                      "--limit", "1"]]),
    ("availability", "Per-VM outages, MTTR and availability (MTBF / (MTBF + MTTR)).",
     [["availability", "--since=-1h"]]),
    ("config-show", "The cluster config stored in etcd.", [["config", "show"]]),
    ("config-validate", "Check the timing rules of a config file or of the stored config.",
     [["config", "validate"]]),
    ("explain", "Why a VM runs where it runs: the stored decision and every node's verdict.",
     [["explain", "web1"]]),
    ("snapshot", "Export the cluster as JSON (docs/snapshot-format.md).", [["snapshot"]]),
    ("simulate", "Run the planner offline on a snapshot: fail or drain nodes, rebalance.",
     [["simulate", "--snapshot", "@SNAPSHOT@", "--fail", "n2"]]),
    ("graph", "The migration graph and the node ranking (PageRank).", [["graph"]]),
    ("fence-list", "Every fence record.", [["fence", "list"]]),
    ("node-confirm-off", "Record by hand that a lost node is off (manual fence; keyspace 2: "
     "a request the leader records, waited for).",
     [["node", "confirm-off", "n2"]]),
    ("keyspace-show", "Which keyspace the cluster runs, what each holds, the migration's "
     "steps left.", [["keyspace", "show"]]),
    ("keyspace-migrate", "Migrate keyspace 1 to keyspace 2: check, freeze, copy, switch, "
     "clean, done; resumable, with a dry run and a rollback.",
     [["keyspace", "migrate", "--dry-run"]]),
    ("auth-setup", "Create vmha's etcd roles and users, then enable auth (keyspace 2 only; "
     "this cluster is on keyspace 1, so it refuses).",
     [["auth", "setup", "--nodes", "n1,n2,n3", "--dry-run"]]),
    ("auth-node", "One node's etcd role and users: add, rotate after a compromise, remove.",
     [["auth", "node", "add", "n4"], ["auth", "node", "rotate", "n4"],
      ["auth", "node", "rotate", "n4", "--finish"], ["auth", "node", "remove", "n4"]]),
    ("auth-check", "vmha's etcd roles and users against the design; exit 1 on a difference.",
     [["auth", "check"]]),
    ("web", "Read-only live page of the cluster and the migration graph (loopback).", []),
    ("lab", "Local lab of namespaced libvirt nodes with real QEMU guests (root).", []),
    ("lab-up", "Start the lab in the background: etcd auth on, keyspace 2; --no-auth: "
     "keyspace 1 on plain etcd (the default until auth; operator-guide.md, \"On the "
     "lab\", has the migration).", []),
    ("bench", "Outage measurements on the lab (`vmha bench outage`).", []),
    ("completion", "Shell completion script.", [["completion", "bash"]]),
]
COMMAND_WORDS = {"web": ["web"], "lab": ["lab"], "lab-up": ["lab", "up"],
                 "bench": ["bench", "outage"]}


def main() -> int:
    """`--only PAGE,PAGE`: run those pages alone (the index still lists every page)."""
    only = None
    if len(sys.argv) == 3 and sys.argv[1] == "--only":
        only = set(sys.argv[2].split(","))
        unknown = only - {p for p, _, _ in PAGES}
        if unknown:
            print(f"unknown page(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
    OUT.mkdir(parents=True, exist_ok=True)
    wd = Path(tempfile.mkdtemp(prefix="vmha-docs-"))
    try:
        with running_fake_cluster(DOCS_CONFIG.to_json(), wd, ("orch-a", "orch-b")) as (fc, store):
            return write_pages(fc, store, wd, only)
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def write_pages(fc: FakeCluster, store: EtcdStore, wd: Path, only: set[str] | None) -> int:
    base = [sys.executable, "-m", "vmha", "--etcd", fc.etcd.endpoints]
    for i in (2, 3, 4):
        subprocess.run([*base, "vm", "add", f"web{i}", "--memory-mib", "512"], check=True,
                       capture_output=True)
    index = []
    for page, summary, runs in PAGES:
        words = COMMAND_WORDS.get(page) or _cmd_words(runs[0])
        index.append(f"- [vmha {' '.join(words)}]({page}.md): {summary}")
        if only is not None and page not in only:
            continue
        helptext = subprocess.run([*base, *words, "--help"],
                                  capture_output=True, text=True).stdout
        body = [f"# vmha {' '.join(words)}", "", summary, "", "```text",
                helptext.rstrip(), "```", ""]
        for argv in runs:
            if "@SNAPSHOT@" in argv:
                snapfile = wd / "snapshot.json"
                snapfile.write_text(subprocess.run([*base, "snapshot"], capture_output=True,
                                                   text=True, check=True).stdout)
                argv = [str(snapfile) if a == "@SNAPSHOT@" else a for a in argv]
            if page == "node-confirm-off":
                fc.agents["n2"].kill()
                for gpid in _guard_pids(wd):
                    _kill(gpid)
                wait_until(lambda: store.get(KS.node("n2")) is None, 30)
            if page in ("vm-show", "node-show", "status", "vm-list", "node-list"):
                wait_until(lambda: len(fake_ground_truth(fc.fake_root)) >= 4, 20)
            r = subprocess.run([*base, *argv], capture_output=True, text=True)
            shown = r.stdout if page != "completion" else "\n".join(
                r.stdout.splitlines()[:8]) + "\n..."
            shown = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:2379", shown)
            lines = shown.splitlines()
            if page == "snapshot" and len(lines) > 40:
                shown = "\n".join(lines[:40]) + f"\n... ({len(lines) - 40} more lines)"
            shown_argv = ["snapshot.json" if a.endswith("snapshot.json") else a
                          for a in argv]
            body += ["```console", f"$ vmha {' '.join(shown_argv)}", shown.rstrip()]
            if r.stderr.strip():
                body.append(r.stderr.rstrip())
            body += [f"# exit code {r.returncode}", "```", ""]
        (OUT / f"{page}.md").write_text("\n".join(body))
    (OUT / "README.md").write_text(
        "# vmha commands\n\nEvery page shows the command's help and a real run against a "
        "local cluster (real etcd, fake hypervisor), regenerated by `make docs`.\n"
        "All commands take `-o json`. Exit codes: 0 ok, 1 failed, 2 bad input, "
        "3 etcd unreachable.\n"
        "Each command works on the keyspace `/vmha/version` names (absent: keyspace 1, "
        "docs/keyspace.md; `keyspace 2, done`: keyspace 2, docs/keyspace-v2.md, with the "
        "same output; a migration under way: exit 1, nothing written); the runs below are "
        "on keyspace 1.\n\n" + "\n".join(index) + "\n")
    print(json.dumps({"pages": len(index), "dir": str(OUT)}))
    return 0


def _guard_pids(wd: Path) -> list[int]:
    """The fake hosts' guard processes (the agent's guard is the fake host)."""
    out = []
    for f in wd.glob("hv/*/host.pid"):
        try:
            out.append(int(f.read_text()))
        except ValueError:
            continue
    return out


def _kill(pid: int) -> None:
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _cmd_words(argv: list[str]) -> list[str]:
    out = []
    skip = False
    for w in argv:
        if skip:
            skip = False
            continue
        if w == "-o":
            skip = True
            continue
        if w.startswith("-"):
            break
        out.append(w)
    # the command path is the leading words that are sub-commands (at most two)
    return out[:2] if out and out[0] in ("vm", "node", "config", "auth", "keyspace") else out[:1]


if __name__ == "__main__":
    sys.exit(main())
