"""Lab tests: real libvirtd nodes and QEMU guests on this host (root only)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "lab: needs root, unshare, libvirtd and QEMU; starts libvirt nodes and TCG guests",
    )


@pytest.fixture
def lab_dir() -> Iterator[Path]:
    """A lab root short enough for libvirtd's AF_UNIX socket paths (108 bytes) wherever
    pytest puts its temporary directories: under xdist they gain a `popen-gwN/` level,
    and a long test name then made `vmha lab up` refuse the root.  Removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="vl-", dir="/tmp"))
    try:
        yield root / "lab"
    finally:
        shutil.rmtree(root)
