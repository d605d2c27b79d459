from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest

from tests.helpers import ClusterProcess, RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test session's own, on a free port (never the machine's)."""
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(directory)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module", params=["zmq", "redis"])
def cluster(request: pytest.FixtureRequest) -> Iterator[ClusterProcess]:
    """`trio-fanout run --workers 2` on free ports, shared by the tests of one module; once on
    the embedded ZeroMQ proxy and once on Redis. A module's ``CLUSTER_OPTIONS`` (a tuple of
    flags), if it has one, are added to the command."""
    backplane: list[str] = []
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        backplane = ["--backplane", server.url]
    options = getattr(request.module, "CLUSTER_OPTIONS", ())
    process = ClusterProcess("--workers", "2", "--heartbeat-interval", "0.2", *options, *backplane)
    try:
        process.wait_for_workers(2)
        yield process
    finally:
        process.stop()
