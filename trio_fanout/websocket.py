"""The server side of RFC 6455, sans I/O: the HTTP request head, the handshake reply, and frames.

We own this layer rather than use trio-websocket on the server because the send path of a
fan-out server must write one pre-encoded frame to many sockets with one system call each, and
because the protocol asks for things a generic server does not do: ``/healthz`` and 404/426 on
the WebSocket port, a ``too_large`` error frame before closing 1009, and every client frame
reported so that it can be charged against a budget. Everything here is pure: bytes in, values
or bytes out, so the tests drive it without sockets (see docs/architecture.md).
"""

from __future__ import annotations

import base64
import binascii
import codecs
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
CLOSE_INVALID_DATA = 1007
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

    def param_values(self, name: str) -> list[str]:
        """Every non-empty value of the query string's parameter ``name``, in order."""
        return [value for key, value in urllib.parse.parse_qsl(self.query) if key == name]

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
        # 400, not 405: the protocol promises 426 or 400 to any plain HTTP request on /ws.
        raise HandshakeError(400, "a WebSocket handshake is a GET")
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
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
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


def unmask(payload: bytes | bytearray, mask: bytes) -> bytes:
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
    """A complete data message: ``is_text`` false means it came in binary frames. The payload of
    a text message is valid UTF-8."""

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


@attrs.frozen
class Unanswered:
    """Frames that call for no answer: pongs, and the fragments of a message before its last.

    They are reported, a run of them as one event, so that the caller can charge every frame a
    client sends against its budget. ``payload_bytes`` counts the pongs' payloads; a fragment's
    bytes are counted in its :class:`Message`.
    """

    frames: int
    payload_bytes: int


Event = Message | Ping | Close | Unanswered

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


class _Utf8Validator:
    """Checks a text message's UTF-8 piece by piece, failing at the first byte that no valid
    text can continue.

    CPython's incremental decoder fails that early on every invalid sequence but one: the first
    two bytes of an encoded surrogate (ED A0 to ED BF), which it keeps pending until the third
    byte arrives. That case is checked here.
    """

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = _Utf8Decoder()

    def feed(self, data: bytes) -> None:
        try:
            self._decoder.decode(data)
        except UnicodeDecodeError:
            raise _invalid_utf8() from None
        pending = self._decoder.getstate()[0]
        if len(pending) == 2 and pending[0] == 0xED and pending[1] >= 0xA0:
            raise _invalid_utf8()

    def finish(self) -> None:
        """The message ended: a code point cut short at its end is invalid too."""
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _invalid_utf8() from None


def _invalid_utf8() -> ProtocolViolation:
    return ProtocolViolation("a text message that is not valid UTF-8", CLOSE_INVALID_DATA)


