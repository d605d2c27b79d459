"""Every frame a client sends is charged to its budget of frames and of bytes: a client over it
gets ``rate_limited`` for its messages, and a flood of frames that earn no reply (pongs,
fragments) or of pings is cut with 1008 at once, while other clients on the worker are served."""

from __future__ import annotations

import json
import struct

import pytest
import trio

from tests.helpers import RECEIVE_TIMEOUT, receive_data
from tests.test_worker import RawClient, publish_from_outside, running_worker
from trio_fanout import connection, websocket
from trio_fanout.client import open_client
from trio_fanout.connection import ABUSE_QUIET_SECONDS, ABUSE_REFUSALS, RateLimiter

# A flood at full speed is cut after its first read or two, in milliseconds: one 64 KiB read
# holds about 10,000 empty frames, and the budget allows 1,000 frames plus 200 refusals. The
# bound is far above that so that a loaded machine does not fail the test.
FLOOD_CUT_SECONDS = 1.0
# An upper bound on what one flooder sends, so that a server that never cuts it fails the test
# rather than running forever: 64 MiB.
FLOOD_MAX_CHUNKS = 1024
CHUNK_BYTES = 65536


# --- the budget itself (virtual time) --------------------------------------------------------


async def test_frames_are_granted_up_to_the_burst_then_at_the_rate(autojump_clock):
    limiter = RateLimiter(10.0, 5, 1e9, 10**9)
    assert [limiter.allow(0) for _ in range(6)] == [True] * 5 + [False]
    await trio.sleep(0.1)  # one frame's worth
    assert limiter.allow(0)
    assert not limiter.allow(0)


async def test_a_charge_of_many_frames_takes_what_fits_and_counts_the_rest(autojump_clock):
    limiter = RateLimiter(10.0, 5, 1e9, 10**9)
    assert limiter.charge(3, 0) == 0
    assert limiter.charge(4, 0) == 2  # two tokens were left
    assert not limiter.allow(0)


async def test_bytes_are_granted_while_the_byte_bucket_is_not_empty(autojump_clock):
    limiter = RateLimiter(1e9, 10**9, 1000.0, 10_000)
    # 10,000 bytes of burst: three frames of 4,096 bytes pass, the third into debt.
    assert [limiter.allow(4096) for _ in range(4)] == [True, True, True, False]
    await trio.sleep(2.0)  # 2,000 bytes refilled: the debt of 2,288 is not yet repaid
    assert not limiter.allow(1)
    await trio.sleep(0.3)
    assert limiter.allow(1)


async def test_abuse_is_more_than_the_limit_of_refusals_without_a_pause(autojump_clock):
    limiter = RateLimiter(1.0, 1, 1e9, 10**9)
    assert limiter.allow(0)
    assert limiter.charge(ABUSE_REFUSALS, 0) == ABUSE_REFUSALS
    assert not limiter.abusive
    await trio.sleep(ABUSE_QUIET_SECONDS * 0.9)  # refilled less than a frame: one refusal more
    assert not limiter.allow(0)
    assert limiter.abusive


async def test_a_pause_after_refusals_gives_a_clean_slate(autojump_clock):
    limiter = RateLimiter(1.0, 1, 1e9, 10**9)
    assert limiter.charge(ABUSE_REFUSALS + 2, 0) == ABUSE_REFUSALS + 1  # one token was there
    assert limiter.abusive
    await trio.sleep(ABUSE_QUIET_SECONDS + 0.5)
    assert limiter.allow(0)  # refilled
    assert limiter.charge(1, 0) == 1
    assert not limiter.abusive  # the count started again


# --- floods over real sockets ------------------------------------------------------------------


