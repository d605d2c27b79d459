"""The Redis backplane against real redis-servers of the tests' own: passwords, TLS, and a
restart of Redis under a running backplane and under a running cluster."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from tests.helpers import (
    RECEIVE_TIMEOUT,
    ClusterProcess,
    RedisServer,
    Relay,
    connect_on_each_worker,
    free_port,
    receive_data,
    redis_call,
)
from trio_fanout.backplane import (
    Backplane,
    BackplaneError,
    BackplaneUnavailable,
    HistoryPolicy,
    Position,
    Received,
    open_backplane,
)
from trio_fanout.backplane import redis as redis_backend
from trio_fanout.client import ServerError

# How long the tests let a backplane or cluster take to notice that Redis is back.
RECOVERY_TIMEOUT = 10.0


@pytest.fixture
def short_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_backend, "CONNECT_TIMEOUT", 1.0)


async def round_trip(url: str) -> None:
    """Publish through one backplane and receive through another: Redis carried it."""
    async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
        await subscriber.subscribe(b"topic")
        await publisher.publish(b"topic", b"payload")
        with trio.fail_after(RECEIVE_TIMEOUT):
            assert await subscriber.receive_batch() == [Received(b"topic", b"payload", None)]


async def test_a_password_protected_redis(tmp_path: Path, short_connect_timeout: None):
    server = RedisServer(str(tmp_path), "--requirepass", "s3cret/with:odd@chars")
    try:
        await round_trip(f"redis://:s3cret%2Fwith%3Aodd%40chars@127.0.0.1:{server.port}")
        with pytest.raises(BackplaneError, match="refused AUTH"):
            async with open_backplane(f"redis://:wrong@127.0.0.1:{server.port}"):
                pass
        with pytest.raises(BackplaneError, match="refused PING: NOAUTH"):
            async with open_backplane(server.url):
                pass
    finally:
        server.stop()


async def test_a_redis_user_with_a_password(tmp_path: Path):
    acl = ["--user", "default", "off", "--user", "alice", "on", ">wonderland", "~*", "&*", "+@all"]
    server = RedisServer(str(tmp_path), *acl)
    try:
        await round_trip(f"redis://alice:wonderland@127.0.0.1:{server.port}")
        with pytest.raises(BackplaneError, match="refused AUTH"):
            async with open_backplane(f"redis://alice:looking-glass@127.0.0.1:{server.port}"):
                pass
    finally:
        server.stop()


@pytest.fixture
def certificates(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    files = {name: tmp_path / name for name in ("ca.key", "ca.crt", "server.key", "server.csr",
                                                "server.crt", "san.ext")}  # fmt: skip
    # The extensions Python 3.13's strict verification (VERIFY_X509_STRICT) asks of a CA and
    # of a server certificate.
    files["san.ext"].write_text(
        "subjectAltName=IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
    )

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        files["ca.key"],
        "-out",
        files["ca.crt"],
        "-days",
        "1",
        "-subj",
        "/CN=trio-fanout test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        files["server.key"],
        "-out",
        files["server.csr"],
        "-subj",
        "/CN=127.0.0.1",
    )
    openssl("x509", "-req", "-in", files["server.csr"], "-CA", files["ca.crt"],
            "-CAkey", files["ca.key"], "-CAcreateserial", "-out", files["server.crt"],
            "-days", "1", "-extfile", files["san.ext"])  # fmt: skip
    yield files


async def test_redis_over_tls(
    tmp_path: Path, certificates: dict[str, Path], short_connect_timeout: None
):
    port = free_port()
    server = RedisServer(
        str(tmp_path), "--tls-port", str(port), "--tls-cert-file", str(certificates["server.crt"]),
        "--tls-key-file", str(certificates["server.key"]),
        "--tls-ca-cert-file", str(certificates["ca.crt"]), "--tls-auth-clients", "no",
        "--requirepass", "tls-pw",
        port=0,
    )  # fmt: skip
    try:
        ca = certificates["ca.crt"]
        await round_trip(f"rediss://:tls-pw@127.0.0.1:{port}?ssl_ca_certs={ca}")
        # The system's CAs do not vouch for our throwaway CA: refused, and the error says why.
        with pytest.raises(BackplaneUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            async with open_backplane(f"rediss://:tls-pw@127.0.0.1:{port}"):
                pass
        # Plain text to a TLS port gets nowhere either.
        with pytest.raises(BackplaneUnavailable):
            async with open_backplane(f"redis://:tls-pw@127.0.0.1:{port}"):
                pass
    finally:
        server.stop()


async def publish_until_accepted(publisher: Backplane, topic: bytes, payload: bytes) -> int:
    """Publish until Redis takes it; return how many attempts were refused."""
    refused = 0
    with trio.fail_after(RECOVERY_TIMEOUT):
        while True:
            try:
                await publisher.publish(topic, payload)
                return refused
            except BackplaneUnavailable:
                refused += 1
                await trio.sleep(0.05)


async def test_a_backplane_survives_a_redis_restart(tmp_path: Path):
    server = RedisServer(str(tmp_path))
    try:
        async with (
            open_backplane(server.url) as publisher,
            open_backplane(server.url) as subscriber,
        ):
            await subscriber.subscribe(b"kept")
            await publisher.publish(b"kept", b"before")
            with trio.fail_after(RECEIVE_TIMEOUT):
                assert await subscriber.receive_batch() == [Received(b"kept", b"before", None)]
            server.stop()
            with pytest.raises(BackplaneUnavailable):
                await publisher.publish(b"kept", b"during")
            server = RedisServer(str(tmp_path), port=server.port)
            await publish_until_accepted(publisher, b"kept", b"after-0")
            # The subscriber may be back a moment after the publisher: retry with new payloads
            # until one arrives, then check that each arrived once and in order.
            received: list[bytes] = []
            with trio.fail_after(RECOVERY_TIMEOUT):
                for attempt in itertools.count(1):
                    with trio.move_on_after(0.2):
                        received += [payload for _, payload, _ in await subscriber.receive_batch()]
                    if received:
                        break
                    await publish_until_accepted(publisher, b"kept", b"after-%d" % attempt)
            await publisher.publish(b"kept", b"sentinel")
            with trio.fail_after(RECEIVE_TIMEOUT):
                while received[-1] != b"sentinel":
                    received += [payload for _, payload, _ in await subscriber.receive_batch()]
            assert b"during" not in received
            assert len(set(received)) == len(received)  # nothing twice
            numbers = [int(payload.split(b"-")[1]) for payload in received[:-1]]
            assert numbers == sorted(numbers)  # in publish order
    finally:
        server.stop()


class _LinkLog(logging.Handler):
    """The Redis backend's log records, with an event for each new one (to wait on them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[int, str]] = []
        self.changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))
        self.changed.set()

    def lines(self, level: int, text: str) -> list[str]:
        return [line for levelno, line in self.records if levelno == level and text in line]

    async def wait_for(self, level: int, text: str, count: int) -> None:
        with trio.fail_after(RECOVERY_TIMEOUT):
            while len(self.lines(level, text)) < count:
                self.changed = trio.Event()
                await self.changed.wait()


