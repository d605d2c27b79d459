"""The client protocol, sans I/O (trio_fanout/protocol.py): which code each bad frame earns, and
that the frames we build are the JSON docs/protocol.md describes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trio_fanout import protocol
from trio_fanout.protocol import (
    HistoryRequest,
    Join,
    Leave,
    Ping,
    Publish,
    RequestError,
    Since,
    parse_request,
)


def strict_json(data: bytes) -> Any:
    """Parse as RFC 8259 JSON: UTF-8, and no NaN/Infinity (which browsers' JSON.parse refuses)."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(data.decode("utf-8"), parse_constant=refuse)


def frame(obj: object) -> bytes:
    return json.dumps(obj).encode("utf-8")


def refused(payload: bytes, *, is_text: bool = True) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_request(payload, is_text=is_text)
    assert caught.value.message  # a sentence for people
    return caught.value


# --- accepted requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"type": "join", "room": "lobby"}, Join("lobby")),
        ({"type": "join", "room": "lobby", "id": 7}, Join("lobby", 7)),
        ({"type": "leave", "room": "lobby", "id": -3}, Leave("lobby", -3)),
        ({"type": "ping"}, Ping()),
        ({"type": "ping", "id": 0}, Ping(0)),
        ({"type": "ping", "id": None}, Ping()),
        ({"type": "publish", "room": "r", "data": None}, Publish("r", None)),
        (
            {"type": "publish", "room": "r", "data": {"a": [1, 2.5, "x"]}, "id": 2**53 - 1},
            Publish("r", {"a": [1, 2.5, "x"]}, 2**53 - 1),
        ),
        ({"type": "publish", "room": "r", "data": 1, "echo": False}, Publish("r", 1, echo=False)),
        ({"type": "publish", "room": "r", "data": 1, "echo": True}, Publish("r", 1, echo=True)),
        ({"type": "join", "room": "lobby", "extra": "ignored"}, Join("lobby")),
        (
            {"type": "join", "room": "r", "since": {"epoch": "ab", "offset": 0}},
            Join("r", since=Since("ab", 0)),
        ),
        ({"type": "join", "room": "r", "since": None}, Join("r")),
        ({"type": "history", "room": "r"}, HistoryRequest("r", limit=100)),
        (
            {
                "type": "history",
                "room": "r",
                "id": 2,
                "limit": 0,
                "since": {"epoch": "e", "offset": 3},
            },
            HistoryRequest("r", 2, Since("e", 3), 0),
        ),
        ({"type": "history", "room": "r", "limit": 1000}, HistoryRequest("r", limit=1000)),
        # null is the same as absent, for limit as for id and since
        (
            {"type": "history", "room": "r", "id": None, "since": None, "limit": None},
            HistoryRequest("r", limit=100),
        ),
    ],
)
def test_accepted(obj: dict[str, Any], expected: protocol.Request) -> None:
    assert parse_request(frame(obj)) == expected


def test_room_of_exactly_200_characters_is_accepted() -> None:
    room = "r" * 200
    assert parse_request(frame({"type": "join", "room": room})) == Join(room)


@pytest.mark.parametrize(
    "room",
    [
        "caf\u00e9",
        "\u623f\u95f4",
        "\U0001f600",  # astral: one character
        "\U0001f600" * 200,  # 200 characters, 800 bytes of UTF-8
        "\u00e9" * 200,
        "\u2028 line separator is not a control character",
        "a b/c:d",
    ],
)
def test_unicode_rooms_are_accepted(room: str) -> None:
    assert parse_request(frame({"type": "join", "room": room})) == Join(room)
    # The same room written raw in UTF-8 rather than with \u escapes.
    raw = json.dumps({"type": "join", "room": room}, ensure_ascii=False).encode("utf-8")
    assert parse_request(raw) == Join(room)


# --- bad_json --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b'{"type": "ping"',
        b'{"type": "ping"} trailing',
        b"{'type': 'ping'}",
        b'{"type":"publish","room":"r","data":NaN}',
        b'{"type":"publish","room":"r","data":Infinity}',
        b'{"type":"publish","room":"r","data":-Infinity}',
        b"NaN",
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000,
        b"\xef\xbb\xbf{}",  # a byte-order mark
    ],
)
def test_bad_json(payload: bytes) -> None:
    error = refused(payload)
    assert error.code == protocol.BAD_JSON
    assert error.request_id is None


# --- bad_frame -------------------------------------------------------------------------------


def test_binary_frame_is_bad_frame() -> None:
    error = refused(frame({"type": "ping", "id": 1}), is_text=False)
    assert error.code == protocol.BAD_FRAME


