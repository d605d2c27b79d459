"""TLS on the worker port (wss://, https://), with certificates made at test time by trustme:
clients over TLS on a real cluster, plain clients refused cleanly, handshakes that fail or stall,
a certificate reloaded on SIGHUP while clients stay connected, and bad files refused."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio_websocket
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests import browser
from tests.helpers import (
    RECEIVE_TIMEOUT,
    ClusterProcess,
    LoggedProcess,
    connect_on_each_worker,
    free_port,
    receive_data,
    trio_fanout_command,
)
from tests.test_limits import SMALL_RECEIVE_BUFFER, RawClient, close_code
from tests.test_reconnecting import embedded_worker, reconnecting_on_worker, until
from tests.test_worker import publish_from_outside, running_worker
from trio_fanout import Config, TLSFileError, connection, serve, tls, websocket
from trio_fanout.client import open_client
from trio_fanout.config import ConfigError, load_config
from trio_fanout.reconnecting import (
    Connected,
    Disconnected,
    Reconnecting,
    Recovered,
    Unrecovered,
    open_reconnecting_client,
)
from trio_fanout.worker import Worker

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"


@attrs.define
class ServerFiles:
    """A certificate for 127.0.0.1 from a throwaway CA, in PEM files a server loads."""

    ca: trustme.CA
    cert_file: Path
    key_file: Path

    @classmethod
    def issue(cls, directory: Path) -> ServerFiles:
        directory.mkdir(exist_ok=True)
        files = cls(trustme.CA(), directory / "server.crt", directory / "server.key")
        files.renew()
        return files

    def renew(self, ca: trustme.CA | None = None, name: str = "127.0.0.1") -> None:
        """Write a new certificate for ``name`` and its key over the files, from ``ca`` if
        given."""
        self.ca = ca or self.ca
        cert = self.ca.issue_cert(name)
        self.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.key_file))

    def spki_hash(self) -> str:
        """The base64 SHA-256 of the certificate's public key, as Chromium names a key it is
        told to trust."""
        cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
        key = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(hashlib.sha256(key).digest()).decode()

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    @property
    def flags(self) -> list[str]:
        return ["--tls-cert-file", str(self.cert_file), "--tls-key-file", str(self.key_file)]

    @property
    def settings(self) -> dict[str, str]:
        return {"tls_cert_file": str(self.cert_file), "tls_key_file": str(self.key_file)}


@pytest.fixture
def server_files(tmp_path: Path) -> ServerFiles:
    return ServerFiles.issue(tmp_path)


@pytest.fixture(scope="module")
def tls_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ClusterProcess, ServerFiles]]:
    """`trio-fanout run --workers 2` serving TLS, shared by the tests that do not reload it."""
    files = ServerFiles.issue(tmp_path_factory.mktemp("tls"))
    process = ClusterProcess("--workers", "2", "--heartbeat-interval", "0", *files.flags)
    try:
        process.wait_for_workers(2)
        yield process, files
    finally:
        process.stop()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def https_get(port: int, context: ssl.SSLContext, request: bytes = HEALTHZ) -> bytes:
    """The whole answer to one request over TLS."""
    with trio.fail_after(RECEIVE_TIMEOUT):
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=context, https_compatible=True
        )
        async with stream:
            await stream.send_all(request)
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
    return answer


async def verify_server(port: int, context: ssl.SSLContext) -> None:
    """A TLS handshake with the server on ``port``; raises ``SSLCertVerificationError`` if
    ``context`` does not trust its certificate."""
    with trio.fail_after(RECEIVE_TIMEOUT):
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as broken:
            assert isinstance(broken.__cause__, ssl.SSLError), broken
            raise broken.__cause__ from None
        finally:
            await trio.aclose_forcefully(stream)


async def receive_until_closed(stream: trio.SocketStream) -> bytes:
    """What the server sends before it closes the connection."""
    received = b""
    with trio.fail_after(RECEIVE_TIMEOUT):
        while chunk := await stream.receive_some():
            received += chunk
    return received


@asynccontextmanager
async def tls_worker(files: ServerFiles, **settings: object) -> AsyncIterator[tuple[Worker, str]]:
    """A worker in this process serving TLS; yields it and its wss:// URL."""
    async with running_worker(**files.settings, **settings) as (worker, url):
        yield worker, url.replace("ws://", "wss://", 1)


