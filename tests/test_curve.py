"""CURVE on the ZeroMQ backplane, with real processes: `trio-fanout keygen`, `trio-fanout proxy`,
`trio-fanout worker`, `trio-fanout run` and `trio-fanout publish`, real WebSocket clients, and a
loopback TCP relay between a worker and the proxy that records what crosses the wire."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import attrs
import pytest
import trio
import zmq.auth

from tests.helpers import (
    RECEIVE_TIMEOUT,
    START_TIMEOUT,
    ClusterProcess,
    LoggedProcess,
    connect_on_each_worker,
    free_port,
    receive_message,
    trio_fanout_command,
)
from trio_fanout.backplane import BackplaneUnavailable, Credentials
from trio_fanout.backplane._credentials import write_key_pair
from trio_fanout.client import ServerError, open_client
from trio_fanout.emitter import open_emitter

# How long a refused client may take to say so: the refusal arrives with the proxy's first
# answer to the handshake, in milliseconds; generous for a shared machine.
REFUSAL_TIMEOUT = 15.0


@attrs.frozen
class Keys:
    """Key pairs written by write_key_pair (the code of `trio-fanout keygen`) in a directory."""

    directory: Path

    def public(self, name: str) -> str:
        return str(self.directory / f"{name}.key")

    def secret(self, name: str) -> str:
        return str(self.directory / f"{name}.key_secret")

    @property
    def allowed(self) -> str:
        return str(self.directory / "allowed")

    def credentials(self, name: str) -> Credentials:
        return Credentials(
            curve_secret_key_file=self.secret(name), curve_server_key_file=self.public("proxy")
        )


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """The proxy's pair; "member", whose public key the proxy allows; "stranger", not allowed."""
    directory = tmp_path / "keys"
    (directory / "allowed").mkdir(parents=True)
    for name in ("proxy", "member", "stranger"):
        write_key_pair(str(directory), name)
    (directory / "allowed" / "member.key").write_bytes((directory / "member.key").read_bytes())
    return Keys(directory)


def settings_file(directory: Path, name: str, **settings: str | float) -> str:
    path = directory / f"{name}.toml"
    path.write_text("".join(f"{key} = {value!r}\n" for key, value in settings.items()))
    return str(path)


def start_proxy(
    keys: Keys | None, port: int, tmp_path: Path, heartbeat_interval: float = 0
) -> LoggedProcess:
    settings: dict[str, str | float] = {
        "proxy_port": port,
        "heartbeat_interval": heartbeat_interval,
    }
    if keys is not None:
        settings["curve_secret_key_file"] = keys.secret("proxy")
        settings["curve_allowed_keys_dir"] = keys.allowed
    config = settings_file(tmp_path, "proxy", **settings)
    proxy = LoggedProcess(trio_fanout_command("proxy", "--config", config))
    proxy.wait_for_log("ZeroMQ proxy: clients connect")
    return proxy


def worker_command(tmp_path: Path, name: str, proxy_port: int, **curve: str) -> list[str]:
    config = settings_file(
        tmp_path, name, backplane=f"zmq://127.0.0.1:{proxy_port}", port=0, **curve
    )
    return trio_fanout_command("worker", "--config", config)


def start_worker(
    processes: list[LoggedProcess], tmp_path: Path, name: str, proxy_port: int, **curve: str
) -> str:
    """Start a worker (stopped with ``processes``) and return its URL once it serves."""
    worker = LoggedProcess(worker_command(tmp_path, name, proxy_port, **curve))
    processes.append(worker)
    match = worker.wait_for_log(r"serving ws://127\.0\.0\.1:(\d+)/ws")
    return f"ws://127.0.0.1:{match.group(1)}/ws"


