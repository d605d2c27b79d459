"""Tokens (JWT) and origins against real clusters: each rule of docs/protocol.md, "Tokens",
with real clients, and the pure parts of trio_fanout/tokens.py on their own."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import trio_websocket
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests import browser
from tests.helpers import (
    RECEIVE_TIMEOUT,
    START_TIMEOUT,
    ClusterProcess,
    free_port,
    receive_data,
    trio_fanout_command,
)
from tests.test_cluster import http_get
from tests.test_reconnecting import embedded_worker
from trio_fanout import Config, Hooks, Request, serve, tokens
from trio_fanout.client import Client, ServerError, open_client
from trio_fanout.emitter import open_emitter
from trio_fanout.reconnecting import (
    Connected,
    Disconnected,
    Reconnecting,
    Recovered,
    TokenRequired,
    Unrecovered,
    open_reconnecting_client,
)

# The handshake timeout of the clusters here: it is also how long a client has for its auth
# frame, and the auth-timeout test waits for it.
HANDSHAKE_TIMEOUT = 5
ALLOWED_ORIGIN = "https://app.example"
# Every token these tests make, valid or not: none may appear in a cluster's log.
MINTED: list[str] = []


class Keys:
    """A secret and two key pairs, written where the clusters read them."""

    def __init__(self, directory: Path) -> None:
        self.secret = b"0123456789abcdef0123456789abcdef-test-secret"
        self.secret_file = directory / "secret"
        self.secret_file.write_bytes(self.secret + b"\n")
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa_public_pem = _public_pem(self.rsa)
        self.public_files = {"RS256": directory / "rsa.pem", "ES256": directory / "ec.pem"}
        self.public_files["RS256"].write_bytes(self.rsa_public_pem)
        self.public_files["ES256"].write_bytes(_public_pem(self.ec))
        self.private = {"HS256": self.secret, "RS256": self.rsa, "ES256": self.ec}
        self.private_files = {
            "RS256": directory / "rsa-private.pem",
            "ES256": directory / "ec-private.pem",
        }
        for algorithm, key in (("RS256", self.rsa), ("ES256", self.ec)):
            self.private_files[algorithm].write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


def token(
    keys: Keys, sub: str = "ann", *, ttl: float = 600, algorithm: str = "HS256", **claims: Any
) -> str:
    now = int(time.time())
    payload = {"sub": sub, "exp": now + round(ttl), **claims}
    minted = jwt.encode(payload, keys.private[algorithm], algorithm=algorithm)
    MINTED.append(minted)
    return minted


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    """A JWT assembled by hand, for the forgeries PyJWT refuses to make: ``alg: none``, or HS256
    with a public key as the secret."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    forged = f"{signing_input}.{_b64(signature)}"
    MINTED.append(forged)
    return forged


def write_config(directory: Path, **settings: Any) -> str:
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path = directory / "trio-fanout.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def cluster(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcess]:
    """Two workers requiring HS256 tokens, no leeway (so that expiry is exact), and two allowed
    origins, one of them the cluster's own (for pages it serves to a browser); at debug level,
    so that every log line a request can cause is written."""
    port = free_port()
    config = write_config(
        tmp_path_factory.mktemp("hs256"),
        token_secret_file=str(keys.secret_file),
        token_leeway=0,
        handshake_timeout=HANDSHAKE_TIMEOUT,
        allowed_origins=[ALLOWED_ORIGIN, f"http://127.0.0.1:{port}"],
    )
    process = ClusterProcess(
        "--workers", "2", "--heartbeat-interval", "0.2", "--config", config, "--log-level", "debug",
        "--port", str(port),
    )  # fmt: skip
    try:
        process.wait_for_workers(2)
        yield process
    finally:
        process.stop()


async def closed_with(client: Client) -> trio_websocket.CloseReason:
    """How the server closed ``client`` (every frame until then is read and dropped)."""
    with trio.fail_after(RECEIVE_TIMEOUT + HANDSHAKE_TIMEOUT):
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await client.receive()
    return closed.value.reason


async def witnesses(stack: AsyncExitStack, cluster: ClusterProcess, keys: Keys) -> list[Client]:
    """One authenticated client on each worker, in room ``witness``: whichever worker refuses
    a client in a test, one of these shares its worker and must still be served."""
    by_worker: dict[int, Client] = {}
    for _ in range(100):
        client = await stack.enter_async_context(
            open_client(cluster.url, token=token(keys, "witness"), connect_timeout=START_TIMEOUT)
        )
        if client.worker not in by_worker:
            by_worker[client.worker] = client
            await client.join("witness")
        if len(by_worker) == 2:
            return list(by_worker.values())
    raise AssertionError("could not place a client on each worker")


async def still_served(clients: list[Client], text: str) -> None:
    await clients[0].publish("witness", text)
    for client in clients:
        assert await receive_data(client, 1) == [text]


