"""The short form of `make fuzz` (bench.fuzz, ≥ 10 min): 15 s of hostile writes to every key
pattern of a running 3-node cluster on real etcd."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.fuzz import run

pytestmark = pytest.mark.integration


def test_fuzz_short(tmp_path: Path) -> None:
    res = run(minutes=0.25, vms=6, seed=7, workdir=tmp_path)
    assert res["writes"] > 0
    assert res["daemon_exits"] == 0, res["daemons_exited"]
    assert res["vms_stopped"] == 0 and res["vms_moved"] == 0, (res["stopped"], res["moved"])
    assert res["status_failures"] == []
    assert res["bad_keys_missing"] == 0, res["missing_examples"]
    assert res["status_checks"] > 0 and res["bad_keys_listed"] > 0
    assert not any(res["cycle_failed_events"].values()), res["cycle_failed_events"]
    assert "ETCD_MAX_REQUEST_BYTES" not in os.environ  # later etcds keep the default limit
