"""Encrypted live migration on the lab (cluster option `migration_tls`).

Three TLS lab nodes (lab.pki): n1 and n2 hold certificates of the lab's CA, n3 of
another CA.  One tiny BIOS guest (what crosses the wire does not matter here, only
whether it may): with TLS on it moves between the trusted nodes without booting again;
the untrusted n3 cannot take it, the guest keeps running on its source and its status
carries the refusal; and a destination whose QEMU alone holds a foreign certificate
refuses the memory stream too, which shows the stream itself runs over TLS.

The lab runs as `vmha lab up --tls` starts it: etcd with authentication on and the
cluster on keyspace 2, every daemon and the operator's `vmha` with their own etcd
certificates (another CA's than the nodes' migration certificates).

Root only; skipped without libvirtd / QEMU / unshare / openssl.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import libvirt
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("libvirt-python is not installed", allow_module_level=True)

from lab import tiny_guest_xml  # noqa: E402
from lab.cluster import LabCluster  # noqa: E402
from lab.etcdpki import OPERATOR  # noqa: E402
from lab.localcluster import wait_until  # noqa: E402
from schemas.keys_v2 import KeyspaceV2  # noqa: E402
from store.etcd import EtcdStore  # noqa: E402
from tests.conftest import TEST_CONFIG  # noqa: E402
from tests.lab.test_e2e import _REASON, events, log_mark, truth_poller  # noqa: E402

_TLS_REASON = _REASON or (None if shutil.which("openssl") else "TLS lab needs openssl")
pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(_TLS_REASON is not None, reason=_TLS_REASON or ""),
]

VM = "t0"
TLS_CONFIG = TEST_CONFIG.model_copy(update={"migration_tls": True})
KS = KeyspaceV2()


def vmha(lc: LabCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`vmha ARGS` as the operator (its etcd certificate), as env.sh has it."""
    return subprocess.run([sys.executable, "-m", "vmha", *lc.common(OPERATOR), *args],
                          capture_output=True, text=True, timeout=60)


def status(store: EtcdStore, lc: LabCluster, vm: str) -> dict[str, Any] | None:
    """The newest of the nodes' statuses of ``vm`` (keyspace 2: one per node)."""
    kvs = [kv for n in lc.node_names if (kv := store.get(KS.status(n, vm)))]
    return dict(json.loads(max(kvs, key=lambda kv: kv.mod_revision).value)) if kvs else None


def arrived(store: EtcdStore, lc: LabCluster, vm: str, avoid: set[str]) -> str | None:
    """The node ``vm`` runs on and is reported running on, if it is not in ``avoid``."""
    nodes = lc.ground_truth().get(vm, [])
    st = status(store, lc, vm)
    if len(nodes) == 1 and nodes[0] not in avoid and st and st["state"] == "running" \
            and st["node"] == nodes[0]:
        return nodes[0]
    return None


@pytest.fixture
def tls_lab(tmp_path: Path) -> Iterator[tuple[LabCluster, EtcdStore]]:
    lc = LabCluster(tmp_path / "lab", tmp_path / "logs", tls=True,
                    tls_ca_of={"n3": "rogue"}, auth=True)
    lc.start(TLS_CONFIG.to_json(), orchestrators=1)
    store = lc.store(OPERATOR)
    try:
        # every node registered first: the guest is to start on n1
        wait_until(lambda: all(store.get(KS.reg(n)) for n in lc.node_names), 40, 0.1,
                   "all agents registered")
        xml = tmp_path / f"{VM}.xml"
        xml.write_text(tiny_guest_xml(VM))
        r = vmha(lc, "vm", "add", VM, "--memory-mib", "32", "--xml", str(xml),
                 "--prefer", "n1=100")
        assert r.returncode == 0, r.stderr
        wait_until(lambda: arrived(store, lc, VM, set()) == "n1", 40, 0.1, "t0 running on n1")
        yield lc, store
    finally:
        store.close()
        lc.stop()


def _move(lc: LabCluster, to: str, *, wait: bool) -> None:
    r = vmha(lc, "vm", "migrate", VM, "--to", to, *(["--wait", "--timeout", "40"]
                                                         if wait else []))
    assert r.returncode == 0, (r.stdout, r.stderr)


