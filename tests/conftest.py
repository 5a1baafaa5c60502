from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.fake import kill_guests
from lab.configs import FAST_CONFIG
from schemas import ClusterConfig
from store.etcd import EtcdStore
from tests.authetcd import TlsEtcd, start_tls_etcd
from tests.harness import EtcdCluster, FakeCluster, start_etcd

# A shell that starts the suite in the background without job control (`cmd &` in a
# script) leaves SIGINT ignored, and an ignored signal stays ignored across exec: every
# `vmha` the tests start would then ignore the Ctrl-C the tests send it (`lab up`
# interrupted mid-way waited out its teardown timeout).  A handler, unlike SIG_IGN, is
# reset to the default in a child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Fails the session if a process it started outlives it (and kills it).
pytest_plugins = ["tests.leakcheck"]

# The suite runs in two pytest-xdist workers (`make test`: `-n 2 --dist loadfile`).  A
# test file stays in one worker, so its module-scoped clusters start once, and the lab's
# files all share one worker: each lab node is a libvirtd with QEMU guests under TCG, and
# two labs at once on 2 cores would stretch the guests' timing, not the tests' coverage.
# (A scheduler of our own: xdist's `loadgroup` marks are lost on pytest 9's node ids.)
LAB_UNIT = "tests/lab"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class _FileOrLab(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return LAB_UNIT if path.startswith("tests/lab/") else path

        def _assign_work_unit(self, node: Any) -> None:
            # The lab's unit is the longest (several minutes of QEMU guests): handed out
            # first, the other worker runs the rest beside it instead of waiting at the end.
            if LAB_UNIT in self.workqueue:
                self.workqueue.move_to_end(LAB_UNIT, last=False)
            super()._assign_work_unit(node)

    return _FileOrLab(config, log)


# Short timing for tests (lab.configs says why); it passes the same validation as
# production config.
TEST_CONFIG = FAST_CONFIG


@pytest.fixture(autouse=True)
def _fake_guests_end_with_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """The fake hypervisor's guests are processes of their own that outlive every daemon
    (as QEMU does): the ones a test booted under its tmp_path end with it."""
    yield
    tmp = getattr(request.node, "funcargs", {}).get("tmp_path")
    if isinstance(tmp, Path) and (any(tmp.glob("*/domains")) or any(tmp.glob("*/*/domains"))):
        kill_guests(tmp)


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    cluster = start_etcd(1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd3() -> Iterator[EtcdCluster]:
    cluster = start_etcd(3)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd_tls() -> Iterator[TlsEtcd]:
    """One etcd member with TLS and client-certificate authentication, auth still off,
    and a CA that issues a client certificate for any CN (`etcd_tls.store(cn)`)."""
    cluster = start_tls_etcd()
    try:
        yield cluster
    finally:
        cluster.stop()


#: The nodes `etcd_auth` makes roles and users for.
AUTH_NODES = ("n1", "n2")


@pytest.fixture
def etcd_auth(etcd_tls: TlsEtcd) -> TlsEtcd:
    """`etcd_tls` on keyspace 2 (the marker says `done`) with `vmha auth setup` run for
    AUTH_NODES: auth on, one user per role, each logging in by its certificate's CN
    (`etcd_auth.store("node-n1")`; `.root` is etcd's root)."""
    etcd_tls.mark_keyspace_2()
    code, _, err = etcd_tls.vmha("root", "auth", "setup", "--nodes", ",".join(AUTH_NODES),
                                 "--root-cn-only")
    assert code == 0, err
    return etcd_tls


@pytest.fixture
def store(etcd: EtcdCluster) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd.endpoints)
    try:
        yield s
    finally:
        s.close()


def make_fake_cluster(etcd: EtcdCluster, tmp_path: Path,
                      config: ClusterConfig = TEST_CONFIG, keyspace: int = 1) -> FakeCluster:
    """The config written and, for `keyspace` 2, its marker (before any daemon starts:
    tests.integration.keyspaces)."""
    from tests.integration.keyspaces import mark_keyspace

    s = EtcdStore(etcd.endpoints)
    s.put("/vmha/config", config.to_json())
    s.close()
    mark_keyspace(etcd.endpoints, keyspace)
    return FakeCluster(etcd, tmp_path)


@pytest.fixture
def fake_cluster(etcd: EtcdCluster, tmp_path: Path) -> Iterator[FakeCluster]:
    fc = make_fake_cluster(etcd, tmp_path)
    try:
        yield fc
    finally:
        fc.stop()


def vmha(etcd: EtcdCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmha", "--etcd", etcd.endpoints, *args],
                          capture_output=True, text=True, timeout=60)
