from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import ClusterProcess


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterProcess]:
    """`trio-fanout run --workers 2` on free ports, shared by the tests of one module."""
    process = ClusterProcess("--workers", "2", "--heartbeat-interval", "0.2")
    try:
        process.wait_for_workers(2)
        yield process
    finally:
        process.stop()
