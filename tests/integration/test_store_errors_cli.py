"""The CLI tells a refusal by etcd from an outage (exit 1, not 3)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import vmha
from tests.harness import EtcdCluster, start_etcd

pytestmark = pytest.mark.integration


@pytest.fixture
def small_etcd(monkeypatch: pytest.MonkeyPatch) -> Iterator[EtcdCluster]:
    # An etcd that takes requests of at most 64 KiB: a spec under vmha's own limit
    # (schemas.MAX_VALUE_BYTES, refused by the CLI itself with exit 2) that etcd refuses.
    monkeypatch.setenv("ETCD_MAX_REQUEST_BYTES", str(64 * 1024))
    cluster = start_etcd(1)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_request_etcd_refuses_is_not_reported_as_unreachable(
        small_etcd: EtcdCluster, tmp_path: Path) -> None:
    etcd = small_etcd
    # Well-formed, but larger than etcd takes in one request.
    xml = tmp_path / "big.xml"
    xml.write_text(f"<domain><name>big</name><description>{'x' * 150_000}"
                   "</description></domain>")
    r = vmha(etcd, "vm", "add", "big", "--memory-mib", "64", "--xml", str(xml))
    assert r.returncode == 1, r.stderr
    assert "refused" in r.stderr and "unreachable" not in r.stderr
    assert "Traceback" not in r.stderr
    ok = vmha(etcd, "vm", "list")
    assert ok.returncode == 0 and "big" not in ok.stdout