async def test_a_valid_token_as_the_first_frame_is_answered_authed_and_the_client_is_served(
    cluster: ClusterProcess, keys: Keys
):
    async with open_client(cluster.url, token=token(keys, "ann")) as ann:
        assert ann.authed is not None
        assert ann.authed["sub"] == "ann"
        assert ann.authed["exp"] > time.time()
        assert ann.authed["id"] == 1
        await ann.join("lobby")
        await ann.publish("lobby", "hello")
        assert await receive_data(ann, 1) == ["hello"]


async def test_a_valid_token_in_the_query_string_needs_no_auth_frame(
    cluster: ClusterProcess, keys: Keys
):
    async with open_client(f"{cluster.url}?token={token(keys, 'bob')}") as bob:
        await bob.join("lobby")
        await bob.publish("lobby", "from bob")
        assert await receive_data(bob, 1) == ["from bob"]


async def test_two_tokens_in_the_query_are_refused_400_while_others_are_served(
    cluster: ClusterProcess, keys: Keys
):
    first, second = token(keys, "ann"), token(keys, "bob")
    async with AsyncExitStack() as stack:
        served = await witnesses(stack, cluster, keys)
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with open_client(f"{cluster.url}?token={first}&token={second}"):
                pass
        assert rejected.value.status_code == 400
        assert b"more than one token" in rejected.value.body
        assert first.encode() not in rejected.value.body
        assert second.encode() not in rejected.value.body
        await still_served(served, "after the 400 for two tokens")
        # One token, with an empty second, is one token.
        async with open_client(f"{cluster.url}?token={first}&token=") as ann:
            await ann.join("lobby")
            await ann.publish("lobby", "from ann")
            assert await receive_data(ann, 1) == ["from ann"]


@pytest.mark.parametrize(
    "problem, make",
    [
        ("forged", lambda keys: jwt.encode(
            {"sub": "ann", "exp": int(time.time()) + 600}, b"another secret" * 4, "HS256"
        )),
        ("expired", lambda keys: token(keys, ttl=-60)),
        ("not yet valid", lambda keys: token(keys, nbf=int(time.time()) + 60)),
        ("without exp", lambda keys: jwt.encode({"sub": "ann"}, keys.secret, "HS256")),
        ("not a JWT", lambda keys: "not-a-token"),
        ("alg none", lambda keys: unsigned_token(
            {"alg": "none", "typ": "JWT"}, {"sub": "ann", "exp": int(time.time()) + 600}
        )),
        ("RS256, to a server of HS256", lambda keys: token(keys, algorithm="RS256")),
        ("exp past what a float holds", lambda keys: jwt.encode(
            {"sub": "ann", "exp": 10**400}, keys.secret, "HS256"
        )),
    ],
)  # fmt: skip
async def test_a_bad_token_is_refused_401_in_the_query_and_4001_as_auth_while_others_are_served(
    cluster: ClusterProcess, keys: Keys, problem: str, make: Any
):
    bad = make(keys)
    MINTED.append(bad)
    async with AsyncExitStack() as stack:
        served = await witnesses(stack, cluster, keys)
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with open_client(f"{cluster.url}?token={bad}"):
                pass
        assert rejected.value.status_code == 401
        assert bad.encode() not in rejected.value.body
        await still_served(served, f"after the 401 for a {problem} token")

        async with open_client(cluster.url) as client:
            await client.send({"type": "auth", "token": bad, "id": 1})
            reason = await closed_with(client)
        assert reason.code == 4001
        assert bad not in (reason.reason or "")
        await still_served(served, f"after the 4001 for a {problem} token")


async def test_a_first_frame_other_than_auth_closes_4001(cluster: ClusterProcess, keys: Keys):
    async with AsyncExitStack() as stack:
        served = await witnesses(stack, cluster, keys)
        for first in (
            {"type": "join", "room": "lobby", "id": 1},
            {"type": "refresh", "token": token(keys), "id": 1},
            {"type": "auth", "id": 1},
        ):
            async with open_client(cluster.url) as client:
                await client.send(first)
                reason = await closed_with(client)
            assert reason.code == 4001, first
            assert "the first frame must be auth" in reason.reason
        await still_served(served, "after the clients without auth")


async def test_a_token_that_is_not_ascii_closes_4001_without_an_internal_error(
    cluster: ClusterProcess, keys: Keys
):
    """JSON can carry a lone surrogate ("\\ud800"), which no JWT holds: a clear refusal."""
    async with open_client(cluster.url) as client:
        await client.send({"type": "auth", "token": "\ud800", "id": 1})
        reason = await closed_with(client)
    assert reason.code == 4001
    assert reason.reason == "the token is not a well-formed JWT"


async def test_no_auth_frame_within_the_handshake_timeout_closes_4001(
    cluster: ClusterProcess, keys: Keys
):
    async with AsyncExitStack() as stack:
        served = await witnesses(stack, cluster, keys)
        opened = trio.current_time()  # before the server's timer starts, whatever the load
        async with open_client(cluster.url) as silent:
            reason = await closed_with(silent)
        assert reason.code == 4001
        assert reason.reason == f"no auth frame within {HANDSHAKE_TIMEOUT} s"
        assert trio.current_time() - opened >= HANDSHAKE_TIMEOUT
        await still_served(served, "after the silent client")


