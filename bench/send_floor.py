"""The floor under trio-fanout's cost per delivery: the least a Python process can spend to
put one frame on one client's socket. A single-threaded server with no framework at all (the
selectors module, blocking-free sockets, one ``send`` per recipient) that speaks just enough of
the protocol for loadgen.mjs's broadcast and rate sessions (join a room, publish to a room).
fanout_bench.py and cpu_floor.py run it in the same session as the systems they measure and
report their cost per delivery beside this floor's.

    python send_floor.py PORT_FILE      # writes its port to PORT_FILE; SIGTERM stops it

It prints one JSON line on exit: the CPU seconds it spent from its first publish to the end of
its last one (connecting clients is not counted), and how many frames it sent to members.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trio_fanout import protocol, websocket


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    listener.setblocking(False)
    Path(sys.argv[1]).write_text(str(listener.getsockname()[1]))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    rooms: dict[str, list[socket.socket]] = {}
    state: dict[socket.socket, tuple[bytearray, websocket.FrameParser | None]] = {}
    sent = 0
    cpu_first = cpu_last = 0.0
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    welcome = websocket.encode_text_frame(protocol.welcome_frame(1, os.getpid(), 0))
    while not stopping:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            if sock is listener:
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    continue
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                state[client] = (bytearray(), None)
                selector.register(client, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ConnectionResetError):
                continue
            if not data:
                selector.unregister(sock)
                sock.close()
                state.pop(sock, None)
                for members in rooms.values():
                    if sock in members:
                        members.remove(sock)
                continue
            buffer, parser = state[sock]
            if parser is None:
                buffer += data
                end = websocket.find_request_head_end(buffer)
                if end < 0:
                    continue
                request = websocket.parse_request_head(bytes(buffer[:end]))
                sock.send(websocket.websocket_accept_response(request) + welcome)
                parser = websocket.FrameParser(65536)
                state[sock] = (buffer, parser)
                data = bytes(buffer[end:])
            for event in parser.feed(data):
                if not isinstance(event, websocket.Message):
                    continue
                request = protocol.parse_request(event.payload)
                if isinstance(request, protocol.Join):
                    rooms.setdefault(request.room, []).append(sock)
                    joined = protocol.joined_frame(request.room, 1, "floor", 0)
                    sock.send(websocket.encode_text_frame(joined))
                elif isinstance(request, protocol.Publish):
                    if not sent:
                        cpu_first = cpu_seconds()
                    frame = websocket.encode_text_frame(
                        protocol.message_frame(request.room, request.data)
                    )
                    members = rooms.get(request.room, [])
                    for member in members:  # the measured loop: one send per recipient
                        member.send(frame)
                    sent += len(members)
                    cpu_last = cpu_seconds()
    print(json.dumps({"cpu_seconds": cpu_last - cpu_first, "deliveries": sent}))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
