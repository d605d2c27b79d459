"""What tokens cost a worker: the CPU time of one verification for each algorithm, and the
memory of an idle connection with and without a token.

    python bench/token_cost.py [--connections 5000]

Verification: ``tokens.Verifier.verify`` of one token in a loop, best of 3 runs of 2,000.
Memory: one ``trio-fanout worker`` (memory backplane) per case; the growth of its RSS while
``--connections`` idle WebSockets open (after 200 to warm it up), divided by their number. With
tokens, each gives a valid token in its query string, so that the worker holds its claims and
sets its timers. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trio_fanout import tokens

WARM_UP_CONNECTIONS = 200


def verification_cost() -> None:
    secret = os.urandom(32)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    cases = [
        ("HS256", secret, secret),
        ("RS256", rsa_key, rsa_key.public_key()),
        ("ES256", ec_key, ec_key.public_key()),
    ]
    for algorithm, signing_key, verifying_key in cases:
        verifier = tokens.Verifier(tokens.TokenKey(algorithm, verifying_key), leeway=5)
        claims = {"sub": "u", "exp": int(time.time()) + 600, "join": ["team-*"]}
        token = jwt.encode(claims, signing_key, algorithm=algorithm)
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(2000):
                verifier.verify(token)
            runs.append((time.perf_counter() - started) / 2000)
        print(f"{algorithm}: {min(runs) * 1e6:.0f} µs per verification")


def idle_connection_memory(connections: int, with_tokens: bool, directory: str) -> float:
    """KiB of worker RSS per idle connection."""
    secret_file = Path(directory) / "secret"
    secret_file.write_text(os.urandom(32).hex())
    environ = {**os.environ, "TRIO_FANOUT_MAX_HANDSHAKES": str(connections + 1000)}
    token = ""
    if with_tokens:
        environ["TRIO_FANOUT_TOKEN_SECRET_FILE"] = str(secret_file)
        token = tokens.mint(tokens.read_secret(str(secret_file)), "u", ttl=3600)
    worker = subprocess.Popen(
        [sys.executable, "-m", "trio_fanout", "worker", "--port", "0", "--backplane",
         "memory://bench"],
        stderr=subprocess.PIPE, text=True, env=environ,
    )  # fmt: skip
    assert worker.stderr is not None
    try:
        for line in worker.stderr:
            if match := re.search(r"serving ws://[\d.]+:(\d+)/ws", line):
                port = int(match.group(1))
                break
        else:
            raise SystemExit("the worker did not start")
        request = (
            f"GET /ws?token={token} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

        def connect() -> socket.socket:
            client = socket.create_connection(("127.0.0.1", port))
            client.sendall(request)
            received = b""
            while b"welcome" not in received:
                chunk = client.recv(4096)
                if not chunk:
                    raise SystemExit(f"refused: {received!r}")
                received += chunk
            return client

        def rss_kib() -> int:
            status = Path(f"/proc/{worker.pid}/status").read_text()
            return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

        held = [connect() for _ in range(WARM_UP_CONNECTIONS)]
        time.sleep(1)
        before = rss_kib()
        held += [connect() for _ in range(connections)]
        time.sleep(2)
        return (rss_kib() - before) / connections
    finally:
        worker.terminate()
        worker.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    args = parser.parse_args()
    needed = args.connections + WARM_UP_CONNECTIONS + 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    verification_cost()
    with tempfile.TemporaryDirectory() as directory:
        for with_tokens in (False, True):
            kib = idle_connection_memory(args.connections, with_tokens, directory)
            label = "with a token" if with_tokens else "without tokens"
            print(f"idle connection {label}: {kib:.2f} KiB of worker RSS")


if __name__ == "__main__":
    main()