async def test_an_outage_is_one_warning_per_link_however_long(tmp_path: Path):
    log = _LinkLog()
    redis_logger = logging.getLogger("trio_fanout.backplane.redis")
    redis_logger.addHandler(log)
    level = redis_logger.level
    redis_logger.setLevel(logging.DEBUG)
    server = RedisServer(str(tmp_path))
    try:
        async with open_backplane(server.url) as backplane:
            server.stop()
            # Both links try again at 0.05 s doubling: at least three attempts each.
            await log.wait_for(logging.DEBUG, "cannot connect to", 4)
            server = RedisServer(str(tmp_path), port=server.port)
            await publish_until_accepted(backplane, b"kept", b"after")
            await log.wait_for(logging.WARNING, "link: connected again", 2)
    finally:
        server.stop()
        redis_logger.removeHandler(log)
        redis_logger.setLevel(level)
    warnings = log.lines(logging.WARNING, "cannot connect to")
    assert sorted(line.split(" link:")[0] for line in warnings) == [
        "Redis publisher", "Redis subscriber"
    ]  # fmt: skip
    assert all("Connection refused" in line for line in warnings)  # why, not "all attempts"


async def test_a_connection_redis_resets_is_made_again(tmp_path: Path):
    server = RedisServer(str(tmp_path))
    relay = Relay(server.port)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve)
            async with open_backplane(f"redis://127.0.0.1:{relay.port}") as backplane:
                await backplane.subscribe(b"topic")
                await backplane.publish(b"topic", b"before")
                with trio.fail_after(RECEIVE_TIMEOUT):
                    assert await backplane.receive_batch() == [Received(b"topic", b"before", None)]
                relay.reset_all()
                # Both links connect again (the subscriber subscribes again) and carry on: the
                # subscriber may be back a moment after the publisher, so publish until one
                # arrives.
                received: list[bytes] = []
                with trio.fail_after(RECOVERY_TIMEOUT):
                    for attempt in itertools.count():
                        await publish_until_accepted(backplane, b"topic", b"after-%d" % attempt)
                        with trio.move_on_after(0.2):
                            received += [
                                payload for _, payload, _ in await backplane.receive_batch()
                            ]
                        if received:
                            break
                assert received[0].startswith(b"after-")
            nursery.cancel_scope.cancel()
    finally:
        server.stop()


