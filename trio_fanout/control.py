"""The control channel between the master and each worker: what goes over it, as bytes.

The master sends :data:`PING` (the liveness ping, one byte, which the worker sends back as it
is) or a request: one byte, :data:`REPORT` (the worker's figures, for ``/metrics`` and
``/status``), :data:`INFO` (its rooms, for ``/api/info``) or :data:`RELOAD` (load the TLS
certificate again, and say whether it did), then a 4-byte big-endian request id. The worker
answers a request with the same byte, the same id, a 4-byte big-endian length and that many
bytes of JSON (an empty body while it is still starting). Any answer counts as a sign of life.
Pure: bytes in, requests and answers out; the master and the worker do the I/O.

Why an id and not the kind alone: a question the master has given up on (the worker was slow)
is still answered later, and that late answer must not pass for the answer to the next
question of the same kind.

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

_REQUEST_ID = struct.Struct("!I")
_ANSWER_HEAD = struct.Struct("!II")  # the request id, the body's length
# Ids go round past this; one outstanding question at a time makes a repeat harmless.
REQUEST_ID_LIMIT = 2**32

# An answer larger than this is taken as a broken channel, not buffered: a report is a few KiB,
# an info lists at most metrics.INFO_ROOMS_LIMIT rooms of at most 200 characters.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class ChannelBroken(Exception):
    """The peer sent bytes that mean nothing here: the channel cannot be trusted any more."""


def encode_request(kind: bytes, request_id: int) -> bytes:
    """The master's request ``kind``, to be answered with ``request_id``."""
    return kind + _REQUEST_ID.pack(request_id)


def encode_answer(kind: bytes, request_id: int, body: bytes) -> bytes:
    """A worker's answer to request ``kind`` number ``request_id``."""
    return kind + _ANSWER_HEAD.pack(request_id, len(body)) + body


class RequestReader:
    """Splits what the master sends into ``(PING, 0)`` and ``(kind, request_id)``."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        self._buffer += data
        requests: list[tuple[bytes, int]] = []
        buffer = self._buffer
        while buffer:
            kind = bytes(buffer[:1])
            if kind == PING:
                del buffer[:1]
                requests.append((PING, 0))
                continue
            if kind not in REQUESTS:
                raise ChannelBroken(f"unexpected byte {kind!r} on the control channel")
            end = 1 + _REQUEST_ID.size
            if len(buffer) < end:
                break
            (request_id,) = _REQUEST_ID.unpack_from(buffer, 1)
            requests.append((kind, request_id))
            del buffer[:end]
        return requests


class AnswerReader:
    """Splits what a worker sends into answers: ``(PING, 0, b"")`` or
    ``(kind, request_id, body)``."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, int, bytes]]:
        self._buffer += data
        answers: list[tuple[bytes, int, bytes]] = []
        buffer = self._buffer
        while buffer:
            kind = bytes(buffer[:1])
            if kind == PING:
                del buffer[:1]
                answers.append((PING, 0, b""))
                continue
            if kind not in REQUESTS:
                raise ChannelBroken(f"unexpected byte {kind!r} on the control channel")
            if len(buffer) < 1 + _ANSWER_HEAD.size:
                break
            request_id, length = _ANSWER_HEAD.unpack_from(buffer, 1)
            if length > MAX_ANSWER_BYTES:
                raise ChannelBroken(f"an answer of {length} bytes on the control channel")
            start = 1 + _ANSWER_HEAD.size
            if len(buffer) < start + length:
                break
            answers.append((kind, request_id, bytes(buffer[start : start + length])))
            del buffer[: start + length]
        return answers
