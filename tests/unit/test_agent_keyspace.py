"""Which keyspace the agent runs on (nodeagent.keyspace), and that on keyspace 1 it
writes exactly the keys it always wrote (nodeagent.context.AgentKeys)."""

from __future__ import annotations

import pytest

from nodeagent.context import AgentKeys
from nodeagent.keyspace import KeyspaceUndecided, keyspace_of
from schemas.keys import Keyspace
from schemas.keys_v2 import KeyspaceV2
from schemas.snapshot import RawKV

KEY = "/vmha/version"


def marker(value: str) -> RawKV:
    return RawKV(KEY, value.encode(), 5, 5)


def test_no_marker_is_keyspace_1_and_done_is_2() -> None:
    assert keyspace_of(None, KEY) == 1
    assert keyspace_of(marker('{"schema": 1, "keyspace": 2, "state": "done", "started_at": 1,'
                              ' "by": "operator:a", "tool_version": "0.2.0"}'), KEY) == 2


@pytest.mark.parametrize("value", [
    '{"schema": 1, "keyspace": 2, "state": "migrating", "started_at": 1, "by": "o",'
    ' "tool_version": "x"}',
    '{"schema": 1, "keyspace": 2, "state": "switching", "started_at": 1, "by": "o",'
    ' "tool_version": "x"}',
    '{"schema": 1, "keyspace": "2", "state": "done", "started_at": 1, "by": "o",'
    ' "tool_version": "x"}',
    "{", "",
])
def test_anything_else_waits(value: str) -> None:
    with pytest.raises(KeyspaceUndecided):
        keyspace_of(marker(value), KEY)


@pytest.mark.parametrize("prefix", ["/vmha", "/other/cluster"])
def test_agent_keys(prefix: str) -> None:
    ks, ks2 = Keyspace(prefix), KeyspaceV2(prefix)
    k1 = AgentKeys.v1(ks, "n1")
    assert (k1.reg, k1.alive, k1.leaving, k1.cordon, k1.config, k1.status("web")) == (
        ks.node("n1"), ks.alive("n1"), ks.leaving("n1"), ks.cordon("n1"), ks.config,
        ks.vm_status("web"))
    k2 = AgentKeys.v2(ks2, "n1")
    assert (k2.reg, k2.alive, k2.leaving, k2.cordon, k2.config, k2.status("web")) == (
        f"{prefix}/n/n1/reg", f"{prefix}/n/n1/alive", f"{prefix}/n/n1/leaving",
        f"{prefix}/cordon/n1", f"{prefix}/config", f"{prefix}/n/n1/vm/web")
