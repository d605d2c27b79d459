"""Configuration: defaults < TOML file < TRIO_FANOUT_* environment < flags, and every way a
setting can be wrong names the key and where it came from."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trio_fanout import cli
from trio_fanout.config import DEFAULT_FILE, KEYS, Config, ConfigError, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_each_source_overrides_the_weaker_ones(tmp_path: Path):
    settings = write(tmp_path / "settings.toml", "port = 9001\nworkers = 3\nlog_level = 'debug'\n")
    environ = {"TRIO_FANOUT_WORKERS": "5", "TRIO_FANOUT_LOG_LEVEL": "warning", "HOME": "/root"}
    config, sources = load_config(
        {"log_level": "error", "host": None},
        config_file=str(settings),
        environ=environ,
        cwd=tmp_path,
    )
    assert (config.port, config.workers, config.log_level) == (9001, 5, "error")
    assert sources["port"] == f"file {settings}"
    assert sources["workers"] == "environment TRIO_FANOUT_WORKERS"
    assert sources["log_level"] == "flag --log-level"
    assert sources["host"] == "default"
    assert config.host == Config().host


def test_the_file_in_the_working_directory_is_read_without_being_named(tmp_path: Path):
    write(tmp_path / DEFAULT_FILE, "heartbeat_interval = 2\nbackplane = 'zmq://10.0.0.5:6000'\n")
    config, sources = load_config({}, environ={}, cwd=tmp_path)
    assert config.heartbeat_interval == 2.0
    assert config.backplane_url == "zmq://10.0.0.5:6000"
    assert sources["heartbeat_interval"] == f"file {tmp_path / DEFAULT_FILE}"


def test_without_any_source_everything_is_the_default(tmp_path: Path):
    config, sources = load_config({}, environ={}, cwd=tmp_path)
    assert config == Config()
    assert set(sources.values()) == {"default"}
    assert config.backplane_url == "zmq://127.0.0.1:5559"


def test_environment_values_are_converted_to_the_key_type(tmp_path: Path):
    environ = {
        "TRIO_FANOUT_PORT": "8000",
        "TRIO_FANOUT_RATE_LIMIT_PER_SECOND": "12.5",
        "TRIO_FANOUT_BACKPLANE": "memory://x",
    }
    config, _ = load_config({}, environ=environ, cwd=tmp_path)
    assert (config.port, config.rate_limit_per_second, config.backplane) == (
        8000,
        12.5,
        "memory://x",
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("port = 'eighty'", "port: expected an integer, got 'eighty' (from file"),
        ("workers = 2.5", "workers: expected an integer, got 2.5 (from file"),
        ("port = true", "port: expected an integer, got True (from file"),
        ("heartbeat_interval = 'soon'", "heartbeat_interval: expected a number"),
        ("host = 5", "host: expected a string, got 5 (from file"),
        ("wrokers = 2", "wrokers: unknown setting (from file"),
        ("port = 70000", "port: must be a port number from 0 to 65535, not 70000 (from file"),
        ("proxy_port = 65536", "proxy_port: must be a port number from 0 to 65535"),
        ("max_queued_frames = 0", "max_queued_frames: must be greater than 0"),
        ("log_level = 'loud'", "log_level: must be one of debug, info, warning, error"),
        ("backplane = 'http://x'", "backplane: 'http://x' has an unknown scheme 'http'"),
        ("backplane = 'zmq://:5559'", "backplane: 'zmq://:5559' names no host"),
        ("port = ", "is not valid TOML"),
        ("heartbeat_interval = inf", "heartbeat_interval: must be a finite number, not inf"),
        ("handshake_timeout = nan", "handshake_timeout: must be a finite number, not nan"),
        ("liveness_interval = 0", "liveness_interval: must be greater than 0, not 0"),
        (
            "liveness_timeout = 1",
            "liveness_timeout: must be greater than liveness_interval (1.0), not 1.0 (from file",
        ),
    ],
)
def test_a_bad_file_value_names_the_key_and_the_file(tmp_path: Path, toml: str, message: str):
    settings = write(tmp_path / "bad.toml", toml + "\n")
    with pytest.raises(ConfigError) as error:
        load_config({}, config_file=str(settings), environ={}, cwd=tmp_path)
    assert message in str(error.value)
    assert str(settings) in str(error.value)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TRIO_FANOUT_PORT", "abc", "port: expected an integer, got 'abc' (from environment"),
        ("TRIO_FANOUT_HEARTBEAT_INTERVAL", "x", "heartbeat_interval: expected a number"),
        ("TRIO_FANOUT_WROKERS", "2", "TRIO_FANOUT_WROKERS: unknown setting (from the environment)"),
        ("TRIO_FANOUT_WORKERS", "0", "workers: must be greater than 0, not 0 (from environment"),
        ("TRIO_FANOUT_BACKPLANE", "redis", "backplane: 'redis' is not a URL"),
        ("TRIO_FANOUT_HANDSHAKE_TIMEOUT", "nan", "handshake_timeout: must be a finite number"),
        ("TRIO_FANOUT_RATE_LIMIT_PER_SECOND", "inf", "rate_limit_per_second: must be a finite"),
        (
            "TRIO_FANOUT_RATE_LIMIT_BYTES_PER_SECOND",
            "0",
            "rate_limit_bytes_per_second: must be greater than 0, not 0.0 (from environment",
        ),
        (
            "TRIO_FANOUT_RATE_LIMIT_BYTES_BURST",
            "1.5",
            "rate_limit_bytes_burst: expected an integer",
        ),
    ],
)
def test_a_bad_environment_value_names_the_variable(
    tmp_path: Path, name: str, value: str, message: str
):
    with pytest.raises(ConfigError) as error:
        load_config({}, environ={name: value}, cwd=tmp_path)
    assert message in str(error.value)


def test_a_missing_named_file_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_config({}, config_file=str(tmp_path / "nope.toml"), environ={}, cwd=tmp_path)


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_fanout", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_the_cli_refuses_a_bad_file_with_one_line_and_exit_code_2(tmp_path: Path):
    write(tmp_path / DEFAULT_FILE, "workers = 'many'\n")
    result = run_cli("run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"trio-fanout: error: workers: expected an integer, got 'many' "
        f"(from file {tmp_path / DEFAULT_FILE})"
    ]


def test_trio_fanout_config_prints_every_value_and_its_source(tmp_path: Path):
    write(tmp_path / DEFAULT_FILE, "port = 9100\n")
    env = {"PATH": "/usr/bin:/bin", "TRIO_FANOUT_WORKERS": "7"}
    result = run_cli("config", "--log-level", "debug", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" = ", 1) for line in result.stdout.strip().splitlines())
    assert set(lines) == set(KEYS)
    assert lines["port"] == f"9100  # file {tmp_path / DEFAULT_FILE}"
    assert lines["workers"] == "7  # environment TRIO_FANOUT_WORKERS"
    assert lines["log_level"] == '"debug"  # flag --log-level'
    assert lines["host"] == '"127.0.0.1"  # default'


def test_the_liveness_flags_of_run_set_their_keys(tmp_path: Path):
    shown = run_cli(
        "config", cwd=tmp_path, env={**os.environ, "TRIO_FANOUT_LIVENESS_TIMEOUT": "2.5"}
    )
    assert "liveness_timeout = 2.5  # environment TRIO_FANOUT_LIVENESS_TIMEOUT" in shown.stdout
    refused = run_cli("run", "--liveness-interval", "3", "--liveness-timeout", "2", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr == (
        "trio-fanout: error: liveness_timeout: must be greater than liveness_interval (3.0), "
        "not 2.0 (from flag --liveness-timeout)\n"
    )


SECURITY_FLAGS = {
    "run": {
        "token_leeway": ("--token-leeway", "2", 2.0),
        "token_expiry_warning": ("--token-expiry-warning", "60", 60.0),
        "max_connections": ("--max-connections", "7", 7),
        "max_handshakes": ("--max-handshakes", "9", 9),
        "backplane_password_file": ("--backplane-password-file", "/etc/pw", "/etc/pw"),
        "curve_secret_key_file": ("--curve-secret-key-file", "/k/a.key_secret", "/k/a.key_secret"),
        "curve_server_key_file": ("--curve-server-key-file", "/k/p.key", "/k/p.key"),
        "curve_allowed_keys_dir": ("--curve-allowed-keys-dir", "/k/allowed", "/k/allowed"),
    },
    "worker": {
        "token_leeway": ("--token-leeway", "0", 0.0),
        "max_connections": ("--max-connections", "1", 1),
        "curve_server_key_file": ("--curve-server-key-file", "/k/p.key", "/k/p.key"),
    },
    "proxy": {"curve_allowed_keys_dir": ("--curve-allowed-keys-dir", "/k", "/k")},
    "publish": {"backplane_password_file": ("--backplane-password-file", "/pw", "/pw")},
}


@pytest.mark.parametrize("command", list(SECURITY_FLAGS))
def test_the_security_settings_and_connection_limits_have_flags(command: str):
    settings = SECURITY_FLAGS[command]
    argv = [command, *(item for flag, text, _ in settings.values() for item in (flag, text))]
    if command == "publish":
        argv += ["room", "1"]
    flags, _ = cli._flags(cli.build_parser().parse_args(argv))
    assert flags == {key: value for key, (_, _, value) in settings.items()}


def test_a_bad_security_flag_is_named_in_the_error(tmp_path: Path):
    refused = run_cli("worker", "--port", "0", "--max-connections", "0", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr == (
        "trio-fanout: error: max_connections: must be greater than 0, not 0 "
        "(from flag --max-connections)\n"
    )
    refused = run_cli("proxy", "--curve-allowed-keys-dir", str(tmp_path), cwd=tmp_path)
    assert refused.returncode == 2
    assert "curve_allowed_keys_dir: needs curve_secret_key_file" in refused.stderr


def test_the_history_settings_make_the_backplanes_policy(tmp_path: Path):
    settings = write(tmp_path / "settings.toml", "history_size = 7\nhistory_max_bytes = 1000\n")
    config, sources = load_config(
        {"history_size": 9},
        config_file=str(settings),
        environ={"TRIO_FANOUT_HISTORY_TTL": "30"},
        cwd=tmp_path,
    )
    assert (config.history_policy.size, config.history_policy.ttl) == (9, 30.0)
    assert config.history_policy.max_bytes == 1000
    assert sources["history_size"] == "flag --history-size"
    refused = run_cli("proxy", "--history-ttl", "0", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr == (
        "trio-fanout: error: history_ttl: must be greater than 0, not 0.0 "
        "(from flag --history-ttl)\n"
    )


def _options(command: str) -> set[str]:
    """The setting flags of ``command``: those that set a configuration key, and ``--config``
    and the log flags."""
    parser = cli.build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        option
        for action in commands.choices[command]._actions
        if action.dest in KEYS or action.dest == "config"
        for option in action.option_strings
    }


def test_config_takes_every_setting_flag_of_run_and_shows_files_never_what_they_hold(
    tmp_path: Path,
):
    assert _options("run") <= _options("config")
    secret = "0123456789abcdef0123456789abcdef-the-token-secret"
    write(tmp_path / "token-secret", secret + "\n")
    write(tmp_path / "api.key", "the-api-key\n")
    result = run_cli(
        "config", "--token-secret-file", "token-secret", "--api-key-file", "api.key",
        "--allowed-origins", "https://a.example,https://b.example", "--workers", "3",
        "--tls-cert-file", "cert.pem", "--tls-key-file", "key.pem",
        "--backplane", "redis://:the-redis-password@10.0.0.6:6379",
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" = ", 1) for line in result.stdout.strip().splitlines())
    assert lines["token_secret_file"] == '"token-secret"  # flag --token-secret-file'
    assert lines["api_key_file"] == '"api.key"  # flag --api-key-file'
    assert lines["allowed_origins"] == (
        '["https://a.example", "https://b.example"]  # flag --allowed-origins'
    )
    assert lines["workers"] == "3  # flag --workers"
    assert lines["tls_key_file"] == '"key.pem"  # flag --tls-key-file'
    assert lines["backplane"] == '"redis://:***@10.0.0.6:6379"  # flag --backplane'
    for hidden in (secret, "the-api-key", "the-redis-password"):
        assert hidden not in result.stdout + result.stderr
