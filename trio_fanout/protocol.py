"""The client protocol (docs/protocol.md), sans I/O: client frames in, server frames out.

``parse_request`` is the single place that decides whether a client frame is acceptable and, if
not, which error code it earns. Server frames are built here as UTF-8 JSON bytes.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import attrs

MAX_ROOM_LENGTH = 200

# An epoch is an opaque string the server made (16 hex characters today): a much longer one
# cannot be ours, and is refused before it costs anything.
MAX_EPOCH_LENGTH = 64

# How many messages a ``history`` answer holds when the request names no ``limit``, and the
# largest ``limit`` accepted: a page of history is one frame, built and sent at once.
HISTORY_DEFAULT_LIMIT = 100
HISTORY_MAX_LIMIT = 1000

# The largest integer a JavaScript number holds exactly (Number.MAX_SAFE_INTEGER): a browser
# would read a larger id as a neighbouring one, and match our reply to the wrong request.
MAX_SAFE_ID = 2**53 - 1
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Error codes (docs/protocol.md, "Error codes"). Stable: clients branch on them.
BAD_JSON = "bad_json"
BAD_FRAME = "bad_frame"
UNKNOWN_TYPE = "unknown_type"
BAD_ROOM = "bad_room"
NOT_MEMBER = "not_member"
TOO_LARGE = "too_large"
TOO_MANY_ROOMS = "too_many_rooms"
RATE_LIMITED = "rate_limited"
FORBIDDEN = "forbidden"
BACKPLANE_UNAVAILABLE = "backplane_unavailable"
ERROR_CODES = (
    BAD_JSON, BAD_FRAME, UNKNOWN_TYPE, BAD_ROOM, NOT_MEMBER, TOO_LARGE, TOO_MANY_ROOMS,
    RATE_LIMITED, FORBIDDEN, BACKPLANE_UNAVAILABLE,
)  # fmt: skip

# The close code for a connection without a valid token where the server requires one: no
# ``auth`` first frame, a bad token, none in time, or a token that expired without a refresh.
# In the 4000-4999 range RFC 6455 leaves to applications.
CLOSE_UNAUTHENTICATED = 4001


class RequestError(Exception):
    """A client frame that is refused with an ``error`` frame; the connection stays open."""

    def __init__(self, code: str, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@attrs.frozen
class Since:
    """A client's last known place in a room: the ``since`` of ``join`` and ``history``."""

    epoch: str
    offset: int


@attrs.frozen
class Join:
    room: str
    id: int | None = None
    since: Since | None = None


@attrs.frozen
class Leave:
    room: str
    id: int | None = None


@attrs.frozen
class Publish:
    room: str
    data: Any
    id: int | None = None
    echo: bool = True


@attrs.frozen
class Ping:
    id: int | None = None


@attrs.frozen
class HistoryRequest:
    room: str
    id: int | None = None
    since: Since | None = None
    limit: int = HISTORY_DEFAULT_LIMIT


@attrs.frozen
class Auth:
    """``auth`` (the first frame, where tokens are required) or ``refresh`` (a new token for
    an authenticated connection)."""

    token: str = attrs.field(repr=False)  # the request is logged at debug level: never a token
    id: int | None = None
    refresh: bool = False


Request = Join | Leave | Publish | Ping | HistoryRequest | Auth

_TYPES = ("join", "leave", "publish", "ping", "history", "auth", "refresh")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON but overflows to inf, which json.dumps would write as Infinity.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is too large for a double")
    return value