async def test_a_cluster_rides_out_a_redis_restart(tmp_path: Path):
    server = RedisServer(str(tmp_path))
    cluster = ClusterProcess(
        "--workers", "2", "--heartbeat-interval", "0.2", "--backplane", server.url
    )
    try:
        cluster.wait_for_workers(2)
        async with AsyncExitStack() as stack:
            by_worker = await connect_on_each_worker(stack, cluster.url, per_worker=2)
            publisher = by_worker[1][1]
            members = [by_worker[1][0], by_worker[2][0], by_worker[2][1]]
            for member in members:
                await member.join("through-the-outage")
            await publisher.publish("through-the-outage", "before", ack=True)
            for member in members:
                assert await receive_data(member, 1) == ["before"]

            server.stop()
            with pytest.raises(ServerError) as refused:
                await publisher.publish("through-the-outage", "during", ack=True)
            assert refused.value.code == "backplane_unavailable"

            server = RedisServer(str(tmp_path), port=server.port)
            # Without rejoining, members receive again within a few seconds: publish numbered
            # messages until a member on each worker has one (each worker subscribes again on
            # its own), then a sentinel.
            accepted: list[int] = []
            firsts: dict[int, list[dict]] = {}
            with trio.fail_after(RECOVERY_TIMEOUT):
                counter = itertools.count()
                for watched in (0, 1):  # members[0] is on worker 1, members[1] on worker 2
                    for number in counter:
                        try:
                            await publisher.publish("through-the-outage", number, ack=True)
                        except ServerError as error:
                            assert error.code == "backplane_unavailable"
                            await trio.sleep(0.05)
                            continue
                        accepted.append(number)
                        with trio.move_on_after(0.2):
                            firsts[watched] = [await members[watched].receive()]
                            break
            await publisher.publish("through-the-outage", "sentinel", ack=True)
            for index, member in enumerate(members):
                got, notices = [], 0
                with trio.fail_after(RECEIVE_TIMEOUT):
                    while not got or got[-1] != "sentinel":
                        pending = firsts.get(index)
                        frame = pending.pop() if pending else await member.receive()
                        if frame["type"] == "joined":
                            # Redis lost the room's numbering: a new epoch, told to members.
                            assert "id" not in frame and frame["recovered"] is False, frame
                            notices += 1
                            continue
                        assert frame["type"] == "message", frame
                        got.append(frame["data"])
                assert notices == 1
                # Each message once, in order; "during" was refused, never delivered; and from
                # the first message a member got after the restart, it got every accepted one.
                assert "during" not in got
                assert got[-1] == "sentinel"
                numbers = got[:-1]
                assert numbers == sorted(set(numbers))
                assert set(numbers) <= set(accepted)
                assert numbers == [n for n in accepted if numbers and n >= numbers[0]]
    finally:
        cluster.stop()
        server.stop()


async def test_a_refused_subscription_is_that_topic_s_alone(tmp_path: Path):
    acl = ["--user", "default", "off",
           "--user", "bob", "on", ">pw", "~*", "resetchannels", "&public*", "+@all"]  # fmt: skip
    server = RedisServer(str(tmp_path), *acl)
    try:
        url = f"redis://bob:pw@127.0.0.1:{server.port}"
        async with open_backplane(url) as publisher, open_backplane(url) as subscriber:
            with pytest.raises(BackplaneUnavailable, match="refused SUBSCRIBE: NOPERM"):
                await subscriber.subscribe(b"secret")
            # The link is still up and the next subscription works.
            await subscriber.subscribe(b"public-news")
            await publisher.publish(b"public-news", b"still working")
            with trio.fail_after(RECEIVE_TIMEOUT):
                assert await subscriber.receive_batch() == [
                    Received(b"public-news", b"still working", None)
                ]
    finally:
        server.stop()


