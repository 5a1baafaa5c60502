"""Fuzz the keyspace of a running cluster with hostile values (issue 11, `make fuzz`).

A 3-node cluster (one etcd member, agents on the fake hypervisor, two orchestrators,
`--vms` running VMs) runs while hypothesis draws writes to every key pattern of
`schemas.keys` (config, leader, nodes/N, cordon/N, fence/N, alive/N, vms/V/{spec,
placement, status, move}, history): deep nesting, values over the size limit (up to 2 MiB; etcd is
started with a larger request limit so they reach the daemons), bytes that are not
UTF-8, wrong types, unknown schema versions, names with slashes, newlines and unicode.

Two classes of writes, and what "0 VMs stopped or moved" means for each:

* **foreign** (most writes): a hostile value at a key of a name no daemon owns (every
  pattern; config and leader, which have no name, get a suffix: `/vmha/config<x>`).
  Nothing real is replaced, so nothing may change: every VM keeps running on its node
  with its boot time unchanged, and `vmha status` lists every such key.  Keys stay a
  few seconds and are deleted, so the snapshot stays bounded.
* **overwrite-then-restore** (one at a time): a hostile value replaces a real key
  (the config, the leader key, a node's registration, cordon, fence or alive key, a live
  VM's spec, placement, status or move key) for 0.2-3 s, then the saved value is put
  back (with its lease while the lease lives; the leader key, whose owner stepped
  down, is deleted: a new election follows).  Both writes are compare-and-swap, so a
  daemon's own newer write is never undone.  This replaces real state, and the rule
  is: a VM or node with a key that does not parse is left as it is -- a VM whose
  spec, placement or status is garbage keeps running where it is, a node whose
  registration is garbage is not fenced, a garbage leader key leaves the cluster
  without a leader (no decisions, no moves) until it is fixed.  So the criterion is
  the same: no VM stops, moves or restarts, and no daemon exits.

Checked all along: every daemon process alive (an exit is counted, never restarted);
every VM on its node with its original boot time (fake hypervisor ground truth, read
without vmha code); every few seconds `vmha -o json status` must exit 0 and list every
hostile key present under the prefix (history records are outside the prefix: `vmha
-o json history` must exit 0 instead).  The daemons' logs are counted for
`invalid_key_ignored` and `cycle_failed`.  Output: results/fuzz.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench.fuzz_values import (
    NAMED,
    NODE_PATTERNS,
    PATTERNS,
    hostile_names,
    hostile_values,
    key_for,
    live_key,
)
from cli.common import default_domain_xml
from hypervisor.fake import fake_ground_truth
from lab.configs import FAST_CONFIG
from lab.localcluster import FakeCluster, running_fake_cluster, wait_until
from schemas.keys import Keyspace, decode_key
from schemas.models import VmSpec
from store.etcd import EtcdStore

MAX_BIG = 2 * 1024 * 1024
_TWO_MIB = b'{"schema": 1, "x": "' + b"x" * MAX_BIG + b'"}'
FOREIGN_TTL_S = 4.0  # a foreign key is deleted this long after its write
STATUS_EVERY_S = 4.0
COMPACT_EVERY_S = 30.0


@dataclass
class Fuzz:
    fc: FakeCluster
    store: EtcdStore
    deadline: float
    rng: random.Random
    ks: Keyspace = field(default_factory=Keyspace)
    baseline: dict[str, tuple[str, float]] = field(default_factory=dict)
    foreign: dict[bytes, float] = field(default_factory=dict)  # key -> written at
    writes: Counter[str] = field(default_factory=Counter)
    live_writes: Counter[str] = field(default_factory=Counter)
    shapes: Counter[str] = field(default_factory=Counter)
    names: Counter[str] = field(default_factory=Counter)
    sizes: Counter[str] = field(default_factory=Counter)
    exits: dict[str, int | None] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)
    moved: set[str] = field(default_factory=set)
    status_checks: int = 0
    status_failures: list[str] = field(default_factory=list)
    listed: int = 0
    missing: list[str] = field(default_factory=list)
    restores_skipped: int = 0
    last_status: float = 0.0
    last_compact: float = 0.0

    # ---- invariants ------------------------------------------------------------------

    def truth(self) -> dict[str, tuple[str, float]]:
        out = {}
        root = self.fc.fake_root
        for vm, nodes in fake_ground_truth(root).items():
            try:
                rec = json.loads((root / nodes[0] / "domains" / f"{vm}.json").read_text())
                out[vm] = (nodes[0], float(rec.get("booted_at", 0.0)))
            except (OSError, ValueError):
                out[vm] = (nodes[0], -1.0)
        return out

    def check(self) -> None:
        for d in [*self.fc.agents.values(), *self.fc.orchestrators.values()]:
            if not d.alive() and d.name not in self.exits:
                self.exits[d.name] = d.proc.returncode if d.proc else None
        now = self.truth()
        for vm, (node, booted) in self.baseline.items():
            if vm not in now:
                self.stopped.add(vm)
            elif now[vm][0] != node or (now[vm][1] != booted and now[vm][1] >= 0):
                self.moved.add(vm)

    def check_status(self, extra: set[str]) -> None:
        self.status_checks += 1
        expected = {decode_key(k) for k in self.foreign
                    if decode_key(k).startswith(self.ks.root)} | extra
        r = _vmha(self.fc, "status")
        if r.returncode != 0:
            self.status_failures.append(f"status exit {r.returncode}: {r.stderr[-300:]}")
            return
        shown = {i["key"] for i in json.loads(r.stdout)["invalid"]}
        self.listed += len(expected & shown)
        self.missing.extend(sorted(expected - shown)[:5])
        h = _vmha(self.fc, "history")
        if h.returncode != 0:
            self.status_failures.append(f"history exit {h.returncode}: {h.stderr[-300:]}")

    # ---- writes ----------------------------------------------------------------------

    def put_foreign(self, pattern: str, name: bytes, shape: str, value: bytes) -> None:
        key = key_for(self.ks, pattern, name)
        if pattern in ("config", "leader") and not name:
            key += b"-"  # never the real singleton key (that is the other class)
        self.store.client.put(key, value)
        self.foreign[key] = time.monotonic()
        self.writes[pattern] += 1
        self.shapes[shape] += 1
        self.names[name_kind(name)] += 1
        self.sizes[size_kind(value)] += 1

    def overwrite_live(self, pattern: str, shape: str, value: bytes, hold: float) -> None:
        key = live_key(self.ks, pattern, self.rng.choice(
            sorted(self.fc.agents) if pattern in NODE_PATTERNS
            else sorted(self.baseline) or ["vm0"]))
        c, t = self.store.client, self.store.client.transactions
        before = self.store.get(key)
        cmp = t.mod(key) == before.mod_revision if before else t.create(key) == 0
        ok, _ = c.transaction(compare=[cmp], success=[t.put(key, value)], failure=[])
        if not ok:
            self.restores_skipped += 1
            return
        mine = self.store.get(key)
        self.writes[pattern] += 1
        self.live_writes[pattern] += 1
        self.shapes[shape] += 1
        self.sizes[size_kind(value)] += 1
        end = time.monotonic() + hold
        while time.monotonic() < end:
            self.check()
            if hold > 1.0 and time.monotonic() - self.last_status > STATUS_EVERY_S:
                self.last_status = time.monotonic()
                self.check_status({key})
            time.sleep(0.1)
        self.restore(key, before, mine.mod_revision if mine else 0)

    def restore(self, key: str, before: Any, hostile_rev: int) -> None:
        c, t = self.store.client, self.store.client.transactions
        still = t.mod(key) == hostile_rev
        if before is None or key == self.ks.leader:
            c.transaction(compare=[still], success=[t.delete(key)], failure=[])
            return
        try:
            ok, _ = c.transaction(compare=[still], success=[
                t.put(key, before.value, lease=before.lease or None)], failure=[])
        except Exception:  # noqa: BLE001 - the lease ended meanwhile: remove the garbage
            ok, _ = c.transaction(compare=[still], success=[t.delete(key)], failure=[])
        if not ok:
            self.restores_skipped += 1

    def housekeeping(self) -> None:
        now = time.monotonic()
        for key, at in list(self.foreign.items()):
            if now - at > FOREIGN_TTL_S:
                self.store.client.delete(key)
                del self.foreign[key]
        if now - self.last_compact > COMPACT_EVERY_S:
            self.last_compact = now
            rev = self.store.revision()
            self.store.client.compact(rev - 1)  # old revisions hold the 2 MiB values
            self.store.client.defragment()
        if now - self.last_status > STATUS_EVERY_S:
            self.last_status = now
            self.check_status(set())
        self.check()


def name_kind(name: bytes) -> str:
    """What is hostile about a name (for the counts of results/fuzz.json)."""
    try:
        text = name.decode()
    except UnicodeDecodeError:
        return "not_utf8"
    if "/" in text:
        return "slash"
    if any(not c.isprintable() for c in text):
        return "newline_or_control"
    if not text.isascii():
        return "unicode"
    return "valid_or_other"


def size_kind(value: bytes) -> str:
    if len(value) >= 2 * 1024 * 1024:
        return "2MiB"
    return "over_256KiB" if len(value) > 256 * 1024 else "small"


def _vmha(fc: FakeCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmha", *fc.common(), "-o", "json", *args],
                          capture_output=True, text=True, timeout=60)


def _writes() -> st.SearchStrategy[tuple[str, bool, bytes, tuple[str, bytes], float]]:
    pattern = st.sampled_from(PATTERNS)
    return pattern.flatmap(lambda p: st.tuples(
        st.just(p),
        st.booleans().map(lambda b: b and p != "history") if p in (*NAMED, "config", "leader")
        else st.just(False),
        hostile_names(),
        hostile_values(p, MAX_BIG),
        st.floats(0.2, 3.0)))


def fuzz(z: Fuzz) -> None:
    """Hypothesis runs of 25 batches each until the time is spent (a run that raised
    would print its example: up to 2 MiB)."""

    @settings(max_examples=25, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(st.lists(_writes(), min_size=1, max_size=6))
    def batch(writes: list[tuple[str, bool, bytes, tuple[str, bytes], float]]) -> None:
        if time.monotonic() > z.deadline:
            return
        for pattern, live, name, (shape, value), hold in writes:
            if shape == "oversized":  # one in ten: 2 MiB, the others just over the limit
                value = (_TWO_MIB if z.rng.random() < 0.1
                         else value[:min(len(value) - 2, 300 * 1024)] + b'"}')
            # One live overwrite in five; the rest go to keys of other names.
            if live and z.rng.random() < 0.2 and pattern != "history":
                z.overwrite_live(pattern, shape, value, hold)
            else:
                z.put_foreign(pattern, name, shape, value)
        z.housekeeping()
        time.sleep(0.05)

    while time.monotonic() < z.deadline:
        batch()


def _log_counts(fc: FakeCluster, event: str) -> dict[str, int]:
    out = {}
    for d in [*fc.agents.values(), *fc.orchestrators.values()]:
        n = 0
        for line in d.log_text().splitlines():
            if f'"event": "{event}"' in line or f'"event":"{event}"' in line:
                n += 1
        out[d.name] = n
    return out


@contextlib.contextmanager
def _etcd_request_limit(limit: int) -> Iterator[None]:
    """etcd's request limit for the etcd started inside (read from its environment at
    start); the caller's environment is left as it was (the short form runs in tests)."""
    old = os.environ.get("ETCD_MAX_REQUEST_BYTES")
    os.environ["ETCD_MAX_REQUEST_BYTES"] = str(limit)
    try:
        yield
    finally:
        if old is None:
            del os.environ["ETCD_MAX_REQUEST_BYTES"]
        else:
            os.environ["ETCD_MAX_REQUEST_BYTES"] = old


