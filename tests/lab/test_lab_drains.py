"""Issue 12, item 3 on real QEMU: with `fence_policy = external`, a drain by lease revoke
and an agent restart (SIGTERM drain, start again) call no fence device and write no
fence record; a node really lost does get its call.  One round of each here;
`make bench-lab-drains` runs the issue's 20 + 20 (bench.lab_drains)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab.test_e2e import _REASON

pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

from bench.lab_drains import run  # noqa: E402


def test_drains_and_restarts_on_the_lab_call_no_fence_device(tmp_path: Path) -> None:
    res = run(rounds=1, workdir=tmp_path)
    assert (res["revoke_drains"], res["restarts"]) == (1, 1)
    assert res["calls_during_drains"] == [] and res["fence_records"] == []
    assert res["double_runs"] == [] and res["i1_samples"] > 100
    victim = res["control"]["victim"]
    assert any(f"/{victim}/" in uri for uri in res["control"]["calls"]), res["control"]