async def test_a_publish_redis_does_not_answer_is_refused_and_the_link_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Redis alive but not answering (stopped): the publish is refused after PUBLISH_TIMEOUT
    # rather than acknowledged. It may still be delivered when Redis resumes, if Redis's kernel
    # had already received it: "refused" means "not confirmed" (docs/architecture.md).
    monkeypatch.setattr(redis_backend, "PUBLISH_TIMEOUT", 0.5)
    server = RedisServer(str(tmp_path))
    try:
        async with (
            open_backplane(server.url) as publisher,
            open_backplane(server.url) as subscriber,
        ):
            await subscriber.subscribe(b"topic")
            server.process.send_signal(signal.SIGSTOP)
            try:
                with trio.fail_after(RECEIVE_TIMEOUT), pytest.raises(BackplaneUnavailable):
                    await publisher.publish(b"topic", b"refused")
            finally:
                server.process.send_signal(signal.SIGCONT)
            await publish_until_accepted(publisher, b"topic", b"accepted")
            received: list[bytes] = []
            with trio.fail_after(RECEIVE_TIMEOUT):
                while b"accepted" not in received:
                    received += [payload for _, payload, _ in await subscriber.receive_batch()]
            assert received in ([b"accepted"], [b"refused", b"accepted"])
    finally:
        server.stop()


async def test_resubscribing_is_not_held_to_the_command_queue_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A worker may hold more topics than the bound on queued commands; after a reconnection
    # every one of them must be subscribed again.
    monkeypatch.setattr(redis_backend, "MAX_QUEUED_COMMANDS", 5)
    server = RedisServer(str(tmp_path))
    try:
        async with (
            open_backplane(server.url) as publisher,
            open_backplane(server.url) as subscriber,
        ):
            topics = [b"topic-%d" % number for number in range(8)]
            for topic in topics:
                await subscriber.subscribe(topic)
            with trio.fail_after(RECEIVE_TIMEOUT):
                await trio.run_process(
                    ["redis-cli", "-p", str(server.port), "client", "kill", "type", "pubsub"],
                    capture_stdout=True,
                )
            received: set[bytes] = set()
            with trio.fail_after(RECOVERY_TIMEOUT):
                while received != set(topics):
                    for topic in set(topics) - received:
                        await publisher.publish(topic, b"again")
                    with trio.move_on_after(0.2):
                        received |= {topic for topic, _, _ in await subscriber.receive_batch()}
    finally:
        server.stop()


# --- numbered messages: the scripts, their keys, their lifetime ------------------------------


