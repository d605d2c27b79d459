"""Publish to a trio-fanout room through the admin port's HTTP API, with nothing but the
standard library: what any program that cannot reach the backplane (another language, another
network) does with one HTTP request.

    python examples/publish_api.py --admin http://127.0.0.1:9100 --key-file api.key lobby '"hi"'

prints the offset the room gave the message. Without ROOM (``--broadcast``), every connection
receives it.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request


def publish(admin_url: str, key: str, room: str | None, data: object) -> dict:
    """POST /api/publish; the server's JSON answer (``room``, ``epoch``, ``offset``)."""
    body = {"data": data} if room is None else {"room": room, "data": data}
    request = urllib.request.Request(
        admin_url.rstrip("/") + "/api/publish",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        # 400 (bad room or data), 401 (wrong key), 503 (backplane down): the body says why.
        problem = json.load(error)
        raise SystemExit(f"publish refused ({error.code}): {problem['message']}") from None
    except urllib.error.URLError as error:  # no admin port there (HTTPError is one too)
        raise SystemExit(f"cannot reach {admin_url}: {error.reason}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin", required=True, help="the admin port, http://HOST:PORT")
    parser.add_argument("--key-file", required=True, help="file holding the API key")
    parser.add_argument("--broadcast", action="store_true", help="to every connection")
    parser.add_argument("room", nargs="?", help="the room")
    parser.add_argument("data", help="a JSON value")
    args = parser.parse_args()
    if (args.room is None) != args.broadcast:
        parser.error("give ROOM, or --broadcast without ROOM")
    try:
        data = json.loads(args.data)
    except ValueError:
        parser.error(f"DATA is not JSON: {args.data!r} (a string needs quotes: '\"hi\"')")
    try:
        with open(args.key_file) as file:
            key = file.read().strip()
    except OSError as error:
        parser.error(f"--key-file: {error}")
    answer = publish(args.admin, key, args.room, data)
    if args.room is None:
        print("sent to every connection")
    else:
        print(f"published to {args.room} at offset {answer['offset']}")


if __name__ == "__main__":
    sys.exit(main())
