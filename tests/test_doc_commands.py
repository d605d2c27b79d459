"""Every command the documentation shows is run, here or elsewhere in the suite, so it stays true.

What counts as a command. The fenced blocks of README.md, docs/*.md and examples/**/README.md
whose language is a shell's (``sh``, ``bash``, ``shell``, ``console``, ``shell-session``):

- in a ``console`` or ``shell-session`` block only the lines after a ``$ `` prompt (the rest is
  the output shown); in the others every line, a ``$ `` prompt dropped;
- a line ending in ``\\`` goes on with the next: the parts are joined with one space;
- ``#`` after white space, outside quotes, starts a comment (dropped), and a line that is only a
  comment is not a command;
- ``A && B`` are two commands, A and B; ``cd DIR`` is not one: the commands after it, to the
  end of the block, run in DIR (relative to the project's root).

Commands are written in prose too, in code spans: a span is a command when it starts with one
of the programs of ``INLINE_COMMAND`` (``trio-fanout``, ``python``, ``node``, ``curl``,
``openssl``, ``systemctl``, ...), unless it only names a program or one of its sub-commands
(``trio-fanout run``, ``systemctl stop``) or quotes what a program printed (``trio-fanout run:
error: …``). Such a span is read as a line of a ``sh`` block. A command whose capitals (or
``…``) stand for the reader's values is listed as ``FORM``; a ``trio-fanout`` command that is
not run here must take the options it shows (its ``--help`` lists them).

A fenced block without a language that holds a line starting with ``$ `` or with a command this
project's docs use (``trio-fanout``, ``curl``, ``python``, ``pip``) fails the test: it must say
it is a shell block, so that its commands are counted.

Every command, as written (after the joining above), must be accounted for in one of two
places, else the test fails naming the command's file and line:

- ``RUN_HERE``: a test of this file runs it, and checks what the documentation promises
  (servers answer ``/healthz``, commands exit 0 and print what the docs show). Each of those
  tests asserts it ran exactly the commands ``RUN_HERE`` gives it.
- ``NOT_RUN_HERE``: the command is run elsewhere in the suite (the test is named), or is set-up
  that ``.ci/run`` runs, or is a benchmark under bench/ (minutes long, run by hand: this file
  checks the script exists and that its ``--help`` lists every option and sub-command the
  documentation uses), or is documented only, with the reason.

An entry of either table that no documentation shows any more fails the test too.

Placeholders. The commands run here are run as written by ``bash``, from a temporary directory,
with ``trio-fanout`` found on the ``PATH`` of the Python running the tests, after these
replacements, which keep them on loopback and off the machine's files:

- ``/etc/trio-fanout/`` and ``/etc/fanout/`` become directories of the temporary directory
  (the TLS certificate in the latter is made by the test, for 127.0.0.1);
- ``examples/two_hosts/`` becomes a copy of the example whose ports are free ones;
- ``redis://127.0.0.1:6379`` becomes the test session's own redis-server;
- the admin port ``9100`` becomes a free port, ``--host 0.0.0.0`` becomes ``--host 127.0.0.1``
  and ``--port 443`` becomes ``--port 0``;
- ``examples/publish_api`` runs the project's example;
- the port ``8765`` of ``https://127.0.0.1:8765/`` becomes that of the ``trio-fanout run`` the
  command is for;
- ``trio-fanout publish`` gets ``TRIO_FANOUT_BACKPLANE``, the backplane of a ``trio-fanout run``
  of the test, as it would get it from a settings file;
- every ``trio-fanout run`` gets ``TRIO_FANOUT_PORT=0``, ``TRIO_FANOUT_PROXY_PORT=0`` and
  ``TRIO_FANOUT_WORKERS=1`` in its environment (a flag given in the command still wins), so
  that several run at once on free ports, and each is told apart by its log.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import trustme

import trio_fanout
from tests.helpers import LoggedProcess, RedisServer, free_port
from tests.test_examples import two_hosts_configs
from trio_fanout import tokens

ROOT = Path(__file__).resolve().parent.parent
SHELL_LANGUAGES = {"sh", "bash", "shell", "console", "shell-session"}
PROMPT_LANGUAGES = {"console", "shell-session"}
# An unlabelled block with such a line holds commands and must say it is a shell block.
LOOKS_LIKE_A_COMMAND = re.compile(r"^(\$ |(trio-fanout|curl|python3?|pip) )")
# A code span in prose that starts with one of these programs is a command (`kill -9` or
# `chmod 600` name what to do to a process or a file of the reader's, with no program to run)...
INLINE_COMMAND = re.compile(
    r"(cd|trio-fanout|python3?|node|npm|pip|curl|openssl|systemctl|journalctl|nginx|"
    r"redis-server|redis-cli)( |$)"
)
# ...unless it only names a program or one of its sub-commands (`trio-fanout run`, `systemctl
# stop`), or quotes what a program printed (`trio-fanout run: error: …`).
A_NAME = re.compile(r"\S+( [a-z][a-z-]*)?|\S+ \S+: .*")
# A command of the documentation takes a second or two when things are well.
COMMAND_TIMEOUT = 30.0

# Every `trio-fanout run` started here, on free ports and light (see the module's docstring).
RUN_ENVIRONMENT = {
    "TRIO_FANOUT_PORT": "0",
    "TRIO_FANOUT_PROXY_PORT": "0",
    "TRIO_FANOUT_WORKERS": "1",
}

# The commands this file runs, by the test that runs them.
RUN_HERE: dict[str, str] = {
    "trio-fanout run": "test_the_run_commands_serve",
    "trio-fanout run --backplane redis://127.0.0.1:6379": "test_the_run_commands_serve",
    "(umask 077; openssl rand -hex 32 > /etc/trio-fanout/api.key)": "test_the_run_commands_serve",
    "trio-fanout run --admin-port 9100 --api-key-file /etc/trio-fanout/api.key":
        "test_the_run_commands_serve",
    "curl -s http://127.0.0.1:9100/metrics | grep trio_fanout_connections":
        "test_the_run_commands_serve",
    "KEY=$(cat /etc/trio-fanout/api.key)": "test_the_run_commands_serve",
    'curl -s -X POST http://127.0.0.1:9100/api/publish -H "Authorization: Bearer $KEY" '
    '-H "Content-Type: application/json" -d \'{"room": "lobby", "data": {"text": "hello"}}\'':
        "test_the_run_commands_serve",
    'curl -s -X POST http://127.0.0.1:9100/api/publish -H "Authorization: Bearer $KEY" '
    "-d '{\"data\": \"maintenance in 5 minutes\"}'": "test_the_run_commands_serve",
    'curl -s -H "Authorization: Bearer $KEY" http://127.0.0.1:9100/api/info':
        "test_the_run_commands_serve",
    "mkdir -p /etc/trio-fanout/": "test_the_run_commands_serve",
    "(umask 077; openssl rand -hex 32 > /etc/trio-fanout/token-secret)":
        "test_the_run_commands_serve",
    "python mint_token.py": "test_the_run_commands_serve",
    "trio-fanout run --token-secret-file /etc/trio-fanout/token-secret "
    "--allowed-origins https://chat.example.com": "test_the_run_commands_serve",
    "openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt "
    "-out private.pem": "test_the_run_commands_serve",
    "openssl ec -in private.pem -pubout -out /etc/trio-fanout/token-public.pem":
        "test_the_run_commands_serve",
    "trio-fanout run --token-public-key-file /etc/trio-fanout/token-public.pem":
        "test_the_run_commands_serve",
    "trio-fanout token ann --join 'team-*' --publish team-a --ttl 600 "
    "--token-secret-file /etc/trio-fanout/token-secret": "test_the_run_commands_serve",
    "trio-fanout token ann --private-key-file private.pem "
    "--token-public-key-file /etc/trio-fanout/token-public.pem": "test_the_run_commands_serve",
    "trio-fanout run --host 0.0.0.0 --port 443 --tls-cert-file /etc/fanout/fullchain.pem "
    "--tls-key-file /etc/fanout/privkey.pem": "test_the_run_commands_serve",
    "TRIO_FANOUT_PORT=9002 trio-fanout config --config settings.toml":
        "test_config_shows_where_each_value_comes_from",
    "trio-fanout keygen proxy --directory /etc/trio-fanout/keys": "test_keygen_makes_the_pairs",
    "mkdir /etc/trio-fanout/keys/allowed": "test_keygen_makes_the_pairs",
    "trio-fanout keygen worker-a --directory /etc/trio-fanout/keys": "test_keygen_makes_the_pairs",
    "trio-fanout keygen proxy --directory keys": "test_the_two_hosts_example_on_curve",
    "trio-fanout keygen workers --directory keys": "test_the_two_hosts_example_on_curve",
    "mkdir keys/allowed": "test_the_two_hosts_example_on_curve",
    "cp keys/workers.key keys/allowed/": "test_the_two_hosts_example_on_curve",
    "TRIO_FANOUT_CURVE_SECRET_KEY_FILE=keys/proxy.key_secret "
    "TRIO_FANOUT_CURVE_ALLOWED_KEYS_DIR=keys/allowed "
    "trio-fanout proxy --config examples/two_hosts/proxy.toml":
        "test_the_two_hosts_example_on_curve",
    "export TRIO_FANOUT_CURVE_SECRET_KEY_FILE=keys/workers.key_secret "
    "TRIO_FANOUT_CURVE_SERVER_KEY_FILE=keys/proxy.key": "test_the_two_hosts_example_on_curve",
    "trio-fanout worker --config examples/two_hosts/worker-a.toml --index 1":
        "test_the_two_hosts_example_on_curve",
    'openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost -addext '
    '"subjectAltName=IP:127.0.0.1,DNS:localhost" -keyout key.pem -out cert.pem':
        "test_the_run_commands_serve",
    "trio-fanout run --tls-cert-file cert.pem --tls-key-file key.pem":
        "test_the_run_commands_serve",
    "curl --cacert cert.pem https://127.0.0.1:8765/healthz": "test_the_run_commands_serve",
    "python examples/publish_api.py --admin http://127.0.0.1:9100 "
    "--key-file /etc/trio-fanout/api.key lobby '\"hi\"'": "test_the_run_commands_serve",
    "node examples/publish_api.mjs http://127.0.0.1:9100 /etc/trio-fanout/api.key lobby "
    "'{\"text\": \"hi\"}'": "test_the_run_commands_serve",
    "trio-fanout publish lobby '{\"text\": \"from the emitter\"}'": "test_the_run_commands_serve",
    "trio-fanout --version": "test_the_version_command_names_the_version",
    "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out private.pem":
        "test_an_rsa_key_made_as_documented_verifies_rs256_tokens",
    "openssl pkey -in private.pem -pubout -out /etc/trio-fanout/token-public.pem":
        "test_an_rsa_key_made_as_documented_verifies_rs256_tokens",
}  # fmt: skip

ELSEWHERE = "run elsewhere"
CI_SET_UP = "set-up, run by .ci/run"
BENCHMARK = "benchmark, run by hand"
DOCUMENTED_ONLY = "documented only"
FORM = "the form of a command"  # its capitals (or …) stand for the reader's values

# The cluster most tests share (tests/conftest.py), and the tests that run one worker.
CLUSTER_TESTS = "tests/conftest.py's cluster fixture, used by tests/test_cluster.py and others"
ONE_WORKER_TESTS = "tests/test_limits.py (run_one_worker)"
# Commands that change the machine's services: the units they start are checked instead.
SERVICES = "acts on the machine's services; tests/test_deployment.py verifies the units"

# Every other command of the documentation: (kind, the test that runs it, or why it is not run).
NOT_RUN_HERE: dict[str, tuple[str, str]] = {
    "pip install .": (
        DOCUMENTED_ONLY,
        "installs into the reader's environment; tests/test_packaging.py builds the wheel it "
        "installs and checks what the wheel holds, and .ci/run installs the checkout with "
        "pip install -e '.[test]'",
    ),
    "pip install -e '.[test]'": (CI_SET_UP, ".ci/run runs it as written"),
    "python -m pytest": (CI_SET_UP, ".ci/run runs it as written"),
    "python bench/autobahn/run.py": (
        ELSEWHERE,
        "tests/test_autobahn.py, in the slow suite (python -m pytest -m slow)",
    ),
    "trio-fanout proxy  --config examples/two_hosts/proxy.toml": (
        ELSEWHERE,
        "tests/test_examples.py::test_two_hosts_proxy_two_workers_and_a_shell_publish",
    ),
    "trio-fanout worker --config examples/two_hosts/worker-b.toml --index 2": (
        ELSEWHERE,
        "tests/test_examples.py::test_two_hosts_proxy_two_workers_and_a_shell_publish",
    ),
    "trio-fanout publish --config examples/two_hosts/worker-a.toml lobby "
    '\'{"name": "shell", "text": "hi"}\'': (
        ELSEWHERE,
        "tests/test_examples.py::test_two_hosts_proxy_two_workers_and_a_shell_publish",
    ),
    "trio-fanout publish --config examples/two_hosts/worker-a.toml --broadcast "
    "'\"maintenance at noon\"'": (
        ELSEWHERE,
        "tests/test_examples.py::test_two_hosts_proxy_two_workers_and_a_shell_publish",
    ),
    "trio-fanout worker --config examples/two_hosts_redis/worker-a.toml --index 1": (
        ELSEWHERE,
        "tests/test_examples.py::test_two_hosts_on_redis_differ_in_one_line_and_use_redis",
    ),
    "trio-fanout worker --config examples/two_hosts_redis/worker-b.toml --index 2": (
        ELSEWHERE,
        "tests/test_examples.py::test_two_hosts_on_redis_differ_in_one_line_and_use_redis",
    ),
    "trio-fanout publish --config examples/two_hosts_redis/worker-a.toml lobby "
    '\'{"name": "shell", "text": "hi"}\'': (
        ELSEWHERE,
        "tests/test_examples.py::test_two_hosts_on_redis_differ_in_one_line_and_use_redis",
    ),
    "pip install -e '.[bench]'": (
        DOCUMENTED_ONLY,
        "installs matplotlib for the benchmarks' pictures, which no test draws",
    ),
    "npm ci": (
        DOCUMENTED_ONLY,
        "installs the benchmarks' Node.js load generator from the network; no test needs it",
    ),
    "npm install": (
        DOCUMENTED_ONLY,
        "installs the benchmarks' Node.js load generator from the network; no test needs it",
    ),
    "python compare.py": (BENCHMARK, "bench/compare.py"),
    "python compare.py --rounds 1 --quick": (BENCHMARK, "bench/compare.py"),
    "python compare.py --rounds 1 --scenarios connections --max-connections 36000": (
        BENCHMARK,
        "bench/compare.py",
    ),
    "python compare.py --rounds 1 --scenarios firehose": (BENCHMARK, "bench/compare.py"),
    "python fanout_bench.py": (BENCHMARK, "bench/fanout_bench.py"),
    "python floor_bench.py": (BENCHMARK, "bench/floor_bench.py"),
    "python fanout_bench.py --tls": (BENCHMARK, "bench/fanout_bench.py"),
    "python tls_cost.py": (BENCHMARK, "bench/tls_cost.py"),
    "python sequencer_cost.py": (BENCHMARK, "bench/sequencer_cost.py"),
    "python proxy_throughput.py --command append --history-sizes 100,0": (
        BENCHMARK,
        "bench/proxy_throughput.py",
    ),
    "python history_bench.py rate": (BENCHMARK, "bench/history_bench.py"),
    "python history_bench.py kill": (BENCHMARK, "bench/history_bench.py"),
    "python history_bench.py kill --backplane redis": (BENCHMARK, "bench/history_bench.py"),
    "python history_bench.py kill --all-on-killed": (BENCHMARK, "bench/history_bench.py"),
    "python history_bench.py kill --all-on-killed --backplane redis": (
        BENCHMARK,
        "bench/history_bench.py",
    ),
    "python compare.py --report FILE": (BENCHMARK, "bench/compare.py"),
    "python bench/flood_bench.py": (BENCHMARK, "bench/flood_bench.py"),
    "python bench/slow_clients.py": (BENCHMARK, "bench/slow_clients.py"),
    "python bench/proxy_throughput.py": (BENCHMARK, "bench/proxy_throughput.py"),
    "python bench/recovery_bench.py --rounds 30": (BENCHMARK, "bench/recovery_bench.py"),
    "python bench/token_cost.py": (BENCHMARK, "bench/token_cost.py"),
    "python bench/soak.py": (BENCHMARK, "bench/soak.py"),
    "trio-fanout run --workers 2": (ELSEWHERE, CLUSTER_TESTS),
    "trio-fanout run --workers 1": (ELSEWHERE, ONE_WORKER_TESTS),
    "trio-fanout run --workers 2 --log-level debug": (
        ELSEWHERE,
        "tests/test_logs.py::test_debug_shows_the_path_of_one_message_through_the_cluster",
    ),
    "trio-fanout worker --backplane memory://autobahn": (
        ELSEWHERE,
        "bench/autobahn/run.py starts it; tests/test_autobahn.py, in the slow suite",
    ),
    "python -m trio_fanout": (
        ELSEWHERE,
        "how the master starts its workers (every cluster test); tests/test_limits.py runs it "
        "directly",
    ),
    "trio-fanout COMMAND --help": (FORM, "COMMAND: run, worker, proxy, publish, ..."),
    "trio-fanout publish ROOM DATA": (FORM, "the room and the JSON to publish"),
    "trio-fanout publish --log-level debug ROOM DATA": (FORM, "the room and the JSON to publish"),
    "trio-fanout publish --backplane zmq://10.0.0.5:5559 ROOM DATA": (
        FORM,
        "the room and the JSON to publish, to a proxy on another host",
    ),
    "trio-fanout keygen NAME": (FORM, "the name of the key pair"),
    "trio-fanout keygen NAME [--directory DIR]": (FORM, "the name, and where to write"),
    "trio-fanout token SUB": (FORM, "the token's subject"),
    "trio-fanout worker --index N": (FORM, "the worker's number"),
    "trio-fanout run --backplane zmq://…": (FORM, "the proxy's address"),
    "trio-fanout run --backplane redis://…": (FORM, "the Redis server's address"),
    "python -m trio_fanout worker …": (FORM, "the worker's options, given by the master"),
    "openssl rand -hex 32 > FILE": (FORM, "the secret's file"),
    "/opt/trio-fanout/bin/pip install /path/to/trio-fanout": (
        FORM,
        "the reader's checkout or wheel; tests/test_packaging.py builds the wheel",
    ),
    "python3 -m venv /opt/trio-fanout": (
        DOCUMENTED_ONLY,
        "makes a directory in /opt, with Python's own venv module",
    ),
    "systemctl daemon-reload": (DOCUMENTED_ONLY, SERVICES),
    "systemctl enable --now trio-fanout": (DOCUMENTED_ONLY, SERVICES),
    "systemctl enable --now trio-fanout-worker@1 trio-fanout-worker@2": (
        DOCUMENTED_ONLY,
        SERVICES,
    ),
    "journalctl -u trio-fanout": (DOCUMENTED_ONLY, "reads the machine's journal"),
    "pip install 'PyJWT[crypto]'": (
        DOCUMENTED_ONLY,
        "installs into the reader's application; trio-fanout itself requires PyJWT[crypto] "
        "(pyproject.toml), so it is installed wherever the suite runs",
    ),
    "npm install jsonwebtoken": (
        DOCUMENTED_ONLY,
        "installs a Node.js library from the network into the reader's application",
    ),
    "node mint_token.js": (
        DOCUMENTED_ONLY,
        "needs jsonwebtoken, which no test installs; test_the_run_commands_serve runs the "
        "Python example beside it, which reads the secret the same way",
    ),
    "redis-cli pubsub channels": (
        DOCUMENTED_ONLY,
        "asks the example's Redis on its default port; "
        "tests/test_examples.py::test_two_hosts_on_redis_differ_in_one_line_and_use_redis asks "
        "the test's Redis for the room's channel with redis-cli pubsub numsub",
    ),
}


@dataclass(frozen=True)
class DocCommand:
    file: str
    line: int
    directory: str  # where it runs, relative to the project's root ("" for the root)
    text: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def documentation() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "examples").glob("**/README.md")),
    ]


def strip_comment(line: str) -> str:
    """The line without a ``#`` comment: one after white space (or at the start), outside
    quotes."""
    quote = ""
    for index, character in enumerate(line):
        if quote:
            if character == quote:
                quote = ""
        elif character in "'\"":
            quote = character
        elif character == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def blocks(path: Path) -> Iterator[tuple[str, list[tuple[int, str]]]]:
    """Each fenced block of a Markdown file: its language and its numbered lines."""
    language: str | None = None
    lines: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = re.match(r"\s*```(\S*)", line)
        if fence and language is None:
            language, lines = fence.group(1), []
        elif fence and not fence.group(1):
            assert language is not None
            yield language, lines
            language = None
        elif language is not None:
            lines.append((number, line))


def commands_of_block(name: str, language: str, lines: list[tuple[int, str]]) -> list[DocCommand]:
    found: list[DocCommand] = []
    directory = ""
    pending: tuple[int, str] | None = None  # a line that goes on with the next
    for number, raw in lines:
        if pending is not None:
            first, text = pending[0], pending[1] + " " + raw.strip()
        else:
            first, text = number, raw.strip()
            if language in PROMPT_LANGUAGES:
                if not text.startswith("$ "):
                    continue  # output
                text = text[2:]
            elif text.startswith("$ "):
                text = text[2:]
        if text.endswith("\\"):
            pending = (first, text[:-1].rstrip())
            continue
        pending = None
        text = strip_comment(text)
        for part in (piece.strip() for piece in text.split(" && ")):
            if not part:
                continue
            if part.startswith("cd "):
                directory = str(Path(directory) / part[3:].strip())
                continue
            found.append(DocCommand(name, first, directory, part))
    return found


def inline_commands(name: str, text: str) -> list[DocCommand]:
    """The commands written in code spans of the prose of a Markdown file (see the module's
    docstring)."""
    prose: list[str] = []  # the file's lines, those of fenced blocks left blank
    in_block = False
    for line in text.splitlines():
        if re.match(r"\s*```", line):
            in_block = not in_block
            prose.append("")
        else:
            prose.append("" if in_block else line)
    joined = "\n".join(prose)
    found: list[DocCommand] = []
    for span in re.finditer(r"`([^`]+)`", joined):
        command = " ".join(span.group(1).split())  # a span may go on over a line break
        if INLINE_COMMAND.match(command) and not A_NAME.fullmatch(command):
            line = joined.count("\n", 0, span.start()) + 1
            found.extend(commands_of_block(name, "sh", [(line, command)]))
    return found


def documented_commands() -> list[DocCommand]:
    found: list[DocCommand] = []
    for path in documentation():
        name = str(path.relative_to(ROOT))
        for language, lines in blocks(path):
            if language in SHELL_LANGUAGES:
                found.extend(commands_of_block(name, language, lines))
        found.extend(inline_commands(name, path.read_text()))
    return found


def test_every_documented_command_is_run_or_listed():
    unaccounted = [
        f"{command.where}: {command.text}"
        for command in documented_commands()
        if command.text not in RUN_HERE and command.text not in NOT_RUN_HERE
    ]
    assert not unaccounted, (
        "commands in the documentation that no test runs; run them in tests/test_doc_commands.py "
        "(RUN_HERE) or list them in NOT_RUN_HERE with the test that runs them:\n"
        + "\n".join(unaccounted)
    )


def test_every_listed_command_is_still_documented():
    shown = {command.text for command in documented_commands()}
    stale = [text for text in [*RUN_HERE, *NOT_RUN_HERE] if text not in shown]
    assert not stale, "listed but in no documentation any more:\n" + "\n".join(stale)
    assert not set(RUN_HERE) & set(NOT_RUN_HERE)
    tests = {name for name in globals() if name.startswith("test_")}
    assert set(RUN_HERE.values()) <= tests


def test_the_collection_finds_commands_and_reads_them_as_a_shell_would():
    assert len(documented_commands()) > 40
    lines = [
        (1, "```"),
        (2, "$ FOO=1 trio-fanout config   # a comment"),
        (3, "port = 1  # output, not a command"),
        (4, "$ cd bench && python x.py --a 'b # c' \\"),
        (5, "    --d e"),
    ]
    assert commands_of_block("f.md", "console", lines[1:]) == [
        DocCommand("f.md", 2, "", "FOO=1 trio-fanout config"),
        DocCommand("f.md", 4, "bench", "python x.py --a 'b # c' --d e"),
    ]
    assert [command.text for command in commands_of_block("f.md", "sh", lines[1:3])] == [
        "FOO=1 trio-fanout config",
        "port = 1",
    ]
    prose = (
        "Run `trio-fanout run` (`trio-fanout run: error: …` if not), or\n"
        "`trio-fanout run --workers\n2`, then `kill -9` or `cd bench && python x.py`.\n"
        "```sh\necho `python y.py`\n```\n"
    )
    assert inline_commands("f.md", prose) == [
        DocCommand("f.md", 2, "", "trio-fanout run --workers 2"),
        DocCommand("f.md", 3, "bench", "python x.py"),
    ]


def test_every_block_of_commands_is_labelled_as_a_shell():
    unlabelled = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in documentation()
        for language, lines in blocks(path)
        if not language
        for number, line in lines
        if LOOKS_LIKE_A_COMMAND.match(line.strip())
    ]
    assert not unlabelled, "commands in a block without a language (say ```sh):\n" + "\n".join(
        unlabelled
    )


def test_the_benchmarks_take_the_documented_options():
    for command in documented_commands():
        kind, script = NOT_RUN_HERE.get(command.text, ("", ""))
        if kind != BENCHMARK:
            continue
        words = shlex.split(command.text)
        assert words[0] == "python"
        path = ROOT / command.directory / words[1]
        assert path == ROOT / script and path.is_file(), command.where
        arguments = words[2:]
        if not arguments:
            # Nothing to check against its --help (and a script without options may run its
            # benchmark when given one): it exists, and Python can read it.
            compile(path.read_text(), str(path), "exec")
            continue
        result = subprocess.run(
            [sys.executable, str(path), "--help"],
            cwd=path.parent, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        for word in arguments:
            if word.startswith("--"):
                assert re.search(rf"{re.escape(word)}\b", result.stdout), (command.where, word)
            elif re.fullmatch(r"[a-z]+", word):  # a sub-command, such as rate or kill
                assert re.search(rf"\b{word}\b", result.stdout), (command.where, word)


# --- Running the commands -------------------------------------------------------------------


class Shell:
    """Runs the documentation's commands with the placeholders replaced (see the module's
    docstring), and remembers which it ran."""

    def __init__(self, directory: Path, replacements: dict[str, str] | None = None) -> None:
        self.directory = directory
        (directory / "etc" / "trio-fanout").mkdir(parents=True)
        (directory / "etc" / "fanout").mkdir(parents=True)
        self.replacements = {
            "/etc/trio-fanout/": f"{directory}/etc/trio-fanout/",
            "/etc/fanout/": f"{directory}/etc/fanout/",
            **(replacements or {}),
        }
        self.ran: list[str] = []
        self.processes: list[LoggedProcess] = []
        self.environment = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        }

    def script(self, command: str, *before: str) -> str:
        documented = {c.text for c in documented_commands()}
        for text in (*before, command):
            assert text in documented, f"not in the documentation: {text}"
            self.ran.append(text)
        script = "\n".join((*before, command))
        for placeholder, value in self.replacements.items():
            script = script.replace(placeholder, value)
        return script

    def run(self, command: str, *before: str, environment: dict[str, str] | None = None) -> str:
        """Run ``command`` (after the documented ``before`` ones, in the same shell, with
        ``environment`` added); its output, once it exited 0."""
        result = subprocess.run(
            ["bash", "-c", "set -e\n" + self.script(command, *before)],
            cwd=self.directory, env={**os.environ, **self.environment, **(environment or {})},
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
        )  # fmt: skip
        assert result.returncode == 0, (command, result.stderr)
        return result.stdout

    def start(self, command: str, *before: str) -> LoggedProcess:
        """Start ``command`` in the background; stopped when the test ends."""
        script = self.script(command, *before)
        *setup, last = script.split("\n")
        environment = {**self.environment}
        if command.startswith("trio-fanout run"):
            environment.update(RUN_ENVIRONMENT)
        variables = [f"{key}={value}" for key, value in environment.items()]
        # exec: the command itself gets the SIGTERM that stops it (env takes the documented
        # VARIABLE=value prefixes, which exec alone does not).
        in_the_background = "\n".join([*setup, f"exec env {last}"])
        process = LoggedProcess(
            ["env", *variables, "bash", "-c", in_the_background], cwd=str(self.directory)
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def assert_ran_what_is_listed_for(self, test: str) -> None:
        assert sorted(set(self.ran)) == sorted(t for t, name in RUN_HERE.items() if name == test)


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    commands = Shell(tmp_path)
    try:
        yield commands
    finally:
        commands.stop()


def serving_port(process: LoggedProcess) -> tuple[str, int]:
    """The scheme and port of a `trio-fanout run`, from its log."""
    match = process.wait_for_log(r"listening on (wss?)://127\.0\.0\.1:(\d+)/ws")
    return ("https" if match.group(1) == "wss" else "http"), int(match.group(2))


def health(shell: Shell, scheme: str, port: int, ca_file: Path) -> dict[str, object]:
    """The answer of ``/healthz`` (curl, as an operator would ask it), once the worker is
    ready: the worker answers 503 until it has its backplane, so curl retries (bounded)."""
    result = subprocess.run(
        ["curl", "-sf", "--retry", "20", "--retry-all-errors", "--retry-delay", "1",
         "--max-time", "5", "--cacert", str(ca_file), f"{scheme}://127.0.0.1:{port}/healthz"],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def python_example(path: Path, containing: str) -> str:
    """The one Python block of ``path`` that holds ``containing``, as a reader saves it."""
    examples = [
        "\n".join(line for _, line in lines) + "\n"
        for language, lines in blocks(path)
        if language == "python"
    ]
    (example,) = [example for example in examples if containing in example]
    return example


def test_the_run_commands_serve(tmp_path: Path, redis_server: RedisServer):
    admin_port = str(free_port())
    shell = Shell(
        tmp_path,
        {
            "redis://127.0.0.1:6379": redis_server.url,
            "127.0.0.1:9100": f"127.0.0.1:{admin_port}",
            "--admin-port 9100": f"--admin-port {admin_port}",
            "--host 0.0.0.0": "--host 127.0.0.1",
            "--port 443": "--port 0",
            "examples/publish_api": str(ROOT / "examples/publish_api"),
        },
    )
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1")
    certificate.private_key_pem.write_to_path(str(tmp_path / "etc/fanout/privkey.pem"))
    chain = b"".join(blob.bytes() for blob in certificate.cert_chain_pems)
    (tmp_path / "etc/fanout/fullchain.pem").write_bytes(chain)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        # The files the servers read, made as the documentation makes them.
        shell.run("mkdir -p /etc/trio-fanout/")
        shell.run("(umask 077; openssl rand -hex 32 > /etc/trio-fanout/api.key)")
        shell.run("(umask 077; openssl rand -hex 32 > /etc/trio-fanout/token-secret)")
        for name in ("api.key", "token-secret"):
            secret = tmp_path / "etc/trio-fanout" / name
            assert re.fullmatch(r"[0-9a-f]{64}\n", secret.read_text())
            assert secret.stat().st_mode & 0o777 == 0o600
        shell.run(
            "openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt "
            "-out private.pem"
        )
        shell.run("openssl ec -in private.pem -pubout -out /etc/trio-fanout/token-public.pem")
        # The self-signed certificate for a test, which is its own CA.
        shell.run(
            "openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost -addext "
            '"subjectAltName=IP:127.0.0.1,DNS:localhost" -keyout key.pem -out cert.pem'
        )
        assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600

        # Every documented `trio-fanout run` at once, each on its free ports.
        started = [
            shell.start(command)
            for command in (
                "trio-fanout run",
                "trio-fanout run --backplane redis://127.0.0.1:6379",
                "trio-fanout run --admin-port 9100 --api-key-file /etc/trio-fanout/api.key",
                "trio-fanout run --token-secret-file /etc/trio-fanout/token-secret "
                "--allowed-origins https://chat.example.com",
                "trio-fanout run --token-public-key-file /etc/trio-fanout/token-public.pem",
                "trio-fanout run --host 0.0.0.0 --port 443 --tls-cert-file "
                "/etc/fanout/fullchain.pem --tls-key-file /etc/fanout/privkey.pem",
                "trio-fanout run --tls-cert-file cert.pem --tls-key-file key.pem",
            )
        ]
        for process in started:
            scheme, port = serving_port(process)
            trusted = tmp_path / "cert.pem" if process is started[-1] else ca_file
            assert health(shell, scheme, port, trusted)["status"] == "ready"
        assert serving_port(started[-2])[0] == serving_port(started[-1])[0] == "https"
        assert redis_server.url in started[1].wait_for_log("listening on").string

        # Clients that trust the test certificate, as security.md tells them to.
        self_signed_port = serving_port(started[-1])[1]
        shell.replacements["127.0.0.1:8765"] = f"127.0.0.1:{self_signed_port}"
        answer = json.loads(shell.run("curl --cacert cert.pem https://127.0.0.1:8765/healthz"))
        assert answer["status"] == "ready"
        trusting = python_example(ROOT / "docs/security.md", "ssl_context=context")
        (tmp_path / "trusting.py").write_text(
            trusting.replace("127.0.0.1:8765", f"127.0.0.1:{self_signed_port}")
        )
        result = subprocess.run(
            [sys.executable, "trusting.py"],
            cwd=tmp_path, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
        )  # fmt: skip
        assert result.stdout == "joined lobby over wss://\n", result.stderr

        # A token from the documented Python example, with the secret the workers read.
        minting = python_example(ROOT / "docs/security.md", "def fanout_token")
        (tmp_path / "mint_token.py").write_text(
            minting.replace("/etc/trio-fanout/", f"{tmp_path}/etc/trio-fanout/")
        )
        minted = shell.run("python mint_token.py").strip()
        secret_file = str(tmp_path / "etc/trio-fanout/token-secret")
        grant = tokens.Verifier(tokens.read_secret(secret_file), 0).verify(minted)
        assert grant.sub == "ann" and 290 <= grant.exp - time.time() <= 300
        assert grant.may_join("lobby") and grant.may_publish("team-blue-1")
        assert not grant.may_publish("lobby")

        # From a shell, to the cluster on Redis.
        published = shell.run(
            'trio-fanout publish lobby \'{"text": "from the emitter"}\'',
            environment={"TRIO_FANOUT_BACKPLANE": redis_server.url},
        )
        assert re.fullmatch(r"published to room 'lobby' at offset \d+\n", published)

        # The admin port of the third, as operations.md asks it.
        started[2].wait_for_log(r"admin port on http://127\.0\.0\.1:\d+")
        metrics = shell.run("curl -s http://127.0.0.1:9100/metrics | grep trio_fanout_connections")
        assert re.search(r'^trio_fanout_connections\{worker="1"\} 0\.0$', metrics, re.M)
        key = "KEY=$(cat /etc/trio-fanout/api.key)"
        published = shell.run(
            'curl -s -X POST http://127.0.0.1:9100/api/publish -H "Authorization: Bearer $KEY" '
            '-H "Content-Type: application/json" '
            '-d \'{"room": "lobby", "data": {"text": "hello"}}\'',
            key,
        )
        answer = json.loads(published)
        assert answer["room"] == "lobby" and answer["offset"] == 1, answer
        assert re.fullmatch(r"[0-9a-f]{16}", answer["epoch"]), answer
        broadcast = shell.run(
            'curl -s -X POST http://127.0.0.1:9100/api/publish -H "Authorization: Bearer $KEY" '
            '-d \'{"data": "maintenance in 5 minutes"}\'',
            key,
        )
        assert json.loads(broadcast) == {"broadcast": True}
        from_python = shell.run(
            "python examples/publish_api.py --admin http://127.0.0.1:9100 "
            "--key-file /etc/trio-fanout/api.key lobby '\"hi\"'"
        )
        assert from_python == "published to lobby at offset 2\n"
        from_node = shell.run(
            "node examples/publish_api.mjs http://127.0.0.1:9100 /etc/trio-fanout/api.key lobby "
            '\'{"text": "hi"}\''
        )
        assert from_node == "published to lobby at offset 3\n"
        info = shell.run(
            'curl -s -H "Authorization: Bearer $KEY" http://127.0.0.1:9100/api/info', key
        )
        (worker,) = json.loads(info)["workers"]
        assert (worker["worker"], worker["connections"], worker["rooms"]) == (1, 0, {})

        # A token from the documented command: three base64url parts, the secret not printed.
        token = shell.run(
            "trio-fanout token ann --join 'team-*' --publish team-a --ttl 600 "
            "--token-secret-file /etc/trio-fanout/token-secret"
        )
        assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+\n", token)
        assert (tmp_path / "etc/trio-fanout/token-secret").read_text().strip() not in token
        # And one signed with the private key, which the server's public key verifies.
        signed = shell.run(
            "trio-fanout token ann --private-key-file private.pem "
            "--token-public-key-file /etc/trio-fanout/token-public.pem"
        )
        public_key = tokens.read_public_key(str(tmp_path / "etc/trio-fanout/token-public.pem"))
        assert public_key.algorithm == "ES256"
        assert tokens.Verifier(public_key, 0).verify(signed.strip()).sub == "ann"
        shell.assert_ran_what_is_listed_for("test_the_run_commands_serve")
    finally:
        shell.stop()


def test_config_shows_where_each_value_comes_from(shell: Shell):
    (shell.directory / "settings.toml").write_text('backplane = "zmq://10.0.0.5:5559"\n')
    shown = shell.run("TRIO_FANOUT_PORT=9002 trio-fanout config --config settings.toml")
    assert "port = 9002  # environment TRIO_FANOUT_PORT\n" in shown
    assert 'backplane = "zmq://10.0.0.5:5559"  # file settings.toml\n' in shown
    shell.assert_ran_what_is_listed_for("test_config_shows_where_each_value_comes_from")


def test_keygen_makes_the_pairs(shell: Shell):
    shell.run("trio-fanout keygen proxy --directory /etc/trio-fanout/keys")
    shell.run("mkdir /etc/trio-fanout/keys/allowed")
    shell.run("trio-fanout keygen worker-a --directory /etc/trio-fanout/keys")
    keys = shell.directory / "etc/trio-fanout/keys"
    assert sorted(path.name for path in keys.iterdir()) == [
        "allowed", "proxy.key", "proxy.key_secret", "worker-a.key", "worker-a.key_secret",
    ]  # fmt: skip
    assert (keys / "proxy.key_secret").stat().st_mode & 0o777 == 0o600
    shell.assert_ran_what_is_listed_for("test_keygen_makes_the_pairs")


def test_the_two_hosts_example_on_curve(tmp_path: Path):
    copies = tmp_path / "two_hosts"
    copies.mkdir()
    two_hosts_configs(copies)
    shell = Shell(tmp_path / "root", {"examples/two_hosts/": f"{copies}/"})
    try:
        shell.run("trio-fanout keygen proxy --directory keys")
        shell.run("trio-fanout keygen workers --directory keys")
        shell.run("mkdir keys/allowed")
        shell.run("cp keys/workers.key keys/allowed/")
        proxy = shell.start(
            "TRIO_FANOUT_CURVE_SECRET_KEY_FILE=keys/proxy.key_secret "
            "TRIO_FANOUT_CURVE_ALLOWED_KEYS_DIR=keys/allowed "
            "trio-fanout proxy --config examples/two_hosts/proxy.toml"
        )
        proxy.wait_for_log("ZeroMQ proxy: clients connect")
        export = (
            "export TRIO_FANOUT_CURVE_SECRET_KEY_FILE=keys/workers.key_secret "
            "TRIO_FANOUT_CURVE_SERVER_KEY_FILE=keys/proxy.key"
        )
        worker = shell.start(
            "trio-fanout worker --config examples/two_hosts/worker-a.toml --index 1", export
        )
        match = worker.wait_for_log(r"worker 1 \(pid \d+\) serving ws://127\.0\.0\.1:(\d+)/ws")
        assert health(shell, "http", int(match.group(1)), Path("/dev/null"))["status"] == "ready"
        shell.assert_ran_what_is_listed_for("test_the_two_hosts_example_on_curve")
    finally:
        shell.stop()


def test_the_version_command_names_the_version(shell: Shell):
    assert shell.run("trio-fanout --version") == f"trio-fanout {trio_fanout.__version__}\n"
    shell.assert_ran_what_is_listed_for("test_the_version_command_names_the_version")


def test_an_rsa_key_made_as_documented_verifies_rs256_tokens(shell: Shell):
    shell.run("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out private.pem")
    shell.run("openssl pkey -in private.pem -pubout -out /etc/trio-fanout/token-public.pem")
    public = shell.directory / "etc/trio-fanout/token-public.pem"
    verifier = tokens.Verifier(tokens.read_public_key(str(public)), 0)
    claims = {"sub": "ann", "exp": int(time.time()) + 600, "join": ["lobby"]}
    token = jwt.encode(claims, (shell.directory / "private.pem").read_bytes(), algorithm="RS256")
    assert verifier.verify(token).sub == "ann"
    shell.assert_ran_what_is_listed_for("test_an_rsa_key_made_as_documented_verifies_rs256_tokens")


def test_the_commands_not_run_take_the_options_they_show():
    """A ``trio-fanout`` command that no test runs as written (a form, a command run with other
    values) still shows only options its sub-command has."""
    helps: dict[str, str] = {}
    for command in documented_commands():
        kind, _ = NOT_RUN_HERE.get(command.text, ("", ""))
        words = command.text.split()
        if kind not in {FORM, DOCUMENTED_ONLY, ELSEWHERE} or words[0] != "trio-fanout":
            continue
        sub = words[1] if re.fullmatch(r"[a-z]+", words[1]) else ""
        if sub not in helps:
            result = subprocess.run(
                [sys.executable, "-m", "trio_fanout", *([sub] if sub else []), "--help"],
                capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
            )  # fmt: skip
            assert result.returncode == 0, (command.where, result.stderr)
            helps[sub] = result.stdout
        for option in re.findall(r"--[a-z][a-z-]*", command.text):
            assert re.search(rf"{option}\b", helps[sub]), (command.where, option)
