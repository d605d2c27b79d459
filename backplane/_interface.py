"""The interface every backplane backend implements, and the errors it raises."""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import attrs
import trio


class BackplaneError(Exception):
    """Base class of the errors this package raises on purpose."""


class BadBackplaneURL(BackplaneError, ValueError):
    """A backplane URL that no backend accepts; the message says what is wrong with it."""


class BackplaneUnavailable(BackplaneError):
    """The backplane cannot take this publish or subscription right now; nothing was sent."""


@attrs.frozen
class Position:
    """Where a message stands in its topic's numbered series."""

    epoch: str
    """Opaque; changes whenever the topic's numbering starts again (first append, expiry,
    eviction, a restart of the sequencer)."""
    offset: int
    """1, 2, 3 ... per topic and epoch; 0 means "nothing yet"."""


class Received(NamedTuple):
    """One message as a subscriber receives it."""

    topic: bytes
    payload: bytes
    position: Position | None
    """Its place in the topic's series; None for a message sent with ``publish`` (unnumbered)."""


@attrs.frozen
class History:
    """A topic's state at its sequencer, and the messages it keeps (see ``Backplane.history``)."""

    epoch: str
    offset: int
    """The topic's latest offset (0 if none)."""
    messages: list[tuple[int, bytes]]
    """``(offset, payload)``, oldest first."""
    complete: bool


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be a whole number >= 0, not {value!r}")


def _positive_seconds(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a number of seconds > 0, not {value!r}")


@attrs.frozen
class HistoryPolicy:
    """What a topic's sequencer keeps. The defaults let a client that reconnects within a few
    minutes recover what it missed, in a bounded amount of memory."""

    size: int = attrs.field(default=100, validator=_non_negative)
    """Messages kept per topic (0: no history, offsets still assigned)."""
    ttl: float = attrs.field(default=300.0, validator=_positive_seconds)
    """Seconds a topic's history (and numbering) lives after its last append."""
    max_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_non_negative)
    """Bound on all topics' kept payloads together (memory and zmq sequencers; on Redis,
    Redis's own ``maxmemory`` governs)."""


class Backplane(abc.ABC):
    """Topic-based publish/subscribe between processes.

    Topics and payloads are bytes; the backplane never looks inside a payload. A topic is matched
    exactly: callers that need prefix safety on a prefix-matching transport (ZeroMQ) get it from
    the backend, not by convention.

    Messages from one publisher on one topic arrive in the order they were published. Messages
    sent with :meth:`append` are numbered by the topic's one sequencer, so every subscriber
    receives them in the same order, whoever appended them.
    """

    @abc.abstractmethod
    async def publish(self, topic: bytes, payload: bytes) -> None:
        """Hand one message to the backplane, or raise :class:`BackplaneUnavailable`.

        The message is not numbered and not kept (broadcasts, heartbeats); see :meth:`append`.
        """

    @abc.abstractmethod
    async def append(self, topic: bytes, payload: bytes) -> Position:
        """Have the topic's sequencer number the message, keep it in the topic's history, and
        deliver it to subscribers with its position; return that position.

        Raises :class:`BackplaneUnavailable` like :meth:`publish`.
        """

    @abc.abstractmethod
    async def history(
        self, topic: bytes, since: Position | None = None, limit: int | None = None
    ) -> History:
        """The topic's current epoch and latest offset, and its kept messages, read atomically
        at the sequencer.

        - Without ``since``: the kept messages (the newest ``limit`` if limited); complete.
        - With ``since`` in the current epoch and within the kept history: the messages after
          ``since.offset`` (the first ``limit`` of them if limited); ``complete`` tells whether
          nothing after ``since.offset`` is missing from them.
        - With ``since`` of another epoch, older than the kept history or ahead of the latest
          offset: no messages, ``complete`` False.

        ``limit=0`` returns no messages: a cheap "where are we" query. Reading a topic that has
        no numbering yet starts one (a new epoch at offset 0), so that a reader who saw offset
        0 can later recover what was appended after.
        """

    @abc.abstractmethod
    async def subscribe(self, topic: bytes) -> None:
        """Start receiving ``topic``; on return the subscription is live end to end.

        Anything published on ``topic`` by anyone after this returns is received. Raises
        :class:`BackplaneUnavailable` when that cannot be established in time.
        Subscriptions are counted: each call needs its own :meth:`unsubscribe`.
        """

    @abc.abstractmethod
    def unsubscribe(self, topic: bytes) -> None:
        """Undo one :meth:`subscribe`; never blocks (the backend sends it when it can)."""

    @abc.abstractmethod
    async def receive_batch(self, max_messages: int | None = None) -> list[Received]:
        """Wait for at least one message and return those that are ready (up to
        ``max_messages``), oldest first.

        Batches let a consumer do per-wake-up work (flushing sockets) once per batch instead of
        once per message.
        """

    @property
    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """Why this backplane cannot carry messages right now, or None while it can.

        It reports what the backend already knows (a connection down, a proxy that stopped
        answering its probes) and sends nothing, so it is cheap to ask. A worker's ``/healthz``
        shows it, so that a load balancer stops sending clients to a worker whose joins and
        publishes would fail. None is no promise: the next publish can still be refused.
        """

    @property
    def available(self) -> bool:
        """Whether the backplane can carry messages right now (see :attr:`unavailable_reason`)."""
        return self.unavailable_reason is None

    def __aiter__(self) -> Backplane:
        """Iterate :class:`Received` messages one at a time while the backplane is open.

        Each step takes one message, so leaving the loop early leaves the rest for later; and
        the backplane is its own iterator (not an async generator), so it needs no closing.
        """
        return self

    async def __anext__(self) -> Received:
        (message,) = await self.receive_batch(1)
        return message