def run(minutes: float, vms: int = 6, seed: int = 1,
        workdir: Path | None = None) -> dict[str, Any]:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="vmha-fuzz-"))
    # Let etcd take the 2 MiB values (its default request limit is 1.5 MiB).
    with _etcd_request_limit(8 * 1024 * 1024), \
            running_fake_cluster(FAST_CONFIG.to_json(), workdir) as (fc, store):
        for i in range(vms):
            spec = VmSpec(name=f"vm{i}", domain_xml=default_domain_xml(f"vm{i}", 256, 1),
                          memory_mib=256, vcpus=1)
            store.put(store.keyspace.vm_spec(spec.name), spec.to_json())
        wait_until(lambda: len(fake_ground_truth(fc.fake_root)) == vms, 60,
                   what="all VMs running")
        time.sleep(2)  # let statuses settle
        started = time.monotonic()
        z = Fuzz(fc, store, started + minutes * 60, random.Random(seed))
        z.baseline = z.truth()
        fuzz(z)
        for key in list(z.foreign):
            store.client.delete(key)
        z.foreign.clear()
        time.sleep(2)
        z.check()
        z.check_status(set())
        elapsed = time.monotonic() - started
        return {
            "minutes": round(elapsed / 60, 2), "vms": vms, "nodes": len(fc.agents),
            "orchestrators": len(fc.orchestrators), "seed": seed,
            "writes": sum(z.writes.values()), "writes_per_pattern": dict(sorted(z.writes.items())),
            "live_overwrites_per_pattern": dict(sorted(z.live_writes.items())),
            "writes_per_shape": dict(sorted(z.shapes.items())),
            "foreign_writes_per_name_kind": dict(sorted(z.names.items())),
            "writes_per_size": dict(sorted(z.sizes.items())),
            "live_writes_skipped_by_cas": z.restores_skipped,
            "daemon_exits": len(z.exits), "daemons_exited": z.exits,
            "vms_stopped": len(z.stopped), "vms_moved": len(z.moved),
            "stopped": sorted(z.stopped), "moved": sorted(z.moved),
            "status_checks": z.status_checks, "status_failures": z.status_failures,
            "bad_keys_listed": z.listed, "bad_keys_missing": len(z.missing),
            "missing_examples": [repr(k) for k in z.missing[:20]],
            "invalid_key_events": _log_counts(fc, "invalid_key_ignored"),
            "cycle_failed_events": _log_counts(fc, "cycle_failed"),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float,
                    default=float(os.environ.get("FUZZ_MINUTES", "10")))
    ap.add_argument("--vms", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="results/fuzz.json")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="vmha-fuzz-"))
    print(f"daemon logs in {workdir}", file=sys.stderr)
    res = run(args.minutes, args.vms, args.seed, workdir)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: res[k] for k in ("minutes", "writes", "daemon_exits", "vms_stopped",
                                          "vms_moved", "bad_keys_listed", "bad_keys_missing",
                                          "status_checks")}))
    ok = not (res["daemon_exits"] or res["vms_stopped"] or res["vms_moved"]
              or res["bad_keys_missing"] or res["status_failures"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
