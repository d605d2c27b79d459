"""The control channel between the master and each worker: what goes over it, as bytes.

The master sends single bytes: :data:`PING` (the liveness ping, which the worker sends back
as it is) or a request, :data:`REPORT` (the worker's figures, for ``/metrics`` and
``/status``), :data:`INFO` (its rooms, for ``/api/info``) or :data:`RELOAD` (load the TLS
certificate again, and say whether it did). The worker answers a request with
the same byte, a 4-byte big-endian length and that many bytes of JSON (an empty body while it
is still starting). Any answer counts as a sign of life. Pure: bytes in, answers out; the
master and the worker do the I/O.

Why this channel and not prometheus-client's multiprocess mode: the master already has one
socket to each worker and already asks it something every second, while multiprocess mode
needs a directory of memory-mapped files shared by every process, cleaned after each dead
worker, and per-process metric objects on the hot paths. Here workers count with plain
integers and report only when a scrape asks (docs/operations.md).
"""

from __future__ import annotations

import struct

PING = b"?"
REPORT = b"M"
INFO = b"I"
RELOAD = b"R"  # load the TLS certificate and key again (after a SIGHUP to the master)
REQUESTS = (REPORT, INFO, RELOAD)

_LENGTH = struct.Struct("!I")

# An answer larger than this is taken as a broken channel, not buffered: a report is a few KiB,
# an info lists at most metrics.INFO_ROOMS_LIMIT rooms of at most 200 characters.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class ChannelBroken(Exception):
    """The worker sent bytes that are no answer: the channel cannot be trusted any more."""


def encode_answer(kind: bytes, body: bytes) -> bytes:
    """A worker's answer to request ``kind``."""
    return kind + _LENGTH.pack(len(body)) + body


class AnswerReader:
    """Splits what a worker sends into answers: ``(PING, b"")`` or ``(kind, body)``."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buffer += data
        answers: list[tuple[bytes, bytes]] = []
        buffer = self._buffer
        while buffer:
            kind = bytes(buffer[:1])
            if kind == PING:
                del buffer[:1]
                answers.append((PING, b""))
                continue
            if kind not in REQUESTS:
                raise ChannelBroken(f"unexpected byte {kind!r} on the control channel")
            if len(buffer) < 1 + _LENGTH.size:
                break
            (length,) = _LENGTH.unpack_from(buffer, 1)
            if length > MAX_ANSWER_BYTES:
                raise ChannelBroken(f"an answer of {length} bytes on the control channel")
            end = 1 + _LENGTH.size + length
            if len(buffer) < end:
                break
            answers.append((kind, bytes(buffer[1 + _LENGTH.size : end])))
            del buffer[:end]
        return answers
