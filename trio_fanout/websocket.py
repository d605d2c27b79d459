"""The server side of RFC 6455, sans I/O: the HTTP request head, the handshake reply, and frames.

We own this layer rather than use trio-websocket on the server because the send path of a
fan-out server must write one pre-encoded frame to many sockets with one system call each, and
because the protocol asks for things a generic server does not do: ``/healthz`` and 404/426 on
the WebSocket port, a ``too_large`` error frame before closing 1009, and invalid UTF-8 answered
with an error frame rather than a closed connection. Everything here is pure: bytes in, values or
bytes out, so the tests drive it without sockets (see docs/architecture.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
import urllib.parse
from collections.abc import Sequence

import attrs

# The largest HTTP request head we read before answering 431; browsers send well under 2 KiB.
MAX_REQUEST_HEAD_BYTES = 8192

# The first byte of a TLS ClientHello (a handshake record, RFC 8446 section 5.1): a client
# that speaks wss:// to this plain port.
TLS_HANDSHAKE_RECORD = b"\x16"

# A token (RFC 9110 section 5.6.2): what methods and header names are made of.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# The request line (RFC 9112 section 3): method SP request-target SP HTTP-version.
_REQUEST_LINE = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^\x00-\x20\x7f]+) (HTTP/[0-9]\.[0-9])"
)
# The end of a line, and of a head (an empty line); a bare LF counts (RFC 9112 section 2.2).
_LINE_END = re.compile(rb"\r?\n")
_HEAD_END = re.compile(rb"\n\r?\n")
# Control characters no request head may hold (HT, CR and LF have their places in it).
_FORBIDDEN_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# Fragments one message may arrive in; browsers send one, libraries a few.
MAX_FRAGMENTS = 1024

_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DATA_OPCODES = (OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

# Close codes we send (RFC 6455 section 7.4.1 and the IANA registry).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013


class HandshakeError(Exception):
    """The request head is not HTTP/1.1 we can answer; ``status`` is the reply to send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NotHTTP(HandshakeError):
    """The peer speaks another protocol that could not read an HTTP answer (TLS): close the
    connection without one. A TLS client then reports a failed handshake at once, which is
    what it would make of a plain-text 400 too, and nothing is sent that it would misparse."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class ProtocolViolation(Exception):
    """The peer broke RFC 6455; the connection must be closed with ``close_code``."""

    def __init__(self, message: str, close_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


class MessageTooBig(ProtocolViolation):
    """A message larger than the configured limit is arriving (its payload is not buffered)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"a message is larger than {limit} bytes", CLOSE_TOO_BIG)


@attrs.frozen
class Request:
    """An HTTP request head; header names are lower case."""

    method: str
    target: str
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    @property
    def params(self) -> dict[str, str]:
        """The query string's parameters (the last value of a repeated one)."""
        return dict(urllib.parse.parse_qsl(self.query))

    def wants_websocket(self) -> bool:
        connection = {
            token.strip() for token in self.headers.get("connection", "").lower().split(",")
        }
        return "upgrade" in connection and self.headers.get("upgrade", "").lower() == "websocket"


def find_request_head_end(buffer: bytes | bytearray, searched: int = 0) -> int:
    """Index just past the empty line that ends the head, or -1 if it has not fully arrived.

    ``searched`` is how many bytes of ``buffer`` an earlier call already searched (the
    buffer's length then): the search resumes just before them, so that a head arriving byte
    by byte costs linear time, not quadratic. A bare LF ends a line as CRLF does (RFC 9112
    section 2.2 allows it, and h11 does it too), so ``\n\n`` ends a head.
    """
    found = _HEAD_END.search(buffer, max(0, searched - 2))
    if found is None:
        # Up to three bytes of the terminator may already be here without being found.
        if len(buffer) > MAX_REQUEST_HEAD_BYTES + 3:
            raise HandshakeError(431, "request head too large")
        return -1
    if found.end() > MAX_REQUEST_HEAD_BYTES + 4:
        raise HandshakeError(431, "request head too large")
    return found.end()


def parse_request_head(head: bytes) -> Request:
    """Parse the bytes up to and including the empty line that ends an HTTP/1.1 request head.

    Lines may end in CRLF or a bare LF; a CR anywhere else is refused (RFC 9112 section 2.2),
    as are control characters and header names that are not tokens.
    """
    if _FORBIDDEN_BYTE.search(head):
        raise HandshakeError(400, "a control character in the request head")
    request_line, *header_lines = _LINE_END.split(head)[:-2]
    method, target = _parse_request_line(request_line)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, value = _split_header_line(line)
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(method, target, headers)


