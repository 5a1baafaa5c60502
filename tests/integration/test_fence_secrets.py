"""A fence password given through a credential file (systemd's LoadCredential=) reaches
the fence agent on stdin and appears nowhere else: not in etcd, not in `vmha config
show` or `vmha snapshot` (table or JSON), not in the daemons' logs or the fence record.
A URI with a control character is refused wherever it enters.  The first on keyspace 1
and 2 (tests/integration/keyspaces.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hypervisor.fake import fake_ground_truth
from lab.configs import FAST_CONFIG
from schemas import Keyspace
from tests.conftest import make_fake_cluster, vmha
from tests.harness import EtcdCluster, wait_until
from tests.integration.keyspaces import KEYSPACES, ClusterView

pytestmark = pytest.mark.integration
KS = Keyspace()
SECRET = "Cred-Only_7f3a91"
PLAIN = "plain-in-config-55"
# Logs its stdin, then fences like the built-in fencer (the fake hypervisor's files).
AGENT = """\
import io, sys
text = sys.stdin.read()
with open(sys.argv[1], "a") as f:
    f.write(text + "--\\n")
from fencing import fence_vmha
sys.stdin = io.StringIO(text)
sys.exit(fence_vmha.main())
"""


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_fence_password_from_a_credential_file_reaches_the_agent_and_nowhere_else(
        etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        keyspace: int) -> None:
    script, stdin_log = tmp_path / "fence_logging.py", tmp_path / "fence-stdin.log"
    script.write_text(AGENT)
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "ipmi-password").write_text(SECRET + "\n")
    # What systemd's LoadCredential= gives the orchestrator (the daemons inherit it).
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    fc = make_fake_cluster(etcd, tmp_path, keyspace=keyspace)
    cfg = FAST_CONFIG.model_dump(by_alias=True, mode="json") | {
        "fence_policy": "external", "fence_retry_initial_s": 0.5, "fence_retry_max_s": 1.0,
        "fence_devices": {
            "*": {"agent": [sys.executable, str(script), str(stdin_log)], "timeout_s": 10,
                  "params": {"uri": f"fake://{fc.fake_root}/{{node}}", "username": "admin",
                             "password": {"credential": "ipmi-password"}}},
            # Never used to fence here: a plain secret-looking value is still never shown.
            "n9": {"agent": ["/usr/sbin/fence_ipmilan"],
                   "params": {"ip": "10.0.0.19", "passwd": PLAIN}}}}
    cfg_file = tmp_path / "cluster.json"
    cfg_file.write_text(json.dumps(cfg))
    try:
        r = vmha(etcd, "config", "apply", "--file", str(cfg_file))
        assert r.returncode == 0, r.stderr
        assert "passwd" in r.stderr and "credential" in r.stderr  # the plain one is flagged
        assert PLAIN not in r.stdout + r.stderr
        for n in ("n1", "n2"):
            fc.start_agent(n)
        orch = fc.start_orchestrator("o1")
        assert vmha(etcd, "vm", "add", "m1", "--memory-mib", "64").returncode == 0
        wait_until(lambda: fake_ground_truth(fc.fake_root).get("m1"), 20, what="m1 running")
        victim = fake_ground_truth(fc.fake_root)["m1"][0]
        fc.agents[victim].kill()

        def fenced() -> bool:
            record = view.fence(victim)
            return record is not None and record.outcome == "success"

        with ClusterView(etcd.endpoints) as view:
            wait_until(fenced, 30, what=f"{victim} fenced by the external agent")
            wait_until(lambda: fake_ground_truth(fc.fake_root).get("m1") not in (None, [victim]),
                       30, what="m1 running on the other node")
            raw_config = view.store.get(KS.config)
            assert raw_config is not None and SECRET not in raw_config.value.decode()
            entry = view.snapshot().fences[victim]  # the record's key, read as etcd holds it
            record = view.store.get(entry.key)
            assert record is not None and SECRET not in record.value.decode()
        # The agent got the password on stdin, after the operator's other parameters.
        first = stdin_log.read_text().split("--\n")[0].splitlines()
        assert f"password={SECRET}" in first and "username=admin" in first
        assert "action=off" in first
        outputs = {}
        for args in (("config", "show"), ("-o", "json", "config", "show"), ("snapshot",),
                     ("-o", "json", "snapshot"), ("-o", "json", "fence", "list"),
                     ("fence", "list"), ("-o", "json", "status")):
            r = vmha(etcd, *args)
            assert r.returncode == 0, (args, r.stderr)
            outputs[" ".join(args)] = r.stdout + r.stderr
        shown = json.loads(outputs["-o json config show"])
        assert shown["fence_devices"]["*"]["params"]["password"] == {
            "credential": "ipmi-password"}  # the reference is shown, not what it holds
        assert shown["fence_devices"]["n9"]["params"]["passwd"] != PLAIN
        assert shown["fence_devices"]["n9"]["params"]["ip"] == "10.0.0.19"
        for daemon in [orch, *fc.agents.values()]:
            outputs[f"log of {daemon.name}"] = daemon.log_text()
        assert any('"event": "fenced"' in t for t in outputs.values())  # the log was read
        for what, text in outputs.items():
            assert SECRET not in text, what
            assert PLAIN not in text, what
    finally:
        fc.stop()


def test_registration_uri_with_a_newline_is_refused(etcd: EtcdCluster,
                                                    tmp_path: Path) -> None:
    from store.etcd import EtcdStore

    bad = "test:///default\npassword_script=/tmp/evil"
    r = vmha(etcd, "agent", "--name", "n1", "--libvirt-uri", bad, "--validate-config")
    assert r.returncode == 2 and "control character" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = vmha(etcd, "agent", "--name", "n1", "--fake-root", str(tmp_path),
             "--migration-address", "10.0.0.1\rx", "--validate-config")
    assert r.returncode == 2 and "control character" in r.stderr, r.stderr
    # Written straight into etcd, it is an invalid key: never a URI the leader uses.
    reg = {"schema": 1, "name": "n1", "lease_id": "1f", "libvirt_uri": bad,
           "migration_address": "10.0.0.1", "capacity": {"memory_mib": 1, "vcpus": 1},
           "agent": {"pid": 1, "hostname": "h", "version": "0"}, "registered_at": 0}
    s = EtcdStore(etcd.endpoints)
    try:
        s.put(KS.node("n1"), json.dumps(reg))
        snap = s.snapshot()
        assert "n1" not in snap.nodes
        assert any(e.key == KS.node("n1") and "control character" in str(e)
                   for e in snap.errors), snap.errors
    finally:
        s.close()