@pytest.mark.parametrize(
    "payload", [b"[]", b'[{"type":"ping"}]', b"1", b'"ping"', b"null", b"true"]
)
def test_non_object_is_bad_frame(payload: bytes) -> None:
    error = refused(payload)
    assert error.code == protocol.BAD_FRAME
    assert error.request_id is None


@pytest.mark.parametrize("request_id", [True, False, 1.5, 1.0, "1", [1], {"n": 1}])
@pytest.mark.parametrize("kind", ["join", "leave", "publish", "ping", "nonsense"])
def test_id_that_is_not_an_integer_is_bad_frame(request_id: object, kind: str) -> None:
    obj = {"type": kind, "room": "r", "data": 1, "id": request_id}
    error = refused(frame(obj))
    assert error.code == protocol.BAD_FRAME
    assert error.request_id is None  # the id was not readable


@pytest.mark.parametrize("request_id", [2**53, -(2**53), 2**63, -(2**64), 10**300])
@pytest.mark.parametrize("kind", ["join", "publish", "ping", "nonsense"])
def test_id_beyond_javascripts_safe_integers_is_bad_frame_without_id(
    request_id: int, kind: str
) -> None:
    obj = {"type": kind, "room": "r", "data": 1, "id": request_id}
    error = refused(frame(obj))
    assert error.code == protocol.BAD_FRAME
    assert "2**53 - 1" in error.message
    assert error.request_id is None  # a browser would read it as another number
    assert "id" not in json.loads(protocol.error_frame(error.code, error.message, error.request_id))
    # Nor is it echoed in a rate_limited error, which reads ids of frames it did not parse.
    assert protocol.readable_id(frame(obj)) is None


def test_a_refused_frame_is_read_for_its_id_only_when_small() -> None:
    small = frame({"type": "publish", "room": "r", "id": 7, "data": "x"})
    assert protocol.readable_id(small) == 7
    padding = protocol.READABLE_ID_MAX_BYTES - len(small)
    at_limit = frame({"type": "publish", "room": "r", "id": 7, "data": "x" * (1 + padding)})
    assert len(at_limit) == protocol.READABLE_ID_MAX_BYTES
    assert protocol.readable_id(at_limit) == 7
    past_limit = frame({"type": "publish", "room": "r", "id": 7, "data": "x" * (2 + padding)})
    assert protocol.readable_id(past_limit) is None  # not parsed at all


@pytest.mark.parametrize("request_id", [2**53 - 1, -(2**53 - 1), 0, -1])
def test_ids_within_javascripts_safe_integers_are_echoed(request_id: int) -> None:
    assert parse_request(frame({"type": "ping", "id": request_id})) == Ping(request_id)
    assert protocol.readable_id(frame({"type": "ping", "id": request_id})) == request_id
    assert json.loads(protocol.pong_frame(request_id))["id"] == request_id


def test_publish_without_data_is_bad_frame_with_id() -> None:
    error = refused(frame({"type": "publish", "room": "r", "id": 5}))
    assert error.code == protocol.BAD_FRAME
    assert error.request_id == 5


@pytest.mark.parametrize("echo", [None, 0, 1, "false", "true", [], {}])
def test_echo_that_is_not_a_bool_is_bad_frame_with_id(echo: object) -> None:
    error = refused(frame({"type": "publish", "room": "r", "data": 1, "echo": echo, "id": 9}))
    assert error.code == protocol.BAD_FRAME
    assert error.request_id == 9


# --- unknown_type ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"room": "r"},
        {"type": None},
        {"type": "JOIN", "room": "r"},
        {"type": "subscribe", "room": "r"},
        {"type": "message", "room": "r", "data": 1},
        {"type": ["join"], "room": "r"},
        {"type": 1},
    ],
)
def test_unknown_type(obj: dict[str, Any]) -> None:
    assert refused(frame(obj)).code == protocol.UNKNOWN_TYPE
    error = refused(frame({**obj, "id": 42}))
    assert error.code == protocol.UNKNOWN_TYPE
    assert error.request_id == 42


# --- bad_room --------------------------------------------------------------------------------

BAD_ROOMS = [
    pytest.param(None, id="null"),
    pytest.param(1, id="number"),
    pytest.param(["r"], id="list"),
    pytest.param({"r": 1}, id="object"),
    pytest.param(True, id="bool"),
    pytest.param("", id="empty"),
    pytest.param("r" * 201, id="201-chars"),
    pytest.param("\U0001f600" * 201, id="201-astral-chars"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\x1fb", id="x1f"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\x7fb", id="del"),
    pytest.param("a\x85b", id="nel"),
    pytest.param("a\x9fb", id="x9f"),
    pytest.param("\ud800", id="lone-high-surrogate"),
    pytest.param("a\udfffb", id="lone-low-surrogate"),
]