# ---- a cluster over TLS -------------------------------------------------------------------


async def test_wss_clients_on_two_workers_join_publish_and_receive(tls_cluster):
    cluster, files = tls_cluster
    assert cluster.url.startswith("wss://")
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(
            stack, cluster.url, ssl_context=files.client_context()
        )
        first, second = by_worker[1][0], by_worker[2][0]
        for client in (first, second):
            await client.join("secure")
        await first.publish("secure", {"n": 1}, ack=True)  # in order: one after the other
        await second.publish("secure", "x" * 60_000)  # several TLS records
        for client in (first, second):
            assert await receive_data(client, 2) == [{"n": 1}, "x" * 60_000]


async def test_healthz_answers_over_https(tls_cluster):
    cluster, files = tls_cluster
    answer = await https_get(cluster.port, files.client_context())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(body)["status"] == "ready"


async def test_a_plain_ws_client_on_the_tls_port_is_told_and_the_worker_keeps_serving(
    tls_cluster,
):
    cluster, files = tls_cluster
    plain_url = cluster.url.replace("wss://", "ws://", 1)
    with pytest.raises(trio_websocket.ConnectionRejected) as refusal:
        async with open_client(plain_url, connect_timeout=RECEIVE_TIMEOUT):
            pass
    assert refusal.value.status_code == 400
    assert refusal.value.body is not None and b"speaks TLS" in refusal.value.body
    # Both workers still serve TLS clients.
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(
            stack, cluster.url, ssl_context=files.client_context()
        )
        for clients in by_worker.values():
            await clients[0].ping()
    assert "Traceback" not in cluster.log()


@pytest.mark.skipif(
    browser.CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)"
)
async def test_the_chat_page_chats_over_https_and_wss_in_a_real_browser(tls_cluster):
    cluster, files = tls_cluster
    # Chromium cannot be given a CA of our own without a system-wide NSS database; it is told
    # instead to accept this one certificate's key, and nothing else it would refuse.
    trust = [f"--ignore-certificate-errors-spki-list={files.spki_hash()}"]
    page_url = f"https://127.0.0.1:{cluster.port}/?room=lobby&name=ann&say=hello%20over%20tls"
    async with open_client(cluster.url, ssl_context=files.client_context()) as python_client:
        await python_client.join("lobby")
        async with browser.open_page(page_url, trust) as page:
            # The page came over https, loaded /client.js from there, and joined over wss.
            assert await page.evaluate("location.protocol") == "https:"
            heard = await receive_data(python_client, 1)
            assert heard == [{"name": "ann", "text": "hello over tls"}]
            await python_client.publish("lobby", {"name": "bob", "text": "hi ann"})
            with trio.fail_after(RECEIVE_TIMEOUT):
                log = await page.wait_for_text("log", "bob: hi ann")
            assert "ann: hello over tls" in log


async def test_the_reconnecting_client_reconnects_over_wss_after_its_worker_is_killed(
    tls_cluster,
):
    cluster, files = tls_cluster
    async with AsyncExitStack() as stack:
        # Its ssl_context trusts only the test CA: every connection, the new one included,
        # is checked against it.
        client = await reconnecting_on_worker(
            stack, cluster.url, 1, ssl_context=files.client_context(), backoff_cap=1.0
        )
        witness = await reconnecting_on_worker(
            stack, cluster.url, 2, ssl_context=files.client_context()
        )
        for member in (client, witness):
            await member.join("secure-reconnect")
        assert client.welcome is not None
        victim = client.welcome["pid"]
        os.kill(victim, signal.SIGKILL)
        lost, _ = await until(client, Disconnected)
        assert lost == Disconnected(
            "the connection was lost without a close handshake (code 1006)", 1006
        )
        connected, _ = await until(client, Connected)
        assert isinstance(connected, Connected) and connected.pid != victim
        rejoin, _ = await until(client, (Recovered, Unrecovered))  # type: ignore[arg-type]
        assert rejoin.room == "secure-reconnect"  # type: ignore[union-attr]
        await witness.publish("secure-reconnect", "after the kill", ack=True)
        received, skipped = await until(client, dict)
        assert received["data"] == "after the kill", (received, skipped)  # type: ignore[index]
    # The master restarts the killed worker; later tests of this module use both.
    await trio.to_thread.run_sync(
        functools.partial(cluster.wait_for_log, rf"worker 1 \(pid (?!{victim}\))\d+\) serving")
    )


