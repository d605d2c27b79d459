"""What wss:// adds to a delivery on the worker's CPU: the encryption of one connection's batch
(``tls.Session.seal``, what ``Connection._send_now`` calls once per connection per batch),
measured without sockets, in CPU time, so that other work on the machine barely moves it.

    python bench/tls_cost.py

Prints, per frame size and frames per batch, the CPU microseconds per batch and per frame.
The certificate is made by trustme (the test extra).
"""

from __future__ import annotations

import contextlib
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trustme

from trio_fanout.tls import Session, load_server_context
from trio_fanout.websocket import encode_text_frame

BATCHES = 20_000
REPEATS = 5


def connected_session(directory: Path) -> Session:
    """A server session whose handshake with an in-memory client is done."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = directory / "c.pem", directory / "k.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    server = Session(load_server_context(str(cert_file), str(key_file)))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    for _ in range(10):  # a handshake takes two round trips
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
        server.receive(outgoing.read())
        incoming.write(server.seal(b""))
        if server.established:
            return server
    raise RuntimeError("the handshake did not finish")


def cpu_us_per_call(work: Callable[[list[bytes]], object], pending: list[bytes]) -> float:
    """The median over REPEATS of the CPU microseconds per call of ``work(pending)``."""
    samples = []
    for _ in range(REPEATS):
        start = time.process_time_ns()
        for _ in range(BATCHES):
            work(pending)
        samples.append((time.process_time_ns() - start) / BATCHES / 1000)
    return statistics.median(samples)


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        session = connected_session(Path(directory))
    print("frame bytes  frames/batch  plain join us/batch  TLS seal us/batch  TLS us/frame")
    for size in (100, 1000, 16_000):
        frame = encode_text_frame(b'{"type":"message","data":"' + b"x" * (size - 30) + b'"}')
        for frames in (1, 10):
            pending = [frame] * frames
            # As _send_now does: the batch joined (plain), then sealed (TLS).
            plain = cpu_us_per_call(b"".join, pending)
            sealed = cpu_us_per_call(lambda batch: session.seal(b"".join(batch)), pending)
            print(
                f"{len(frame):>11}  {frames:>12}  {plain:>19.2f}  {sealed:>17.2f}  "
                f"{(sealed - plain) / frames:>12.2f}"
            )


if __name__ == "__main__":
    main()
