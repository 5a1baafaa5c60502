"""The CLI tells a refusal by etcd from an outage (exit 1, not 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import vmha
from tests.harness import EtcdCluster

pytestmark = pytest.mark.integration


def test_a_request_etcd_refuses_is_not_reported_as_unreachable(
        etcd: EtcdCluster, tmp_path: Path) -> None:
    # Well-formed, but larger than etcd takes in one request.
    xml = tmp_path / "big.xml"
    xml.write_text(f"<domain><name>big</name><description>{'x' * 1_700_000}"
                   "</description></domain>")
    r = vmha(etcd, "vm", "add", "big", "--memory-mib", "64", "--xml", str(xml))
    assert r.returncode == 1, r.stderr
    assert "refused" in r.stderr and "unreachable" not in r.stderr
    assert "Traceback" not in r.stderr
    ok = vmha(etcd, "vm", "list")
    assert ok.returncode == 0 and "big" not in ok.stdout