async def test_a_certificate_refused_at_a_reconnection_is_reported_and_retried(
    server_files: ServerFiles,
):
    port = free_port()
    trusted = server_files.ca
    async with (
        embedded_worker(port, **server_files.settings) as first,
        open_reconnecting_client(
            f"wss://127.0.0.1:{port}/ws",
            ssl_context=server_files.client_context(),
            backoff_base=0.05,
            backoff_cap=0.2,
        ) as client,
    ):
        assert isinstance((await until(client, Connected))[0], Connected)
        first.cancel()
        await until(client, Disconnected)
        # The worker comes back with a certificate from a CA the client does not trust.
        server_files.renew(trustme.CA())
        async with embedded_worker(port, **server_files.settings) as second:
            refused, _ = await until(client, Disconnected)
            assert refused == Disconnected(
                "the server's TLS certificate was refused: unable to get local issuer certificate"
            )
            assert not client.connected
            second.cancel()
        # Trusted again: the client, which kept trying, connects.
        server_files.renew(trusted)
        async with embedded_worker(port, **server_files.settings):
            _, before = await until(client, Connected)
            assert all(isinstance(item, Disconnected | Reconnecting) for item in before), before


# ---- handshakes that fail or stall (a worker in this process) -----------------------------


async def test_a_client_that_does_not_trust_the_certificate_fails_and_others_are_served(
    server_files: ServerFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    stranger = ServerFiles.issue(tmp_path / "other")  # another CA: not the server's
    async with tls_worker(server_files) as (worker, url):
        with pytest.raises(ssl.SSLCertVerificationError):
            await verify_server(port_of(url), stranger.client_context())
        async with open_client(url, ssl_context=server_files.client_context()) as client:
            await client.join("r")
            await publish_from_outside(worker, "r", "still here")
            assert await receive_data(client, 1) == ["still here"]
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]


# Far longer than a refusal takes: a client that waited for it would fail the test.
PATIENT_CONNECT_TIMEOUT = 60.0


@pytest.mark.parametrize(
    ("problem", "said"),
    [
        ("untrusted CA", "unable to get local issuer certificate"),
        ("another name", "IP address mismatch"),
    ],
)
async def test_a_certificate_the_client_refuses_raises_at_once_and_says_why(
    server_files: ServerFiles, tmp_path: Path, problem: str, said: str
):
    if problem == "untrusted CA":
        context = ServerFiles.issue(tmp_path / "other").client_context()
    else:
        server_files.renew(name="fanout.example")  # the client trusts its CA, not its name
        context = server_files.client_context()
    async with tls_worker(server_files) as (worker, url):
        for opener in (open_client, open_reconnecting_client):
            started = trio.current_time()
            with (
                trio.fail_after(RECEIVE_TIMEOUT),
                pytest.raises(ssl.SSLCertVerificationError) as refused,
            ):
                async with opener(
                    url, ssl_context=context, connect_timeout=PATIENT_CONNECT_TIMEOUT
                ):
                    pass  # pragma: no cover
            assert trio.current_time() - started < RECEIVE_TIMEOUT
            assert said in str(refused.value), refused.value
        # The worker serves on, a client that trusts it included.
        if problem == "another name":
            server_files.renew()
            worker.tls.reload()
        async with open_client(url, ssl_context=server_files.client_context()) as client:
            await client.ping()


