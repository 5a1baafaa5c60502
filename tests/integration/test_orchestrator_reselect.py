"""`vmha orchestrator` follows the keyspace marker in its own process.

A value in etcd must never stop a daemon.  When `/vmha/version` appears under a running
keyspace-1 leader (a migration starts), the leader resigns and writes nothing more; the
process then waits, unelected, and runs keyspace 2's leader once the marker says
`done`.  Before, the process exited (code 2) and depended on a service manager to start
it again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import migration as mig
from schemas.keys import Keyspace
from schemas.keys_v2 import KeyspaceV2
from schemas.models import CONFIG_SCHEMA_KEYSPACE_2
from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster, wait_until

pytestmark = pytest.mark.integration

KS1, KS2 = Keyspace(), KeyspaceV2()


@pytest.fixture
def store(etcd: EtcdCluster) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd.endpoints)
    s.put(KS1.config, TEST_CONFIG.to_json())
    try:
        yield s
    finally:
        s.close()


def _leader(store: EtcdStore, key: str) -> dict[str, object] | None:
    kv = store.get(key)
    return None if kv is None else dict(json.loads(kv.value))


def _start_o1(etcd: EtcdCluster, log: Path) -> subprocess.Popen[bytes]:
    """`vmha orchestrator` named o1, its JSON log (and stderr) into `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "vmha", "--etcd", etcd.endpoints,
                                 "orchestrator", "--name", "o1", "--log-format", "json"],
                                stdout=out, stderr=subprocess.STDOUT)


def test_the_process_resigns_at_the_marker_and_leads_keyspace_2_when_done(
        etcd: EtcdCluster, store: EtcdStore, tmp_path: Path) -> None:
    log = tmp_path / "orch.log"
    proc = _start_o1(etcd, log)
    try:
        first = wait_until(lambda: _leader(store, KS1.leader), 30, 0.1,
                           "o1 leads keyspace 1")
        assert first is not None and first["id"] == "o1", first
        store.put(KS2.version, mig.marker_json("migrating", "t", "0.2.0", 1.0))
        wait_until(lambda: store.get(KS1.leader) is None, 30, 0.1, "o1 resigned")
        time.sleep(1.0)  # it would have exited by now
        assert proc.poll() is None, log.read_text()[-2000:]
        assert store.get(KS1.leader) is None  # and is not elected while migrating

        store.put(KS1.config,
                  TEST_CONFIG.model_copy(update={"schema_": CONFIG_SCHEMA_KEYSPACE_2}).to_json())
        store.put(KS2.version, mig.marker_json("done", "t", "0.2.0", 1.0))
        second = wait_until(lambda: _leader(store, KS2.leader), 30, 0.1,
                            "o1 leads keyspace 2")
        assert second is not None and second["id"] == "o1" and second["pid"] == proc.pid, second
        assert proc.poll() is None
        assert '"keyspace_reselect"' in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log.read_text()[-2000:]


def test_a_reselect_under_a_bad_config_keeps_the_process_and_its_last_valid_config(
        etcd: EtcdCluster, store: EtcdStore, tmp_path: Path) -> None:
    """The marker fixed while `/vmha/config` is still broken (an operator repairing both,
    in that order) is a *running* orchestrator's config turning invalid: it keeps the
    last valid config and leads, rather than exit as a fresh start does.  The resigned
    loop's lease keeper ends with it: no renewal of the revoked lease on a closed store,
    no self-fence deadline of a term that is over."""
    store.delete(KS1.config)
    store.put(KS2.config, TEST_CONFIG.to_json())
    store.put(KS2.version, mig.marker_json("done", "t", "0.2.0", 1.0))
    good_marker = store.get(KS2.version)
    assert good_marker is not None
    log = tmp_path / "orch.log"
    proc = _start_o1(etcd, log)
    try:
        first = wait_until(lambda: _leader(store, KS2.leader), 30, 0.1, "o1 leads")
        assert first is not None and first["id"] == "o1", first
        store.put(KS2.version, b'{"schema": 1, "keyspace": "two"}')
        wait_until(lambda: '"waiting_for_keyspace"' in log.read_text(), 30, 0.1,
                   "o1 resigned and waits for a marker that parses")
        assert store.get(KS2.leader) is None
        store.put(KS2.config, b"not json")
        store.put(KS2.version, good_marker.value)
        second = wait_until(lambda: _leader(store, KS2.leader), 30, 0.1, "o1 leads again")
        assert second is not None and second["pid"] == proc.pid, second
        # Past the old term's self-fence deadline (its lease TTL from the last renewal).
        time.sleep(TEST_CONFIG.lease_ttl_s + 1.0)
        assert proc.poll() is None, log.read_text()[-3000:]
        events = [json.loads(line) for line in log.read_text().splitlines()
                  if line.startswith("{")]
        names = [e["event"] for e in events]
        assert "config_rejected" in names, names
        assert "self_fence_deadline" not in names, names
        assert not [e for e in events if e["event"] == "keepalive_failed"], names
        assert _leader(store, KS2.leader) == second, "o1 still leads, on its last config"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log.read_text()[-2000:]
