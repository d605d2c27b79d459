"""The sans-IO RFC 6455 server side (trio_fanout/websocket.py), checked against wsproto.

wsproto is the independent reference: client frames come from a wsproto client connection (masked,
with random masks), and what we encode is parsed back by one. Frames that wsproto refuses to
produce (protocol violations) are built by hand with :func:`raw_frame`.
"""

from __future__ import annotations

import random
import struct

import h11
import pytest
from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    TextMessage,
)
from wsproto.events import Ping as WsPing
from wsproto.events import Pong as WsPong
from wsproto.events import Request as WsRequest

from trio_fanout import websocket
from trio_fanout.websocket import (
    MAX_REQUEST_HEAD_BYTES,
    Close,
    FrameParser,
    HandshakeError,
    Message,
    MessageTooBig,
    Ping,
    ProtocolViolation,
    Unanswered,
)

MASK = b"\x37\xfa\x21\x3d"


def raw_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    announced_length: int | None = None,
) -> bytes:
    """A client frame built by hand, independently of the code under test."""
    length = len(payload) if announced_length is None else announced_length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = bytes((first, mask_bit | length))
    elif length < 65536:
        header = bytes((first, mask_bit | 126)) + struct.pack("!H", length)
    else:
        header = bytes((first, mask_bit | 127)) + struct.pack("!Q", length)
    if not masked:
        return header + payload
    body = bytes(byte ^ MASK[i % 4] for i, byte in enumerate(payload))
    return header + MASK + body


def naive_unmask(payload: bytes, mask: bytes) -> bytes:
    return bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def client() -> Connection:
    return Connection(ConnectionType.CLIENT)


def merge_unanswered(events: list) -> list:
    """Events with each run of :class:`Unanswered` summed into one, as one big read gives them."""
    merged: list = []
    for event in events:
        if isinstance(event, Unanswered) and merged and isinstance(merged[-1], Unanswered):
            previous = merged.pop()
            event = Unanswered(
                previous.frames + event.frames, previous.payload_bytes + event.payload_bytes
            )
        merged.append(event)
    return merged


def feed_whole_and_bytewise(data: bytes, max_message_bytes: int = 1 << 20) -> list:
    """Parse ``data`` in one piece and byte by byte; both must give the same events."""
    whole = FrameParser(max_message_bytes).feed(data)
    parser = FrameParser(max_message_bytes)
    bytewise = []
    for i in range(len(data)):
        bytewise += parser.feed(data[i : i + 1])
    assert merge_unanswered(bytewise) == whole
    return whole


def receive_as_client(data: bytes) -> list:
    """The events a wsproto client sees for bytes from the server."""
    conn = client()
    conn.receive_data(data)
    return list(conn.events())


