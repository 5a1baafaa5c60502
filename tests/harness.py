"""Test-side names for the local cluster helpers (they live in the package so the
demo and the benchmarks use the very same code)."""

from lab.localcluster import (
    Daemon,
    EtcdCluster,
    EtcdMember,
    FakeCluster,
    free_ports,
    start_etcd,
    wait_until,
)

__all__ = ["Daemon", "EtcdCluster", "EtcdMember", "FakeCluster", "free_ports", "start_etcd",
           "wait_until"]