async def test_the_join_and_publish_claims_limit_rooms_history_included(
    cluster: ClusterProcess, keys: Keys
):
    limited = token(keys, "carol", join=["team-*", "lobby"], publish=["team-a"])
    async with open_client(cluster.url, token=limited) as carol:
        await carol.join("team-b")
        await carol.join("lobby")
        with pytest.raises(ServerError) as refused:
            await carol.join("admin")
        assert refused.value.code == "forbidden"
        assert refused.value.frame["message"] == "the token does not allow joining room 'admin'"

        await carol.publish("team-a", "allowed", ack=True)
        for room in ("team-b", "lobby"):
            with pytest.raises(ServerError) as refused:
                await carol.publish(room, "refused", ack=True)
            assert refused.value.code == "forbidden"

        with pytest.raises(ServerError) as refused:
            await carol._request(
                {"type": "history", "room": "admin"}, lambda f: f["type"] == "history"
            )
        assert refused.value.code == "forbidden"
        history = await carol._request(
            {"type": "history", "room": "team-a"}, lambda f: f["type"] == "history"
        )
        assert [m["data"] for m in history["messages"]] == ["allowed"]
        await carol.ping()  # the refusals left the connection open


async def test_token_expiring_then_refresh_keeps_the_connection_past_the_first_exp(
    cluster: ClusterProcess, keys: Keys
):
    async with open_client(cluster.url, token=token(keys, "dan", ttl=5)) as dan:
        assert dan.authed is not None
        first_exp = dan.authed["exp"]
        with trio.fail_after(RECEIVE_TIMEOUT):
            expiring = await dan.receive()
        assert expiring == {"type": "token_expiring", "exp": first_exp}
        authed = await dan.refresh(token(keys, "dan", ttl=600))
        assert authed["sub"] == "dan"
        assert authed["exp"] > first_exp
        await trio.sleep(max(first_exp + 1 - time.time(), 0))  # past the first token's end
        await dan.ping()
        await dan.join("after-refresh")


async def test_without_a_refresh_the_connection_closes_4001_at_exp(
    cluster: ClusterProcess, keys: Keys
):
    async with open_client(cluster.url, token=token(keys, "eve", ttl=4)) as eve:
        assert eve.authed is not None
        with trio.fail_after(RECEIVE_TIMEOUT):
            assert (await eve.receive())["type"] == "token_expiring"
        reason = await closed_with(eve)
    assert reason.code == 4001
    assert reason.reason == "the token has expired"
    assert time.time() >= eve.authed["exp"] - 0.1


async def test_with_a_leeway_the_close_still_comes_at_exp_and_a_late_token_gets_the_leeway(
    keys: Keys,
):
    """The leeway lets in a token whose exp has just passed by the worker's clock (the minter's
    clock behind it), with that long to refresh; it does not push back the close of a token
    given before its exp, which comes at exp."""
    leeway = 3
    config = Config(
        port=0,
        heartbeat_interval=0,
        backplane="memory://leeway",
        token_secret_file=str(keys.secret_file),
        token_leeway=leeway,
    )
    async with trio.open_nursery() as nursery:
        worker = await nursery.start(functools.partial(serve, config))
        url = f"ws://127.0.0.1:{worker.port}/ws"
        async with open_client(url, token=token(keys, "ora", ttl=2)) as ora:
            assert ora.authed is not None
            reason = await closed_with(ora)
            closed_at = time.time()
        assert reason.code == 4001
        assert ora.authed["exp"] - 0.1 <= closed_at < ora.authed["exp"] + leeway - 1

        async with open_client(url, token=token(keys, "pam", ttl=-1)) as pam:
            assert pam.authed is not None
            with trio.fail_after(RECEIVE_TIMEOUT):
                assert (await pam.receive())["type"] == "token_expiring"
            await pam.ping()  # within the leeway, still served
            reason = await closed_with(pam)
            closed_at = time.time()
        assert reason.code == 4001
        assert closed_at >= pam.authed["exp"] + leeway - 1.1
        worker.stop()


async def test_a_refresh_with_another_sub_or_a_bad_token_is_refused_and_the_token_stays(
    cluster: ClusterProcess, keys: Keys
):
    async with open_client(cluster.url, token=token(keys, "fay")) as fay:
        for bad in (token(keys, "mallory"), token(keys, "fay", ttl=-60)):
            with pytest.raises(ServerError) as refused:
                await fay.refresh(bad)
            assert refused.value.code == "forbidden"
        await fay.join("lobby")


