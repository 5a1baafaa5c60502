"""Fixtures shared by the integration tests of keyspace 2."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from store.etcd import EtcdStore
from tests.conftest import TEST_CONFIG
from tests.harness import EtcdCluster
from tests.integration.helpers_v2 import KS, mark_keyspace_2


@pytest.fixture
def v2store(etcd: EtcdCluster) -> Iterator[EtcdStore]:
    """A store on a one-member etcd marked keyspace 2, with the test config."""
    store = EtcdStore(etcd.endpoints)
    mark_keyspace_2(store)
    store.put(KS.config, TEST_CONFIG.to_json())
    try:
        yield store
    finally:
        store.close()