def _split_header_line(line: bytes | bytearray) -> tuple[bytes | bytearray, bytes | bytearray]:
    """The name and the raw value of a header line (its line ending removed)."""
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name) or b"\r" in value:
        raise HandshakeError(400, "malformed header line")
    return name, value


def _parse_request_line(line: bytes | bytearray) -> tuple[str, str]:
    """The method and target of a complete request line (its line ending removed)."""
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise HandshakeError(400, "malformed request line")
    method, target, version = match.groups()
    if not version.startswith(b"HTTP/1."):
        raise HandshakeError(400, f"unsupported HTTP version {version.decode('ascii')!r}")
    return method.decode("ascii"), target.decode("latin-1")


class RequestHeadReader:
    """Gathers a request head as its bytes arrive, and refuses it as soon as they cannot begin a
    valid HTTP/1.1 request, rather than when the head is complete (or the handshake times out).

    Refusals are :class:`HandshakeError` (answer with its status) or :class:`NotHTTP` (answer
    nothing, just close). What is checked as the bytes come: a TLS ClientHello as the first byte,
    control characters, a method that is not a token, and each line once it is complete. Each
    byte is looked at a bounded number of times, however the head is split.
    """

    __slots__ = ("_buffer", "_line_start", "_method_checked")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._line_start = 0  # where the line not yet complete begins
        self._method_checked = False

    def feed(self, data: bytes) -> tuple[Request, bytes] | None:
        """Add the bytes that arrived; once the head is complete, return the request and the
        bytes that came after it (the client's first WebSocket frames, if it did not wait)."""
        buffer = self._buffer
        searched = len(buffer)
        buffer += data
        if buffer[:1] == TLS_HANDSHAKE_RECORD:
            raise NotHTTP("a TLS handshake on the plain (ws://) port")
        end = find_request_head_end(buffer, searched)
        head_so_far = len(buffer) if end < 0 else end
        if _FORBIDDEN_BYTE.search(buffer, searched, head_so_far):
            raise HandshakeError(400, "a control character in the request head")
        self._check_lines(searched, head_so_far)
        if end < 0:
            return None
        return parse_request_head(bytes(buffer[:end])), bytes(buffer[end:])

    def _check_lines(self, searched: int, head_so_far: int) -> None:
        """Check the lines completed by the bytes from ``searched`` on, and while the request
        line is not complete, that it starts with a method."""
        buffer = self._buffer
        while (line_end := buffer.find(b"\n", searched, head_so_far)) >= 0:
            line = buffer[self._line_start : line_end]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._line_start == 0:
                _parse_request_line(line)
            elif line:  # not the empty line that ends the head
                _split_header_line(line)
            self._line_start = searched = line_end + 1
        if self._line_start or self._method_checked:
            return
        space = buffer.find(b" ", searched, head_so_far)
        method_part = buffer[searched : head_so_far if space < 0 else space]
        if space == 0 or (method_part and not _TOKEN.fullmatch(method_part)):
            raise HandshakeError(400, "malformed request line: it does not start with a method")
        self._method_checked = space > 0


def accept_key(client_key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1(client_key.encode("ascii") + _WEBSOCKET_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def websocket_accept_response(request: Request) -> bytes:
    """The 101 reply to a valid upgrade request, or :class:`HandshakeError` saying why not."""
    if request.method != "GET":
        raise HandshakeError(405, "a WebSocket handshake is a GET")
    if not request.wants_websocket():
        raise HandshakeError(426, "this endpoint speaks WebSocket only")
    if request.headers.get("sec-websocket-version") != "13":
        raise HandshakeError(426, "WebSocket version 13 is required")
    key = request.headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HandshakeError(400, "missing or malformed Sec-WebSocket-Key") from None
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
        "\r\n"
    ).encode("ascii")


_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def http_response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A complete HTTP/1.1 response after which the server closes the connection; ``headers``
    are added to the usual ones."""
    if status == 426:
        headers = [*headers, ("Upgrade", "websocket")]
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii") + body


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame as a server sends it: the same bytes suit every recipient."""
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        header = bytes((first, length))
    elif length < 65536:
        header = struct.pack("!BBH", first, 126, length)
    else:
        header = struct.pack("!BBQ", first, 127, length)
    return header + payload


def encode_text_frame(payload: bytes) -> bytes:
    return encode_frame(OP_TEXT, payload)


def encode_close_frame(code: int, reason: str = "") -> bytes:
    # A close frame's payload is at most 125 bytes, two of which carry the code; the reason is
    # cut on a character boundary, since a reason that is not UTF-8 fails the connection.
    encoded = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, struct.pack("!H", code) + encoded)


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask``, as one big-integer operation (fast in CPython)."""
    length = len(payload)
    if not length:
        return b""
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        length, "little"
    )


@attrs.frozen
class Message:
    """A complete data message: ``is_text`` false means it came in binary frames."""

    is_text: bool
    payload: bytes


@attrs.frozen
class Ping:
    payload: bytes


@attrs.frozen
class Close:
    """The peer's close frame; ``code`` is None when it carried none."""

    code: int | None
    reason: str


