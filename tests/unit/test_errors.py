"""The error taxonomy: every error vmha raises says whether retrying can help."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pyetcd import exceptions as etcd_exc

from fencing.guard import destroy_managed, open_hypervisor
from hypervisor.base import HypervisorError, HypervisorRefused, HypervisorUnavailable
from hypervisor.fake import FakeHypervisor
from schemas.errors import ConfigError, PermanentError, SchemaError, TemporaryError, VmhaError
from store.etcd import (
    StoreCompacted,
    StoreError,
    StoreRejected,
    StoreUnavailable,
    is_transient,
    store_error,
)

XML = "<domain><name>{}</name></domain>"


@pytest.mark.parametrize(("cls", "kind"), [
    (StoreUnavailable, TemporaryError),
    (StoreCompacted, TemporaryError),
    (StoreRejected, PermanentError),
    (HypervisorUnavailable, TemporaryError),
    (HypervisorRefused, PermanentError),
    (SchemaError, PermanentError),
    (ConfigError, PermanentError),
])
def test_each_error_is_exactly_one_kind(cls: type[Exception], kind: type[Exception]) -> None:
    assert issubclass(cls, kind) and issubclass(cls, VmhaError)
    other = PermanentError if kind is TemporaryError else TemporaryError
    assert not issubclass(cls, other)


def test_family_bases_still_catch_both_kinds() -> None:
    assert issubclass(HypervisorUnavailable, HypervisorError)
    assert issubclass(HypervisorRefused, HypervisorError)
    assert issubclass(StoreUnavailable, StoreError) and issubclass(StoreRejected, StoreError)
    # Input errors stay ValueErrors for the CLI's bad-input exit code.
    assert issubclass(SchemaError, ValueError) and issubclass(ConfigError, ValueError)


def test_only_connection_errors_are_transient() -> None:
    assert is_transient(etcd_exc.ConnectionFailedError())
    assert is_transient(etcd_exc.ConnectionTimeoutError())
    assert is_transient(etcd_exc.NoServerAvailableError())
    # pyetcd's failover race: a ValueError with exactly this text.
    assert is_transient(ValueError("Trying to use a failed node"))
    assert not is_transient(ValueError("Value out of range: 18446744073709551616"))
    assert not is_transient(TypeError("bug"))
    assert not is_transient(KeyError("bug"))
    assert not is_transient(etcd_exc.PreconditionFailedError())
    assert not is_transient(etcd_exc.RevisionCompactedError(5))


def test_store_error_maps_client_errors_and_leaves_bugs_alone() -> None:
    assert isinstance(store_error("get", etcd_exc.ConnectionFailedError()), StoreUnavailable)
    assert isinstance(store_error("watch", etcd_exc.RevisionCompactedError(5)), StoreCompacted)
    assert isinstance(store_error("txn", etcd_exc.PreconditionFailedError()), StoreRejected)
    assert store_error("txn", ValueError("bug")) is None
    assert store_error("txn", AttributeError("bug")) is None


def test_fake_migration_errors_are_classed(tmp_path: Path) -> None:
    src = FakeHypervisor(tmp_path, "a")
    with pytest.raises(HypervisorRefused):
        src.migrate("nope", f"fake://{tmp_path}/b", "127.0.0.1")  # not running here
    src.boot("vm", XML.format("vm"))
    with pytest.raises(HypervisorRefused):
        src.migrate("vm", "qemu+tcp://b/system", "127.0.0.1")  # not a fake target
    with pytest.raises(HypervisorUnavailable):
        src.migrate("vm", f"fake://{tmp_path}/nohost", "127.0.0.1")  # no host there
    (tmp_path / "dead" / "domains").mkdir(parents=True)
    (tmp_path / "dead" / "host.pid").write_text(str(2 ** 22 + 12345))
    with pytest.raises(HypervisorUnavailable):
        src.migrate("vm", f"fake://{tmp_path}/dead", "127.0.0.1")  # host is down
    assert src.list_domains()["vm"].active


def test_attach_to_a_fake_host_does_not_claim_it(tmp_path: Path) -> None:
    host_pid = os.getppid()  # some other live process "is" the host
    host = FakeHypervisor(tmp_path, "n1", host_pid=host_pid)
    host.boot("vm", XML.format("vm"))
    hv = FakeHypervisor.attach(host.uri)
    assert hv.host_pid == host_pid and hv.uri == host.uri
    assert (tmp_path / "n1" / "host.pid").read_text() == str(host_pid)
    assert hv.list_domains()["vm"].active
    # The guard (and fence_vmha) open it this way and destroy what runs there.
    assert destroy_managed(open_hypervisor(host.uri)) == (["vm"], [])
    assert not host.list_domains()["vm"].active
    assert (tmp_path / "n1" / "host.pid").read_text() == str(host_pid)


def test_attach_to_a_missing_fake_host_sees_nothing(tmp_path: Path) -> None:
    hv = FakeHypervisor.attach(f"fake://{tmp_path}/none")
    assert hv.host_pid == 0 and hv.list_domains() == {}
    assert not (tmp_path / "none").exists()  # attaching creates nothing
    with pytest.raises(ValueError):
        FakeHypervisor.attach("qemu:///system")