async def test_an_origin_outside_the_allowed_list_is_refused_403(
    cluster: ClusterProcess, keys: Keys
):
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    async with AsyncExitStack() as stack:
        served = await witnesses(stack, cluster, keys)
        for target in ("/ws", f"/ws?token={token(keys)}"):
            status, body = await http_get(
                cluster.port, target, upgrade + "Origin: https://evil.example\r\n"
            )
            assert (status, body) == (403, b"this origin may not connect\n")
        await still_served(served, "after the refused origins")
    for origin in (ALLOWED_ORIGIN, ALLOWED_ORIGIN.upper()):
        async with trio_websocket.open_websocket_url(
            cluster.url, extra_headers=[(b"Origin", origin.encode())]
        ) as ws:
            with trio.fail_after(RECEIVE_TIMEOUT):
                assert json.loads(await ws.get_message())["type"] == "welcome"
    async with open_client(cluster.url, token=token(keys)):  # no Origin: not a browser
        pass


async def test_no_broadcast_nor_heartbeat_reaches_a_client_before_its_auth(
    cluster: ClusterProcess, keys: Keys
):
    async with AsyncExitStack() as stack:
        waiting = await stack.enter_async_context(open_client(cluster.url))
        for _ in range(100):  # an authenticated client on the same worker, to see the broadcast
            same = await stack.enter_async_context(open_client(cluster.url, token=token(keys)))
            if same.worker == waiting.worker:
                break
        else:
            raise AssertionError("no client on the same worker")
        async with open_emitter(cluster.backplane_url) as emitter:
            await emitter.broadcast("for authenticated clients only")
        with trio.fail_after(RECEIVE_TIMEOUT):
            assert (await same.receive())["data"] == "for authenticated clients only"
        # The worker has fanned that broadcast out, and heartbeats went by meanwhile: none of
        # them may be queued for the client still waiting to authenticate.
        await waiting.send({"type": "auth", "token": token(keys, "hal"), "id": 7})
        with trio.fail_after(RECEIVE_TIMEOUT):
            assert (await waiting.receive(heartbeats=True))["type"] == "authed"


async def test_the_reconnecting_client_refreshes_on_token_expiring_and_stays_connected(
    cluster: ClusterProcess, keys: Keys
):
    calls: list[str] = []

    async def fresh_token() -> str:  # an async function, as one that asks a web app would be
        calls.append(token(keys, "ida", ttl=4))
        return calls[-1]

    async with open_reconnecting_client(cluster.url, token=fresh_token) as ida:
        with trio.fail_after(RECEIVE_TIMEOUT):
            assert isinstance(await ida.receive(), Connected)
        await ida.join("ida-room")
        first_exp = jwt.decode(calls[0], options={"verify_signature": False})["exp"]
        # Refreshed at least once (each token is refreshed halfway through its 4 s), and still
        # on the first connection past the first token's end:
        await trio.sleep(max(first_exp + 1 - time.time(), 0))
        assert len(calls) >= 2
        await ida.publish("ida-room", "still here", ack=True)
        with trio.fail_after(RECEIVE_TIMEOUT):
            item = await ida.receive()
        assert isinstance(item, dict) and item["data"] == "still here", item


async def test_the_reconnecting_client_takes_a_fresh_token_on_every_reconnection(
    cluster: ClusterProcess, keys: Keys
):
    subs = iter(["joe", "not-joe", "joe", "joe", "joe"])

    def next_token() -> str:  # a plain function; its second token is refused (another sub)
        return token(keys, next(subs), ttl=4)

    async with open_reconnecting_client(cluster.url, token=next_token, backoff_base=0.1) as joe:
        with trio.fail_after(RECEIVE_TIMEOUT):
            assert isinstance(await joe.receive(), Connected)
        await joe.join("joe-room")
        with trio.fail_after(RECEIVE_TIMEOUT):
            lost = await joe.receive()
            assert isinstance(lost, Disconnected) and lost.code == 4001, lost
            assert isinstance(await joe.receive(), Reconnecting)
            assert isinstance(await joe.receive(), Connected)
            rejoined = await joe.receive()
        assert isinstance(rejoined, Recovered | Unrecovered) and rejoined.room == "joe-room"
        assert joe.connected


async def test_the_reconnecting_client_without_a_token_is_told_at_once_that_one_is_required(
    cluster: ClusterProcess,
):
    started = trio.current_time()
    with trio.fail_after(RECEIVE_TIMEOUT), pytest.raises(TokenRequired) as refused:
        async with open_reconnecting_client(cluster.url):
            pass  # pragma: no cover
    # At once: neither after the server's wait for an auth frame nor after a silence.
    assert trio.current_time() - started < HANDSHAKE_TIMEOUT
    assert refused.value.reason == "the first frame must be auth"
    assert str(refused.value) == (
        "the server requires a token (it closed the connection with 4001: the first frame "
        "must be auth); give open_reconnecting_client a token"
    )


