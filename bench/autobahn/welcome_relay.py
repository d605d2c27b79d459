"""A TCP relay in front of a real worker's ``/ws`` that removes the ``welcome`` frame.

Autobahn compares every message a server sends with the ones a case expects, and a worker's
first frame is always its ``welcome``: unexpected in every case. The relay drops that one frame
(the first after the ``101`` answer) and passes every other byte through unchanged, both ways,
end of stream included, so what Autobahn judges is the worker's own framing, budgets and close
handshake.

    python bench/autobahn/welcome_relay.py LISTEN_PORT WORKER_PORT
"""

from __future__ import annotations

import struct
import sys
from functools import partial

import trio

HEAD_END = b"\r\n\r\n"


class _Reader:
    """Reads exact amounts from a stream, keeping what came early."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def fill(self, count: int) -> bool:
        while len(self.buffer) < count:
            chunk = await self.stream.receive_some()
            if not chunk:
                return False
            self.buffer += chunk
        return True

    async def until(self, marker: bytes) -> bool:
        while marker not in self.buffer:
            chunk = await self.stream.receive_some()
            if not chunk:
                return False
            self.buffer += chunk
        return True


async def _server_to_client(server: trio.SocketStream, client: trio.SocketStream) -> None:
    reader = _Reader(server)
    if await reader.until(HEAD_END):
        head, _, reader.buffer = reader.buffer.partition(HEAD_END)
        await client.send_all(head + HEAD_END)
        if head.startswith(b"HTTP/1.1 101 ") and await reader.fill(2):
            length = reader.buffer[1] & 0x7F
            header_size = {126: 4, 127: 10}.get(length, 2)
            if await reader.fill(header_size):
                if length == 126:
                    (length,) = struct.unpack_from("!H", reader.buffer, 2)
                elif length == 127:
                    (length,) = struct.unpack_from("!Q", reader.buffer, 2)
                if await reader.fill(header_size + length):
                    reader.buffer = reader.buffer[header_size + length :]  # the welcome
    await _copy(reader.buffer, server, client)


async def _copy(first: bytes, source: trio.SocketStream, target: trio.SocketStream) -> None:
    try:
        if first:
            await target.send_all(first)
        while data := await source.receive_some():
            await target.send_all(data)
        await target.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _relay(worker_port: int, client: trio.SocketStream) -> None:
    async with client:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", worker_port)
        except OSError:
            return
        async with server, trio.open_nursery() as nursery:
            nursery.start_soon(_copy, b"", client, server)
            nursery.start_soon(_server_to_client, server, client)


def main() -> None:
    listen_port, worker_port = int(sys.argv[1]), int(sys.argv[2])
    trio.run(partial(trio.serve_tcp, partial(_relay, worker_port), listen_port, host="127.0.0.1"))


if __name__ == "__main__":
    main()
