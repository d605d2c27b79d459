"""A reconnecting client living through a server restart.

Runs on its own: it starts a worker in this program, joins a room, stops the worker, publishes
while it is away, starts it again on the same port, and shows what the client reports: the
reconnection, the recovery, and the message it would otherwise have missed.

    python examples/reconnecting_client.py
"""

import trio

import trio_fanout
from trio_fanout.reconnecting import (
    Connected,
    Disconnected,
    Recovered,
    Unrecovered,
    open_reconnecting_client,
)


async def serve_in(scope, config, task_status=trio.TASK_STATUS_IGNORED):
    """Serve until ``scope`` is cancelled: the sockets then close at once, like a crash."""
    with scope:
        await trio_fanout.serve(config, task_status=task_status)


async def main():
    backplane = "memory://restart-demo"
    config = trio_fanout.Config(port=0, heartbeat_interval=0, backplane=backplane)
    # The emitter's backplane keeps the room's numbering and history alive while the worker is
    # away, as the ZeroMQ proxy or Redis does for the workers of `trio-fanout run`.
    async with trio_fanout.open_emitter(backplane) as emitter, trio.open_nursery() as nursery:
        first_run = trio.CancelScope()
        worker = await nursery.start(serve_in, first_run, config)
        url = f"ws://127.0.0.1:{worker.port}/ws"
        async with open_reconnecting_client(url, backoff_cap=1.0) as client:
            await client.join("lobby")
            first_run.cancel()
            async for item in client:
                match item:
                    case Connected(worker=index):
                        print("connected to worker", index)
                    case Disconnected():
                        print("disconnected; reconnecting")
                        await emitter.publish("lobby", "sent while the client was away")
                        again = trio_fanout.Config(
                            port=worker.port, heartbeat_interval=0, backplane=backplane
                        )
                        await nursery.start(serve_in, trio.CancelScope(), again)
                    case Recovered(room=room):
                        print("rejoined", room, "and recovered what was missed")
                    case Unrecovered(room=room):
                        print("rejoined", room, "without what was missed: reload its state")
                    case {"type": "message", "offset": offset, "data": data}:
                        print("message", offset, data)
                        break
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
