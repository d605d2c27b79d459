"""Publish to a room from a plain Python program: no Trio, no server code.

    python examples/emitter.py lobby "hello from a script"
    python examples/emitter.py --backplane zmq://10.0.0.5:5559 lobby "hello"

By default it publishes through the backplane of a `trio-fanout run` on this machine (its
embedded ZeroMQ proxy listens on 127.0.0.1:5559). Every member of the room, on every worker,
receives {"type": "message", "room": "lobby", "data": {"text": "...", "from": "emitter.py"}}.
A web application does the same from its request handlers, with one SyncEmitter for the process.
"""

import argparse

from trio_fanout import SyncEmitter


def main() -> None:
    parser = argparse.ArgumentParser(description="Publish one message to a trio-fanout room.")
    parser.add_argument("--backplane", default="zmq://127.0.0.1:5559", help="backplane URL")
    parser.add_argument("room")
    parser.add_argument("text")
    args = parser.parse_args()
    with SyncEmitter(args.backplane) as emitter:
        emitter.publish(args.room, {"text": args.text, "from": "emitter.py"})
    print(f"published to {args.room}")


if __name__ == "__main__":
    main()