async def test_a_reconnecting_client_without_a_token_stops_when_its_server_starts_requiring_one(
    keys: Keys,
):
    handshakes: list[str] = []

    async def count(request: Request) -> None:
        handshakes.append(request.path)

    port = free_port()
    async with (
        embedded_worker(port) as without_tokens,
        open_reconnecting_client(
            f"ws://127.0.0.1:{port}/ws", backoff_base=0.05, backoff_cap=0.2
        ) as client,
    ):
        with trio.fail_after(RECEIVE_TIMEOUT):
            assert isinstance(await client.receive(), Connected)
            await client.join("lobby")
            without_tokens.cancel()
            assert isinstance(await client.receive(), Disconnected)
        # The server comes back requiring tokens: the client, which has none, stops.
        settings = {"token_secret_file": str(keys.secret_file)}
        async with embedded_worker(port, Hooks(authenticate=count), **settings):
            with trio.fail_after(RECEIVE_TIMEOUT), pytest.raises(TokenRequired) as refused:
                while True:  # the attempts announced, until the one refused for want of a token
                    assert isinstance(await client.receive(), Reconnecting)
            assert refused.value.reason == "the first frame must be auth"
            assert not client.connected
            for request in (client.join("lobby"), client.publish("lobby", "hi"), client.receive()):
                with pytest.raises(TokenRequired):
                    await request
            # Ten times the longest backoff: a client still trying would have come back.
            await trio.sleep(2.0)
            assert handshakes == ["/ws"]


# The browser client in a page, given its tokens one by one by the test (its token option is a
# function, as an application's would be that fetches them from its own server).
BROWSER_SETUP = (
    """
(async () => {"""
    + browser.IMPORT_CLIENT
    + """
  window.tokens = TOKENS;
  window.tokensTaken = 0;
  window.events = [];
  window.received = [];
  window.client = new FanoutClient(WS_URL, {
    token: async () => tokens[tokensTaken++],
    backoffBaseMs: 100,
  });
  for (const name of ["connected", "disconnected", "error"]) {
    client.on(name, (detail) => events.push([name, detail]));
  }
  await new Promise((resolve) => client.on("connected", resolve));
  await client.join("browser-room", (data) => received.push(data));
  return client.auth;
})().catch((error) => `the page could not set up the client: ${error.stack}`)
"""
)


@pytest.mark.skipif(browser.CHROMIUM is None, reason="Chromium is not installed")
async def test_the_browser_client_authenticates_refreshes_and_stays_connected(
    cluster: ClusterProcess, keys: Keys
):
    origin = f"http://127.0.0.1:{cluster.port}"
    async with browser.open_page(f"{origin}/healthz") as page:
        # Minted once the browser is up, which may take seconds on a loaded machine.
        first, second = token(keys, "page", ttl=8), token(keys, "page", ttl=600)
        first_exp = jwt.decode(first, options={"verify_signature": False})["exp"]
        setup = (
            BROWSER_SETUP.replace("ORIGIN", json.dumps(origin))
            .replace("WS_URL", json.dumps(cluster.url))
            .replace("TOKENS", json.dumps([first, second]))
        )
        with trio.fail_after(START_TIMEOUT):
            auth = await page.evaluate(setup)
        assert auth == {"sub": "page", "exp": first_exp}, auth
        # token_expiring comes halfway through the first token's 8 s: the page asks for the
        # next token and refreshes with it.
        with trio.fail_after(RECEIVE_TIMEOUT):
            while await page.evaluate("client.auth.exp") == first_exp:
                await page.evaluate("new Promise((resolve) => setTimeout(resolve, 100))")
        await trio.sleep(max(first_exp + 1 - time.time(), 0))  # past the first token's end
        async with open_client(cluster.url, token=token(keys, "sender")) as sender:
            await sender.publish("browser-room", "after the refresh", ack=True)
        with trio.fail_after(RECEIVE_TIMEOUT):
            while not await page.evaluate("received.length"):
                await page.evaluate("new Promise((resolve) => setTimeout(resolve, 100))")
        assert await page.evaluate("received") == ["after the refresh"]
        assert await page.evaluate("events.map((event) => event[0])") == ["connected"]
        assert await page.evaluate("tokensTaken") == 2


# The browser client in a page, with no token option, against a server that requires one.
BROWSER_WITHOUT_TOKEN = (
    """
(async () => {"""
    + browser.IMPORT_CLIENT
    + """
  const events = [];
  const client = new FanoutClient(WS_URL, { backoffBaseMs: 50 });
  for (const name of ["connected", "disconnected", "reconnecting", "error"]) {
    client.on(name, (detail) => events.push([name, detail]));
  }
  const stopped = new Promise((resolve) => client.on("error", resolve));
  const joined = client.join("lobby", () => {}).then(
    () => "joined",
    (error) => [error.name, error.code, error.message]
  );
  await stopped;
  return { events, joined: await joined, state: client.state };
})().catch((error) => `the page could not run the client: ${error.stack}`)
"""
)


