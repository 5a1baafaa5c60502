"""Which keyspace the agent runs on, and the few reads that differ between them at
start (docs/keyspace-v2.md, sections 1 and 6).

`/vmha/version` absent: keyspace 1, as every release before it.  `keyspace 2, done`:
keyspace 2.  Anything else (a migration under way, or a marker that does not parse)
and the agent waits without registering: the freeze and switch of a migration are part
5's, and guessing a keyspace could make it read no assignment and destroy its domains.
"""

from __future__ import annotations

import time
from typing import Literal

from nodeagent.context import AgentContext
from nodeagent.writes_v2 import AgentWrites
from schemas.errors import ConfigError, SchemaError
from schemas.keys_v2 import KeyspaceV2
from schemas.marker import KeyspaceUndecided as KeyspaceUndecided
from schemas.marker import keyspace_of as keyspace_of
from schemas.models import ClusterConfig
from store.etcd import EtcdStore


def read_keyspace(store: EtcdStore) -> Literal[1, 2]:
    ks = KeyspaceV2(store.keyspace.prefix)
    return keyspace_of(store.get(ks.version), ks.version)


def read_config(ctx: AgentContext) -> ClusterConfig:
    """The cluster config, refused if invalid.  Keyspace 1: from a snapshot of the whole
    prefix, as always; keyspace 2: by one targeted get (absent: the defaults, as keyspace
    1's snapshot gives them)."""
    if ctx.keyspace == 1:
        snap = ctx.store.snapshot()
        bad = [e for e in snap.errors if e.key == ctx.ks.config]
        if bad:
            raise ConfigError(f"refusing to start: {bad[0]}")
        return snap.config
    key = ctx.ks2.config
    kv = ctx.store.get(key)
    if kv is None:
        return ClusterConfig()
    try:
        return ClusterConfig.from_json(kv.value, key)
    except SchemaError as exc:
        raise ConfigError(f"refusing to start: {exc}") from exc


def stale_claims_rewritten(ctx: AgentContext) -> bool:
    """Keyspace 2, before a new registration (not an adoption): this node's statuses
    that claim a VM runs here while no domain of it is active are rewritten as stopped
    (section 1, "Clean-up").  False: a registration of this node appeared meanwhile."""
    active = [n for n, d in ctx.hv.list_domains().items() if d.managed and d.active]
    n = AgentWrites(ctx.store, ctx.ks2, ctx.me).rewrite_stale_claims(active, now=time.time())
    if n:
        ctx.log.warning("stale_claims_rewritten", count=n,
                        reason="claims of an earlier registration, no domain active here")
    return n is not None
