"""What a flood of frames costs the other clients of a worker, and how fast it is cut.

    python bench/flood_bench.py [--flooders 4] [--seconds 10]

It starts one `trio-fanout worker` (default limits, memory backplane) and a well-behaved client
that publishes to a room it is in and times each round trip, first alone (the baseline), then
while flooder processes send one kind of flood at full speed over raw sockets: empty pongs,
125-byte pongs, empty fragments of a message that never ends, or pings. For each kind it prints
how long the worker took to close each flooder (1008), and the round trips' median and maximum
during the flood. A flooder stops after ``--seconds`` if it was never closed ("never" in the
table). Flooders and the timing client run in processes of their own, not in the worker's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trio_fanout.client import open_client

CHUNK_BYTES = 65536
BASELINE_SECONDS = 2.0
HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    header = bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload)))  # payloads < 126 bytes
    return header + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def repeated(frame: bytes) -> bytes:
    return frame * (CHUNK_BYTES // len(frame))


FLOODS = {
    "empty pongs": (b"", repeated(masked_frame(0xA, b""))),
    "125-byte pongs": (b"", repeated(masked_frame(0xA, b"x" * 125))),
    "empty fragments": (
        masked_frame(0x1, b'{"type":', fin=False),
        repeated(masked_frame(0x0, b"", fin=False)),
    ),
    "pings": (b"", repeated(masked_frame(0x9, b"are you there"))),
}


def close_code_in(stream: bytearray) -> int | None:
    """Consume whole server frames from ``stream``; the close code if a close frame came."""
    while len(stream) >= 2:
        length, offset = stream[1] & 0x7F, 2
        if length == 126:
            if len(stream) < 4:
                return None
            (length,), offset = struct.unpack_from("!H", stream, 2), 4
        elif length == 127:
            if len(stream) < 10:
                return None
            (length,), offset = struct.unpack_from("!Q", stream, 2), 10
        if len(stream) < offset + length:
            return None
        opcode, payload = stream[0] & 0x0F, bytes(stream[offset : offset + length])
        del stream[: offset + length]
        if opcode == 0x8:
            return int(struct.unpack("!H", payload[:2])[0]) if payload else 1005
    return None


def flood(
    port: int, kind: str, seconds: float, results: multiprocessing.Queue[tuple[int | None, float]]
) -> None:
    """One flooder: send ``kind`` at full speed until the server closes us or time is up."""
    opening, chunk = FLOODS[kind]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(HANDSHAKE)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    stream = bytearray(received.partition(b"\r\n\r\n")[2])
    sock.sendall(opening)
    sock.setblocking(False)
    start = time.monotonic()
    code = None
    pending = memoryview(chunk)
    while code is None and time.monotonic() - start < seconds:
        try:
            sent = sock.send(pending)
            pending = pending[sent:] or memoryview(chunk)
        except BlockingIOError:
            time.sleep(0.0005)
        except OSError:
            break
        try:
            while data := sock.recv(65536):
                stream += data
                code = close_code_in(stream)
                if code is not None:
                    break
        except BlockingIOError:
            pass
        except OSError:
            break
    elapsed = time.monotonic() - start
    sock.close()
    results.put((code, elapsed))


async def round_trips(url: str, until: trio.Event) -> list[float]:
    """Publish-to-receive times of one client publishing to its own room until ``until``."""
    times = []
    async with open_client(url) as client:
        await client.join("timing")
        while not until.is_set():
            sent = trio.current_time()
            await client.publish("timing", sent)
            while (await client.receive()).get("type") != "message":
                pass
            times.append(trio.current_time() - sent)
            await trio.sleep(0.01)
    return times


async def baseline(url: str) -> list[float]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_set_after, stop, BASELINE_SECONDS)
        return await round_trips(url, stop)


async def _set_after(event: trio.Event, seconds: float) -> None:
    await trio.sleep(seconds)
    event.set()


async def during_flood(
    url: str, port: int, kind: str, flooders: int, seconds: float
) -> tuple[list[tuple[int | None, float]], list[float]]:
    """Start ``flooders`` processes flooding ``kind``; time round trips until all have ended."""
    results: multiprocessing.Queue[tuple[int | None, float]] = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=flood, args=(port, kind, seconds, results))
        for _ in range(flooders)
    ]
    for process in processes:
        process.start()
    outcomes: list[tuple[int | None, float]] = []
    done = trio.Event()

    async def collect() -> None:
        for _ in processes:
            outcomes.append(await trio.to_thread.run_sync(results.get, True, seconds + 30))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        times = await round_trips(url, done)
    for process in processes:
        process.join()
    return outcomes, times


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"no worker on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="longest flood")
    args = parser.parse_args()
    port = free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "trio_fanout", "worker", "--port", str(port),
         "--backplane", "memory://flood-bench", "--log-level", "warning"],
    )  # fmt: skip
    try:
        wait_for(port)
        url = f"ws://127.0.0.1:{port}/ws"
        alone = trio.run(baseline, url)
        print(
            f"baseline round trip: median {statistics.median(alone) * 1000:.1f} ms, "
            f"max {max(alone) * 1000:.1f} ms ({len(alone)} round trips)"
        )
        print(
            "| flood | closed 1008 after (each flooder) | round trips during it: n, median, max |"
        )
        print("|---|---|---|")
        for kind in FLOODS:
            outcomes, times = trio.run(during_flood, url, port, kind, args.flooders, args.seconds)
            cuts = ", ".join(
                f"{elapsed * 1000:.0f} ms" if code == 1008 else f"never ({code})"
                for code, elapsed in outcomes
            )
            timing = (
                f"{len(times)}, {statistics.median(times) * 1000:.1f} ms, "
                f"{max(times) * 1000:.1f} ms"
                if times
                else "none finished before the flood ended"
            )
            print(f"| {args.flooders} x {kind} | {cuts} | {timing} |")
    finally:
        worker.terminate()
        worker.wait(timeout=10)


if __name__ == "__main__":
    main()