Event = Message | Ping | Close


class FrameParser:
    """Turns bytes from a client into :class:`Message`, :class:`Ping` and :class:`Close` events.

    Pongs are consumed silently. Text payloads are *not* checked for UTF-8 here: the protocol
    answers invalid UTF-8 with an error frame, which the caller does when it decodes.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragments_size = 0
        self._fragmented_is_text: bool | None = None
        self._failure: ProtocolViolation | None = None

    @property
    def failed(self) -> bool:
        """Whether the peer broke the protocol; the next :meth:`feed` raises the violation."""
        return self._failure is not None

    def feed(self, data: bytes) -> list[Event]:
        """Add received bytes; return every event they complete, in order.

        Raises :class:`ProtocolViolation` (or :class:`MessageTooBig`) on bad input. When frames
        completed in this same call precede the bad one, they are returned first and the
        violation is raised by the next call (see :attr:`failed`): nothing valid is lost.
        """
        if self._failure is not None:
            raise self._failure
        self._buffer += data
        events: list[Event] = []
        try:
            while (frame := self._take_frame()) is not None:
                event = self._frame_event(*frame)
                if event is not None:
                    events.append(event)
        except ProtocolViolation as violation:
            self._failure = violation
            if not events:
                raise
        return events

    def _take_frame(self) -> tuple[bool, int, bytes] | None:
        """Remove one whole frame from the buffer: ``(fin, opcode, payload)``, or None if it has
        not fully arrived."""
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        fin = bool(first & 0x80)
        opcode = first & 0x0F
        if first & 0x70:
            raise ProtocolViolation("reserved bits set without a negotiated extension")
        if not second & 0x80:
            raise ProtocolViolation("a client frame must be masked")
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            (length,) = struct.unpack_from("!H", buffer, 2)
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buffer, 2)
            offset = 10
        if opcode in _CONTROL_OPCODES:
            if not fin or length > 125:
                raise ProtocolViolation("a control frame must be final and at most 125 bytes")
        elif opcode in _DATA_OPCODES:
            if self._fragmented_is_text is not None:
                raise ProtocolViolation("a new message started inside a fragmented one")
        elif opcode == OP_CONTINUATION:
            if self._fragmented_is_text is None:
                raise ProtocolViolation("a continuation frame with no message to continue")
        else:
            raise ProtocolViolation(f"unknown opcode {opcode:#x}")
        is_data = opcode not in _CONTROL_OPCODES
        if is_data and self._fragments_size + length > self.max_message_bytes:
            raise MessageTooBig(self.max_message_bytes)
        end = offset + 4 + length
        if len(buffer) < end:
            return None
        payload = unmask(bytes(buffer[offset + 4 : end]), bytes(buffer[offset : offset + 4]))
        del buffer[:end]
        return fin, opcode, payload

    def _frame_event(self, fin: bool, opcode: int, payload: bytes) -> Event | None:
        if opcode == OP_PING:
            return Ping(payload)
        if opcode == OP_PONG:
            return None
        if opcode == OP_CLOSE:
            return _parse_close(payload)
        if opcode != OP_CONTINUATION:
            self._fragmented_is_text = opcode == OP_TEXT
        if len(self._fragments) >= MAX_FRAGMENTS:
            # Empty fragments add nothing to the size limit, but each costs memory.
            raise ProtocolViolation("too many fragments in one message", CLOSE_POLICY_VIOLATION)
        self._fragments.append(payload)
        self._fragments_size += len(payload)
        if not fin:
            return None
        is_text = bool(self._fragmented_is_text)
        message = self._fragments[0] if len(self._fragments) == 1 else b"".join(self._fragments)
        self._fragments = []
        self._fragments_size = 0
        self._fragmented_is_text = None
        return Message(is_text, message)


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(None, "")
    if len(payload) == 1:
        raise ProtocolViolation("a close frame payload of one byte")
    (code,) = struct.unpack_from("!H", payload)
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        raise ProtocolViolation(f"close code {code} may not be sent in a close frame")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("a close reason that is not UTF-8", 1007) from None
    return Close(code, reason)
