from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fencing.procs import stop_started


@pytest.fixture(autouse=True)
def _stop_leftovers() -> Iterator[None]:
    """What a test started through tests.fencing.procs.popen is killed when it ends."""
    yield
    stop_started()