# --- handshake -------------------------------------------------------------------------------

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
# RFC 6455 section 1.3 spells it "...9kYG..." (Y, not E); wsproto agrees (see the handshake test).
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def upgrade_head(
    *,
    method: str = "GET",
    target: str = "/ws",
    extra: str = "",
    upgrade: str | None = "websocket",
    connection: str | None = "Upgrade",
    version: str | None = "13",
    key: str | None = RFC_KEY,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: example.com"]
    if upgrade is not None:
        lines.append(f"Upgrade: {upgrade}")
    if connection is not None:
        lines.append(f"Connection: {connection}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


def handshake_status(head: bytes) -> int:
    with pytest.raises(HandshakeError) as caught:
        websocket.websocket_accept_response(websocket.parse_request_head(head))
    return caught.value.status


def test_accept_key_matches_rfc_6455_example() -> None:
    assert websocket.accept_key(RFC_KEY) == RFC_ACCEPT


def test_accept_response_carries_rfc_example_accept_header() -> None:
    response = websocket.websocket_accept_response(websocket.parse_request_head(upgrade_head()))
    assert response.startswith(b"HTTP/1.1 101 ")
    assert f"\r\nSec-WebSocket-Accept: {RFC_ACCEPT}\r\n".encode() in response
    assert response.endswith(b"\r\n\r\n")


def test_wsproto_client_handshake_is_accepted_by_wsproto() -> None:
    ws = WSConnection(ConnectionType.CLIENT)
    request_bytes = ws.send(WsRequest(host="example.com", target="/ws?token=abc"))
    assert websocket.find_request_head_end(request_bytes) == len(request_bytes)
    request = websocket.parse_request_head(request_bytes)
    assert request.method == "GET"
    assert request.path == "/ws"
    assert request.query == "token=abc"
    assert request.wants_websocket()
    ws.receive_data(websocket.websocket_accept_response(request))
    events = list(ws.events())
    assert len(events) == 1
    assert isinstance(events[0], AcceptConnection)


def test_firefox_style_connection_header_and_mixed_case_upgrade_are_accepted() -> None:
    head = upgrade_head(connection="keep-alive, Upgrade", upgrade="WebSocket")
    response = websocket.websocket_accept_response(websocket.parse_request_head(head))
    assert response.startswith(b"HTTP/1.1 101 ")


def test_parse_request_head_lowercases_names_strips_values_and_joins_repeats() -> None:
    head = (
        b"GET /ws?a=1&b=2 HTTP/1.1\r\nHost:  example.com  \r\nX-Thing: one\r\nx-thing: two\r\n\r\n"
    )
    request = websocket.parse_request_head(head)
    assert request.target == "/ws?a=1&b=2"
    assert request.path == "/ws"
    assert request.query == "a=1&b=2"
    assert request.headers == {"host": "example.com", "x-thing": "one, two"}
    assert not request.wants_websocket()


def test_find_request_head_end_waits_for_blank_line_and_ignores_what_follows() -> None:
    head = upgrade_head()
    for cut in range(len(head)):
        assert websocket.find_request_head_end(head[:cut]) == -1
    trailing = raw_frame(websocket.OP_TEXT, b"early")
    assert websocket.find_request_head_end(head + trailing) == len(head)
    assert websocket.find_request_head_end(bytearray(head)) == len(head)


def test_non_get_is_400() -> None:
    assert handshake_status(upgrade_head(method="POST")) == 400


@pytest.mark.parametrize(
    ("upgrade", "connection"),
    [
        (None, None),
        (None, "Upgrade"),
        ("websocket", None),
        ("h2c", "Upgrade"),
        ("websocket", "close"),
    ],
)
def test_no_upgrade_is_426(upgrade: str | None, connection: str | None) -> None:
    assert handshake_status(upgrade_head(upgrade=upgrade, connection=connection)) == 426


@pytest.mark.parametrize("version", [None, "8", "12", "14", ""])
def test_wrong_version_is_426(version: str | None) -> None:
    assert handshake_status(upgrade_head(version=version)) == 426


@pytest.mark.parametrize(
    "key",
    [
        None,
        "",
        "not base64!",
        "dGhlIHNhbXBsZSBub25jZQ",  # padding missing
        "dGhlIHNhbXBsZSBub25j",  # 15 bytes
        "dGhlIHNhbXBsZSBub25jZTE=",  # 17 bytes
        "dGhlIHNhbXBsZSBub25jZQ==\u00e9",  # not ASCII
    ],
)
def test_bad_key_is_400(key: str | None) -> None:
    assert handshake_status(upgrade_head(key=key)) == 400


@pytest.mark.parametrize(
    "head",
    [
        b"\r\n\r\n",
        b"GET /ws\r\n\r\n",
        b"GET  /ws HTTP/1.1\r\n\r\n",
        b"GET /ws HTTP/1.1 extra\r\n\r\n",
        b"GET /ws HTTP/2.0\r\n\r\n",
        b"GET /ws FTP/1.1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /ws HTTP/1.1\r\n: empty name\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\n folded: line\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost : x\r\n\r\n",
    ],
)
def test_malformed_head_is_400(head: bytes) -> None:
    with pytest.raises(HandshakeError) as caught:
        websocket.parse_request_head(head)
    assert caught.value.status == 400


def test_oversized_head_without_end_is_431() -> None:
    buffer = b"GET /ws HTTP/1.1\r\nX-Filler: " + b"a" * MAX_REQUEST_HEAD_BYTES
    with pytest.raises(HandshakeError) as caught:
        websocket.find_request_head_end(buffer)
    assert caught.value.status == 431


def test_oversized_head_with_end_is_431() -> None:
    buffer = b"GET /ws HTTP/1.1\r\nX-Filler: " + b"a" * MAX_REQUEST_HEAD_BYTES + b"\r\n\r\n"
    with pytest.raises(HandshakeError) as caught:
        websocket.find_request_head_end(buffer)
    assert caught.value.status == 431


def test_head_at_the_limit_is_accepted() -> None:
    prefix = b"GET /ws HTTP/1.1\r\nX-Filler: "
    head = prefix + b"a" * (MAX_REQUEST_HEAD_BYTES - len(prefix)) + b"\r\n\r\n"
    assert websocket.find_request_head_end(head) == len(head)


# Whether a head is accepted must not depend on how its bytes were split across reads.
@pytest.mark.parametrize("terminator_at", [MAX_REQUEST_HEAD_BYTES - 2, MAX_REQUEST_HEAD_BYTES])
def test_head_acceptance_does_not_depend_on_how_it_is_split(terminator_at: int) -> None:
    prefix = b"GET /ws HTTP/1.1\r\nX-Filler: "
    head = prefix + b"a" * (terminator_at - len(prefix)) + b"\r\n\r\n"
    assert websocket.find_request_head_end(head) == len(head)  # in one piece: accepted
    for cut in range(len(head) - 4, len(head)):
        assert websocket.find_request_head_end(head[:cut]) == -1, f"refused at {cut} bytes"


# --- plain HTTP responses ------------------------------------------------------------------


def parse_response_with_h11(response: bytes) -> tuple[h11.Response, bytes]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "example.com")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(response)
    head = conn.next_event()
    assert isinstance(head, h11.Response)
    body = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        body += event.data
    return head, body


# The statuses the handshake and /healthz answer with, and their standard reason phrases.
@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (200, b"OK"),
        (400, b"Bad Request"),
        (404, b"Not Found"),
        (405, b"Method Not Allowed"),
        (426, b"Upgrade Required"),
        (431, b"Request Header Fields Too Large"),
    ],
)
def test_http_response_parses_with_h11(status: int, reason: bytes) -> None:
    body = b'{"status": "ok", "caf\xc3\xa9": 1}'
    head, received = parse_response_with_h11(
        websocket.http_response(status, body, "application/json")
    )
    headers = dict(head.headers)
    assert head.status_code == status
    assert head.reason == reason
    assert received == body
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"connection"] == b"close"
    assert (headers.get(b"upgrade") == b"websocket") == (status == 426)


