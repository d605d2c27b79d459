"""What the ZeroMQ backplane's clients and its proxy say to each other, and the Trio glue both use.

Every client (a worker, an emitter, the heartbeat) has one DEALER socket connected to the
proxy's one ROUTER socket. A message is a list of frames. The first frame is the head: one
command byte, then the request id (8 bytes) if the command is answered, then the command's
fixed fields. Every frame costs a Python call or two on each side, and the proxy handles every
message of the cluster, so fields share the head where they can. Below, ``|`` separates frames.

Client to proxy:

- ``S request-id topic``: SUBSCRIBE; answered once the proxy routes the topic to us, or
  refused (the answer's one field says why: the proxy holds ``MAX_TOPICS_PER_PEER`` for us).
- ``U | topic | topic...``: UNSUBSCRIBE from these topics; not answered. A client queues its
  unsubscriptions and sends them together (a mass disconnect leaves thousands at once), in
  order with its other commands.
- ``Y request-id stage | topic | topic...``: one part of a SYNC, our subscriptions are exactly
  these (after the proxy restarted or forgot us); answered, or refused as SUBSCRIBE is. A set
  goes in parts of at most ``MAX_TOPICS_PER_MESSAGE`` topics, one at a time, so the proxy's
  work per message stays small. ``stage`` is one byte of flags: ``SYNC_FIRST`` starts a new
  set, ``SYNC_LAST`` ends it; the answer to the last part means the proxy holds exactly the
  set (topics subscribed or unsubscribed meanwhile included).
- ``P request-id topic | payload``: PUBLISH to the topic's subscribers; answered once routed.
- ``A request-id topic | payload``: APPEND, number the message in the topic's series, keep it in
  its history and deliver it to the subscribers; answered with its position once routed.
- ``H request-id topic | since | limit``: HISTORY of the topic; ``since`` is a position or empty
  (none), ``limit`` a count or empty (none). Answered with a history head and the payloads.
- ``? request-id count``: PING, are you there, and do you hold ``count`` topics for us?
  answered with the proxy's instance id and its count.
- ``C bytes``: CREDIT, our consumer has taken this many more bytes of messages; not answered.
- ``B``: BYE, forget us; not answered.

Proxy to client:

- ``R request-id [| field...]``: REPLY, the answer to a request (a PING's carries two fields,
  a HISTORY's a history head and then one frame per kept payload; a SUBSCRIBE's or SYNC's one
  field, the reason, when the proxy refused it).
- ``R request-id position``: the REPLY to an APPEND, its position in the head.
- ``M topic | payload``: MESSAGE on a topic we subscribed to, sent with PUBLISH.
- ``N position topic | payload``: NUMBERED message, sent with APPEND, with its position.

A position is the offset (a NUMBER) then the epoch's 16 ASCII characters: fixed in size, so
that a numbered message's position shares its head with the topic and costs the proxy nothing
per subscriber (a frame more would, for each one). A history head is one frame: the latest
offset, the offset of the first payload that follows (NUMBERs), one byte (1: complete, 0:
not), then the epoch's characters.
"""

from __future__ import annotations

import struct
from typing import cast

import zmq

SUBSCRIBE = b"S"
UNSUBSCRIBE = b"U"
SYNC = b"Y"
PUBLISH = b"P"
APPEND = b"A"
HISTORY = b"H"
PING = b"?"
CREDIT = b"C"
BYE = b"B"

REPLY = b"R"
MESSAGE = b"M"
NUMBERED = b"N"

# The flags of a SYNC part's stage byte.
SYNC_FIRST = 1
SYNC_LAST = 2

# Topics per UNSUBSCRIBE or SYNC message, at most. A mass disconnect leaves thousands of rooms
# at once and a reconnect sends every topic held; in parts of this size the proxy handles a
# bounded number of topics per wake-up, and a message stays far below the proxy's size limit.
MAX_TOPICS_PER_MESSAGE = 1_000

# Request ids, counts and credits: one unsigned 64-bit integer each.
NUMBER = struct.Struct(">Q")
# Where a head's request id ends and what follows it begins.
ID_END = 1 + NUMBER.size
# A history head's fixed fields: latest offset, first offset, complete.
HISTORY_HEAD = struct.Struct(">QQ?")