async def test_a_stalled_tls_handshake_holds_a_handshake_slot_until_handshake_timeout(
    server_files: ServerFiles,
):
    # The start of a ClientHello, and then nothing.
    partial_hello = bytes.fromhex("16030100f4010000f00303") + os.urandom(32)
    async with tls_worker(server_files, max_handshakes=1, handshake_timeout=1.0) as (worker, url):
        port = port_of(url)
        async with await trio.open_tcp_stream("127.0.0.1", port) as stalled:
            await stalled.send_all(partial_hello)
            with trio.fail_after(RECEIVE_TIMEOUT):
                while worker.handshakes < 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            # The only slot is taken: another connection is closed at once, unanswered.
            async with await trio.open_tcp_stream("127.0.0.1", port) as refused:
                assert await receive_until_closed(refused) == b""
            # The stalled one is cut by the handshake timeout, without an answer.
            assert await receive_until_closed(stalled) == b""
        with trio.fail_after(RECEIVE_TIMEOUT):
            while worker.handshakes:  # noqa: ASYNC110
                await trio.sleep(0.01)
        async with open_client(url, ssl_context=server_files.client_context()) as client:
            await client.ping()


async def test_garbage_instead_of_a_client_hello_is_closed_and_the_worker_serves_on(
    server_files: ServerFiles, caplog: pytest.LogCaptureFixture
):
    async with tls_worker(server_files, handshake_timeout=60) as (_, url):
        async with await trio.open_tcp_stream("127.0.0.1", port_of(url)) as stream:
            await stream.send_all(b"\x16\x03\x01\x00\x05hello" + os.urandom(64))
            await receive_until_closed(stream)  # an alert perhaps, then the close; not 60 s
        async with open_client(url, ssl_context=server_files.client_context()) as client:
            await client.ping()
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]


async def test_a_wss_client_that_stops_reading_is_cut_by_the_bytes_bound(
    server_files: ServerFiles, monkeypatch: pytest.MonkeyPatch
):
    # Keep the cut connection around long enough for this test to read up to its close frame.
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT", 60.0)
    bound = 256 * 1024
    settings = {"max_queued_bytes": bound, "max_queued_frames": 10**6}
    async with (
        tls_worker(server_files, **settings) as (worker, url),
        open_client(url, ssl_context=server_files.client_context()) as fast,
    ):
        slow = await RawClient.connect(
            port_of(url),
            receive_buffer=SMALL_RECEIVE_BUFFER,
            ssl_context=server_files.client_context(),
        )
        await slow.join("news")
        await fast.join("news")
        slow_conn = list(worker.connections.values())[-1]
        payload = "y" * 16_000
        # The slow client reads nothing more; 2,000 messages (32 MB), 20 at a time, reach the
        # fast one, while what waits for the slow one (ciphertext included) stays bounded.
        for first in range(0, 2000, 20):
            for number in range(first, first + 20):
                await publish_from_outside(worker, "news", [number, payload])
            received = await receive_data(fast, 20)
            assert [number for number, _ in received] == list(range(first, first + 20))
            assert slow_conn.queued_bytes <= bound + 16_100
        frames = await slow.frames_until_closed()
        assert close_code(frames[-1]) == 1013
        numbers = [json.loads(payload)["data"][0] for _, payload in frames[:-1]]
        assert numbers == list(range(len(numbers)))  # in order, then cut
        assert worker.queued_bytes == 0
        await slow.stream.aclose()