@pytest.mark.parametrize("status", [403, 418, 500, 503])
def test_http_response_other_statuses_still_parse(status: int) -> None:
    head, body = parse_response_with_h11(websocket.http_response(status, b"x"))
    assert head.status_code == status
    assert head.reason
    assert body == b"x"


# --- what we encode, parsed by a wsproto client ----------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70001])
def test_encoded_text_frame_parses_with_wsproto(length: int) -> None:
    text = ("\u00e9" * length)[: length // 2] + "x" * (length - length // 2 * 2)
    events = receive_as_client(websocket.encode_text_frame(text.encode("utf-8")))
    assert len(events) == 1
    assert isinstance(events[0], TextMessage)
    assert events[0].data == text
    assert events[0].message_finished


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_encoded_frame_uses_shortest_length_form(length: int, header: bytes) -> None:
    frame = websocket.encode_text_frame(b"x" * length)
    assert frame[: len(header)] == header
    assert len(frame) == len(header) + length


def test_encoded_binary_ping_and_pong_parse_with_wsproto() -> None:
    data = (
        websocket.encode_frame(websocket.OP_BINARY, b"\x00\xff" * 100)
        + websocket.encode_frame(websocket.OP_PING, b"are you there")
        + websocket.encode_frame(websocket.OP_PONG, b"yes")
    )
    events = receive_as_client(data)
    assert events == [
        BytesMessage(data=b"\x00\xff" * 100),
        WsPing(payload=b"are you there"),
        WsPong(payload=b"yes"),
    ]


@pytest.mark.parametrize(
    ("code", "reason"), [(1000, ""), (1009, "frame too large"), (1013, "try again \u00e9")]
)
def test_encoded_close_frame_parses_with_wsproto(code: int, reason: str) -> None:
    events = receive_as_client(websocket.encode_close_frame(code, reason))
    assert events == [CloseConnection(code=code, reason=reason)]


def test_encoded_close_frame_truncates_long_ascii_reason_to_fit() -> None:
    frame = websocket.encode_close_frame(1000, "x" * 300)
    assert len(frame) == 2 + 125
    events = receive_as_client(frame)
    assert events == [CloseConnection(code=1000, reason="x" * 123)]


# A long non-ASCII reason is cut on a character boundary: a close frame must be valid UTF-8.
def test_encoded_close_frame_with_long_non_ascii_reason_is_valid_utf8() -> None:
    reason = "\u00e9" * 100  # 200 bytes of UTF-8: the 123-byte cut falls inside a character
    events = receive_as_client(websocket.encode_close_frame(1000, reason))
    assert len(events) == 1
    assert isinstance(events[0], CloseConnection)
    assert events[0].code == 1000
    assert reason.startswith(events[0].reason)


# --- unmask ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [*range(10), 125, 4096, 65537])
def test_unmask_matches_naive_xor(length: int) -> None:
    payload = bytes((i * 7 + 3) % 256 for i in range(length))
    for mask in (MASK, b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x00\x00\x80"):
        assert websocket.unmask(payload, mask) == naive_unmask(payload, mask)
        assert websocket.unmask(websocket.unmask(payload, mask), mask) == payload


# --- FrameParser on well-formed client frames ------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 100_000])
def test_wsproto_text_message_in_one_piece(length: int) -> None:
    text = "\u00e9a" * (length // 3) + "z" * (length % 3)
    data = client().send(TextMessage(data=text))
    assert FrameParser(1 << 20).feed(data) == [Message(True, text.encode("utf-8"))]


def test_wsproto_messages_byte_by_byte() -> None:
    conn = client()
    data = (
        conn.send(TextMessage(data='{"type":"ping"}'))
        + conn.send(BytesMessage(data=b"\x00\x01\x02"))
        + conn.send(TextMessage(data="x" * 300))
        + conn.send(TextMessage(data=""))
    )
    assert feed_whole_and_bytewise(data) == [
        Message(True, b'{"type":"ping"}'),
        Message(False, b"\x00\x01\x02"),
        Message(True, b"x" * 300),
        Message(True, b""),
    ]


def test_several_frames_in_one_feed_come_out_in_order() -> None:
    conn = client()
    data = b"".join(conn.send(TextMessage(data=str(i))) for i in range(50))
    assert FrameParser(1024).feed(data) == [Message(True, str(i).encode()) for i in range(50)]


def test_fragmented_message_is_reassembled() -> None:
    conn = client()
    data = (
        conn.send(TextMessage(data="hel", message_finished=False))
        + conn.send(TextMessage(data="lo ", message_finished=False))
        + conn.send(TextMessage(data="w\u00f6rld", message_finished=True))
    )
    assert data[0] & 0x0F == websocket.OP_TEXT and not data[0] & 0x80  # really fragmented
    assert feed_whole_and_bytewise(data) == [
        Unanswered(2, 0),  # the fragments before the last, for the caller to charge
        Message(True, "hello w\u00f6rld".encode()),
    ]


def test_fragmented_binary_message_is_reassembled_as_binary() -> None:
    conn = client()
    data = conn.send(BytesMessage(data=b"\x01", message_finished=False)) + conn.send(
        BytesMessage(data=b"\x02", message_finished=True)
    )
    assert feed_whole_and_bytewise(data) == [Unanswered(1, 0), Message(False, b"\x01\x02")]


def test_ping_between_fragments_is_delivered_first() -> None:
    conn = client()
    data = (
        conn.send(TextMessage(data="ab", message_finished=False))
        + conn.send(WsPing(payload=b"p"))
        + conn.send(TextMessage(data="cd", message_finished=True))
    )
    assert feed_whole_and_bytewise(data) == [
        Unanswered(1, 0),
        Ping(b"p"),
        Message(True, b"abcd"),
    ]


def test_ping_close_and_a_pong_reported_as_unanswered() -> None:
    conn = client()
    data = (
        conn.send(WsPing(payload=b"hello"))
        + conn.send(WsPong(payload=b"ignored"))
        + conn.send(CloseConnection(code=1001, reason="bye \u00e9"))
    )
    assert feed_whole_and_bytewise(data) == [
        Ping(b"hello"),
        Unanswered(1, len(b"ignored")),
        Close(1001, "bye \u00e9"),
    ]


def test_close_without_payload_has_no_code() -> None:
    assert feed_whole_and_bytewise(raw_frame(websocket.OP_CLOSE)) == [Close(None, "")]


def test_close_with_one_byte_payload_is_a_violation() -> None:
    with pytest.raises(ProtocolViolation) as caught:
        FrameParser(1024).feed(raw_frame(websocket.OP_CLOSE, b"\x03"))
    assert caught.value.close_code == websocket.CLOSE_PROTOCOL_ERROR


def test_close_reason_not_utf8_is_1007() -> None:
    with pytest.raises(ProtocolViolation) as caught:
        FrameParser(1024).feed(raw_frame(websocket.OP_CLOSE, b"\x03\xe8\xc3"))
    assert caught.value.close_code == 1007


def test_incomplete_frame_yields_nothing_until_complete() -> None:
    data = client().send(TextMessage(data="complete"))
    parser = FrameParser(1024)
    assert parser.feed(data[:-1]) == []
    assert parser.feed(data[-1:]) == [Message(True, b"complete")]


# --- violations ------------------------------------------------------------------------------


def feed_until_violation(parser: FrameParser, data: bytes) -> None:
    """Feed ``data``; if frames before the bad one completed, the next feed raises."""
    parser.feed(data)
    assert parser.failed
    parser.feed(b"")


def assert_violation(data: bytes, *, max_message_bytes: int = 1024) -> ProtocolViolation:
    """``data`` raises ProtocolViolation (1002) both in one piece and when fed byte by byte."""
    with pytest.raises(ProtocolViolation) as caught:
        feed_until_violation(FrameParser(max_message_bytes), data)
    assert type(caught.value) is ProtocolViolation
    assert caught.value.close_code == websocket.CLOSE_PROTOCOL_ERROR
    parser = FrameParser(max_message_bytes)
    with pytest.raises(ProtocolViolation):
        for i in range(len(data)):
            parser.feed(data[i : i + 1])
    return caught.value


def test_unmasked_client_frame() -> None:
    assert_violation(raw_frame(websocket.OP_TEXT, b"hi", masked=False))


def test_unmasked_frame_is_refused_from_its_header_alone() -> None:
    with pytest.raises(ProtocolViolation):
        FrameParser(1024).feed(raw_frame(websocket.OP_TEXT, b"hi", masked=False)[:2])


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_reserved_bits(rsv: int) -> None:
    assert_violation(raw_frame(websocket.OP_TEXT, b"hi", rsv=rsv))


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcode(opcode: int) -> None:
    assert_violation(raw_frame(opcode, b"hi"))


@pytest.mark.parametrize("opcode", [websocket.OP_PING, websocket.OP_PONG, websocket.OP_CLOSE])
def test_control_frame_over_125_bytes(opcode: int) -> None:
    assert_violation(raw_frame(opcode, b"\x03\xe8" + b"x" * 124))


def test_control_frame_of_125_bytes_is_fine() -> None:
    assert feed_whole_and_bytewise(raw_frame(websocket.OP_PING, b"x" * 125)) == [Ping(b"x" * 125)]


def test_control_frame_over_125_bytes_is_refused_from_its_header_alone() -> None:
    header = raw_frame(websocket.OP_PING, announced_length=126)[:4]
    with pytest.raises(ProtocolViolation):
        FrameParser(1024).feed(header)


@pytest.mark.parametrize("opcode", [websocket.OP_PING, websocket.OP_PONG, websocket.OP_CLOSE])
def test_fragmented_control_frame(opcode: int) -> None:
    assert_violation(raw_frame(opcode, b"\x03\xe8", fin=False))


@pytest.mark.parametrize("fin", [True, False])
def test_continuation_without_start(fin: bool) -> None:
    assert_violation(raw_frame(websocket.OP_CONTINUATION, b"orphan", fin=fin))


def test_continuation_after_a_finished_message() -> None:
    data = raw_frame(websocket.OP_TEXT, b"done") + raw_frame(websocket.OP_CONTINUATION, b"more")
    assert_violation(data)


@pytest.mark.parametrize("opcode", [websocket.OP_TEXT, websocket.OP_BINARY])
def test_new_data_frame_inside_fragmented_message(opcode: int) -> None:
    data = raw_frame(websocket.OP_TEXT, b"start", fin=False) + raw_frame(opcode, b"again")
    assert_violation(data)


# --- the message size limit ------------------------------------------------------------------


def assert_too_big(data: bytes, max_message_bytes: int) -> None:
    with pytest.raises(MessageTooBig) as caught:
        FrameParser(max_message_bytes).feed(data)
    assert caught.value.close_code == websocket.CLOSE_TOO_BIG
    assert isinstance(caught.value, ProtocolViolation)


@pytest.mark.parametrize("length", [101, 126, 65536, 2**40, 2**63 - 1])
def test_too_big_is_raised_from_the_header_before_the_payload(length: int) -> None:
    # Only the header: no mask, no payload. The limit must trip right there.
    header = raw_frame(websocket.OP_TEXT, announced_length=length)
    header = header[: len(header) - 4]
    assert_too_big(header, 100)


def test_message_exactly_at_the_limit_is_accepted() -> None:
    data = client().send(TextMessage(data="x" * 100))
    assert FrameParser(100).feed(data) == [Message(True, b"x" * 100)]
    assert_too_big(client().send(TextMessage(data="x" * 101)), 100)


def test_binary_messages_count_too() -> None:
    assert_too_big(client().send(BytesMessage(data=b"x" * 101)), 100)


def test_too_big_across_fragments_is_raised_at_the_header_of_the_fragment_that_exceeds() -> None:
    conn = client()
    first = conn.send(TextMessage(data="x" * 60, message_finished=False))
    second = conn.send(TextMessage(data="y" * 41, message_finished=True))
    parser = FrameParser(100)
    assert parser.feed(first) == [Unanswered(1, 0)]
    with pytest.raises(MessageTooBig):
        parser.feed(second[:2])  # just the second fragment's header


def test_fragments_adding_up_to_the_limit_are_accepted() -> None:
    conn = client()
    data = conn.send(TextMessage(data="x" * 60, message_finished=False)) + conn.send(
        TextMessage(data="y" * 40, message_finished=True)
    )
    assert feed_whole_and_bytewise(data, 100) == [
        Unanswered(1, 0),
        Message(True, b"x" * 60 + b"y" * 40),
    ]


def test_the_limit_applies_per_message_not_per_connection() -> None:
    conn = client()
    data = b"".join(conn.send(TextMessage(data="x" * 90)) for _ in range(5))
    assert feed_whole_and_bytewise(data, 100) == [Message(True, b"x" * 90)] * 5


def test_control_frames_do_not_count_toward_the_limit() -> None:
    conn = client()
    data = (
        conn.send(TextMessage(data="x" * 8, message_finished=False))
        + conn.send(WsPing(payload=b"p" * 125))
        + conn.send(TextMessage(data="y" * 2, message_finished=True))
    )
    assert feed_whole_and_bytewise(data, 10) == [
        Unanswered(1, 0),
        Ping(b"p" * 125),
        Message(True, b"x" * 8 + b"yy"),
    ]


# A valid message that arrives in the same read as a bad one is returned before the error.
def test_message_before_an_oversized_one_in_the_same_read_is_not_lost() -> None:
    text = b'{"type":"publish","room":"r","data":1}'
    good = client().send(TextMessage(data=text.decode()))
    oversized_header = raw_frame(websocket.OP_TEXT, announced_length=1000)[:4]
    parser = FrameParser(100)
    try:
        events = parser.feed(good + oversized_header)
    except MessageTooBig as too_big:
        assert getattr(too_big, "events", None) == [Message(True, text)]
    else:
        assert events == [Message(True, text)]
        with pytest.raises(MessageTooBig):
            parser.feed(b"")


# --- payloads that arrive over several reads -------------------------------------------------


def split_randomly(data: bytes, rng: random.Random, pieces: int) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(pieces - 1, len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@pytest.mark.parametrize("seed", range(20))
def test_frames_split_anywhere_give_the_same_events(seed: int) -> None:
    # Payload pieces are unmasked as they arrive: the mask's phase must carry over each cut.
    rng = random.Random(seed)
    conn = client()
    text = "".join(rng.choice("ab\u00e9\u20ac\U0001f600") for _ in range(rng.randrange(1, 3000)))
    blob = rng.randbytes(rng.randrange(0, 70000))
    data = (
        conn.send(TextMessage(data=text))
        + conn.send(BytesMessage(data=blob))
        + conn.send(TextMessage(data=text[:7], message_finished=False))
        + conn.send(WsPing(payload=b"mid"))
        + conn.send(TextMessage(data=text[7:], message_finished=True))
    )
    expected = [
        Message(True, text.encode()),
        Message(False, blob),
        Unanswered(1, 0),
        Ping(b"mid"),
        Message(True, text.encode()),
    ]
    parser = FrameParser(1 << 20)
    events = []
    for piece in split_randomly(data, rng, rng.randrange(2, 60)):
        events += parser.feed(piece)
    assert merge_unanswered(events) == expected


def test_a_partly_arrived_payload_is_consumed_not_kept_twice() -> None:
    payload = bytes(range(256)) * 100
    frame = raw_frame(websocket.OP_BINARY, payload)
    parser = FrameParser(1 << 20)
    cut = len(frame) - 500
    for start in range(0, cut, 1000):
        assert parser.feed(frame[start : min(start + 1000, cut)]) == []
        assert len(parser._buffer) < 14  # at most a header waits; the payload has moved on
    assert parser.feed(frame[cut:]) == [Message(False, payload)]


# --- UTF-8 -----------------------------------------------------------------------------------


def assert_invalid_utf8_at(data: bytes, failing_index: int) -> None:
    """Fed byte by byte, ``data`` fails with 1007 exactly at byte ``failing_index``; fed whole,
    it fails too."""
    parser = FrameParser(1 << 20)
    for index in range(failing_index):
        parser.feed(data[index : index + 1])
    with pytest.raises(ProtocolViolation) as caught:
        parser.feed(data[failing_index : failing_index + 1])
    assert caught.value.close_code == websocket.CLOSE_INVALID_DATA == 1007
    with pytest.raises(ProtocolViolation) as caught:
        feed_until_violation(FrameParser(1 << 20), data)
    assert caught.value.close_code == 1007


VALID_SEQUENCES = ["\u00e9", "\u07ff", "\u0800", "\u20ac", "\ud7ff", "\ue000", "\uffff",
                   "\U00010000", "\U0001f600", "\U0010ffff"]  # fmt: skip


@pytest.mark.parametrize("character", VALID_SEQUENCES)
def test_invalid_utf8_fails_at_the_first_bad_byte_of_a_sequence(character: str) -> None:
    sequence = character.encode()
    header_size = 6
    for position in range(len(sequence)):
        # A lead byte replaced by a continuation byte, or a continuation byte by ASCII.
        bad = b"\x80" if position == 0 else b"A"
        broken = sequence[:position] + bad + sequence[position + 1 :]
        payload = b"ok " + broken + b" and more text after it"
        assert_invalid_utf8_at(raw_frame(websocket.OP_TEXT, payload), header_size + 3 + position)


@pytest.mark.parametrize(
    ("sequence", "bad_at"),
    [
        (b"\xc0\xaf", 0),  # overlong: C0 and C1 never start a character
        (b"\xc1\xbf", 0),
        (b"\xe0\x80\xaf", 1),  # overlong three-byte form
        (b"\xf0\x8f\xbf\xbf", 1),  # overlong four-byte form
        (b"\xed\xa0\x80", 1),  # a surrogate (U+D800): invalid from its second byte
        (b"\xed\xbf\xbf", 1),  # U+DFFF
        (b"\xf4\x90\x80\x80", 1),  # past U+10FFFF
        (b"\xf5\x80\x80\x80", 0),  # F5 to FF never appear
        (b"\xff", 0),
        (b"\xfe", 0),
    ],
)
def test_sequences_that_no_text_can_continue_fail_at_once(sequence: bytes, bad_at: int) -> None:
    assert_invalid_utf8_at(raw_frame(websocket.OP_TEXT, b"abc" + sequence + b"xyz"), 6 + 3 + bad_at)


@pytest.mark.parametrize("character", [c for c in VALID_SEQUENCES if len(c.encode()) > 1])
def test_a_message_ending_inside_a_code_point_is_invalid(character: str) -> None:
    sequence = character.encode()
    for kept in range(1, len(sequence)):
        frame = raw_frame(websocket.OP_TEXT, b"abc" + sequence[:kept])
        assert_invalid_utf8_at(frame, len(frame) - 1)  # the frame's last byte tells
        fragments = raw_frame(websocket.OP_TEXT, b"abc" + sequence[:kept], fin=False) + raw_frame(
            websocket.OP_CONTINUATION, b""
        )
        assert_invalid_utf8_at(fragments, len(fragments) - 1)


@pytest.mark.parametrize("character", VALID_SEQUENCES)
def test_fragmented_text_split_inside_a_code_point_is_valid(character: str) -> None:
    text = ("x" + character + "y").encode()
    for first in range(1, len(text)):
        for second in range(first, len(text)):
            data = (
                raw_frame(websocket.OP_TEXT, text[:first], fin=False)
                + raw_frame(websocket.OP_CONTINUATION, text[first:second], fin=False)
                + raw_frame(websocket.OP_CONTINUATION, text[second:])
            )
            assert feed_whole_and_bytewise(data) == [Unanswered(2, 0), Message(True, text)]


def test_invalid_utf8_in_a_later_fragment_fails_when_it_arrives() -> None:
    data = (
        raw_frame(websocket.OP_TEXT, b"\xe2\x82", fin=False)
        + raw_frame(websocket.OP_CONTINUATION, b"\xac fine", fin=False)
        + raw_frame(websocket.OP_CONTINUATION, b"then \xed\xa0\x80 not")
    )
    third_start = len(data) - len(raw_frame(websocket.OP_CONTINUATION, b"then \xed\xa0\x80 not"))
    assert_invalid_utf8_at(data, third_start + 6 + 6)  # at the A0 after ED


def test_binary_messages_are_not_checked_for_utf8() -> None:
    data = raw_frame(websocket.OP_BINARY, b"\xff\xfe\xed\xa0\x80", fin=False) + raw_frame(
        websocket.OP_CONTINUATION, b"\xc3"
    )
    assert feed_whole_and_bytewise(data) == [
        Unanswered(1, 0),
        Message(False, b"\xff\xfe\xed\xa0\x80\xc3"),
    ]


def test_text_with_every_kind_of_character_is_accepted_whole_and_bytewise() -> None:
    text = "".join(VALID_SEQUENCES) + "plain ascii \x00 \x7f"
    data = client().send(TextMessage(data=text))
    assert feed_whole_and_bytewise(data) == [Message(True, text.encode())]


# --- many fragments --------------------------------------------------------------------------


def test_a_message_in_thousands_of_tiny_fragments_is_reassembled() -> None:
    # No cap on the number of fragments: the size limit bounds the memory, the caller's frame
    # budget the work (each fragment is reported in Unanswered).
    payload = bytes(range(256)) * 256  # 64 KiB
    pieces = [payload[i : i + 16] for i in range(0, len(payload), 16)]
    data = raw_frame(websocket.OP_BINARY, pieces[0], fin=False)
    data += b"".join(raw_frame(websocket.OP_CONTINUATION, piece, fin=False) for piece in pieces[1:])
    data += raw_frame(websocket.OP_CONTINUATION, b"")
    parser = FrameParser(len(payload))
    events = []
    for start in range(0, len(data), 1000):
        events += parser.feed(data[start : start + 1000])
    assert merge_unanswered(events) == [Unanswered(len(pieces), 0), Message(False, payload)]


def test_empty_fragments_without_end_are_reported_for_charging() -> None:
    data = (
        raw_frame(websocket.OP_TEXT, b"", fin=False)
        + raw_frame(websocket.OP_CONTINUATION, b"", fin=False) * 9999
    )
    assert FrameParser(10).feed(data) == [Unanswered(10000, 0)]


def test_pongs_are_counted_with_their_payload_bytes() -> None:
    data = raw_frame(websocket.OP_PONG, b"") * 5 + raw_frame(websocket.OP_PONG, b"x" * 125) * 3
    assert feed_whole_and_bytewise(data) == [Unanswered(8, 375)]


def test_unanswered_frames_before_a_violation_are_still_reported() -> None:
    parser = FrameParser(1024)
    data = raw_frame(websocket.OP_PONG, b"abc") * 2 + raw_frame(0x3, b"")
    assert parser.feed(data) == [Unanswered(2, 6)]
    with pytest.raises(ProtocolViolation):
        parser.feed(b"")


# --- bare LF line endings (RFC 9112 section 2.2), and refusing a head as soon as it is bad ----


def test_a_bare_lf_ends_lines_and_the_head() -> None:
    head = b"GET /healthz HTTP/1.1\nHost: x\n\n"
    assert websocket.find_request_head_end(head) == len(head)
    assert websocket.find_request_head_end(b"\n\n") == 2
    assert websocket.find_request_head_end(b"GET / HTTP/1.1\nHost: x\n") == -1
    request = websocket.parse_request_head(head)
    assert (request.method, request.path, request.headers) == ("GET", "/healthz", {"host": "x"})


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
@pytest.mark.parametrize("blank", [b"\r\n", b"\n"])
def test_an_upgrade_with_any_mix_of_line_endings_is_accepted(ending: bytes, blank: bytes) -> None:
    head = upgrade_head().replace(b"\r\n", ending)[: -len(ending)] + blank
    assert websocket.find_request_head_end(head) == len(head)
    response = websocket.websocket_accept_response(websocket.parse_request_head(head))
    assert response.startswith(b"HTTP/1.1 101 ")


@pytest.mark.parametrize(
    "head",
    [
        b"GET /ws HTTP/1.1\r\nHost: a\rb\r\n\r\n",  # a bare CR inside a line
        b"GET /ws\r HTTP/1.1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHo st: x\r\n\r\n",  # a header name that is not a token
        b"GET /ws HTTP/1.1\r\nHost: x\x00y\r\n\r\n",  # a control character
        b"G\xc3\xa9T /ws HTTP/1.1\r\n\r\n",  # a method that is not a token
    ],
)
def test_heads_no_http_1_1_server_may_accept_are_400(head: bytes) -> None:
    with pytest.raises(HandshakeError) as caught:
        websocket.parse_request_head(head)
    assert caught.value.status == 400


def refused_after(data: bytes) -> tuple[HandshakeError, int]:
    """Feed ``data`` to a reader a byte at a time: its refusal, and how many bytes it took."""
    reader = websocket.RequestHeadReader()
    for count in range(1, len(data) + 1):
        try:
            reader.feed(data[count - 1 : count])
        except HandshakeError as refusal:
            return refusal, count
    raise AssertionError(f"{data!r} was not refused")


def test_a_tls_client_hello_is_recognised_at_its_first_byte() -> None:
    client_hello_start = bytes.fromhex("160301020001")  # record header of a ClientHello
    refusal, count = refused_after(client_hello_start)
    assert isinstance(refusal, websocket.NotHTTP)
    assert count == 1


@pytest.mark.parametrize(
    ("garbage", "known_after"),
    [
        (b'{"type": "join"}', 1),  # JSON sent before any handshake: no method starts with {
        (b" GET /ws HTTP/1.1\r\n", 1),  # no method before the space
        (b"GE\x00T /ws HTTP/1.1\r\n", 3),  # a NUL
        (b"GET /ws HTTP/1.1 \r\n", 19),  # the request line is complete, and wrong
        (b"SSH-2.0-OpenSSH_9.6\r\n", 20),  # another protocol's greeting: CR ends no method
        (b"PING\r\n", 5),  # a Redis inline command
        (b"GET /ws HTTP/2.0\n", 17),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nno colon\r\n", 37),  # a header line, once complete
        (b"GET /ws HTTP/1.1\nHost: x\n folded: line\n", 39),
        (b"GET /ws HTTP/1.1\r\nHost: a\rb\r\n", 29),  # a bare CR
    ],
)
def test_a_head_that_cannot_be_valid_is_refused_as_soon_as_that_is_known(
    garbage: bytes, known_after: int
) -> None:
    refusal, count = refused_after(garbage + b"more that never comes")
    assert refusal.status == 400
    assert not isinstance(refusal, websocket.NotHTTP)
    assert count == known_after


@pytest.mark.parametrize("cut", [1, 2, 5, 17, 40])
def test_the_reader_returns_the_request_and_what_followed_however_the_bytes_are_split(
    cut: int,
) -> None:
    frame = raw_frame(websocket.OP_TEXT, b"\x00\x01 early frame, control bytes and all")
    data = upgrade_head().replace(b"\r\n", b"\n") + frame
    reader = websocket.RequestHeadReader()
    for start in range(0, len(data), cut):
        if (complete := reader.feed(data[start : start + cut])) is not None:
            break
    else:
        raise AssertionError("the head was never complete")
    request, leftover = complete
    assert request.wants_websocket()
    assert leftover + data[start + cut :] == frame