def parse_request(payload: bytes, *, is_text: bool = True) -> Request:
    """Decode one client message, or raise :class:`RequestError` with the code it earns.

    The payload of a text message is valid UTF-8: the WebSocket codec fails a connection that
    sends anything else (close code 1007) before its message gets here.
    """
    if not is_text:
        raise RequestError(BAD_FRAME, "binary frames are not accepted; send JSON in text frames")
    try:
        obj = json.loads(
            payload.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (ValueError, RecursionError):
        raise RequestError(BAD_JSON, "the frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise RequestError(BAD_FRAME, "a frame must be a JSON object")
    request_id = obj.get("id")
    if request_id is not None and not _usable_id(request_id):
        # No id in the error: a client that cannot read this id could not match it either.
        raise RequestError(
            BAD_FRAME, f"id must be an integer from -{MAX_SAFE_ID} to {MAX_SAFE_ID} (2**53 - 1)"
        )
    kind = obj.get("type")
    if kind == "ping":
        return Ping(request_id)
    if kind not in _TYPES:
        raise RequestError(UNKNOWN_TYPE, f"type must be one of {', '.join(_TYPES)}", request_id)
    if kind in ("auth", "refresh"):
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise RequestError(BAD_FRAME, f"{kind} needs a token, a non-empty string", request_id)
        return Auth(token, request_id, refresh=kind == "refresh")
    room = check_room(obj.get("room"), request_id)
    if kind == "join":
        return Join(room, request_id, _since(obj, request_id))
    if kind == "history":
        return HistoryRequest(room, request_id, _since(obj, request_id), _limit(obj, request_id))
    if kind == "leave":
        return Leave(room, request_id)
    if "data" not in obj:
        raise RequestError(BAD_FRAME, "publish needs a data field", request_id)
    echo = obj.get("echo", True)
    if type(echo) is not bool:
        raise RequestError(BAD_FRAME, "echo must be true or false", request_id)
    return Publish(room, obj["data"], request_id, echo)


def _since(obj: dict[str, Any], request_id: int | None) -> Since | None:
    """The optional ``since`` of a request: ``{"epoch": str, "offset": int >= 0}``."""
    since = obj.get("since")
    if since is None:
        return None
    if not isinstance(since, dict):
        raise RequestError(BAD_FRAME, "since must be an object with epoch and offset", request_id)
    epoch, offset = since.get("epoch"), since.get("offset")
    if not isinstance(epoch, str) or not 1 <= len(epoch) <= MAX_EPOCH_LENGTH:
        raise RequestError(
            BAD_FRAME,
            f"since.epoch must be a string of 1 to {MAX_EPOCH_LENGTH} characters",
            request_id,
        )
    if type(offset) is not int or not 0 <= offset <= MAX_SAFE_ID:
        raise RequestError(
            BAD_FRAME, f"since.offset must be an integer from 0 to {MAX_SAFE_ID}", request_id
        )
    return Since(epoch, offset)


def _limit(obj: dict[str, Any], request_id: int | None) -> int:
    """The ``limit`` of a ``history`` request; ``null`` is the same as absent, as for ``id``
    and ``since``."""
    limit = obj.get("limit")
    if limit is None:
        return HISTORY_DEFAULT_LIMIT
    if type(limit) is not int or not 0 <= limit <= HISTORY_MAX_LIMIT:
        raise RequestError(
            BAD_FRAME, f"limit must be an integer from 0 to {HISTORY_MAX_LIMIT}", request_id
        )
    return limit


def message_frame(room: str, data: object, request_id: int | None = None) -> bytes:
    """The frame every member of ``room`` receives; built once, by the publisher.

    JSON can spell an unpaired surrogate (``"\\ud800"``) that UTF-8 cannot carry: such data is
    refused here rather than sent to browsers that would reject the whole frame.
    """
    try:
        return b'{"type":"message","room":' + _dump(room) + b',"data":' + _dump(data) + b"}"
    except UnicodeEncodeError:
        raise RequestError(BAD_FRAME, "data holds an unpaired surrogate", request_id) from None
    except ValueError as error:
        raise RequestError(BAD_FRAME, f"data cannot be sent as JSON: {error}", request_id) from None
    except RecursionError:
        raise RequestError(BAD_FRAME, "data is nested too deeply", request_id) from None


# A frame refused before it was looked at (rate limit) is parsed for its id only up to this
# size: a refusal must cost the server little, and parsing JSON costs up to ~40 µs a KiB (a long
# array of small numbers), 6 ms for a 64 KiB frame. Requests without large data (join, leave,
# ping, small publishes) fit, and are the ones a client matches answers to by id.
READABLE_ID_MAX_BYTES = 1024


def readable_id(payload: bytes) -> int | None:
    """The ``id`` of a client frame refused before it was looked at (rate limit), if it has a
    readable one and is at most ``READABLE_ID_MAX_BYTES`` long: errors carry the request's id
    wherever they can do so cheaply."""
    if len(payload) > READABLE_ID_MAX_BYTES:
        return None
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    request_id = obj.get("id") if isinstance(obj, dict) else None
    return request_id if _usable_id(request_id) else None


def _usable_id(request_id: object) -> bool:
    """Whether ``request_id`` is an integer (``true`` and ``1.0`` are not) that every client,
    a browser included, reads back exactly."""
    return type(request_id) is int and -MAX_SAFE_ID <= request_id <= MAX_SAFE_ID


def check_room(room: object, request_id: int | None = None) -> str:
    """``room`` if it is a valid room name, else :class:`RequestError` ``bad_room``."""
    if not isinstance(room, str):
        raise RequestError(BAD_ROOM, "room must be a string", request_id)
    if not 1 <= len(room) <= MAX_ROOM_LENGTH:
        raise RequestError(
            BAD_ROOM, f"room must be 1 to {MAX_ROOM_LENGTH} characters long", request_id
        )
    if _CONTROL_CHARACTER.search(room):
        raise RequestError(BAD_ROOM, "room must not contain control characters", request_id)
    if not room.isascii():
        try:
            room.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(BAD_ROOM, "room holds an unpaired surrogate", request_id) from None
    return room


def _dump(value: object) -> bytes:
    """Compact UTF-8 JSON; NaN and the infinities are refused (``ValueError``): they are not
    JSON, and a browser would reject the whole frame."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _with_id(frame: dict[str, Any], request_id: int | None) -> bytes:
    if request_id is not None:
        frame["id"] = request_id
    return _dump(frame)


def welcome_frame(worker: int, pid: int, heartbeat_interval: float) -> bytes:
    return _dump(
        {"type": "welcome", "worker": worker, "pid": pid, "heartbeat_interval": heartbeat_interval}
    )


def joined_frame(
    room: str, request_id: int | None, epoch: str, offset: int, recovered: bool | None = None
) -> bytes:
    """``joined``: ``epoch`` and ``offset`` say where this connection's messages start (every
    message after ``offset`` reaches it); ``recovered`` answers a join with ``since`` only.

    Without ``request_id`` (and with ``recovered`` false) it tells a member that the room's
    numbering started again."""
    frame: dict[str, Any] = {"type": "joined", "room": room, "epoch": epoch, "offset": offset}
    if recovered is not None:
        frame["recovered"] = recovered
    return _with_id(frame, request_id)


def left_frame(room: str, request_id: int | None) -> bytes:
    return _with_id({"type": "left", "room": room}, request_id)


def ack_frame(request_id: int, offset: int) -> bytes:
    return _dump({"type": "ack", "id": request_id, "offset": offset})


def with_offset(message: bytes, offset: int) -> bytes:
    """A room's ``message`` frame with its offset added, once per message for all recipients.

    ``message`` is a JSON object with at least one member (the worker relays no other), so
    its last byte, once trailing whitespace is gone, is the closing brace."""
    if not message.endswith(b"}"):
        message = message.rstrip(b" \t\r\n")
    return b'%b,"offset":%d}' % (message[:-1], offset)


def message_prefix(room: str) -> bytes:
    """What every ``message`` frame for ``room`` built by :func:`message_frame` starts with:
    its ``data`` follows, then the closing brace."""
    return b'{"type":"message","room":' + _dump(room) + b',"data":'


def history_frame(
    room: str, request_id: int | None, epoch: str, offset: int, messages: list[tuple[int, bytes]]
) -> bytes:
    """The answer to ``history``. Each message is ``(offset, data)`` where ``data`` is already
    the JSON text of the message's data, spliced in as it is rather than decoded and encoded
    again."""
    head: dict[str, Any] = {"type": "history", "room": room}
    if request_id is not None:
        head["id"] = request_id
    head["epoch"] = epoch
    head["offset"] = offset
    head["messages"] = []
    items = b",".join(b'{"offset":%d,"data":%b}' % (number, data) for number, data in messages)
    return _dump(head)[: -len(b"[]}")] + b"[" + items + b"]}"


def authed_frame(request_id: int | None, sub: str, exp: int) -> bytes:
    return _with_id({"type": "authed", "sub": sub, "exp": exp}, request_id)


def token_expiring_frame(exp: int) -> bytes:
    return _dump({"type": "token_expiring", "exp": exp})


def pong_frame(request_id: int | None) -> bytes:
    return _with_id({"type": "pong"}, request_id)


def error_frame(code: str, message: str, request_id: int | None = None) -> bytes:
    return _with_id({"type": "error", "code": code, "message": message}, request_id)


def broadcast_frame(data: object) -> bytes:
    """A message to every connection (an emitter's broadcast): a ``message`` with no room."""
    try:
        return b'{"type":"message","data":' + _dump(data) + b"}"
    except UnicodeEncodeError:
        raise RequestError(BAD_FRAME, "data holds an unpaired surrogate") from None
    except ValueError as error:
        raise RequestError(BAD_FRAME, f"data cannot be sent as JSON: {error}") from None
    except RecursionError:
        raise RequestError(BAD_FRAME, "data is nested too deeply") from None


def heartbeat_frame(seq: int, timestamp: float) -> bytes:
    return _dump({"type": "heartbeat", "seq": seq, "ts": timestamp})
