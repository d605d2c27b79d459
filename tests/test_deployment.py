"""The files of docs/deployment.md (examples/deploy/) work: nginx with the documented
configuration carries WebSockets over TLS to a real cluster, the systemd units pass
`systemd-analyze verify`, and the page quotes each file as it is."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio_websocket

from tests.helpers import (
    RECEIVE_TIMEOUT,
    START_TIMEOUT,
    ClusterProcess,
    LoggedProcess,
    free_port,
    trio_fanout_command,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "examples" / "deploy"
GUIDE = ROOT / "docs" / "deployment.md"
UNITS = ["trio-fanout.service", "trio-fanout-proxy.service", "trio-fanout-worker@.service"]
INSTALLED_COMMAND = "/opt/trio-fanout/bin/trio-fanout"


@pytest.mark.parametrize(
    "name", ["trio-fanout.toml", "nginx.conf", "worker-1.toml", "proxy.toml", *UNITS]
)
def test_the_guide_quotes_each_file_as_it_is(name):
    assert (DEPLOY / name).read_text() in GUIDE.read_text()


def test_the_documented_settings_load():
    shown = subprocess.run(
        trio_fanout_command("config", "--config", str(DEPLOY / "trio-fanout.toml")),
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert 'log_format = "json"  # file ' in shown.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("unit", UNITS)
def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path, unit):
    # The installed command's path, as on the documented host, is this environment's.
    command = str(Path(sys.executable).with_name("trio-fanout"))
    text = (DEPLOY / unit).read_text()
    assert INSTALLED_COMMAND in text
    # A template is verified through an instance of it.
    checked = tmp_path / unit.replace("@.", "@1.")
    checked.write_text(text.replace(INSTALLED_COMMAND, command))
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(checked)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")


@pytest.fixture
def certificate(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for 127.0.0.1 and its key, made with openssl."""
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    yield cert, key


@asynccontextmanager
async def nginx_in_front(
    tmp_path: Path, upstream_port: int, certificate: tuple[Path, Path]
) -> AsyncIterator[int]:
    """nginx with examples/deploy/nginx.conf, its addresses and files replaced by the test's;
    the port it serves TLS on."""
    cert, key = certificate
    port = free_port()
    site = (DEPLOY / "nginx.conf").read_text()
    for documented, ours in [
        ("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
        ("server 127.0.0.1:8765;", f"server 127.0.0.1:{upstream_port};"),
        ("/etc/ssl/fanout.example.com/fullchain.pem", str(cert)),
        ("/etc/ssl/fanout.example.com/privkey.pem", str(key)),
    ]:
        assert documented in site
        site = site.replace(documented, ours)
    (tmp_path / "site.conf").write_text(site)
    # The rest of an nginx.conf, as a distribution's main file has it, in the test's directory.
    temporary = "\n".join(
        f"    {kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {tmp_path / 'nginx.pid'};\n"
        f"error_log stderr notice;\nevents {{ worker_connections 64; }}\n"
        f"http {{\n    access_log off;\n{temporary}\n    include {tmp_path / 'site.conf'};\n}}\n"
    )
    nginx = await trio.to_thread.run_sync(
        lambda: LoggedProcess(
            ["nginx", "-e", "stderr", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
        )
    )
    try:
        await trio.to_thread.run_sync(nginx.wait_for_log, "start worker process")
        yield port
    finally:
        await trio.to_thread.run_sync(nginx.stop)


async def test_nginx_with_the_documented_config_carries_websockets_over_tls(tmp_path, certificate):
    assert shutil.which("nginx"), "nginx is needed (.ci/run installs it)"
    cluster = await trio.to_thread.run_sync(
        lambda: ClusterProcess("--config", str(DEPLOY / "trio-fanout.toml"), "--workers", "2")
    )
    try:
        await trio.to_thread.run_sync(cluster.wait_for_workers, 2)
        async with nginx_in_front(tmp_path, cluster.port, certificate) as port:
            context = ssl.create_default_context(cafile=str(certificate[0]))
            context.verify_flags &= ~ssl.VERIFY_X509_STRICT  # a self-signed leaf is its own CA
            url = f"wss://127.0.0.1:{port}/ws"
            with trio.fail_after(START_TIMEOUT):
                async with (
                    trio_websocket.open_websocket_url(url, ssl_context=context) as member,
                    trio_websocket.open_websocket_url(url, ssl_context=context) as sender,
                ):
                    for ws in (member, sender):
                        assert json.loads(await ws.get_message())["type"] == "welcome"
                    await member.send_message('{"type": "join", "room": "lobby", "id": 1}')
                    assert json.loads(await member.get_message())["type"] == "joined"
                    await sender.send_message(
                        '{"type": "publish", "room": "lobby", "data": "through nginx"}'
                    )
                    with trio.fail_after(RECEIVE_TIMEOUT):
                        frame = json.loads(await member.get_message())
                    assert (frame["type"], frame["data"]) == ("message", "through nginx")
                    # A heartbeat comes through as well: nginx passes frames as they come.
                    with trio.fail_after(RECEIVE_TIMEOUT):
                        frame = json.loads(await member.get_message())
                    assert frame["type"] == "heartbeat"
    finally:
        await trio.to_thread.run_sync(cluster.stop)