def publish(tmp_path: Path, name: str, proxy_port: int, room: str, data: str, **curve: str):
    config = settings_file(tmp_path, name, backplane=f"zmq://127.0.0.1:{proxy_port}", **curve)
    return subprocess.run(
        trio_fanout_command("publish", "--config", config, room, data),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def processes() -> Iterator[list[LoggedProcess]]:
    """Processes a test starts, stopped at its end whatever happens."""
    started: list[LoggedProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop()


def test_keygen_writes_a_pair_that_pyzmq_reads_and_keeps_the_secret_to_its_owner(
    tmp_path: Path,
):
    def keygen(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "trio_fanout", "keygen", *args],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )

    made = keygen("worker-1", "--directory", str(tmp_path / "keys"))
    assert made.returncode == 0, made.stderr
    keys = tmp_path / "keys"  # created by keygen
    public, secret = zmq.auth.load_certificate(keys / "worker-1.key_secret")
    assert secret is not None and len(secret) == 40
    assert zmq.auth.load_certificate(keys / "worker-1.key") == (public, None)
    assert stat.S_IMODE(os.stat(keys / "worker-1.key_secret").st_mode) == 0o600
    assert secret.decode() not in made.stdout + made.stderr

    again = keygen("worker-1", "--directory", str(tmp_path / "keys"))
    assert again.returncode == 2
    assert "exists; not overwriting" in again.stderr and "Traceback" not in again.stderr
    assert zmq.auth.load_certificate(keys / "worker-1.key_secret") == (public, secret)


async def test_separate_processes_a_listed_key_works_end_to_end_and_others_get_nothing_through(
    keys: Keys, tmp_path: Path, processes: list[LoggedProcess]
):
    proxy_port = free_port()
    proxy = start_proxy(keys, proxy_port, tmp_path, heartbeat_interval=0.2)
    processes.append(proxy)
    url = start_worker(
        processes,
        tmp_path,
        "member-worker",
        proxy_port,
        curve_secret_key_file=keys.secret("member"),
        curve_server_key_file=keys.public("proxy"),
    )
    room = f"curve-{os.getpid()}"
    async with open_client(url) as member:
        with trio.fail_after(RECEIVE_TIMEOUT):  # the proxy's own heartbeat gets through
            assert (await member.receive(heartbeats=True))["type"] == "heartbeat"
        await member.join(room)

        listed = publish(
            tmp_path, "member-publish", proxy_port, room, '"from a listed key"',
            curve_secret_key_file=keys.secret("member"),
            curve_server_key_file=keys.public("proxy"),
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        assert (await receive_message(member))["data"] == "from a listed key"

        unlisted = publish(
            tmp_path, "stranger-publish", proxy_port, room, '"from an unlisted key"',
            curve_secret_key_file=keys.secret("stranger"),
            curve_server_key_file=keys.public("proxy"),
        )  # fmt: skip
        assert unlisted.returncode == 1
        # Said once, as the command's error, not also as a log line before it.
        assert unlisted.stderr == (
            f"trio-fanout: error: the ZeroMQ proxy at zmq://127.0.0.1:{proxy_port} refused our "
            "CURVE key: it is not among the keys the proxy allows (curve_allowed_keys_dir)\n"
        )
        plain = publish(tmp_path, "plain-publish", proxy_port, room, '"without keys"')
        assert plain.returncode == 1
        (line,) = plain.stderr.splitlines()
        assert line.startswith("trio-fanout: error: ") and "requires CURVE" in line

        # The proxy keeps serving, and nothing of the refused ones arrived before this.
        async with open_emitter(
            f"zmq://127.0.0.1:{proxy_port}", credentials=keys.credentials("member")
        ) as emitter:
            await emitter.publish(room, "after the refusals")
        assert (await receive_message(member))["data"] == "after the refusals"
    proxy.wait_for_log("refused 1 CURVE handshakes from keys not allowed")


async def test_a_revoked_worker_is_refused_cleanly_and_its_clients_told_backplane_unavailable(
    keys: Keys, tmp_path: Path, processes: list[LoggedProcess]
):
    proxy_port = free_port()
    processes.append(start_proxy(keys, proxy_port, tmp_path))
    url = start_worker(
        processes,
        tmp_path,
        "revoked-worker",
        proxy_port,
        curve_secret_key_file=keys.secret("member"),
        curve_server_key_file=keys.public("proxy"),
    )
    worker = processes[-1]
    room = f"revoked-{os.getpid()}"
    async with open_client(url) as member:
        await member.join(room)
        await member.publish(room, "while listed", ack=True)
        assert (await receive_message(member))["data"] == "while listed"

        # Revoked: its key leaves the allowed directory, and the proxy restarts to read it.
        os.remove(Path(keys.allowed) / "member.key")
        processes[0].stop()
        processes[0] = start_proxy(keys, proxy_port, tmp_path)
        worker.wait_for_log("refused our CURVE key", timeout=REFUSAL_TIMEOUT)
        with trio.fail_after(REFUSAL_TIMEOUT), pytest.raises(ServerError) as refused:
            await member.publish(room, "after the revocation", ack=True)
        assert refused.value.frame["code"] == "backplane_unavailable"
        with trio.fail_after(REFUSAL_TIMEOUT), pytest.raises(ServerError) as refused:
            await member.join(f"{room}-new")
        assert refused.value.frame["code"] == "backplane_unavailable"
        await member.ping()  # the worker keeps serving its clients

        # Allowed again: the worker gets back in by itself (it connects anew every
        # REFUSED_RETRY_INTERVAL, as ZeroMQ does not retry a refused key).
        await trio.Path(keys.allowed, "member.key").write_bytes(
            await trio.Path(keys.public("member")).read_bytes()
        )
        processes[0].stop()
        processes[0] = start_proxy(keys, proxy_port, tmp_path)
        with trio.fail_after(START_TIMEOUT):
            while True:
                try:
                    await member.publish(room, "allowed again", ack=True)
                    break
                except ServerError as refusal:
                    assert refusal.frame["code"] == "backplane_unavailable"
                    await trio.sleep(0.1)
    assert worker.process.poll() is None
    assert "Traceback" not in worker.log()


@pytest.mark.parametrize(
    ("name", "curve", "complaint"),
    [
        (
            "stranger",
            {"curve_secret_key_file": "stranger", "curve_server_key_file": "proxy"},
            "refused our CURVE key: it is not among the keys the proxy allows",
        ),
        ("plain", {}, "refused our handshake: it requires CURVE"),
        (
            "wrong-server-key",
            {"curve_secret_key_file": "member", "curve_server_key_file": "stranger"},
            "is curve_server_key_file the proxy's public key?",
        ),
    ],
)
def test_a_worker_the_proxy_refuses_says_why_and_exits(
    keys: Keys,
    tmp_path: Path,
    processes: list[LoggedProcess],
    name: str,
    curve: dict[str, str],
    complaint: str,
):
    proxy_port = free_port()
    processes.append(start_proxy(keys, proxy_port, tmp_path))
    paths = {
        key: keys.secret(value) if key == "curve_secret_key_file" else keys.public(value)
        for key, value in curve.items()
    }
    worker = LoggedProcess(worker_command(tmp_path, name, proxy_port, **paths))
    processes.append(worker)
    worker.wait_for_log(complaint, timeout=REFUSAL_TIMEOUT)
    assert worker.process.wait(REFUSAL_TIMEOUT) == 1
    assert "Traceback" not in worker.log()
    assert "serving ws://" not in worker.log()


async def test_run_with_its_embedded_proxy_speaks_curve_to_its_workers_and_listed_emitters(
    keys: Keys, tmp_path: Path, processes: list[LoggedProcess]
):
    config = settings_file(
        tmp_path,
        "run",
        curve_secret_key_file=keys.secret("proxy"),
        curve_allowed_keys_dir=keys.allowed,
    )
    cluster = ClusterProcess("--workers", "2", "--heartbeat-interval", "0.2", "--config", config)
    processes.append(cluster)
    cluster.wait_for_workers(2)
    cluster.wait_for_log("with CURVE, 2 keys allowed")
    cluster.wait_for_log(r"access: no tokens; .*; CURVE on the ZeroMQ backplane$")
    room = f"embedded-curve-{os.getpid()}"
    async with AsyncExitStack() as stack:
        by_worker = await connect_on_each_worker(stack, cluster.url)
        (on_1,), (on_2,) = by_worker[1], by_worker[2]
        await on_1.join(room)
        await on_2.join(room)
        await on_1.publish(room, "across the workers")
        for client in (on_1, on_2):
            assert (await receive_message(client))["data"] == "across the workers"
        with trio.fail_after(RECEIVE_TIMEOUT):  # the master's heartbeat gets through too
            assert (await on_2.receive(heartbeats=True))["type"] == "heartbeat"

        async with open_emitter(
            cluster.backplane_url, credentials=keys.credentials("member")
        ) as emitter:
            await emitter.publish(room, "from a listed emitter")
        for client in (on_1, on_2):
            assert (await receive_message(client))["data"] == "from a listed emitter"

        with trio.fail_after(REFUSAL_TIMEOUT), pytest.raises(BackplaneUnavailable) as refused:
            async with open_emitter(
                cluster.backplane_url, credentials=keys.credentials("stranger")
            ):
                pass
        assert "refused our CURVE key" in str(refused.value)


async def relay_forever(
    target_port: int,
    seen: bytearray,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward loopback TCP connections to ``target_port``, appending every byte that passes,
    both ways, to ``seen``; ``started`` reports the relay's own port."""

    async def pump(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        try:
            while data := await source.receive_some():
                seen.extend(data)
                await sink.send_all(data)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(sink)

    async def relay(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", target_port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, relay, listeners)
        task_status.started(port)


@pytest.mark.parametrize("curve", [True, False], ids=["curve", "plain"])
async def test_what_crosses_the_wire_between_worker_and_proxy_is_encrypted(
    keys: Keys, tmp_path: Path, processes: list[LoggedProcess], curve: bool
):
    proxy_port = free_port()
    processes.append(start_proxy(keys if curve else None, proxy_port, tmp_path))
    marker = f"payload-marker-{os.urandom(8).hex()}"
    room = f"relayed-{os.getpid()}"
    seen = bytearray()
    client_keys = keys.credentials("member") if curve else None
    async with trio.open_nursery() as nursery:
        relay_port = await nursery.start(relay_forever, proxy_port, seen)
        worker_curve = (
            {
                "curve_secret_key_file": keys.secret("member"),
                "curve_server_key_file": keys.public("proxy"),
            }
            if curve
            else {}
        )
        # Waited for on a thread: the relay, on this loop, must carry the worker's start.
        url = await trio.to_thread.run_sync(
            lambda: start_worker(processes, tmp_path, "relayed-worker", relay_port, **worker_curve)
        )
        async with open_client(url) as member:
            await member.join(room)
            async with open_emitter(
                f"zmq://127.0.0.1:{proxy_port}", credentials=client_keys
            ) as emitter:
                await emitter.publish(room, marker)
            assert (await receive_message(member))["data"] == marker
        nursery.cancel_scope.cancel()
    assert seen  # the worker's traffic went through the relay
    assert (marker.encode() in seen) is not curve


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        (
            {"curve_server_key_file": "proxy.key"},
            "curve_server_key_file: needs curve_secret_key_file",
        ),
        (
            {"curve_secret_key_file": "proxy.key"},
            "curve_secret_key_file: {keys}/proxy.key holds no secret key",
        ),
        (
            {"curve_secret_key_file": "missing.key_secret"},
            "curve_secret_key_file: cannot read the CURVE key file {keys}/missing.key_secret",
        ),
        (
            {"curve_secret_key_file": "garbage"},
            "curve_secret_key_file: {keys}/garbage is not a CURVE key file",
        ),
        (
            {"curve_secret_key_file": "proxy.key_secret", "curve_allowed_keys_dir": "proxy.key"},
            "curve_allowed_keys_dir: {keys}/proxy.key is not a directory",
        ),
    ],
)
def test_unusable_curve_settings_are_one_line_errors(
    keys: Keys, tmp_path: Path, settings: dict[str, str], complaint: str
):
    (keys.directory / "garbage").write_bytes(b"\xff\xfe not a key\n")
    paths = {key: str(keys.directory / name) for key, name in settings.items()}
    config = settings_file(tmp_path, "settings", **paths)
    for command in ("config", "proxy", "worker"):
        result = subprocess.run(
            trio_fanout_command(command, "--config", config),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 2, result.stderr
        assert complaint.format(keys=keys.directory) in result.stderr
        assert "Traceback" not in result.stderr


def test_config_shows_where_the_keys_are_and_never_a_key(keys: Keys, tmp_path: Path):
    config = settings_file(
        tmp_path,
        "settings",
        curve_secret_key_file=keys.secret("member"),
        curve_server_key_file=keys.public("proxy"),
    )
    result = subprocess.run(
        trio_fanout_command("config", "--config", config),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert f'curve_secret_key_file = "{keys.secret("member")}"' in result.stdout
    _, secret = zmq.auth.load_certificate(keys.secret("member"))
    assert secret is not None and secret.decode() not in result.stdout