@pytest.mark.parametrize("room", BAD_ROOMS)
@pytest.mark.parametrize("kind", ["join", "leave", "publish"])
def test_bad_room(room: object, kind: str) -> None:
    obj = {"type": kind, "room": room, "data": 1, "id": 11}
    error = refused(frame(obj))
    assert error.code == protocol.BAD_ROOM
    assert error.request_id == 11


@pytest.mark.parametrize("kind", ["join", "leave", "publish"])
def test_missing_room_is_bad_room(kind: str) -> None:
    error = refused(frame({"type": kind, "data": 1, "id": 3}))
    assert error.code == protocol.BAD_ROOM
    assert error.request_id == 3


def test_unpaired_surrogate_room_spelled_in_json() -> None:
    # Spelled out, to be sure the JSON escape (not a Python string) is what is tested.
    error = refused(b'{"type":"join","room":"\\ud800","id":1}')
    assert error.code == protocol.BAD_ROOM
    assert error.request_id == 1


def test_paired_surrogates_in_json_make_one_character() -> None:
    assert parse_request(b'{"type":"join","room":"\\ud83d\\ude00"}') == Join("\U0001f600")


# --- server frames ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        None,
        0,
        -1.5,
        2**70,
        "caf\u00e9 \U0001f600",
        'quote " backslash \\ newline \n nul \x00 u2028 \u2028',
        [1, "two", {"three": [None, True, False]}],
        {"nested": {"deep": ["x" * 1000]}},
        {},
        [],
    ],
)
@pytest.mark.parametrize("room", ["r", "caf\u00e9", "\U0001f600" * 200])
def test_message_frame_is_the_documented_json(room: str, data: object) -> None:
    built = protocol.message_frame(room, data)
    assert strict_json(built) == {"type": "message", "room": room, "data": data}
    assert list(strict_json(built)) == ["type", "room", "data"]


def test_message_frame_of_published_data_round_trips() -> None:
    request = parse_request(b'{"type":"publish","room":"r","data":{"k":[1,"\\u00e9"]},"id":4}')
    assert isinstance(request, Publish)
    built = protocol.message_frame(request.room, request.data, request.id)
    assert strict_json(built) == {"type": "message", "room": "r", "data": {"k": [1, "\u00e9"]}}


@pytest.mark.parametrize("data", ["\ud800", ["ok", "\udc00"], {"k": "a\ud83db"}, {"\ud800": 1}])
def test_message_frame_refuses_unpaired_surrogate(data: object) -> None:
    with pytest.raises(RequestError) as caught:
        protocol.message_frame("r", data, 17)
    assert caught.value.code == protocol.BAD_FRAME
    assert caught.value.request_id == 17


def test_message_frame_refuses_unpaired_surrogate_from_a_parsed_publish() -> None:
    request = parse_request(b'{"type":"publish","room":"r","data":"\\udbff","id":8}')
    assert isinstance(request, Publish)
    with pytest.raises(RequestError) as caught:
        protocol.message_frame(request.room, request.data, request.id)
    assert caught.value.code == protocol.BAD_FRAME
    assert caught.value.request_id == 8