def repeated(frame: bytes) -> bytes:
    """About 64 KiB of ``frame`` over and over: one send of a flood."""
    return frame * (CHUNK_BYTES // len(frame))


FLOODS = {
    # Empty pongs: the cheapest frame there is, and one that earns no reply.
    "empty pongs": (b"", repeated(RawClient.masked_frame(websocket.OP_PONG, b""))),
    "125-byte pongs": (b"", repeated(RawClient.masked_frame(websocket.OP_PONG, b"x" * 125))),
    # A message that never ends, in empty fragments: it never reaches the size limit.
    "empty fragments": (
        RawClient.masked_frame(websocket.OP_TEXT, b'{"type":', fin=False),
        repeated(RawClient.masked_frame(websocket.OP_CONTINUATION, b"", fin=False)),
    ),
    # Pings earn a pong each while within the budget.
    "pings": (b"", repeated(RawClient.masked_frame(websocket.OP_PING, b"are you there"))),
}


async def flood_until_closed(raw: RawClient, opening: bytes, chunk: bytes) -> tuple[int, float]:
    """Send ``opening``, then ``chunk`` at full speed until the server's close frame arrives;
    return its code and how long after the start of the flood it came."""
    start = trio.current_time()
    closed: list[tuple[int, float]] = []

    async def send() -> None:
        try:
            await raw.stream.send_all(opening)
            for _ in range(FLOOD_MAX_CHUNKS):
                await raw.stream.send_all(chunk)
        except trio.BrokenResourceError:
            pass  # the server is done with us

    async def receive(cancel_scope: trio.CancelScope) -> None:
        while True:
            opcode, payload = await raw.receive_frame()
            if opcode == websocket.OP_CLOSE:
                closed.append((struct.unpack("!H", payload[:2])[0], trio.current_time() - start))
                cancel_scope.cancel()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive, nursery.cancel_scope)
    await raw.stream.aclose()
    assert closed, "the flood was never cut"
    return closed[0]


@pytest.mark.parametrize("kind", FLOODS)
async def test_a_flood_is_cut_1008_at_once_and_other_clients_are_served(
    kind: str, monkeypatch: pytest.MonkeyPatch
):
    # The flooder's close frame comes after its socket's backlog; keep it around to read it.
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT", 30.0)
    opening, chunk = FLOODS[kind]
    async with running_worker() as (worker, url), open_client(url) as bystander:
        await bystander.join("news")
        flooders = [await RawClient.connect(url) for _ in range(4)]
        cuts: list[tuple[int, float]] = []
        latencies: list[float] = []

        async def flood(raw: RawClient) -> None:
            cuts.append(await flood_until_closed(raw, opening, chunk))

        async def bystand() -> None:
            for number in range(20):
                sent = trio.current_time()
                await publish_from_outside(worker, "news", number)
                assert await receive_data(bystander, 1) == [number]
                latencies.append(trio.current_time() - sent)

        with trio.fail_after(RECEIVE_TIMEOUT * 3):
            async with trio.open_nursery() as nursery:
                for raw in flooders:
                    nursery.start_soon(flood, raw)
                nursery.start_soon(bystand)
        assert [code for code, _ in cuts] == [1008] * 4
        assert max(seconds for _, seconds in cuts) < FLOOD_CUT_SECONDS, cuts
        assert len(latencies) == 20
        assert max(latencies) < FLOOD_CUT_SECONDS, latencies
        await bystander.ping()  # still served


async def test_messages_past_the_byte_budget_get_rate_limited():
    settings = {"rate_limit_bytes_per_second": 1.0, "rate_limit_bytes_burst": 10_000}
    async with running_worker(**settings) as (_, url):
        raw = await RawClient.connect(url)
        padding = "x" * 4000
        for request_id in range(5):
            request = {"type": "ping", "id": request_id, "padding": padding}
            await raw.send_frame(websocket.OP_TEXT, json.dumps(request).encode())
        replies = [await raw.receive_json() for _ in range(5)]
        # 10,000 bytes of burst: three messages of about 4 KiB pass (the third into debt).
        assert [reply["type"] for reply in replies] == ["pong"] * 3 + ["error"] * 2
        assert [reply.get("code") for reply in replies[3:]] == ["rate_limited"] * 2
        assert [reply["id"] for reply in replies[:3]] == list(range(3))
        # A refused message is read for its id only when small: these are over 4 KiB.
        assert ["id" in reply for reply in replies[3:]] == [False, False]
        await raw.send_frame(websocket.OP_TEXT, b'{"type": "ping", "id": 5}')
        assert await raw.receive_json() == {
            "type": "error", "code": "rate_limited", "message": "too many frames; slow down",
            "id": 5,
        }  # fmt: skip
        await raw.stream.aclose()


async def test_a_message_in_thousands_of_fragments_within_the_budget_is_served():
    async with running_worker() as (_, url):
        raw = await RawClient.connect(url)
        text = b'{"type":"ping","id":7}'
        frames = [RawClient.masked_frame(websocket.OP_TEXT, text[:1], fin=False)]
        frames += [RawClient.masked_frame(websocket.OP_CONTINUATION, b"", fin=False)] * 900
        frames += [RawClient.masked_frame(websocket.OP_CONTINUATION, text[1:])]
        await raw.stream.send_all(b"".join(frames))
        assert await raw.receive_json() == {"type": "pong", "id": 7}
        await raw.stream.aclose()