class FrameParser:
    """Turns bytes from a client into events: :class:`Message`, :class:`Ping`, :class:`Close`,
    and :class:`Unanswered` for pongs and fragments.

    A data frame's payload is consumed as it arrives: unmasked (the mask's phase carried from
    one read to the next), checked for UTF-8 if the message is text, and appended to the message
    being assembled. So invalid UTF-8 fails the connection (1007, RFC 6455 section 8.1) as soon
    as its bytes arrive, not when the message is complete. A message's fragments go into one
    growing buffer, whose size ``max_message_bytes`` bounds; how many fragments a client may
    send is its frame budget's business (``connection.RateLimiter``), not the parser's.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        # The frame whose header has been read and whose payload is still (partly) to come.
        self._in_frame = False
        self._fin = False
        self._opcode = 0
        self._mask = b""  # rotated as payload is consumed, so it always starts at phase 0
        self._remaining = 0
        # The data message being assembled, if one has begun.
        self._message_is_text: bool | None = None
        self._message = bytearray()
        # A message that came whole in one frame and one read, the common case: never copied.
        self._whole: bytes | None = None
        self._utf8: _Utf8Validator | None = None
        # Unanswered frames since the last event, reported before the next one.
        self._quiet_frames = 0
        self._quiet_bytes = 0
        self._failure: ProtocolViolation | None = None

    @property
    def failed(self) -> bool:
        """Whether the peer broke the protocol; the next :meth:`feed` raises the violation."""
        return self._failure is not None

    def feed(self, data: bytes) -> list[Event]:
        """Add received bytes; return every event they complete, in order.

        Raises :class:`ProtocolViolation` (or :class:`MessageTooBig`) on bad input. When events
        completed in this same call precede the bad frame, they are returned first and the
        violation is raised by the next call (see :attr:`failed`): nothing valid is lost.
        """
        if self._failure is not None:
            raise self._failure
        # Bytes left from the previous read are joined to these; without any (the usual case),
        # the frames are read from ``data`` itself and only its unread end is kept.
        buffer: bytes | bytearray
        if self._buffer:
            buffer = self._buffer
            buffer += data
        else:
            buffer = data
        events: list[Event] = []
        event: Event | None
        position = 0
        try:
            while True:
                if not self._in_frame:
                    if len(buffer) - position < 2:
                        break
                    position = self._read_header(buffer, position)
                    if not self._in_frame:
                        break
                if self._opcode >= OP_CLOSE:
                    end = position + self._remaining
                    if len(buffer) < end:
                        break  # a control frame is at most 125 bytes: wait for all of it
                    payload = unmask(buffer[position:end], self._mask)
                    position = end
                    self._in_frame = False
                    event = self._control_event(payload)
                else:
                    take = min(len(buffer) - position, self._remaining)
                    if take:
                        payload = unmask(buffer[position : position + take], self._mask)
                        position += take
                        self._consume_data(payload)
                    if self._remaining:
                        break
                    self._in_frame = False
                    event = self._end_data_frame()
                if event is not None:
                    self._report_quiet(events)
                    events.append(event)
        except ProtocolViolation as violation:
            self._failure = violation
            if not events and not self._quiet_frames:
                raise
        finally:
            if buffer is self._buffer:
                del self._buffer[:position]
            else:
                self._buffer += buffer[position:]
        self._report_quiet(events)
        return events

    def _read_header(self, buffer: bytes | bytearray, position: int) -> int:
        """Read the header at ``position`` if it has fully arrived (then ``_in_frame`` is set);
        return the position after it. Violations are raised from the header alone."""
        available = len(buffer) - position
        if available < 2:
            return position
        first, second = buffer[position], buffer[position + 1]
        fin = bool(first & 0x80)
        opcode = first & 0x0F
        if first & 0x70:
            raise ProtocolViolation("reserved bits set without a negotiated extension")
        if not second & 0x80:
            raise ProtocolViolation("a client frame must be masked")
        length = second & 0x7F
        header_size = 6
        if length == 126:
            if available < 4:
                return position
            (length,) = struct.unpack_from("!H", buffer, position + 2)
            header_size = 8
        elif length == 127:
            if available < 10:
                return position
            (length,) = struct.unpack_from("!Q", buffer, position + 2)
            header_size = 14
        if opcode in _CONTROL_OPCODES:
            if not fin or length > 125:
                raise ProtocolViolation("a control frame must be final and at most 125 bytes")
        elif opcode in _DATA_OPCODES:
            if self._message_is_text is not None:
                raise ProtocolViolation("a new message started inside a fragmented one")
        elif opcode == OP_CONTINUATION:
            if self._message_is_text is None:
                raise ProtocolViolation("a continuation frame with no message to continue")
        else:
            raise ProtocolViolation(f"unknown opcode {opcode:#x}")
        if opcode < OP_CLOSE and len(self._message) + length > self.max_message_bytes:
            raise MessageTooBig(self.max_message_bytes)
        if available < header_size:
            return position
        self._in_frame = True
        self._fin = fin
        self._opcode = opcode
        self._mask = bytes(buffer[position + header_size - 4 : position + header_size])
        self._remaining = length
        if opcode in _DATA_OPCODES:
            self._message_is_text = opcode == OP_TEXT
        return position + header_size

    def _consume_data(self, payload: bytes) -> None:
        """Take the next piece of a data frame's payload, already unmasked."""
        self._remaining -= len(payload)
        if not self._remaining and self._fin and not self._message:
            if self._message_is_text and not payload.isascii():
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise _invalid_utf8() from None
            self._whole = payload
            return
        if self._remaining:
            shift = len(payload) % 4
            self._mask = self._mask[shift:] + self._mask[:shift]
        if self._message_is_text:
            if self._utf8 is None:
                self._utf8 = _Utf8Validator()
            self._utf8.feed(payload)
        self._message += payload

    def _end_data_frame(self) -> Message | None:
        if not self._fin:
            self._quiet_frames += 1
            return None
        if self._utf8 is not None:
            self._utf8.finish()
            self._utf8 = None
        if self._whole is not None:
            message = Message(bool(self._message_is_text), self._whole)
            self._whole = None
        else:
            message = Message(bool(self._message_is_text), bytes(self._message))
            self._message = bytearray()
        self._message_is_text = None
        return message

    def _control_event(self, payload: bytes) -> Ping | Close | None:
        if self._opcode == OP_PING:
            return Ping(payload)
        if self._opcode == OP_PONG:
            self._quiet_frames += 1
            self._quiet_bytes += len(payload)
            return None
        return _parse_close(payload)

    def _report_quiet(self, events: list[Event]) -> None:
        if self._quiet_frames:
            events.append(Unanswered(self._quiet_frames, self._quiet_bytes))
            self._quiet_frames = 0
            self._quiet_bytes = 0


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
        raise ProtocolViolation("a close reason that is not UTF-8", CLOSE_INVALID_DATA) from None
    return Close(code, reason)