# 1e400 is valid JSON that Python reads as inf; it must never go out as Infinity, which no
# browser parses.
@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"[1e999]"])
def test_huge_number_never_becomes_infinity_on_the_wire(number: bytes) -> None:
    payload = b'{"type":"publish","room":"r","data":' + number + b',"id":1}'
    try:
        request = parse_request(payload)
    except RequestError as error:
        assert error.code in (protocol.BAD_JSON, protocol.BAD_FRAME)
        return
    assert isinstance(request, Publish)
    try:
        built = protocol.message_frame(request.room, request.data, request.id)
    except RequestError as error:
        assert error.code == protocol.BAD_FRAME
        return
    strict_json(built)  # raises ValueError on Infinity


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (
            protocol.joined_frame("r", None, "e1", 0),
            {"type": "joined", "room": "r", "epoch": "e1", "offset": 0},
        ),
        (
            protocol.joined_frame("r", 3, "e1", 9, True),
            {"type": "joined", "room": "r", "id": 3, "epoch": "e1", "offset": 9, "recovered": True},
        ),
        (
            protocol.joined_frame("r", None, "e2", 0, False),
            {"type": "joined", "room": "r", "epoch": "e2", "offset": 0, "recovered": False},
        ),
        (protocol.left_frame("caf\u00e9", 0), {"type": "left", "room": "caf\u00e9", "id": 0}),
        (protocol.left_frame("r", None), {"type": "left", "room": "r"}),
        (protocol.ack_frame(5, 12), {"type": "ack", "id": 5, "offset": 12}),
        (
            protocol.history_frame("r", 4, "e1", 7, [(6, b'{"a":[1]}'), (7, b'"\xc3\xa9"')]),
            {
                "type": "history",
                "room": "r",
                "id": 4,
                "epoch": "e1",
                "offset": 7,
                "messages": [{"offset": 6, "data": {"a": [1]}}, {"offset": 7, "data": "\u00e9"}],
            },
        ),
        (
            protocol.history_frame("r", None, "e1", 0, []),
            {"type": "history", "room": "r", "epoch": "e1", "offset": 0, "messages": []},
        ),
        (protocol.pong_frame(None), {"type": "pong"}),
        (protocol.pong_frame(6), {"type": "pong", "id": 6}),
        (
            protocol.error_frame(protocol.BAD_ROOM, "no", 7),
            {"type": "error", "code": "bad_room", "message": "no", "id": 7},
        ),
        (
            protocol.error_frame(protocol.TOO_LARGE, "big"),
            {"type": "error", "code": "too_large", "message": "big"},
        ),
        (
            protocol.welcome_frame(1, 1234, 2.5),
            {"type": "welcome", "worker": 1, "pid": 1234, "heartbeat_interval": 2.5},
        ),
        (
            protocol.heartbeat_frame(1, 1700000000.125),
            {"type": "heartbeat", "seq": 1, "ts": 1700000000.125},
        ),
    ],
)
def test_other_frames_are_the_documented_json(built: bytes, expected: dict[str, Any]) -> None:
    assert strict_json(built) == expected


def test_error_codes_are_the_documented_ones() -> None:
    assert {
        protocol.BAD_JSON,
        protocol.BAD_FRAME,
        protocol.UNKNOWN_TYPE,
        protocol.BAD_ROOM,
        protocol.NOT_MEMBER,
        protocol.TOO_LARGE,
        protocol.TOO_MANY_ROOMS,
        protocol.RATE_LIMITED,
        protocol.FORBIDDEN,
        protocol.BACKPLANE_UNAVAILABLE,
    } == {
        "bad_json",
        "bad_frame",
        "unknown_type",
        "bad_room",
        "not_member",
        "too_large",
        "too_many_rooms",
        "rate_limited",
        "forbidden",
        "backplane_unavailable",
    }


@pytest.mark.parametrize(
    "extra",
    [
        {"since": 3},
        {"since": []},
        {"since": {"offset": 3}},
        {"since": {"epoch": "", "offset": 3}},
        {"since": {"epoch": "e" * 65, "offset": 3}},
        {"since": {"epoch": 5, "offset": 3}},
        {"since": {"epoch": "e"}},
        {"since": {"epoch": "e", "offset": -1}},
        {"since": {"epoch": "e", "offset": 1.0}},
        {"since": {"epoch": "e", "offset": True}},
        {"since": {"epoch": "e", "offset": 2**53}},
    ],
)
@pytest.mark.parametrize("kind", ["join", "history"])
def test_a_malformed_since_is_a_bad_frame(kind: str, extra: dict[str, Any]) -> None:
    error = refused(frame({"type": kind, "room": "r", "id": 4, **extra}))
    assert (error.code, error.request_id) == (protocol.BAD_FRAME, 4)


@pytest.mark.parametrize("limit", [-1, 1001, 2.0, "3", True, False, [], {}])
def test_a_limit_outside_0_to_1000_is_a_bad_frame(limit: object) -> None:
    error = refused(frame({"type": "history", "room": "r", "id": 5, "limit": limit}))
    assert (error.code, error.request_id) == (protocol.BAD_FRAME, 5)


def test_history_needs_a_valid_room() -> None:
    assert refused(frame({"type": "history"})).code == protocol.BAD_ROOM


@pytest.mark.parametrize(
    "message",
    [b'{"type":"message","room":"r","data":1}', b'{"type":"message","data":[]}  \n'],
)
def test_the_offset_is_spliced_into_the_frame(message: bytes) -> None:
    spliced = protocol.with_offset(message, 42)
    assert strict_json(spliced) == {**strict_json(message), "offset": 42}


def test_a_message_frame_starts_with_its_room_prefix() -> None:
    built = protocol.message_frame("caf\u00e9", {"x": 1})
    prefix = protocol.message_prefix("caf\u00e9")
    assert built.startswith(prefix) and built[len(prefix) : -1] == b'{"x":1}'
