"""What clients that stop reading cost a worker: its resident memory through a burst.

`trio-fanout run --workers 1`; CLIENTS clients join one room, complete their handshake and
never read again (a small receive buffer, so their sockets fill after a few KiB), and one more
client in the room reads everything. A SyncEmitter then publishes one burst of MESSAGES messages
of SIZE bytes, unpaced. Not part of the test suite; run it by hand:

    python bench/slow_clients.py                      # the defaults of Config
    python bench/slow_clients.py --max-queued-bytes 1048576

It prints one JSON line: the worker's RSS before the burst and its peak (VmHWM) after, how many
stalled clients were cut, and how many of the burst's messages the reading client received
(all, unless the burst cut it too: see "Slow clients" in docs/protocol.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trio_fanout import SyncEmitter

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
JOIN = json.dumps({"type": "join", "room": "burst"}).encode()


def open_member(port: int, receive_buffer: int | None) -> socket.socket:
    """A client that has joined the room and read its replies, nothing more."""
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(UPGRADE)
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(JOIN))
    sock.sendall(bytes((0x81, 0x80 | len(JOIN))) + mask + masked)
    received = b""
    while b'"joined"' not in received:  # the 101, the welcome, then joined
        received += sock.recv(4096)
    return sock


def count_messages(sock: socket.socket, expected: int, result: dict) -> None:
    """Read frames until ``expected`` text frames or a close; record how many arrived."""
    buffer = bytearray()
    count = 0
    while count < expected:
        try:
            chunk = sock.recv(1 << 20)
        except OSError:
            break
        if not chunk:
            break
        buffer += chunk
        position = 0
        while len(buffer) - position >= 4:
            opcode, length, header = buffer[position] & 0x0F, buffer[position + 1] & 0x7F, 2
            if length == 126:
                (length,) = struct.unpack_from("!H", buffer, position + 2)
                header = 4
            elif length == 127:
                if len(buffer) - position < 10:
                    break
                (length,) = struct.unpack_from("!Q", buffer, position + 2)
                header = 10
            if len(buffer) - position < header + length:
                break
            if opcode == 0x8:
                result["reader_closed"] = True
                count = expected + 1
                break
            count += 1
            position += header + length
        del buffer[:position]
    result["reader_received"] = min(count, expected)


def vm(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=65_000)
    parser.add_argument("--max-queued-bytes", type=int)
    args = parser.parse_args()
    env = dict(os.environ)
    if args.max_queued_bytes is not None:
        env["TRIO_FANOUT_MAX_QUEUED_BYTES"] = str(args.max_queued_bytes)
    command = [sys.executable, "-m", "trio_fanout", "run", "--workers", "1", "--port", "0"]
    # At debug, each client cut has a line of its own ("is too slow"); at info only a count.
    command += ["--proxy-port", "0", "--heartbeat-interval", "0", "--log-level", "debug"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    assert server.stderr is not None
    log: list[str] = []
    port = backplane = None
    for line in server.stderr:
        log.append(line)
        if match := re.search(r"listening on ws://[\d.]+:(\d+)/ws .* backplane (\S+)", line):
            port, backplane = int(match.group(1)), match.group(2)
        if "serving" in line:
            break
    threading.Thread(target=lambda: log.extend(server.stderr), daemon=True).start()  # type: ignore[arg-type]
    assert port is not None and backplane is not None
    try:
        health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz"))
        pid = health["pid"]
        stalled = [open_member(port, 4096) for _ in range(args.clients)]
        reader = open_member(port, None)
        result: dict = {"reader_closed": False}
        reading = threading.Thread(target=count_messages, args=(reader, args.messages, result))
        reading.start()
        time.sleep(0.5)
        rss_before = vm(pid, "VmRSS")
        with SyncEmitter(backplane) as emitter:
            payload = "x" * args.size
            for number in range(args.messages):
                emitter.publish("burst", [number, payload])
        reading.join(60)
        time.sleep(1)
        health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz"))
        print(
            json.dumps(
                {
                    "clients": args.clients,
                    "messages": args.messages,
                    "size": args.size,
                    "max_queued_bytes": args.max_queued_bytes,
                    "rss_before_mb": round(rss_before / 1e6, 1),
                    "rss_peak_mb": round(vm(pid, "VmHWM") / 1e6, 1),
                    "rss_after_mb": round(vm(pid, "VmRSS") / 1e6, 1),
                    "stalled_cut": sum("is too slow" in line for line in log),
                    "connections_left": health["connections"],
                    **result,
                }
            )
        )
        for sock in [*stalled, reader]:
            sock.close()
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