def check_topic(topic: bytes) -> None:
    """Refuse topics that no backend can carry faithfully, the same way for every backend."""
    if not isinstance(topic, bytes) or not topic:
        raise ValueError(f"a topic is non-empty bytes, not {topic!r}")


# Offsets and limits a backend sends on in a history query are capped here: beyond any offset a
# sequencer will reach (2**53: exact as a Lua number in Redis, and within the ZeroMQ wire's
# 64 bits), so the answer is the same as for the number asked for.
QUERY_NUMBER_CAP = 2**53


def check_history_query(since: Position | None, limit: int | None) -> None:
    """Refuse a history query that no backend could answer, the same way for every backend."""
    if since is not None and not isinstance(since, Position):
        raise ValueError(f"since is a Position or None, not {since!r}")
    if since is not None and since.offset < 0:
        raise ValueError(f"since.offset is >= 0, not {since.offset}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit is an int >= 0 or None, not {limit!r}")


class MessageQueue:
    """The messages a backend has received and its consumer has not yet taken.

    One producer (the backend's reader) and one consumer (:meth:`Backplane.receive_batch`).
    The producer stops producing when the queue holds ``high_water`` messages, which hands
    backpressure to the transport instead of growing memory without bound.
    """

    def __init__(self, high_water: int) -> None:
        self.high_water = high_water
        self._messages: list[Received] = []
        self._not_empty = trio.Event()
        self._not_full = trio.Event()
        self._not_full.set()

    def __len__(self) -> int:
        return len(self._messages)

    def put(self, topic: bytes, payload: bytes, position: Position | None = None) -> None:
        self._messages.append(Received(topic, payload, position))
        self._not_empty.set()
        if len(self._messages) >= self.high_water:
            self._not_full = trio.Event()

    async def wait_not_full(self) -> None:
        await self._not_full.wait()

    async def take(self, max_messages: int | None = None) -> list[Received]:
        """Wait for a message; return all that are ready, or the oldest ``max_messages``."""
        while not self._messages:
            self._not_empty = trio.Event()
            await self._not_empty.wait()
        await trio.lowlevel.checkpoint()
        if max_messages is None or max_messages >= len(self._messages):
            batch, self._messages = self._messages, []
        else:
            batch = self._messages[:max_messages]
            del self._messages[:max_messages]
        if len(self._messages) < self.high_water:
            self._not_full.set()
        return batch


@contextlib.contextmanager
def unwrap_single_errors() -> Iterator[None]:
    """Let an exception raised inside a backend's nursery reach the caller as itself.

    A backend runs its reader in a nursery around the caller's ``async with`` block, and Trio
    wraps whatever leaves a nursery in an ExceptionGroup. The caller of ``open_backplane``
    should be able to write ``except BackplaneUnavailable`` (or see its own error unchanged),
    whichever backend the URL picked.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is group:
            raise
        raise error from None