@pytest.mark.skipif(browser.CHROMIUM is None, reason="Chromium is not installed")
async def test_the_browser_client_without_a_token_stops_and_says_one_is_required(
    cluster: ClusterProcess,
):
    origin = f"http://127.0.0.1:{cluster.port}"
    async with browser.open_page(f"{origin}/healthz") as page:
        script = BROWSER_WITHOUT_TOKEN.replace("ORIGIN", json.dumps(origin)).replace(
            "WS_URL", json.dumps(cluster.url)
        )
        with trio.fail_after(START_TIMEOUT):
            outcome = await page.evaluate(script)
    said = (
        "the server requires a token (it closed the connection with 4001: the first frame "
        "must be auth); give the client a token option"
    )
    # Told once, never connected, and stopped: no reconnection is planned.
    assert outcome == {
        "events": [["error", {"room": None, "code": "token_required", "message": said}]],
        "joined": ["FanoutError", "token_required", said],
        "state": "closed",
    }, outcome


@pytest.mark.skipif(browser.CHROMIUM is None, reason="Chromium is not installed")
async def test_a_page_of_another_origin_cannot_open_a_websocket(cluster: ClusterProcess):
    # localhost is the same server, but another origin than the allowed http://127.0.0.1:PORT.
    async with browser.open_page(f"http://localhost:{cluster.port}/healthz") as page:
        with trio.fail_after(RECEIVE_TIMEOUT):
            outcome = await page.evaluate(
                f"""new Promise((resolve) => {{
                    const ws = new WebSocket({json.dumps(cluster.url)});
                    ws.onopen = () => resolve("open");
                    ws.onclose = (event) => resolve(event.code);
                }})"""
            )
    assert outcome == 1006  # what a browser reports for a refused handshake


async def test_an_embedded_workers_hooks_apply_on_top_of_the_token_and_see_its_sub(
    keys: Keys,
):
    seen: list[tuple[object, str]] = []

    async def authorize_join(identity: object, room: str) -> bool:
        seen.append((identity, room))
        return room != "closed-by-the-hook"

    config = Config(
        port=0,
        heartbeat_interval=0,
        backplane="memory://tokens-and-hooks",
        token_secret_file=str(keys.secret_file),
    )
    async with trio.open_nursery() as nursery:
        worker = await nursery.start(
            functools.partial(serve, config, hooks=Hooks(authorize_join=authorize_join))
        )
        url = f"ws://127.0.0.1:{worker.port}/ws"
        async with open_client(url, token=token(keys, "lea", join=["open", "closed-*"])) as lea:
            await lea.join("open")
            for room in ("closed-by-the-hook", "not-in-the-token"):
                with pytest.raises(ServerError) as refused:
                    await lea.join(room)
                assert refused.value.code == "forbidden"
            # The hook ran for the rooms the token allows, with the token's sub as identity.
            assert seen == [("lea", "open"), ("lea", "closed-by-the-hook")]
        worker.stop()


def documented_python_minting(secret_file: Path) -> Any:
    """The Python function of docs/security.md that mints tokens, as the reader would copy it,
    reading the secret from ``secret_file`` where the example reads the workers' file."""
    text = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    after = text.split("From a Python web application", 1)[1]
    code = after.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("/etc/trio-fanout/token-secret", str(secret_file))
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/security.md", "exec"), namespace)  # it prints one token
    return namespace["fanout_token"]


async def test_the_documented_python_minting_makes_tokens_the_server_takes(
    cluster: ClusterProcess, keys: Keys, capsys: pytest.CaptureFixture[str]
):
    fanout_token = documented_python_minting(keys.secret_file)
    printed = capsys.readouterr().out.strip()
    MINTED.append(printed)
    async with open_client(cluster.url, token=printed) as printed_for:
        assert printed_for.authed is not None and printed_for.authed["sub"] == "ann"
    minted = fanout_token("ann", "blue", keys.secret)
    MINTED.append(minted)
    async with open_client(cluster.url, token=minted) as ann:
        assert ann.authed is not None and ann.authed["sub"] == "ann"
        await ann.join("team-blue-design")
        await ann.join("lobby")
        await ann.publish("team-blue-design", "from the documented token", ack=True)
        assert await receive_data(ann, 1) == ["from the documented token"]
        with pytest.raises(ServerError) as refused:
            await ann.join("team-red-design")
        assert refused.value.code == "forbidden"
        with pytest.raises(ServerError) as refused:
            await ann.publish("lobby", "not allowed", ack=True)
        assert refused.value.code == "forbidden"


def test_tokens_never_reach_the_log(cluster: ClusterProcess):
    """Runs last: every token of this module, valid or not, was sent to this cluster."""
    log = cluster.log()
    assert "closing 4001" in log  # the refusals were logged, at debug level
    assert MINTED
    for minted in MINTED:
        assert minted not in log
        signature = minted.rsplit(".", 1)[-1]
        assert len(signature) < 16 or signature not in log


# ---- algorithms: the one the key allows, whatever the token says ----------------------------