async def test_a_frame_for_many_wss_clients_is_built_once_and_only_encrypted_per_connection(
    server_files: ServerFiles, monkeypatch: pytest.MonkeyPatch
):
    marker = f"built-once-{os.urandom(4).hex()}"
    built: list[bytes] = []  # each message frame holding the marker, as it was encoded
    sealed: list[tuple[bytes, bytes]] = []  # (plaintext, ciphertext) of each batch with it
    encode, seal = websocket.encode_text_frame, tls.Session.seal

    def counting_encode(payload: bytes) -> bytes:
        frame = encode(payload)
        if marker.encode() in frame:
            built.append(frame)
        return frame

    def recording_seal(session: tls.Session, plaintext: bytes) -> bytes:
        wire = seal(session, plaintext)
        if marker.encode() in plaintext:
            sealed.append((plaintext, wire))
        return wire

    monkeypatch.setattr(websocket, "encode_text_frame", counting_encode)
    monkeypatch.setattr(tls.Session, "seal", recording_seal)
    async with tls_worker(server_files) as (worker, url), AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                open_client(url, ssl_context=server_files.client_context())
            )
            for _ in range(5)
        ]
        for client in clients:
            await client.join("once")
        await publish_from_outside(worker, "once", marker)
        for client in clients:
            assert await receive_data(client, 1) == [marker]
    (frame,) = built  # one frame for the five connections
    assert len(sealed) == 5  # each connection's batch encrypted on its own
    for plaintext, wire in sealed:
        assert frame in plaintext  # those very bytes, only encrypted per connection
        assert marker.encode() not in wire
    assert len({wire for _, wire in sealed}) == 5  # five sessions, five ciphertexts


# ---- reloading on SIGHUP --------------------------------------------------------------------


async def test_sighup_reloads_a_new_certificate_and_connected_clients_stay(
    server_files: ServerFiles,
):
    cluster = ClusterProcess("--workers", "2", "--heartbeat-interval", "0", *server_files.flags)
    try:
        cluster.wait_for_workers(2)
        old_context = server_files.client_context()
        async with AsyncExitStack() as stack:
            old = await connect_on_each_worker(stack, cluster.url, ssl_context=old_context)
            for clients in old.values():
                await clients[0].join("stay")

            server_files.renew(trustme.CA())  # a new CA: the old one cannot verify it
            logged = len(cluster.lines)
            os.kill(cluster.process.pid, signal.SIGHUP)
            # The master checks the files, then has each worker reload them: until both have,
            # a new client might still get the old certificate.
            cluster.wait_for_log("TLS certificate reloaded by workers 1, 2 of 2", start=logged)

            new = await connect_on_each_worker(
                stack, cluster.url, ssl_context=server_files.client_context()
            )
            with pytest.raises(ssl.SSLCertVerificationError):
                await verify_server(cluster.port, old_context)
            await new[1][0].publish("stay", "after the reload")
            for clients in old.values():
                assert await receive_data(clients[0], 1) == ["after the reload"]
    finally:
        cluster.stop()


async def test_a_bad_reload_is_logged_and_the_current_certificate_serves_on(
    server_files: ServerFiles,
):
    cluster = ClusterProcess("--workers", "2", "--heartbeat-interval", "0", *server_files.flags)
    try:
        cluster.wait_for_workers(2)
        key = server_files.key_file.read_text()
        logged = len(cluster.lines)
        server_files.cert_file.write_text("not a certificate\n")
        os.kill(cluster.process.pid, signal.SIGHUP)
        cluster.wait_for_log(r"ERROR .*TLS reload failed, still serving", start=logged)
        async with AsyncExitStack() as stack:
            by_worker = await connect_on_each_worker(
                stack, cluster.url, ssl_context=server_files.client_context()
            )
            for clients in by_worker.values():
                await clients[0].ping()
        secret = "".join(key.splitlines()[1:-1])
        assert secret[:40] not in cluster.log().replace("\n", "")
    finally:
        cluster.stop()


async def test_a_lone_worker_reloads_on_sighup_and_keeps_serving_when_a_reload_fails(
    server_files: ServerFiles,
):
    worker = LoggedProcess(
        trio_fanout_command(
            "worker",
            "--port",
            "0",
            "--backplane",
            f"memory://lone-{os.getpid()}",
            *server_files.flags,
        )
    )
    try:
        port = int(worker.wait_for_log(r"serving wss://[\d.]+:(\d+)/ws").group(1))
        url = f"wss://127.0.0.1:{port}/ws"
        server_files.renew(trustme.CA())
        logged = len(worker.lines)
        worker.process.send_signal(signal.SIGHUP)
        worker.wait_for_log(r"TLS certificate reloaded", start=logged)
        async with open_client(url, ssl_context=server_files.client_context()) as client:
            await client.ping()
            server_files.key_file.write_text("")
            logged = len(worker.lines)
            worker.process.send_signal(signal.SIGHUP)
            worker.wait_for_log(r"TLS reload failed", start=logged)
            await client.ping()  # the connected client is served on
        async with open_client(url, ssl_context=server_files.client_context()) as client:
            await client.ping()  # and new ones get the certificate that last loaded
    finally:
        worker.stop()


