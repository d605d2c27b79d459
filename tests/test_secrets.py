"""Secrets never reach argv, the environment of a worker, a log line or `trio-fanout config`:
real `trio-fanout run` clusters on a redis-server that requires a password, their worker
processes read through /proc."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from tests.helpers import (
    RECEIVE_TIMEOUT,
    START_TIMEOUT,
    ClusterProcess,
    LoggedProcess,
    RedisServer,
    connect_on_each_worker,
    receive_message,
    trio_fanout_command,
)
from trio_fanout.backplane import BackplaneUnavailable, Credentials, open_backplane, redact_url
from trio_fanout.config import Config

PASSWORD = "s3cret-Pa55-" + os.urandom(6).hex()
# Bound on a reconnection to Redis, which takes milliseconds when healthy (shared machine).
RECOVERY_TIMEOUT = 20.0


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@10.0.0.6:6379/2", "redis://:***@10.0.0.6:6379/2"),
        ("rediss://app:pw@host?ssl_ca_certs=/ca.pem", "rediss://app:***@host?ssl_ca_certs=/ca.pem"),
        ("redis://app:p/w@d@host:1", "redis://app:***@host:1"),  # unescaped / and @ in it
        ("redis://app@host", "redis://app@host"),  # a user name alone is no secret
        ("redis://host/0?ssl_ca_certs=a@b", "redis://host/0?ssl_ca_certs=a@b"),
        ("zmq://127.0.0.1:5559", "zmq://127.0.0.1:5559"),
    ],
)
def test_redact_url_hides_the_password_and_nothing_else(url: str, shown: str):
    assert redact_url(url) == shown


def test_a_config_printed_by_a_program_shows_no_password():
    config = Config(backplane=f"redis://app:{PASSWORD}@10.0.0.6:6379")
    assert PASSWORD not in repr(config) and PASSWORD not in str(config)
    assert "backplane='redis://app:***@10.0.0.6:6379'" in repr(config)


def trio_fanout(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        trio_fanout_command(*args),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_config_shows_the_url_with_its_password_redacted_from_file_and_environment(
    tmp_path: Path,
):
    settings = tmp_path / "settings.toml"
    settings.write_text(f'backplane = "redis://app:{PASSWORD}@10.0.0.6:6379/1"\n')
    from_file = trio_fanout("config", "--config", str(settings))
    assert from_file.returncode == 0, from_file.stderr
    assert 'backplane = "redis://app:***@10.0.0.6:6379/1"' in from_file.stdout

    from_env = trio_fanout(
        "config", env={"TRIO_FANOUT_BACKPLANE": f"redis://:{PASSWORD}@10.0.0.6"}, cwd=tmp_path
    )
    assert from_env.returncode == 0, from_env.stderr
    assert 'backplane = "redis://:***@10.0.0.6"  # environment TRIO_FANOUT_BACKPLANE' in (
        from_env.stdout
    )
    for result in (from_file, from_env):
        assert PASSWORD not in result.stdout + result.stderr


def test_config_names_the_password_file_and_never_shows_what_is_in_it(tmp_path: Path):
    password_file = tmp_path / "redis-password"
    password_file.write_text(PASSWORD + "\n")
    result = trio_fanout(
        "config",
        env={
            "TRIO_FANOUT_BACKPLANE": "redis://app@10.0.0.6",
            "TRIO_FANOUT_BACKPLANE_PASSWORD_FILE": str(password_file),
        },
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f'backplane_password_file = "{password_file}"' in result.stdout
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("backplane", "complaint"),
    [
        # Both a password file and a password in the URL: which one is meant is unclear.
        (f"redis://:{PASSWORD}@10.0.0.6", "the backplane URL has a password too"),
        # A URL that is refused shows without its password.
        (f"redis://:{PASSWORD}@10.0.0.6/zero", "redis://:***@10.0.0.6/zero"),
    ],
)
def test_refused_settings_never_show_the_password(tmp_path: Path, backplane: str, complaint: str):
    password_file = tmp_path / "redis-password"
    password_file.write_text("another")
    result = trio_fanout(
        "config",
        env={
            "TRIO_FANOUT_BACKPLANE": backplane,
            "TRIO_FANOUT_BACKPLANE_PASSWORD_FILE": str(password_file),
        },
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert complaint in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # A ? in the password (unescaped) ends the user information where urlsplit looks.
        (f"redis://:p?{PASSWORD}@10.0.0.6", "'redis://:***@10.0.0.6' has a port that"),
        # redis-py takes ?password=; this URL does not, and says so without the value.
        (f"redis://10.0.0.6?password={PASSWORD}", "'redis://10.0.0.6?password=***': unknown"),
        (
            f"rediss://app:{PASSWORD}@h?ssl_ca_certs=/ca.pem&password={PASSWORD}",
            "'rediss://app:***@h?ssl_ca_certs=/ca.pem&password=***': unknown option password",
        ),
        # A # in the password (unescaped) starts a fragment where urlsplit looks: what follows
        # it is a secret too, not an option to name.
        (f"redis://app:#{PASSWORD}@10.0.0.6", "'redis://app:***@10.0.0.6': a URL fragment"),
        (f"redis://app:1234#{PASSWORD}@10.0.0.6", "'redis://app:***@10.0.0.6': a URL fragment"),
        # urlsplit itself refuses it: a clear error, not a traceback.
        (f"redis://:{PASSWORD}@[::1", "'redis://:***@[::1' is not a valid URL"),
    ],
)
def test_a_malformed_url_is_refused_without_its_password(tmp_path: Path, url: str, shown: str):
    result = trio_fanout("config", env={"TRIO_FANOUT_BACKPLANE": url}, cwd=tmp_path)
    assert result.returncode == 2
    assert shown in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_password_file_is_a_clear_error(tmp_path: Path):
    result = trio_fanout(
        "config",
        env={
            "TRIO_FANOUT_BACKPLANE": "redis://10.0.0.6",
            "TRIO_FANOUT_BACKPLANE_PASSWORD_FILE": str(tmp_path / "missing"),
        },
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "backplane_password_file: cannot read the password file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this module's own that requires PASSWORD."""
    server = RedisServer(str(tmp_path_factory.mktemp("redis")), "--requirepass", PASSWORD)
    try:
        yield server
    finally:
        server.stop()


