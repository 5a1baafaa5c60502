"""`vmha lab up --auth`: the lab with etcd authentication on, on keyspace 2, used the way
its printed examples say (vmha and etcdctl through env.sh as `operator`), then `vmha lab
down`.  Auth is `up`'s default; `--auth`, which scripts written before still pass, is
kept here so that a fresh lab started with it stays covered (tests/lab/test_labcli.py
starts one without either flag, and one with `--no-auth`).

Root only; skipped without libvirtd / QEMU / unshare / etcd (same check as `vmha lab up`).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lab.commands import missing_prerequisite
from lab.etcdpki import EtcdPki, node_user
from lab.localcluster import wait_until
from schemas.keys_v2 import KeyspaceV2
from schemas.models_v2 import KeyspaceVersion
from store.errors import PermissionDenied
from store.etcd import EtcdStore, StoreError
from tests.lab.procs import lab_down_on_failure, lab_env, run_vmha

_REASON = missing_prerequisite()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

KS = KeyspaceV2()


def running_on(store: EtcdStore, vm: str, nodes: list[str]) -> str | None:
    """The node whose status of `vm`, the newest, says running."""
    kvs = [kv for n in nodes if (kv := store.get(KS.status(n, vm)))]
    if not kvs:
        return None
    st: dict[str, Any] = json.loads(max(kvs, key=lambda kv: kv.mod_revision).value)
    return str(st["node"]) if st["state"] == "running" else None


def test_lab_up_with_auth(lab_dir: Path) -> None:
    lab = lab_dir
    nodes = ["n1", "n2"]
    with lab_down_on_failure(str(lab)):
        r = run_vmha("lab", "up", "--auth", "--dir", str(lab), "--nodes", "2")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "etcd auth on, keyspace 2" in r.stdout, r.stdout
        st = json.loads((lab / "lab.json").read_text())
        assert st["auth"] is True
        pki = EtcdPki(lab / "nodes")
        # each daemon logs in as its own user
        for key, user in (("agent:n1", "node-n1"), ("agent:n2", "node-n2"),
                          ("orchestrator:o1", "orchestrator")):
            args = st["daemons"][key]["args"]
            assert args[args.index("--etcd-cert") + 1] == pki.client(user).cert, args
        # etcd asks for a client certificate of the lab's CA: none, none talks
        anon = EtcdStore(st["etcd"]["endpoints"], retry_budget=0.5)
        try:
            with pytest.raises(StoreError):
                anon.revision()
        finally:
            anon.close()

        operator = EtcdStore(st["etcd"]["endpoints"], tls=pki.client("operator"))
        n1 = EtcdStore(st["etcd"]["endpoints"], tls=pki.client(node_user("n1")))
        try:
            version = operator.get(KS.version)
            assert version is not None
            assert KeyspaceVersion.from_json(version.value).state == "done"
            # the printed `vm add`: vmha as operator, from env.sh, on keyspace 2
            m = re.search(r"^  vmha (vm add web1 .*)$", r.stdout, re.MULTILINE)
            assert m is not None, r.stdout
            env = lab_env(lab)
            add = run_vmha(*m.group(1).split(), env=env)
            assert add.returncode == 0 and KS.spec("web1") in add.stdout, add.stdout + add.stderr
            node = wait_until(lambda: running_on(operator, "web1", nodes), 60, 0.2,
                              "web1 running on keyspace 2")
            assert node is not None and operator.get(KS.assignment(node, "web1")) is not None
            listed = run_vmha("-o", "json", "vm", "list", env=env)
            assert [(v["name"], v["node"], v["state"]) for v in json.loads(listed.stdout)] == [
                ("web1", node, "running")], listed.stdout + listed.stderr
            # n1's certificate writes nothing of n2's, nor a placement
            before = operator.revision()
            for key in (KS.reg("n2"), KS.status("n2", "web1"), KS.place("web1")):
                with pytest.raises(PermissionDenied):
                    n1.put(key, "{}")
            reg = operator.get(KS.reg("n2"))
            assert reg is not None
            with pytest.raises(PermissionDenied):
                operator.revoke_lease(reg.lease)  # root's
            assert operator.revision() == before
            # etcdctl as n1, as the printed example has it: refused too
            cred = pki.client(node_user("n1"))
            env = dict(lab_env(lab), ETCDCTL_CERT=str(cred.cert), ETCDCTL_KEY=str(cred.key))
            refused = subprocess.run(["etcdctl", "put", KS.reg("n2"), "x"], env=env, text=True,
                                     capture_output=True, timeout=30, check=False)
            assert refused.returncode != 0 and "permission denied" in refused.stderr
            assert operator.revision() == before
        finally:
            operator.close()
            n1.close()
        r = run_vmha("lab", "status", "--dir", str(lab))
        assert r.returncode == 0 and "leader: " in r.stdout, r.stdout + r.stderr
        assert re.search(r"^web1 +running", r.stdout, re.MULTILINE), r.stdout
    r = run_vmha("lab", "down", "--dir", str(lab))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not lab.exists()