# ---- settings -------------------------------------------------------------------------------


def test_tls_files_come_as_a_pair():
    with pytest.raises(ConfigError, match=r"tls_cert_file: needs tls_key_file too.*flag"):
        load_config({"tls_cert_file": "server.crt"}, environ={})
    with pytest.raises(ConfigError, match=r"tls_key_file: needs tls_cert_file too.*environment"):
        load_config({}, environ={"TRIO_FANOUT_TLS_KEY_FILE": "server.key"})
    config, sources = load_config(
        {}, environ={"TRIO_FANOUT_TLS_CERT_FILE": "a.crt", "TRIO_FANOUT_TLS_KEY_FILE": "a.key"}
    )
    assert (config.tls_cert_file, config.tls_key_file) == ("a.crt", "a.key")
    assert sources["tls_key_file"] == "environment TRIO_FANOUT_TLS_KEY_FILE"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trio_fanout_command(*args), capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("command", ["run", "worker"])
def test_unusable_tls_files_are_a_usage_error_not_a_traceback(
    command: str, server_files: ServerFiles, tmp_path: Path
):
    missing = tmp_path / "missing.pem"
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    other = ServerFiles.issue(tmp_path / "other")  # a key that is not the certificate's
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        serialization.load_pem_private_key(server_files.key_file.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    cases = [
        (["--tls-cert-file", str(server_files.cert_file)], "needs tls_key_file"),
        (["--tls-cert-file", str(missing), "--tls-key-file", str(missing)], "No such file"),
        (["--tls-cert-file", str(not_pem), "--tls-key-file", str(not_pem)], "holds no PEM cert"),
        (
            ["--tls-cert-file", str(server_files.cert_file), "--tls-key-file", str(not_pem)],
            f"{not_pem} holds no PEM private key",
        ),
        (
            ["--tls-cert-file", str(server_files.cert_file), "--tls-key-file", str(other.key_file)],
            "the key is not the certificate's",
        ),
        (
            ["--tls-cert-file", str(server_files.cert_file), "--tls-key-file", str(encrypted)],
            "encrypted with a passphrase, which is not supported",
        ),
    ]
    for flags, problem in cases:
        # One worker: memory:// reaches no other, which `run` would refuse for several.
        workers = ["--workers", "1"] if command == "run" else []
        done = run_cli(command, "--port", "0", "--backplane", "memory://x", *workers, *flags)
        assert done.returncode == 2, done.stderr
        assert problem in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_config_shows_the_tls_files():
    done = run_cli("config")
    assert "tls_cert_file = (unset)  # default" in done.stdout
    env = {**os.environ, "TRIO_FANOUT_TLS_CERT_FILE": "a.crt", "TRIO_FANOUT_TLS_KEY_FILE": "a.key"}
    done = subprocess.run(
        trio_fanout_command("config"), capture_output=True, text=True, timeout=60, env=env
    )
    assert 'tls_key_file = "a.key"  # environment TRIO_FANOUT_TLS_KEY_FILE' in done.stdout


async def test_an_embedded_worker_with_unusable_files_raises_tls_file_error(tmp_path: Path):
    config = Config(
        port=0, backplane="memory://embedded-tls", tls_cert_file=str(tmp_path / "missing.pem"),
        tls_key_file=str(tmp_path / "missing.key"),
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        with pytest.raises(TLSFileError, match=r"missing\.pem .*No such file"):
            await nursery.start(serve, config)