@pytest.fixture(scope="module", params=["RS256", "ES256"])
def key_cluster(
    request: pytest.FixtureRequest, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ClusterProcess]]:
    algorithm = request.param
    config = write_config(
        tmp_path_factory.mktemp(algorithm),
        token_public_key_file=str(keys.public_files[algorithm]),
        token_leeway=0,
    )
    process = ClusterProcess("--workers", "1", "--heartbeat-interval", "0", "--config", config)
    try:
        process.wait_for_workers(1)
        yield algorithm, process
    finally:
        process.stop()


async def test_a_public_key_takes_its_own_algorithm_and_refuses_every_other(
    key_cluster: tuple[str, ClusterProcess], keys: Keys
):
    algorithm, cluster = key_cluster
    async with open_client(cluster.url, token=token(keys, "ivy", algorithm=algorithm)) as ivy:
        assert ivy.authed is not None and ivy.authed["sub"] == "ivy"

    payload = {"sub": "ivy", "exp": int(time.time()) + 600}
    other = "ES256" if algorithm == "RS256" else "RS256"
    public_pem = keys.public_files[algorithm].read_bytes()
    forgeries = {
        "alg none": unsigned_token({"alg": "none", "typ": "JWT"}, payload),
        "HS256 with the public key as secret": unsigned_token(
            {"alg": "HS256", "typ": "JWT"},
            payload,
            lambda data: hmac.new(public_pem, data, hashlib.sha256).digest(),
        ),
        f"{other} with another key": token(keys, "ivy", algorithm=other),
        "HS256 with a secret": token(keys, "ivy"),
    }
    # A client on the same (only) worker, served all along.
    async with open_client(cluster.url, token=token(keys, "wit", algorithm=algorithm)) as witness:
        await witness.join("witness")
        for what, forged in forgeries.items():
            await _refused_everywhere(cluster, what, forged)
            await witness.publish("witness", f"after {what}")
            assert await receive_data(witness, 1) == [f"after {what}"]


async def _refused_everywhere(cluster: ClusterProcess, what: str, forged: str) -> None:
    """``forged`` is refused as an ``auth`` frame (4001) and in the query string (401)."""
    async with open_client(cluster.url) as client:
        await client.send({"type": "auth", "token": forged})
        reason = await closed_with(client)
    assert reason.code == 4001, what
    assert reason.reason in (
        "the token is signed with an algorithm this server does not take",
        "the token's signature does not verify",
    ), what
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with open_client(f"{cluster.url}?token={forged}"):
            pass
    assert rejected.value.status_code == 401, what


