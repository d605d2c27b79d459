"""The figures a node reports: counters kept by each worker, and their Prometheus exposition.

Workers count with plain integer increments on their hot paths (:class:`WorkerStats`) and do
nothing else until asked: a scrape asks each worker for a :func:`worker_report` (over the
master's control channel, see ``trio_fanout.control``), and :func:`metric_families` turns the
reports into Prometheus metrics, labelled by worker. Counting per message, never per recipient,
keeps the fan-out loop as cheap as it was (docs/operations.md lists every metric).
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from trio_fanout import protocol

if TYPE_CHECKING:
    from trio_fanout.backplane.proxy import ProxyStats
    from trio_fanout.worker import Worker

# Upper bounds, in seconds, of the backplane latency histogram's buckets: on one host a
# heartbeat takes well under a millisecond through the proxy; tens of ms mean a loaded worker,
# seconds a stalled one.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# The most rooms one worker lists in /api/info, the largest first: a worker may hold 100,000
# rooms, and an answer of megabytes helps nobody read it.
INFO_ROOMS_LIMIT = 1000

# The WorkerStats counters a report carries as they are.
_COUNTED = (
    "joins", "leaves", "published", "received", "delivered", "frames_dropped", "slow_closes",
    "errors",
)  # fmt: skip

_HEARTBEAT_PREFIX = b'{"type":"heartbeat",'


@attrs.define(slots=True)
class LatencyHistogram:
    """Observations in the fixed :data:`LATENCY_BUCKETS` (plus +Inf), their sum and count."""

    counts: list[int] = attrs.field(factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


@attrs.define(slots=True)
class WorkerStats:
    """One worker's counters since it started. Each is a plain int bumped where it happens
    (per message, per send, per request), read only when a report is asked for."""

    joins: int = 0
    leaves: int = 0
    published: int = 0  # client publishes this worker handed to the backplane
    received: int = 0  # messages that came in from the backplane
    delivered: int = 0  # frames of those messages queued for this worker's clients
    frames_dropped: int = 0  # frames thrown away: their client was too slow, or gone
    slow_closes: int = 0  # clients closed 1013 for a full queue
    # Error frames, by code; every code from 0, so that Prometheus's increase() counts a
    # code's first error (a series that first appears at 1 increases by nothing).
    errors: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(protocol.ERROR_CODES, 0))
    refused: dict[int, int] = attrs.field(factory=dict)  # HTTP refusals, by status
    latency: LatencyHistogram = attrs.field(factory=LatencyHistogram)

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def count_refusal(self, status: int) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1


def heartbeat_sent_at(body: bytes) -> float | None:
    """The send time (Unix seconds) a heartbeat frame carries, or None for any other frame.
    Only heartbeats are parsed, and they come once a second."""
    if not body.startswith(_HEARTBEAT_PREFIX):
        return None
    try:
        sent_at = json.loads(body)["ts"]
    except (ValueError, KeyError, TypeError):
        return None
    return float(sent_at) if isinstance(sent_at, int | float) else None


def worker_report(worker: Worker) -> dict[str, Any]:
    """Everything :func:`metric_families` and the status page need from one worker, as JSON."""
    stats = worker.stats
    gc_pauses = worker.gc_pauses
    return {
        "worker": worker.index,
        "pid": os.getpid(),
        "connections": len(worker.connections),
        "parked": len(worker.parked),
        "handshakes": worker.handshakes,
        "rooms": len(worker.rooms),
        "queued_bytes": worker.queued_bytes,
        "sends": worker.sends,  # counted for /healthz: the same counters, not new ones
        "frames_sent": worker.frames_sent,
        "backplane_available": worker.backplane.available,
        "backplane_gaps": worker.gaps.missed,
        "backplane_invalid": worker.dropped_invalid,
        **{name: getattr(stats, name) for name in _COUNTED},
        "refused": {str(status): count for status, count in stats.refused.items()},
        "latency": {"counts": stats.latency.counts, "sum": stats.latency.total},
        "gc": None
        if gc_pauses is None
        else {
            "collections": gc_pauses.collections,
            "pause_seconds": gc_pauses.total_ms / 1000,
            "longest_pause_seconds": gc_pauses.longest_ms / 1000,
        },
    }


def worker_info(worker: Worker) -> dict[str, Any]:
    """A worker's rooms and their local member counts (the largest INFO_ROOMS_LIMIT), for
    ``/api/info``."""
    largest = sorted(worker.rooms.values(), key=lambda room: len(room.members), reverse=True)
    return {
        "worker": worker.index,
        "pid": os.getpid(),
        "connections": len(worker.connections),
        "room_count": len(worker.rooms),
        "rooms": {room.name: len(room.members) for room in largest[:INFO_ROOMS_LIMIT]},
    }


# The results counted by ``trio_fanout_api_publishes_total``. Each is exposed from the start, at
# 0, so that Prometheus sees a result's first occurrence as an increase rather than as a new
# series already at 1 (which ``increase()`` and ``rate()`` would not count).
API_PUBLISH_RESULTS = ("published", "refused", "unavailable")


@attrs.define
class NodeStats:
    """What the process with the admin port counts itself: the master's restarts, the
    heartbeats it published, the API's publishes; and, where it runs the ZeroMQ proxy, what
    the proxy counts (``proxy_stats``, asked at each scrape)."""

    restarts: dict[int, int] = attrs.field(factory=dict)  # by worker index, from its first start
    heartbeats_sent: int = 0
    heartbeats_failed: int = 0
    api_publishes: dict[str, int] = attrs.field(
        factory=lambda: dict.fromkeys(API_PUBLISH_RESULTS, 0)
    )  # by result
    proxy_stats: Callable[[], ProxyStats] | None = None

    def count_api_publish(self, result: str) -> None:
        self.api_publishes[result] += 1


def _by_worker(
    family: CounterMetricFamily | GaugeMetricFamily,
    reports: Iterable[Mapping[str, Any]],
    key: str,
) -> CounterMetricFamily | GaugeMetricFamily:
    for report in reports:
        family.add_metric([str(report["worker"])], report[key])
    return family


def metric_families(
    node: NodeStats, reports: list[dict[str, Any]], expected_workers: Iterable[int]
) -> list[Metric]:
    """The node's metrics: ``reports`` from the workers that answered, and ``up`` 0 for the
    others of ``expected_workers``."""
    worker = ["worker"]
    counters = [
        ("joins", "trio_fanout_joins", "Joins answered joined"),
        ("leaves", "trio_fanout_leaves", "Room memberships ended (leave or close)"),
        ("published", "trio_fanout_messages_published", "Client publishes sent to the backplane"),
        ("received", "trio_fanout_backplane_received", "Messages received from the backplane"),
        ("delivered", "trio_fanout_messages_delivered", "Message frames queued for clients"),
        ("sends", "trio_fanout_socket_sends", "Socket sends of the send path"),
        ("frames_sent", "trio_fanout_frames_sent", "Frames carried by those sends"),
        ("frames_dropped", "trio_fanout_frames_dropped", "Frames dropped for slow or gone clients"),
        ("slow_closes", "trio_fanout_slow_client_closes", "Clients closed 1013 (too slow)"),
        ("backplane_gaps", "trio_fanout_backplane_gaps", "Messages missed (gaps in numbering)"),
        ("backplane_invalid", "trio_fanout_backplane_invalid", "Invalid backplane messages"),
    ]
    gauges = [
        ("connections", "trio_fanout_connections", "Open WebSockets"),
        ("parked", "trio_fanout_connections_parked", "Open WebSockets idle, held without a task"),
        ("handshakes", "trio_fanout_handshakes", "Connections that are not open WebSockets"),
        ("rooms", "trio_fanout_rooms", "Rooms with a member on the worker"),
        ("queued_bytes", "trio_fanout_queued_bytes", "Bytes queued for clients"),
    ]
    families: list[Metric] = []
    answered = {report["worker"] for report in reports}
    up = GaugeMetricFamily("trio_fanout_worker_up", "1 if the worker answered", labels=worker)
    for index in sorted(set(expected_workers) | answered):
        up.add_metric([str(index)], 1 if index in answered else 0)
    families.append(up)
    pids = GaugeMetricFamily("trio_fanout_worker_pid", "The worker's process id", labels=worker)
    families.append(_by_worker(pids, reports, "pid"))
    for key, name, documentation in counters:
        families.append(
            _by_worker(CounterMetricFamily(name, documentation, labels=worker), reports, key)
        )
    for key, name, documentation in gauges:
        families.append(
            _by_worker(GaugeMetricFamily(name, documentation, labels=worker), reports, key)
        )
    available = GaugeMetricFamily(
        "trio_fanout_backplane_available", "1 while the backplane carries messages", labels=worker
    )
    for report in reports:
        available.add_metric([str(report["worker"])], 1 if report["backplane_available"] else 0)
    families.append(available)
    errors = CounterMetricFamily(
        "trio_fanout_errors", "Error frames sent to clients", labels=["worker", "code"]
    )
    refused = CounterMetricFamily(
        "trio_fanout_handshakes_refused", "HTTP requests refused", labels=["worker", "status"]
    )
    latency = HistogramMetricFamily(
        "trio_fanout_backplane_latency_seconds",
        "Heartbeat time from its publisher to the worker, through the backplane",
        labels=worker,
    )
    gc_collections = CounterMetricFamily(
        "trio_fanout_gc_collections", "Garbage collections", labels=["worker", "generation"]
    )
    gc_pause = CounterMetricFamily(
        "trio_fanout_gc_pause_seconds", "Time spent in garbage collections", labels=worker
    )
    gc_longest = GaugeMetricFamily(
        "trio_fanout_gc_longest_pause_seconds", "Longest garbage collection", labels=worker
    )
    for report in reports:
        label = str(report["worker"])
        for code, count in sorted(report["errors"].items()):
            errors.add_metric([label, code], count)
        for status, count in sorted(report["refused"].items()):
            refused.add_metric([label, status], count)
        cumulative, buckets = 0, []
        for bound, count in zip(
            (*LATENCY_BUCKETS, float("inf")), report["latency"]["counts"], strict=True
        ):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        latency.add_metric([label], buckets, report["latency"]["sum"])
        if report["gc"] is not None:
            for generation, count in enumerate(report["gc"]["collections"]):
                gc_collections.add_metric([label, str(generation)], count)
            gc_pause.add_metric([label], report["gc"]["pause_seconds"])
            gc_longest.add_metric([label], report["gc"]["longest_pause_seconds"])
    families += [errors, refused, latency, gc_collections, gc_pause, gc_longest]
    restarts = CounterMetricFamily(
        "trio_fanout_worker_restarts", "Workers restarted by the master", labels=worker
    )
    for index, count in sorted(node.restarts.items()):
        restarts.add_metric([str(index)], count)
    heartbeats = CounterMetricFamily(
        "trio_fanout_heartbeats", "Heartbeats published by this process", labels=["result"]
    )
    heartbeats.add_metric(["sent"], node.heartbeats_sent)
    heartbeats.add_metric(["failed"], node.heartbeats_failed)
    api = CounterMetricFamily(
        "trio_fanout_api_publishes", "Publishes through POST /api/publish", labels=["result"]
    )
    for result, count in sorted(node.api_publishes.items()):
        api.add_metric([result], count)
    families += [restarts, heartbeats, api]
    if node.proxy_stats is not None:
        families += proxy_families(node.proxy_stats())
    return families


def proxy_families(stats: ProxyStats) -> list[Metric]:
    """The ZeroMQ proxy's metrics: the process runs one proxy, so they have no label but
    ``kind``."""
    publishes = CounterMetricFamily(
        "trio_fanout_proxy_publishes", "Messages published to the proxy", labels=["kind"]
    )
    publishes.add_metric(["plain"], stats.publishes)
    publishes.add_metric(["numbered"], stats.appends)
    families: list[Metric] = [publishes]
    for name, documentation, value in (
        ("trio_fanout_proxy_messages_routed", "Messages sent to subscribers", stats.routed),
        ("trio_fanout_proxy_messages_dropped", "Messages dropped for slow subscribers",
         stats.dropped),
        ("trio_fanout_proxy_replies_dropped", "Replies dropped for peers that read none",
         stats.replies_dropped),
    ):  # fmt: skip
        families.append(CounterMetricFamily(name, documentation, value=value))
    for name, documentation, value in (
        ("trio_fanout_proxy_peers", "Clients connected to the proxy", stats.peers),
        ("trio_fanout_proxy_topics", "Topics with a subscriber", stats.topics),
        ("trio_fanout_proxy_history_topics", "Topics the proxy numbers", stats.history_topics),
        ("trio_fanout_proxy_history_bytes", "Bytes of history the proxy holds",
         stats.history_bytes),
    ):  # fmt: skip
        families.append(GaugeMetricFamily(name, documentation, value=value))
    return families
