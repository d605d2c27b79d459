"""The command line refuses bad input with one line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from tests.helpers import START_TIMEOUT, ClusterProcess, LoggedProcess
from trio_fanout import __version__


def trio_fanout(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_fanout", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--workers", "0"], "workers: must be greater than 0, not 0 (from flag --workers)"),
        (["--heartbeat-interval", "-1"], "heartbeat_interval: must be 0 or more"),
        (["--port", "70000"], "port: must be a port number"),
        (["--port", "eighty"], "argument --port: invalid int value"),
        (["--log-level", "loud"], "argument --log-level: invalid choice"),
        (["--wrokers", "2"], "unrecognized arguments: --wrokers"),
    ],
)
def test_bad_flags_get_one_line_and_exit_code_2(args: list[str], complaint: str):
    result = trio_fanout("run", *args)
    assert result.returncode == 2
    assert complaint in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("which", ["--port", "--proxy-port"])
def test_a_port_in_use_gets_one_line_and_exit_code_2(which: str):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        others = ["--proxy-port", "0"] if which == "--port" else ["--port", "0"]
        result = trio_fanout("run", "--workers", "1", which, port, *others)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # nothing before it: the proxy never ran
    if which == "--port":
        assert "Address already in use" in line
    else:
        assert line == (
            f"trio-fanout: error: the ZeroMQ proxy's port 127.0.0.1:{port} is in use: stop what "
            "listens there, or give the proxy another port with --proxy-port (the setting "
            "proxy_port; 0 picks a free one)"
        )


def test_the_proxy_on_a_port_in_use_names_its_own_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = trio_fanout("proxy", "--port", port)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        f"trio-fanout: error: the ZeroMQ proxy's port 127.0.0.1:{port} is in use"
    )
    assert "another port with --port (the setting proxy_port" in line


def test_a_proxy_flag_is_named_as_it_was_given():
    result = trio_fanout("proxy", "--port", "65536")
    assert result.returncode == 2
    assert "proxy_port: must be a port number from 0 to 65535" in result.stderr
    assert "(from flag --port)" in result.stderr


def test_help_explains_the_run_command():
    result = trio_fanout("run", "--help")
    assert result.returncode == 0
    for flag in ("--host", "--port", "--workers", "--heartbeat-interval", "--proxy-port"):
        assert flag in result.stdout
    assert "ws://HOST:PORT/ws" in result.stdout


def test_a_backplane_that_refuses_us_is_one_line_and_exit_code_1(redis_server):
    # This redis-server has no password: AUTH is refused at once.
    result = trio_fanout(
        "publish", "--backplane", f"redis://:secret@127.0.0.1:{redis_server.port}", "room", "1"
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("trio-fanout: error: Redis at redis://127.0.0.1:")
    assert "refused AUTH" in lines[0]


@pytest.mark.parametrize(
    ("room", "data", "complaint"),
    [
        ("lobby", "{not json", "DATA is not JSON"),
        ("lobby", "NaN", "DATA: data cannot be sent as JSON"),
        ("", '"hi"', "ROOM: room must be 1 to 200 characters long"),
    ],
)
def test_publish_refuses_what_clients_could_not_receive(room: str, data: str, complaint: str):
    result = trio_fanout("publish", "--backplane", "zmq://127.0.0.1:1", room, data)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"trio-fanout: error: {complaint}")


def test_version_names_the_installed_version():
    result = trio_fanout("--version")
    assert result.returncode == 0
    assert result.stdout == f"trio-fanout {__version__}\n"


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["publish", "--backplane", "memory://x", "lobby", "1"], "memory://x exists only inside"),
        (["run", "--backplane", "memory://x", "--workers", "2"], "2 workers on it would not"),
        (
            ["publish", "--backplane", "zmq://127.0.0.1:1", "1"],
            "give ROOM and DATA, or --broadcast",
        ),
        (["publish", "--broadcast", "lobby", "1"], "give a ROOM or --broadcast, not both"),
        (["run", "--heartbeat-interval", "0.0001"], "must be 0 (off) or at least 0.1 seconds"),
    ],
)
def test_what_would_reach_nobody_or_flood_everyone_is_refused(args: list[str], complaint: str):
    result = trio_fanout(*args)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert complaint in line


def test_a_log_level_in_capitals_is_the_same_level(monkeypatch):
    monkeypatch.setenv("TRIO_FANOUT_LOG_LEVEL", "DEBUG")
    assert 'log_level = "debug"' in trio_fanout("config").stdout
    monkeypatch.delenv("TRIO_FANOUT_LOG_LEVEL")
    assert 'log_level = "warning"' in trio_fanout("config", "--log-level", "WARNING").stdout


def test_a_second_cluster_on_the_port_of_a_running_one_is_refused():
    # Each worker listens with SO_REUSEPORT; a second `run` must still not share the port.
    cluster = ClusterProcess("--workers", "2")
    try:
        cluster.wait_for_workers(2)
        result = trio_fanout(
            "run", "--workers", "2", "--port", str(cluster.port), "--proxy-port", "0"
        )
        assert result.returncode == 2
        assert "Address already in use" in result.stderr
    finally:
        cluster.stop()


def test_a_start_failure_with_json_logs_is_a_json_line():
    # A log shipper reading a JSON log must get JSON even when the command stops at once.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = trio_fanout(
            "run", "--workers", "1", "--port", port, "--proxy-port", "0", "--log-format", "json"
        )
    assert result.returncode == 2
    records = [json.loads(line) for line in result.stderr.strip().splitlines()]
    (failure,) = [record for record in records if record["level"] == "error"]
    assert failure["role"] == "master"
    assert failure["message"].startswith("cannot start: ")
    assert "Address already in use" in failure["message"]


def test_a_worker_that_cannot_start_says_which_it_is_in_the_nodes_log():
    # A bound socket that does not listen: connections to it are refused at once.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        redis_url = f"redis://127.0.0.1:{closed.getsockname()[1]}"
        node = ClusterProcess(
            "--workers", "1", "--backplane", redis_url, "--heartbeat-interval", "0"
        )
        try:
            # Within the Redis connection timeout (5 s) and the ClusterProcess start timeout.
            match = node.wait_for_log(
                r"ERROR worker 1 \(pid (\d+)\) trio_fanout\.cli: cannot start: (.*)"
            )
            node.wait_for_log(rf"worker 1 \(pid {match.group(1)}\) exited with code 1")
        finally:
            node.stop()
    why = match.group(2)
    assert why.startswith(f"cannot connect to Redis at {redis_url} within 5.0 s")
    assert "Connection refused" in why  # the refused connection itself, not a group of them
    assert "sub-exception" not in why
    assert "trio-fanout: error:" not in node.log()


@pytest.mark.parametrize("command", ["publish", "worker"])
def test_the_backplane_help_offers_no_password_on_the_command_line(command: str):
    help_text = " ".join(trio_fanout(command, "--help").stdout.split())
    assert "backplane_password_file" in help_text
    assert "PASSWORD" not in help_text  # ps shows every process's command line
    assert "memory://" not in help_text  # refused by publish, useless to a worker alone


def test_workers_start_beside_a_file_named_like_a_standard_module(tmp_path):
    """A user who saves the docs' minting example as token.py and starts the server in that
    directory: the workers (Python processes the master starts) must not import it in place of
    the standard library's token module, or every worker dies at start, again and again."""
    (tmp_path / "token.py").write_text("raise SystemExit('the wrong token module')\n")
    # The console script, as a user runs it: its directory, not the current one, leads sys.path.
    command = [sys.executable, "-P", "-m", "trio_fanout", "run", "--workers", "1"]
    command += ["--port", "0", "--proxy-port", "0", "--heartbeat-interval", "0"]
    process = LoggedProcess(command, cwd=str(tmp_path))
    try:
        process.wait_for_log(r"worker 1 \(pid \d+\) serving")
        assert "the wrong token module" not in "\n".join(process.lines)
    finally:
        assert process.stop() == 0


def test_ctrl_c_stops_each_worker_once_and_each_says_it_stopped():
    """Ctrl-C in a terminal sends SIGINT to the whole process group: the master, which then
    sends each worker SIGTERM, and the workers themselves. Each worker stops once, and each
    writes its last line."""
    cluster = ClusterProcess("--workers", "2", "--heartbeat-interval", "0")
    try:
        cluster.wait_for_workers(2)
        os.killpg(cluster.process.pid, signal.SIGINT)
        assert cluster.process.wait(START_TIMEOUT) == 0
    finally:
        cluster.stop()
    log = cluster.log()
    for index in (1, 2):
        assert len(re.findall(rf"worker {index}: SIG\w+, closing clients", log)) == 1, log
        assert len(re.findall(rf"worker {index} \(pid \d+\) stopped", log)) == 1, log
    assert log.count("SIGINT: stopping") == 1
    assert "Traceback" not in log
    assert " WARNING " not in log  # the heartbeat stops before the proxy: it sees no loss
    assert cluster.lines[-2].endswith("trio_fanout.master: stopped"), log