def _refused(store: EtcdStore, lc: LabCluster, target: str,
             words: str) -> dict[str, object] | None:
    st = status(store, lc, VM)
    if st and st.get("failed_target") == target and words in str(st.get("error")):
        return st
    return None


def test_tls_migration_works_and_untrusted_destinations_refuse_it(
        tls_lab: tuple[LabCluster, EtcdStore]) -> None:
    lc, store = tls_lab
    marks = {n: log_mark(d) for n, d in lc.agents.items()}
    with truth_poller(lc).running() as poller:
        # 1. TLS on, trusted destination: a live migration, no boot.
        _move(lc, "n2", wait=True)
        assert lc.ground_truth() == {VM: ["n2"]}
        starts = events(lc.agents["n1"], "migrate_start", marks["n1"], VM)
        assert [e.get("tls") for e in starts] == [True], starts
        assert events(lc.agents["n2"], "boot", marks["n2"], VM) == [], "t0 booted on n2"
        conn = libvirt.open(lc.nodes["n2"].uri)
        try:
            state, reason = conn.lookupByName(VM).state()
        finally:
            conn.close()
        assert (state, reason) == (libvirt.VIR_DOMAIN_RUNNING,
                                   libvirt.VIR_DOMAIN_RUNNING_MIGRATED)
        st = status(store, lc, VM)
        assert st is not None and st["node"] == "n2", st
        mig = st.get("migration") or {}
        assert mig.get("source") == "n1" and mig.get("target") == "n2", st
        assert mig.get("downtime_ms") is not None and mig.get("total_ms") is not None, st
        print(f"\nTLS migration n1 -> n2: total {mig['total_ms']} ms, "
              f"downtime {mig['downtime_ms']} ms")

        # 2. A destination whose certificates another CA signed: the source's libvirtd
        # refuses its certificate; the guest keeps running on n2, the status says why.
        # n1 cordoned: the leader has no other target to retry the move on.
        r = vmha(lc, "node", "cordon", "n1")
        assert r.returncode == 0, r.stderr
        mark = log_mark(lc.agents["n2"])
        _move(lc, "n3", wait=False)
        st = wait_until(lambda: _refused(store, lc, "n3", "certificate"), 40, 0.1,
                        "the migration to n3 refused")
        assert st is not None and st["node"] == "n2" and st["state"] == "running", st
        failed = events(lc.agents["n2"], "migrate_failed", mark, VM)
        assert failed and "certificate" in failed[0]["error"], failed
        assert VM not in lc.node_domains("n3"), "t0 defined on the untrusted node"
        assert lc.ground_truth() == {VM: ["n2"]}
        r = vmha(lc, "vm", "show", VM)
        assert r.returncode == 0 and "certificate" in r.stdout, r.stdout

        # 3. n1's libvirtd keeps its valid certificate, its QEMU gets the foreign CA's:
        # the peer connection succeeds, QEMU's TLS handshake on the memory stream fails.
        qemu_dir = lc.nodes["n1"].dir / "pki" / "qemu"
        shutil.rmtree(qemu_dir)
        shutil.copytree(lc.nodes["n3"].dir / "pki" / "qemu", qemu_dir)
        r = vmha(lc, "node", "uncordon", "n1")
        assert r.returncode == 0, r.stderr
        # Uncordoned, n1 is a target for the move that n3 refused: the leader may retry it
        # there before this command runs, and the command then rightly refuses a VM that
        # is migrating.  Either way, n1's refusal must follow.
        r = vmha(lc, "vm", "migrate", VM, "--to", "n1")
        assert r.returncode == 0 or "not running" in r.stderr, (r.stdout, r.stderr)
        st = wait_until(lambda: _refused(store, lc, "n1", "issuer"), 40, 0.1,
                        "the migration stream to n1 refused")
        assert st is not None and st["node"] == "n2" and st["state"] == "running", st
        assert lc.ground_truth() == {VM: ["n2"]}
    assert poller.violations == [], poller.violations