# Epochs are 16 hex characters (backplane._sequencer.new_epoch); a position is 24 bytes.
EPOCH_SIZE = 16
POSITION_SIZE = NUMBER.size + EPOCH_SIZE
# An epoch no sequencer gives (not hex): what a history query sends for a foreign epoch.
FOREIGN_EPOCH = b"-" * EPOCH_SIZE
# Where a numbered message's position ends and its topic begins.
POSITION_END = 1 + POSITION_SIZE


def pack_position(offset: int, epoch: bytes) -> bytes:
    return NUMBER.pack(offset) + epoch


def unpack_position(frame: bytes) -> tuple[str, int]:
    """``(epoch, offset)`` from a position; raises ``ValueError`` if it is not one."""
    if len(frame) != POSITION_SIZE:
        raise ValueError(f"not a position: {frame!r}")
    return frame[NUMBER.size :].decode("ascii"), NUMBER.unpack_from(frame)[0]


# What one message costs the flow control beyond its topic and payload: ZeroMQ's message
# structures on both sides and the Python objects that hold it in the client, roughly. It keeps
# a flood of empty messages bounded too.
MESSAGE_OVERHEAD_BYTES = 256


def message_cost(topic: bytes, payload: bytes) -> int:
    """The bytes a message counts for in the proxy's flow control (see the proxy's docstring)."""
    return len(topic) + len(payload) + MESSAGE_OVERHEAD_BYTES


# pyzmq's send_multipart and recv_multipart combine its flags as enum.Flag members, which costs
# more than the sends and receives themselves (measured: 12.6 µs to send four frames that way,
# 3.9 µs frame by frame with these plain integers).
_SEND_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_SEND_LAST = _NO_WAIT = int(zmq.NOBLOCK)
_RECEIVE_MORE = int(zmq.RCVMORE)


def send_frames(sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
    """Send one multipart message without blocking; raises ``zmq.Again`` (nothing sent) or
    ``zmq.ZMQError`` as ``send_multipart`` would. Once the first frame is accepted, ZeroMQ
    accepts the rest: a message goes out whole or not at all."""
    send = sock.send
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        send(frame, _SEND_MORE if index < last else _SEND_LAST)


def receive_frames(sock: zmq.Socket[bytes]) -> list[bytes]:
    """Receive one multipart message without blocking; raises ``zmq.Again`` if none is ready."""
    recv, more = sock.recv, sock.get
    frames: list[bytes] = [recv(_NO_WAIT)]
    while more(_RECEIVE_MORE):
        frames.append(recv(_NO_WAIT))
    return frames


def receive_bounded_frames(sock: zmq.Socket[bytes], max_frames: int) -> tuple[list[bytes], bool]:
    """Like :func:`receive_frames`, and whether the message was whole: of a message of more
    than ``max_frames`` frames only the first ``max_frames`` are read, and the caller drops the
    rest with :func:`drop_frames` (a hostile message never becomes a list of a million items,
    and dropping it can be spread over several turns)."""
    recv, more = sock.recv, sock.get
    frames: list[bytes] = [recv(_NO_WAIT)]
    while more(_RECEIVE_MORE):
        if len(frames) == max_frames:
            return frames, False
        frames.append(recv(_NO_WAIT))
    return frames, True


def drop_frames(sock: zmq.Socket[bytes], max_frames: int) -> tuple[int, bool]:
    """Read and drop at most ``max_frames`` frames of the message being received; returns how
    many, and whether the message has ended."""
    recv, more = sock.recv, sock.get
    for dropped in range(max_frames):
        if not more(_RECEIVE_MORE):
            return dropped, True
        recv(_NO_WAIT)
    return max_frames, not more(_RECEIVE_MORE)


def zmq_endpoint(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def events(sock: zmq.Socket[bytes]) -> int:
    """The socket's ``zmq.EVENTS`` bits (pyzmq types every option's value as int, bytes or str)."""
    return cast(int, sock.getsockopt(zmq.EVENTS))


def file_descriptor(sock: zmq.Socket[bytes]) -> int:
    """The socket's ``zmq.FD``: readable (edge-triggered) when ``zmq.EVENTS`` may have changed."""
    return cast(int, sock.getsockopt(zmq.FD))
