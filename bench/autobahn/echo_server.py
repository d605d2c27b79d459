"""An echo endpoint for the Autobahn|Testsuite, made of the server's own codec and send path.

A bench fixture, not a product feature. It runs an ordinary :class:`~trio_fanout.Worker` whose
connections are :class:`EchoConnection`: the real ``Connection`` with its reader (the
``FrameParser``, the frame and byte budgets, the close handshake) and its send path, except that a
message within the budget goes back as it came, text or binary, instead of being read as a JSON
request, and that no JSON frame (``welcome``, errors) is sent: Autobahn expects nothing but its
echoes. The worker makes its connections from the name ``Connection`` in ``trio_fanout.worker``;
this process points that name at the subclass, so the package needs no hook for a fixture.

    python bench/autobahn/echo_server.py PORT

Its limits are raised for the suite: section 9 sends messages of 16 MiB, and 4 MiB messages in
fragments of 64 bytes (65,536 frames), far past what a chat client may do.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from trio_fanout import Config, connection, websocket, worker
from trio_fanout.runner import open_listener, run_worker_process

ECHO_CONFIG = {
    "max_frame_bytes": 16 * 1024 * 1024,  # Autobahn's largest message (cases 9.1.6, 9.2.6)
    "rate_limit_per_second": 10_000_000.0,
    "rate_limit_burst": 10_000_000,
    "rate_limit_bytes_per_second": 1024.0**3,
    "rate_limit_bytes_burst": 1024**3,
    "heartbeat_interval": 0.0,
    "log_level": "warning",
}


class EchoConnection(connection.Connection):
    """A connection that echoes each message and says nothing else."""

    __slots__ = ()

    async def _handle_message(self, message: websocket.Message) -> None:
        opcode = websocket.OP_TEXT if message.is_text else websocket.OP_BINARY
        self.send_encoded(websocket.encode_frame(opcode, message.payload))

    def reply(self, frame: bytes) -> None:
        """Send no JSON frame, since Autobahn would count a ``welcome`` as a message it did not
        expect; but write what is pending, as a reply would (the ``101`` answer waits there)."""
        self.flush()


def main() -> None:
    port = int(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, format="echo: %(levelname)s %(name)s: %(message)s")
    worker.Connection = EchoConnection
    config = Config(backplane=f"memory://autobahn-echo-{port}", port=port, **ECHO_CONFIG)
    listener = open_listener("127.0.0.1", port)
    trio.run(run_worker_process, config, listener)


if __name__ == "__main__":
    main()