async def test_the_token_command_signs_with_a_private_key_for_a_server_with_its_public_key(
    key_cluster: tuple[str, ClusterProcess], keys: Keys
):
    algorithm, cluster = key_cluster
    private, public = keys.private_files[algorithm], keys.public_files[algorithm]
    result = await trio.to_thread.run_sync(
        lambda: run_cli(
            "token", "uma", "--join", "lobby", "--private-key-file", str(private),
            "--token-public-key-file", str(public),
        )
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    minted = result.stdout.strip()
    MINTED.append(minted)
    assert jwt.get_unverified_header(minted)["alg"] == algorithm
    assert "PRIVATE" not in result.stdout + result.stderr
    async with open_client(cluster.url, token=minted) as uma:
        assert uma.authed is not None and uma.authed["sub"] == "uma"
        await uma.join("lobby")
        with pytest.raises(ServerError) as refused:
            await uma.join("elsewhere")
        assert refused.value.code == "forbidden"

    # Another pair's private key: refused before a token the server would refuse is printed.
    other = keys.private_files["ES256" if algorithm == "RS256" else "RS256"]
    mismatched = run_cli(
        "token", "uma", "--private-key-file", str(other), "--token-public-key-file", str(public)
    )
    assert mismatched.returncode == 2
    assert mismatched.stdout == ""
    assert f"{other} is not the private key of token_public_key_file {public}" in (
        mismatched.stderr
    )


def test_the_token_command_refuses_what_cannot_sign_a_token_the_server_takes(
    keys: Keys, tmp_path: Path
):
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        keys.ec.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    secret = ["--token-secret-file", str(keys.secret_file)]
    cases = [
        (["", *secret], "SUB: the identity must not be empty"),
        (["ann", "--token-public-key-file", str(keys.public_files["RS256"])],
         "a public key cannot sign: give the private key of"),
        (["ann", "--private-key-file", str(keys.public_files["RS256"])],
         "is not a PEM private key"),
        (["ann", "--private-key-file", str(encrypted)], "is encrypted"),
        (["ann", "--private-key-file", str(keys.private_files["RS256"]), *secret],
         "token_secret_file is set"),
        (["ann"], "token needs a key"),
    ]  # fmt: skip
    for args, problem in cases:
        result = run_cli("token", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == ""
        assert problem in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


# ---- the pure parts ---------------------------------------------------------------------------


def test_room_patterns():
    assert tokens.room_allowed(None, "anything")
    assert not tokens.room_allowed([], "anything")
    assert tokens.room_allowed(["team-*"], "team-")
    assert tokens.room_allowed(["team-*"], "team-a")
    assert not tokens.room_allowed(["team-*"], "team")
    assert tokens.room_allowed(["*"], "x")
    assert tokens.room_allowed(["a", "b"], "b")
    assert not tokens.room_allowed(["a*b"], "axb")  # only a trailing * is a wildcard


def test_deadlines_come_due_in_order_and_only_when_due():
    deadlines = tokens.Deadlines()
    assert deadlines.next_deadline == float("inf")
    assert deadlines.add(10.0, 1, 1)  # the earliest: a sleeper must wake
    assert not deadlines.add(20.0, 2, 1)
    assert deadlines.add(5.0, 3, 7)
    assert not deadlines.add(5.0, 4, 1)  # a tie is not sooner
    assert deadlines.pop_due(4.9) == []
    assert deadlines.pop_due(10.0) == [(3, 7), (4, 1), (1, 1)]
    assert deadlines.next_deadline == 20.0
    assert deadlines.pop_due(100.0) == [(2, 1)]


def test_leeway_accepts_a_token_just_expired_and_no_more(keys: Keys):
    verifier = tokens.Verifier(tokens.read_secret(str(keys.secret_file)), leeway=30)
    assert verifier.verify(token(keys, ttl=-10)).sub == "ann"
    with pytest.raises(tokens.InvalidToken, match="expired"):
        verifier.verify(token(keys, ttl=-60))


def test_claims_of_the_wrong_type_are_refused(keys: Keys):
    verifier = tokens.Verifier(tokens.read_secret(str(keys.secret_file)), leeway=0)
    with pytest.raises(tokens.InvalidToken, match="join claim"):
        verifier.verify(token(keys, join="lobby"))
    with pytest.raises(tokens.InvalidToken, match="sub"):
        verifier.verify(token(keys, sub=""))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trio_fanout_command(*args),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        env={**os.environ, **(env or {})},
    )


def test_unusable_key_files_stop_the_command_with_a_clear_error(keys: Keys, tmp_path: Path):
    short = tmp_path / "short"
    short.write_text("hunter2\n")
    private = tmp_path / "private.pem"
    private.write_bytes(
        keys.rsa.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cases = [
        (["--token-secret-file", str(short)], "needs at least 32"),
        (["--token-secret-file", str(tmp_path / "missing")], "cannot read"),
        (["--token-public-key-file", str(private)], "holds a private key"),
        (["--token-public-key-file", str(keys.secret_file)], "not a PEM public key"),
        (
            ["--token-secret-file", str(keys.secret_file), "--token-public-key-file",
             str(keys.public_files["RS256"])],
            "not both",
        ),
        (["--allowed-origins", "example.com"], "scheme://host"),
    ]  # fmt: skip
    for flags, problem in cases:
        result = run_cli("worker", "--port", "0", *flags)
        assert result.returncode == 2, result.stderr
        assert problem in result.stderr
        assert "Traceback" not in result.stderr
        assert "hunter2" not in result.stderr


def test_the_token_command_mints_a_token_the_server_takes_and_never_prints_the_secret(
    keys: Keys,
):
    result = run_cli(
        "token", "kim", "--join", "team-*", "--publish", "team-a", "--ttl", "60",
        "--token-secret-file", str(keys.secret_file),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    minted = result.stdout.strip()
    grant = tokens.Verifier(tokens.read_secret(str(keys.secret_file)), 0).verify(minted)
    assert (grant.sub, grant.join, grant.publish) == ("kim", ("team-*",), ("team-a",))
    assert grant.exp - time.time() <= 60
    assert keys.secret.decode() not in result.stdout + result.stderr

    shown = run_cli("config", env={"TRIO_FANOUT_TOKEN_SECRET_FILE": str(keys.secret_file)})
    assert str(keys.secret_file) in shown.stdout
    assert keys.secret.decode() not in shown.stdout

    refused = run_cli("token", "kim", "--token-public-key-file", str(keys.public_files["RS256"]))
    assert refused.returncode == 2
    assert "a public key cannot sign" in refused.stderr


def test_timers_of_replaced_tokens_and_gone_connections_do_not_pile_up():
    """A client refreshing in a loop sets a timer per refresh, each for near its token's exp:
    the stale ones are swept, so the heap stays near the number of live timers."""
    deadlines = tokens.Deadlines()
    for version in range(100_000):
        deadlines.add(86_400.0 + version, key=1, version=version)
    deadlines.add(50.0, key=2, version=0)
    assert len(deadlines) < 200
    due = deadlines.pop_due(86_400.0 + 100_000)
    assert due[0] == (2, 0)
    assert due[-1] == (1, 99_999)  # the live one; the few stale ones left are skipped
    for key in range(3, 1000):  # connections that set a timer and closed before it came due
        deadlines.add(10.0, key=key, version=0)
        deadlines.forget(key)
    deadlines.add(5.0, key=1000, version=0)
    assert len(deadlines) < 200
    due = deadlines.pop_due(10.0)
    assert due[0] == (1000, 0)
    assert len(due) < 200  # the rest, if any, are skipped by the caller: gone connections
