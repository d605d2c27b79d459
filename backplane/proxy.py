"""The ZeroMQ XSUB/XPUB proxy that publishers and subscribers meet at.

Publishers connect to the XSUB side (PORT), subscribers to the XPUB side (PORT+1). The proxy
subscribes upstream to everything and filters only at its XPUB side: a subscriber's subscription
then takes effect at one place, the proxy, which is what lets ``subscribe`` prove it live with one
round trip (see backplane.zmq).

``zmq.proxy_steerable`` is a blocking C loop, so it runs in a thread (the one thread of the
project), and is stopped through its control socket when the calling Trio task is cancelled.
"""

from __future__ import annotations

import contextlib
import itertools
import logging

import trio
import zmq

from trio_fanout.backplane.zmq import HIGH_WATER_MARK, zmq_endpoint

logger = logging.getLogger(__name__)

# With port 0, how many random port pairs to try before giving up on finding PORT and PORT+1 free.
FREE_PAIR_ATTEMPTS = 50

_control_ids = itertools.count()


def _bind_pair(xsub: zmq.Socket[bytes], xpub: zmq.Socket[bytes], host: str, port: int) -> int:
    """Bind XSUB to ``port`` and XPUB to ``port + 1``; port 0 picks a free pair."""
    if port:
        xsub.bind(zmq_endpoint(host, port))
        xpub.bind(zmq_endpoint(host, port + 1))
        return port
    for _ in range(FREE_PAIR_ATTEMPTS):
        address_without_port = zmq_endpoint(host, 0).rsplit(":", 1)[0]
        candidate = xsub.bind_to_random_port(address_without_port, max_port=65_000)
        try:
            xpub.bind(zmq_endpoint(host, candidate + 1))
        except zmq.ZMQError:
            xsub.unbind(zmq_endpoint(host, candidate))
            continue
        return candidate
    raise OSError(f"found no two free consecutive ports on {host}")


async def serve_proxy(
    host: str = "127.0.0.1",
    port: int = 5559,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until cancelled; ``task_status.started`` reports the publisher-side port.

    Raises ``OSError`` (e.g. address in use) before ``started`` if it cannot bind.
    """
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    xsub = context.socket(zmq.XSUB)
    xpub = context.socket(zmq.XPUB)
    control_address = f"inproc://trio-fanout-proxy-control-{next(_control_ids)}"
    control = context.socket(zmq.PAIR)
    proxy_control = context.socket(zmq.PAIR)
    sockets = (xsub, xpub, control, proxy_control)
    try:
        for sock in sockets:
            sock.setsockopt(zmq.LINGER, 0)
        for sock in (xsub, xpub):
            sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
            sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        try:
            bound_port = _bind_pair(xsub, xpub, host, port)
        except zmq.ZMQError as error:
            raise OSError(
                f"cannot bind the ZeroMQ proxy to {host} ports {port} and {port + 1}: {error}"
            ) from None
        control.bind(control_address)
        proxy_control.connect(control_address)
        xsub.send(b"\x01")  # subscribe upstream to every topic
        logger.info(
            "ZeroMQ proxy: publishers connect to %s, subscribers to %s",
            zmq_endpoint(host, bound_port),
            zmq_endpoint(host, bound_port + 1),
        )
        task_status.started(bound_port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_when_cancelled, control)
            await trio.to_thread.run_sync(zmq.proxy_steerable, xsub, xpub, None, proxy_control)
            nursery.cancel_scope.cancel()
    finally:
        for sock in sockets:
            sock.close()
    logger.info("ZeroMQ proxy stopped")


async def _terminate_when_cancelled(control: zmq.Socket[bytes]) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with contextlib.suppress(zmq.ZMQError):  # the proxy has already stopped
            control.send(b"TERMINATE", zmq.NOBLOCK)
