"""Lab tests: real libvirtd nodes and QEMU guests on this host (root only)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "lab: needs root, unshare, libvirtd and QEMU; starts libvirt nodes and TCG guests",
    )
