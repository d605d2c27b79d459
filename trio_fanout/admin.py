"""The admin port: Prometheus metrics, the status page, and the HTTP API (docs/operations.md).

One small HTTP/1.1 server, apart from the WebSocket port so that it can stay on 127.0.0.1
while clients come from everywhere. It serves:

- ``GET /metrics``: the whole node in one scrape, gathered from the workers at that moment;
- ``GET /status`` (an HTML page) and ``GET /status.json`` (the figures it polls): no secrets,
  no messages, so not behind the API key;
- ``/api/...``, behind the API key (``Authorization: Bearer KEY``): ``POST /api/publish`` and
  ``GET /api/info``. Without ``api_key_file`` the API is off and answers 404.

Every request gets one answer and the connection closes. Request heads are parsed by the
WebSocket port's own parser (``websocket.RequestHeadReader``); bodies are bounded.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.resources
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from trio_fanout import control, protocol, websocket
from trio_fanout.backplane import BackplaneError
from trio_fanout.config import Config
from trio_fanout.emitter import Emitter, open_emitter
from trio_fanout.metrics import NodeStats, metric_families

logger = logging.getLogger(__name__)

STATUS_PAGE = (
    importlib.resources.files("trio_fanout").joinpath("static", "status.html").read_bytes()
)

# The largest request body taken (a publish's JSON): far above any message a dashboard or a
# chat sends, and small enough that a few stray uploads cannot fill the master's memory.
MAX_BODY_BYTES = 1024 * 1024

# From the accept to the whole request read and answered: an operator's curl or a scraper
# takes milliseconds; a client that trickles bytes must not hold a connection for long.
REQUEST_TIMEOUT = 10.0

# After an answer, how long the server keeps reading (and discarding) what the client still
# sends, at most LINGER_BYTES of it, before closing: a client refused before its whole body was
# read (413) is still sending it, and closing with unread input would reset the connection and
# could destroy the answer before the client reads it. A client that reads its answer closes
# at once, well within this.
ANSWER_LINGER = 1.0
LINGER_BYTES = 2 * MAX_BODY_BYTES

# Admin connections served at once. A scraper and a few operators need a handful; the bound
# keeps a flood from taking the master's descriptors. Past it, a new connection takes the place
# of the one that has waited longest for its request head (a client that connects and says
# nothing), and is closed at once only if none is waiting: idle connections cannot lock the
# scraper out.
MAX_CONNECTIONS = 64

# After the backplane could not be opened for API publishes, the pause before trying again.
BACKPLANE_RETRY_PAUSE = 1.0

# The fields of a POST /api/publish body.
PUBLISH_FIELDS = frozenset({"room", "data"})

_JSON = "application/json"

AskWorkers = Callable[[bytes], Awaitable[list[dict[str, Any]]]]


class ApiKeyError(OSError):
    """The API key file cannot be used (the message names the file, never its content)."""


def read_api_key(path: str) -> bytes:
    """The key in ``path``: its content without the surrounding white space."""
    try:
        with open(path, "rb") as file:
            key = file.read().strip()
    except OSError as error:
        raise ApiKeyError(f"api_key_file {path}: cannot read it: {error.strerror}") from None
    if not key:
        raise ApiKeyError(f"api_key_file {path}: the file is empty")
    return key


class _Snapshot:
    """A collector that hands over metrics already gathered (prometheus-client's registry
    collects synchronously; the workers' reports were gathered asynchronously before)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def exposition(families: list[Metric]) -> bytes:
    """``families`` in Prometheus's text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return generate_latest(registry)


def _json_response(
    status: int, value: object, headers: list[tuple[str, str]] | None = None
) -> bytes:
    body = json.dumps(value).encode() + b"\n"
    return websocket.http_response(status, body, _JSON, headers=headers or [])


def _error(status: int, code: str, message: str) -> bytes:
    headers = [("WWW-Authenticate", "Bearer")] if status == 401 else []
    return _json_response(status, {"error": code, "message": message}, headers)


class _Refused(Exception):
    """A request answered with an error (``response``) before it was read to its end."""

    def __init__(self, response: bytes) -> None:
        self.response = response


async def _linger(stream: trio.SocketStream) -> None:
    """Close our side, then read what the client still sends (see ANSWER_LINGER)."""
    await stream.send_eof()
    discarded = 0
    with trio.move_on_after(ANSWER_LINGER):
        while discarded < LINGER_BYTES and (data := await stream.receive_some(65536)):
            discarded += len(data)


class AdminServer:
    """Answers the admin port's requests for one process: a master (``workers`` are its
    workers, asked through ``ask_workers``), a standalone worker, or a standalone proxy (no
    workers)."""

    def __init__(
        self,
        config: Config,
        node: NodeStats,
        ask_workers: AskWorkers,
        workers: Iterable[int],
    ) -> None:
        self._config = config
        self._node = node
        self._ask_workers = ask_workers
        self._workers = list(workers)
        self._api_key = None if config.api_key_file is None else read_api_key(config.api_key_file)
        self._emitter: Emitter | None = None
        self._open_connections = 0
        # The connections still waiting for their request head, oldest first.
        self._waiting_for_heads: dict[trio.CancelScope, None] = {}

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on ``admin_host:admin_port`` until cancelled; ``started`` gives the port."""
        config = self._config
        assert config.admin_port is not None
        try:
            listeners = await trio.open_tcp_listeners(config.admin_port, host=config.admin_host)
        except OSError as error:  # say which port: the WebSocket port fails the same way
            raise OSError(
                error.errno, f"admin port {config.admin_host}:{config.admin_port}: {error.strerror}"
            ) from None
        port = listeners[0].socket.getsockname()[1]
        host = f"[{config.admin_host}]" if ":" in config.admin_host else config.admin_host
        logger.info("admin port on http://%s:%d/ (/metrics, /status, /api)", host, port)
        async with trio.open_nursery() as nursery:
            if self._api_key is not None:
                nursery.start_soon(self._keep_emitter)
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(port)

    async def _keep_emitter(self) -> None:
        """Hold an emitter on the backplane for API publishes; reopen it when opening fails."""
        while True:
            try:
                async with open_emitter(
                    self._config.backplane_url, credentials=self._config.backplane_credentials
                ) as emitter:
                    self._emitter = emitter
                    await trio.sleep_forever()
            except BackplaneError as error:
                logger.warning("admin API: cannot open the backplane (%s); trying again", error)
            finally:
                self._emitter = None
            await trio.sleep(BACKPLANE_RETRY_PAUSE)

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection, one answer; nothing a client sends escapes as an exception."""
        if self._open_connections >= MAX_CONNECTIONS:
            if not self._waiting_for_heads:
                await trio.aclose_forcefully(stream)
                return
            oldest = next(iter(self._waiting_for_heads))  # dicts keep their insertion order
            del self._waiting_for_heads[oldest]
            oldest.cancel()
        self._open_connections += 1
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                response = await self._answer(stream)
                if response is not None:
                    await stream.send_all(response)
                    await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:
            logger.exception("admin port: internal error")
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.send_all(_error(500, "internal_error", "internal error"))
        finally:
            self._open_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream) -> bytes | None:
        head = websocket.RequestHeadReader()
        try:
            complete = None
            # Until the head is complete, a newcomer may take this connection's place.
            with trio.CancelScope() as waiting:
                self._waiting_for_heads[waiting] = None
                try:
                    while complete is None:
                        data = await stream.receive_some(65536)
                        if not data:
                            return None
                        complete = head.feed(data)
                finally:
                    self._waiting_for_heads.pop(waiting, None)
            if complete is None:
                return None  # its place was taken
            request, body = complete
            body = await self._read_body(stream, request, body)
        except websocket.NotHTTP:
            return None
        except websocket.HandshakeError as refusal:
            return _error(refusal.status, "bad_request", str(refusal))
        except _Refused as refused:
            return refused.response
        return await self._route(request, body)

    async def _read_body(
        self, stream: trio.SocketStream, request: websocket.Request, body: bytes
    ) -> bytes:
        if "transfer-encoding" in request.headers:
            raise _Refused(_error(411, "length_required", "send the body with Content-Length"))
        text = request.headers.get("content-length", "0")
        if not (text.isascii() and text.isdigit()):  # "²".isdigit(), but int("²") fails
            raise _Refused(_error(400, "bad_request", "Content-Length is not a number"))
        length = int(text)
        if length > MAX_BODY_BYTES:
            raise _Refused(
                _error(413, "too_large", f"the body is larger than {MAX_BODY_BYTES} bytes")
            )
        buffer = bytearray(body)
        while len(buffer) < length:
            data = await stream.receive_some(length - len(buffer))
            if not data:
                raise _Refused(_error(400, "bad_request", "the body ended before Content-Length"))
            buffer += data
        return bytes(buffer[:length])

    async def _route(self, request: websocket.Request, body: bytes) -> bytes:
        path, method = request.path, request.method
        if path.startswith("/api/"):
            return await self._api(request, body)
        if path in ("/metrics", "/status", "/status.json") and method != "GET":
            return _error(405, "method_not_allowed", f"{path} takes GET")
        if path == "/metrics":
            reports = await self._ask_workers(control.REPORT)
            families = metric_families(self._node, reports, self._workers)
            return websocket.http_response(200, exposition(families), CONTENT_TYPE_LATEST)
        if path == "/status":
            return websocket.http_response(200, STATUS_PAGE, "text/html; charset=utf-8")
        if path == "/status.json":
            return _json_response(200, await self._status())
        return _error(404, "not_found", "not found: try /metrics, /status or /api/")

    async def _status(self) -> dict[str, Any]:
        """The figures the status page shows, taken from the same reports as the metrics."""
        reports = {report["worker"]: report for report in await self._ask_workers(control.REPORT)}
        workers = []
        for index in sorted(set(self._workers) | set(reports)):
            report = reports.get(index)
            entry: dict[str, Any] = {
                "worker": index,
                "up": report is not None,
                "restarts": self._node.restarts.get(index, 0),
            }
            if report is not None:
                latency = report["latency"]
                entry.update(
                    pid=report["pid"],
                    connections=report["connections"],
                    rooms=report["rooms"],
                    delivered=report["delivered"],
                    published=report["published"],
                    slow_closes=report["slow_closes"],
                    backplane_available=report["backplane_available"],
                    latency_sum=latency["sum"],
                    latency_count=sum(latency["counts"]),
                )
            workers.append(entry)
        return {"time": time.time(), "workers": workers}

    # ---- the API ----------------------------------------------------------------------------

    def _authorized(self, request: websocket.Request) -> bool:
        assert self._api_key is not None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Compared in constant time, so that the answer's timing tells nothing of the key.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("latin-1"), self._api_key
        )

    async def _api(self, request: websocket.Request, body: bytes) -> bytes:
        if self._api_key is None:
            return _error(404, "api_off", "the HTTP API is off: set api_key_file to turn it on")
        if not self._authorized(request):
            return _error(401, "unauthorized", "send Authorization: Bearer KEY with the API key")
        path, method = request.path, request.method
        if path == "/api/publish":
            if method != "POST":
                return _error(405, "method_not_allowed", "/api/publish takes POST")
            return await self._publish(body)
        if path == "/api/info":
            if method != "GET":
                return _error(405, "method_not_allowed", "/api/info takes GET")
            infos = await self._ask_workers(control.INFO)
            return _json_response(200, {"workers": infos})
        return _error(404, "not_found", "not found: the API has /api/publish and /api/info")

    async def _publish(self, body: bytes) -> bytes:
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            return self._refuse_publish("invalid_json", "the body is not JSON")
        if not isinstance(request, dict):
            return self._refuse_publish("invalid_json", "the body is not a JSON object")
        # A body without "room" goes to every connection: a misspelt "room" (or a room left
        # null by the caller's program) must be refused, never turned into a broadcast.
        if unknown := sorted(set(request) - PUBLISH_FIELDS):
            return self._refuse_publish(
                "unknown_field", f"unknown field {unknown[0]!r}: the body takes room and data"
            )
        if "data" not in request:
            return self._refuse_publish("invalid_data", "data is missing")
        room, data = request.get("room"), request["data"]
        try:
            if "room" in request:
                if not isinstance(room, str):
                    return self._refuse_publish(
                        "invalid_room", "room must be a string (leave it out to broadcast)"
                    )
                protocol.check_room(room)
        except protocol.RequestError as refusal:
            return self._refuse_publish("invalid_room", refusal.message)
        try:
            if room is None:
                protocol.broadcast_frame(data)
            else:
                protocol.message_frame(room, data)
        except protocol.RequestError as refusal:
            return self._refuse_publish("invalid_data", refusal.message)
        emitter = self._emitter
        try:
            if emitter is None:
                raise BackplaneError("the backplane is not connected")
            if room is None:
                await emitter.broadcast(data)
                answer: dict[str, Any] = {"broadcast": True}
            else:
                position = await emitter.append(room, data)
                answer = {"room": room, "epoch": position.epoch, "offset": position.offset}
        except BackplaneError as error:
            self._node.count_api_publish("unavailable")
            return _error(503, "backplane_unavailable", str(error))
        self._node.count_api_publish("published")
        return _json_response(200, answer)

    def _refuse_publish(self, code: str, message: str) -> bytes:
        self._node.count_api_publish("refused")
        return _error(400, code, message)