def worker_pids(cluster: LoggedProcess, count: int) -> list[int]:
    return [
        int(cluster.wait_for_log(rf"worker {index} \(pid (\d+)\) serving").group(1))
        for index in range(1, count + 1)
    ]


@pytest.mark.parametrize("where", ["settings file", "environment", "password file"])
async def test_workers_get_the_password_in_neither_argv_nor_environment_nor_logs(
    redis_with_password: RedisServer, tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch
):
    settings = tmp_path / "settings.toml"
    address = f"127.0.0.1:{redis_with_password.port}"
    if where == "settings file":
        settings.write_text(f'backplane = "redis://:{PASSWORD}@{address}"\n')
    elif where == "environment":
        settings.write_text("")
        # The master's environment: ClusterProcess starts it with this test's.
        monkeypatch.setenv("TRIO_FANOUT_BACKPLANE", f"redis://:{PASSWORD}@{address}")
    else:
        password_file = tmp_path / "redis-password"
        password_file.write_text(PASSWORD + "\n")
        settings.write_text(
            f'backplane = "redis://{address}"\nbackplane_password_file = "{password_file}"\n'
        )
    cluster = ClusterProcess("--workers", "2", "--config", str(settings))
    try:
        pids = worker_pids(cluster, 2)
        for pid in pids:
            for view in ("cmdline", "environ"):
                seen = await trio.Path(f"/proc/{pid}/{view}").read_bytes()
                assert PASSWORD.encode() not in seen, view
        assert "backplane redis://" in cluster.log()

        # The workers did authenticate: a message crosses them through Redis.
        room = f"secret-{os.getpid()}"
        async with AsyncExitStack() as stack:
            by_worker = await connect_on_each_worker(stack, cluster.url)
            (on_1,), (on_2,) = by_worker[1], by_worker[2]
            await on_1.join(room)
            await on_2.join(room)
            await on_1.publish(room, "authenticated")
            for client in (on_1, on_2):
                assert (await receive_message(client))["data"] == "authenticated"
    finally:
        cluster.stop()
    assert PASSWORD not in cluster.log()


@pytest.mark.parametrize("where", ["url", "password file"])
def test_a_refused_password_never_reaches_the_log(
    redis_with_password: RedisServer, tmp_path: Path, where: str
):
    wrong = "wrong-" + PASSWORD
    settings = tmp_path / "settings.toml"
    address = f"127.0.0.1:{redis_with_password.port}"
    if where == "url":
        settings.write_text(f'backplane = "redis://app:{wrong}@{address}"\nport = 0\n')
    else:
        password_file = tmp_path / "redis-password"
        password_file.write_text(wrong)
        settings.write_text(
            f'backplane = "redis://{address}"\nbackplane_password_file = "{password_file}"\n'
            "port = 0\n"
        )
    worker = LoggedProcess(trio_fanout_command("worker", "--config", str(settings)))
    try:
        worker.wait_for_log("refused AUTH")
        assert worker.process.wait(START_TIMEOUT) == 1
    finally:
        worker.stop()
    assert wrong not in worker.log() and PASSWORD not in worker.log()
    assert "Traceback" not in worker.log()
    assert not re.search(r"redis://[^ ]*:[^*][^ ]*@", worker.log())


async def test_a_changed_password_file_is_read_again_at_the_next_connection(tmp_path: Path):
    old, new = "old-" + PASSWORD, "new-" + PASSWORD
    server = RedisServer(str(tmp_path), "--requirepass", old)
    password_file = tmp_path / "redis-password"
    await trio.Path(password_file).write_text(old + "\n")
    credentials = Credentials(password_file=str(password_file))
    url = f"redis://127.0.0.1:{server.port}"

    async def redis_cli(password: str, *command: str) -> None:
        with trio.fail_after(RECEIVE_TIMEOUT):
            await trio.run_process(
                ["redis-cli", "-p", str(server.port), "--no-auth-warning", "-a", password,
                 *command],
                capture_stdout=True,
            )  # fmt: skip

    try:
        async with (
            open_backplane(url, credentials=credentials) as publisher,
            open_backplane(url, credentials=credentials) as subscriber,
        ):
            await subscriber.subscribe(b"rotated")
            await redis_cli(old, "config", "set", "requirepass", new)
            await trio.Path(password_file).write_text(new + "\n")
            for kind in ("pubsub", "normal"):  # both links must connect again
                await redis_cli(new, "client", "kill", "type", kind)
            with trio.fail_after(RECOVERY_TIMEOUT):
                while True:
                    with contextlib.suppress(BackplaneUnavailable):
                        await publisher.publish(b"rotated", b"with the new password")
                    with trio.move_on_after(0.2):
                        (message,) = await subscriber.receive_batch(1)
                        assert message.payload == b"with the new password"
                        break
    finally:
        server.stop()