async def test_scripts_lost_by_redis_are_loaded_again(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An EVALSHA that Redis answers NOSCRIPT (its scripts were flushed, or it restarted and the
    link did not notice) loads them again and is retried: the append is not refused."""
    topic = b"flushed-scripts-%s" % os.urandom(4).hex().encode()
    async with open_backplane(redis_server.url) as backplane:
        first = await backplane.append(topic, b"1")
        assert await redis_call(redis_server.port, b"SCRIPT", b"FLUSH") == b"OK"
        assert await backplane.append(topic, b"2") == Position(first.epoch, 2)
        history = await backplane.history(topic)
        assert history.messages == [(1, b"1"), (2, b"2")]
    assert any("loading them again" in record.getMessage() for record in caplog.records)


async def test_a_restarted_redis_starts_new_epochs(tmp_path: Path) -> None:
    server = RedisServer(str(tmp_path))
    try:
        async with open_backplane(server.url) as backplane:
            before = await backplane.append(b"room", b"before")
            server.stop()
            server = RedisServer(str(tmp_path), port=server.port)  # keeps nothing on disk
            with trio.fail_after(RECOVERY_TIMEOUT):
                while True:
                    try:
                        after = await backplane.append(b"room", b"after")
                        break
                    except BackplaneUnavailable:
                        await trio.sleep(0.05)  # the link reconnects with its own backoff
            assert after.epoch != before.epoch
            assert after.offset == 1
    finally:
        server.stop()


async def test_a_topics_keys_share_a_hash_slot_are_capped_and_expire(
    redis_server: RedisServer,
) -> None:
    ttl = 0.4
    topic = b"keys-%s" % os.urandom(4).hex().encode()
    meta, stream = (
        b"trio-fanout:{%s}:%s" % (topic.hex().encode(), kind) for kind in (b"meta", b"stream")
    )
    policy = HistoryPolicy(size=3, ttl=ttl)
    async with open_backplane(redis_server.url, history=policy) as backplane:
        for i in range(10):
            await backplane.append(topic, b"%d" % i)
        port = redis_server.port
        assert await redis_call(port, b"XLEN", stream) == 3
        assert await redis_call(port, b"HGET", meta, b"o") == b"10"
        for key in (meta, stream):
            assert 0 < await redis_call(port, b"PTTL", key) <= ttl * 1000
        await trio.sleep(ttl * 1.5)  # past the ttl: Redis no longer returns the keys
        assert await redis_call(port, b"EXISTS", meta, stream) == 0


async def test_a_backplane_without_a_policy_follows_the_retention_a_worker_recorded(
    redis_server: RedisServer,
) -> None:
    """A backplane opened with a history policy (a worker's) sets the topic's retention; one
    opened without (an emitter's) applies the retention recorded for the topic, not the
    defaults; on a topic with none recorded, the one the workers recorded for the cluster (as
    it stood when the emitter's connection began), not the defaults either."""
    port = redis_server.port
    topic = b"retention-%s" % os.urandom(4).hex().encode()
    meta, stream = (
        b"trio-fanout:{%s}:%s" % (topic.hex().encode(), kind) for kind in (b"meta", b"stream")
    )
    cluster = HistoryPolicy(size=300, ttl=1000.0)
    async with (
        open_backplane(redis_server.url, history=cluster) as worker,
        open_backplane(redis_server.url) as emitter,
    ):
        # A worker's history read (a join) records the retention too, before any append.
        await worker.history(topic, limit=0)
        for i in range(250):
            await emitter.append(topic, b"%d" % i)
        assert await redis_call(port, b"XLEN", stream) == 250  # not the default 100
        for key in (meta, stream):
            assert await redis_call(port, b"PTTL", key) > 300_000  # not the default 300 s
        # A worker with smaller values is obeyed: the cluster decides, emitters follow.
        async with open_backplane(redis_server.url, history=HistoryPolicy(10, 60.0)) as smaller:
            await smaller.append(topic, b"smaller")
        await emitter.append(topic, b"follows")
        assert await redis_call(port, b"XLEN", stream) == 10
        assert 0 < await redis_call(port, b"PTTL", stream) <= 60_000
        # A topic no worker recorded a retention for: the cluster's, not the defaults (100).
        lone = b"lone-%s" % os.urandom(4).hex().encode()
        for i in range(150):
            await emitter.append(lone, b"%d" % i)
        assert len((await emitter.history(lone)).messages) == 150


async def test_an_emitter_keeps_the_clusters_retention_on_a_room_quiet_past_its_ttl(
    redis_server: RedisServer,
) -> None:
    """A room whose members stay but which is quiet for longer than history_ttl loses its keys,
    and the retention recorded with them: the next message starts a new epoch. An emitter that
    publishes then (the room's members do not join again) still applies the cluster's
    retention, not its own defaults: no more than history_size messages, for history_ttl."""
    port = redis_server.port
    topic = b"quiet-%s" % os.urandom(4).hex().encode()
    meta, stream = (
        b"trio-fanout:{%s}:%s" % (topic.hex().encode(), kind) for kind in (b"meta", b"stream")
    )
    ttl = 0.5
    async with open_backplane(redis_server.url, history=HistoryPolicy(size=5, ttl=ttl)) as worker:
        await worker.history(topic, limit=0)  # a member joins: the retention is recorded
        assert await redis_call(port, b"HGET", meta, b"s") == b"5"
        await trio.sleep(ttl * 2)  # quiet past the ttl: the room's keys are gone
        assert await redis_call(port, b"EXISTS", meta) == 0
        async with open_backplane(redis_server.url) as emitter:
            for i in range(20):
                await emitter.append(topic, b"%d" % i)
        assert await redis_call(port, b"XLEN", stream) == 5  # not the default 100
        for key in (meta, stream):
            assert 0 < await redis_call(port, b"PTTL", key) <= ttl * 1000  # not 300 s


async def test_a_message_from_outside_the_backplane_is_dropped(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Every message on a topic's channel starts with a kind byte; one published to the channel
    by something else (redis-cli, say) is dropped and logged once, not misread."""
    async with open_backplane(redis_server.url) as subscriber:
        await subscriber.subscribe(b"outside")
        await redis_call(redis_server.port, b"PUBLISH", b"outside", b"hello")
        await redis_call(redis_server.port, b"PUBLISH", b"outside", b"\x01bad")
        await subscriber.publish(b"outside", b"sentinel")
        with trio.fail_after(RECEIVE_TIMEOUT):
            assert await subscriber.receive_batch() == [Received(b"outside", b"sentinel", None)]
    assert sum("no trio-fanout backplane sent" in r.getMessage() for r in caplog.records) == 1


async def redis_info(port: int, section: bytes) -> dict[str, str]:
    """The fields of one section of Redis's INFO."""
    info: bytes = await redis_call(port, b"INFO", section)
    return dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)


async def used_memory(port: int) -> int:
    return int((await redis_info(port, b"memory"))["used_memory"])


# A redis-server bounded to this much memory, and what the test appends to it: 200 rooms of
# 50 messages of 1 KB, 10 MB of history, more than twice what Redis may hold.
MAXMEMORY = 4 * 1024 * 1024
FULL_ROOMS, FULL_MESSAGES, FULL_PAYLOAD = 200, 50, b"x" * 1000


async def test_with_volatile_lru_the_history_stays_under_maxmemory_and_evicted_rooms_say_so(
    tmp_path: Path,
) -> None:
    """On Redis the bound on all rooms' history is Redis's ``maxmemory``: every history key
    has a ttl, so ``volatile-lru`` evicts the rooms least recently published to, and appends
    keep succeeding. A room that lost either of its keys tells a reader with an old position
    that it cannot recover; the room published to last keeps its whole history."""
    server = RedisServer(
        str(tmp_path), "--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "volatile-lru"
    )
    try:
        async with open_backplane(server.url, history=HistoryPolicy(size=FULL_MESSAGES)) as bp:
            first: dict[bytes, Position] = {}
            for room in range(FULL_ROOMS):
                topic = b"full-%d" % room
                for _ in range(FULL_MESSAGES):
                    position = await bp.append(topic, FULL_PAYLOAD)
                    first.setdefault(topic, position)
                # Redis evicts before each command, so it may be over by one script's writes
                # (measured: by under 1 %).
                assert await used_memory(server.port) <= MAXMEMORY * 1.1
            assert int((await redis_info(server.port, b"stats"))["evicted_keys"]) > 0
            # The oldest room was evicted (wholly or in part): not recoverable from its start.
            oldest = await bp.history(b"full-0", Position(first[b"full-0"].epoch, 0))
            assert oldest.complete is False
            # The newest one is intact.
            newest_topic = b"full-%d" % (FULL_ROOMS - 1)
            newest = await bp.history(newest_topic, Position(first[newest_topic].epoch, 0))
            assert newest.complete is True
            assert [offset for offset, _ in newest.messages] == list(range(1, FULL_MESSAGES + 1))
    finally:
        server.stop()


async def test_with_noeviction_a_full_redis_refuses_appends_and_the_backplane_stays_up(
    tmp_path: Path,
) -> None:
    """Redis's default policy evicts nothing: once ``maxmemory`` is reached an append is
    refused with BackplaneUnavailable, and the backplane still works for what keeps no data."""
    server = RedisServer(
        str(tmp_path), "--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction"
    )
    try:
        async with (
            open_backplane(server.url, history=HistoryPolicy(size=FULL_MESSAGES)) as bp,
            open_backplane(server.url) as subscriber,
        ):
            refused = None
            for room in range(FULL_ROOMS):
                try:
                    for _ in range(FULL_MESSAGES):
                        await bp.append(b"full-%d" % room, FULL_PAYLOAD)
                except BackplaneUnavailable as error:
                    refused = error
                    break
            assert refused is not None and "OOM" in str(refused), refused
            assert await used_memory(server.port) <= MAXMEMORY * 1.1
            # Plain publishes keep no data: they still go through.
            await subscriber.subscribe(b"still")
            await bp.publish(b"still", b"up")
            with trio.fail_after(RECEIVE_TIMEOUT):
                assert await subscriber.receive_batch() == [Received(b"still", b"up", None)]
    finally:
        server.stop()
