"""Run the Autobahn|Testsuite fuzzing client against trio-fanout's WebSocket server.

    python bench/autobahn/run.py [--venv DIR] [--python2 PATH] [--reports DIR]

Two runs, each judged from wstest's JSON report:

1. every case ("*") against ``echo_server.py``: the server's own codec and send path, echoing;
2. the cases that need no echo against the ``/ws`` of a real worker (``trio-fanout worker``
   with its default limits), through ``welcome_relay.py``, which removes the ``welcome`` frame
   that no Autobahn case expects. These are the cases where the server must answer a ping,
   close, or fail the connection (``REAL_ENDPOINT_CASES``; docs/conformance.md says why).

It prints, per run and per section, how many cases came out OK, NON-STRICT, INFORMATIONAL,
UNIMPLEMENTED and FAILED, and exits 1 if any case of sections 1 to 10 is FAILED or NON-STRICT.

Autobahn|Testsuite is Python 2 code. The script makes its own Python 2.7 virtualenv if ``--venv``
(default ``$AUTOBAHN_VENV``, else ``~/.cache/trio-fanout/autobahn-venv``) has no ``wstest``:
``virtualenv<20.22`` (the last that makes 2.7 environments) in a Python 3 helper environment,
then autobahntestsuite with the exact pins of its sdist's ``requires.txt``. It needs a Python
2.7 interpreter: ``--python2``, ``$AUTOBAHN_PYTHON2``, ``python2.7`` on the PATH, or pyenv's.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

AUTOBAHN_VERSION = "25.10.1"
HERE = Path(__file__).resolve().parent
DEFAULT_VENV = Path(
    os.environ.get("AUTOBAHN_VENV", Path.home() / ".cache" / "trio-fanout" / "autobahn-venv")
)
# Sections whose every case must come out OK or INFORMATIONAL (12 and 13 are compression).
STRICT_SECTIONS = range(1, 11)
OUTCOMES = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
# How long one wstest run may take; the full suite takes a few minutes on two cores.
RUN_TIMEOUT_SECONDS = 1800
STARTUP_TIMEOUT_SECONDS = 20

# Cases in which the server sends no echo: it answers pings, closes, or fails the connection.
# A real worker answers messages with JSON frames, not echoes, so only these can run against it.
REAL_ENDPOINT_CASES = [
    "2.*",  # pings and pongs, including a ping over 125 bytes (fail)
    "3.1", "3.5", "3.6", "3.7",  # reserved bits set, nothing to echo before
    "4.1.1", "4.1.2", "4.2.1", "4.2.2",  # reserved opcodes, nothing to echo before
    "5.1", "5.2",  # fragmented ping and pong
    "5.9", "5.10", "5.11", "5.12", "5.13", "5.14",  # continuations with nothing to continue
    "5.16", "5.17", "5.18",  # fragments that start no message or start one twice
    "6.3.*", "6.4.*",  # invalid UTF-8, whole and arriving piece by piece (fail fast)
    "7.1.2", "7.1.3", "7.1.4", "7.1.5",  # what follows a close
    "7.3.*", "7.5.1", "7.7.*", "7.9.*", "7.13.*",  # close payloads: lengths, reasons, codes
]  # fmt: skip


def find_python2(given: str | None) -> str:
    candidates = [given, os.environ.get("AUTOBAHN_PYTHON2"), shutil.which("python2.7")]
    candidates += sorted(glob.glob(str(Path.home() / ".pyenv/versions/2.7*/bin/python")))
    for candidate in candidates:
        # A pyenv shim exists whether or not it can run the version it names: try each.
        check = [str(candidate), "-c", "import sys; assert sys.version_info[:2] == (2, 7)"]
        if candidate and subprocess.run(check, capture_output=True).returncode == 0:
            return candidate
    sys.exit("run.py: no Python 2.7 interpreter found; pass --python2 PATH (Autobahn needs one)")


def ensure_venv(venv: Path, python2: str | None) -> Path:
    """The path of wstest in ``venv``, which is made first if it has none."""
    wstest = venv / "bin" / "wstest"
    if wstest.exists():
        return wstest
    interpreter = find_python2(python2)
    print(f"making the Autobahn virtualenv {venv} with {interpreter}", flush=True)
    tools = venv.with_name(venv.name + "-tools")
    subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True)
    pip3 = [str(tools / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip3, "virtualenv<20.22"], check=True)
    subprocess.run([str(tools / "bin" / "virtualenv"), "-p", interpreter, str(venv)], check=True)
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [str(tools / "bin" / "python"), "-m", "pip", "download", "-q", "--no-deps",
             "--no-binary", ":all:", f"autobahntestsuite=={AUTOBAHN_VERSION}", "-d", download],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(download).glob("autobahntestsuite-*.tar.gz")
        with tarfile.open(sdist) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("/requires.txt"))
            extracted = archive.extractfile(member)
            assert extracted is not None
            pins = Path(download) / "requires.txt"
            pins.write_bytes(extracted.read())
        pip2 = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip2, "-r", str(pins)], check=True)
        subprocess.run([*pip2, "--no-deps", f"autobahntestsuite=={AUTOBAHN_VERSION}"], check=True)
    return wstest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"run.py: {process.args} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"run.py: nothing listens on port {port} after {STARTUP_TIMEOUT_SECONDS} s")


def fuzz(wstest: Path, agent: str, port: int, cases: list[str], reports: Path) -> dict[str, dict]:
    """Run wstest's fuzzing client on ``cases``; return the report's results for ``agent``."""
    outdir = reports / agent
    spec = {
        "outdir": str(outdir),
        "servers": [{"agent": agent, "url": f"ws://127.0.0.1:{port}/ws"}],
        "cases": cases,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    spec_file = reports / f"{agent}.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    print(f"wstest: {agent}, cases {' '.join(cases)}", flush=True)
    with (reports / f"{agent}.log").open("wb") as log:
        subprocess.run(
            [str(wstest), "-m", "fuzzingclient", "-s", str(spec_file)],
            cwd=reports, stdout=log, stderr=subprocess.STDOUT, check=True,
            timeout=RUN_TIMEOUT_SECONDS,
        )  # fmt: skip
    results: dict[str, dict] = json.loads((outdir / "index.json").read_text())[agent]
    return results


def section_of(case_id: str) -> int:
    return int(case_id.split(".")[0])


def summarize(agent: str, results: dict[str, dict]) -> list[str]:
    """Print a table of outcomes per section; return the strict cases that did not pass."""
    counts: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    bad = []
    for case_id, result in results.items():
        section = section_of(case_id)
        counts[section][result["behavior"]] += 1
        if section in STRICT_SECTIONS and (
            result["behavior"] in ("FAILED", "NON-STRICT") or result["behaviorClose"] == "FAILED"
        ):
            bad.append(f"{case_id}: {result['behavior']} / close {result['behaviorClose']}")
    print(f"\n{agent}: {len(results)} cases")
    print(f"| section | {' | '.join(OUTCOMES)} |")
    print(f"|---|{'---|' * len(OUTCOMES)}")
    for section in sorted(counts):
        row = " | ".join(str(counts[section][outcome]) for outcome in OUTCOMES)
        print(f"| {section} | {row} |")
    total = collections.Counter[str]()
    for counter in counts.values():
        total.update(counter)
    print(f"| all | {' | '.join(str(total[outcome]) for outcome in OUTCOMES)} |")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="Autobahn's virtualenv")
    parser.add_argument("--python2", help="the Python 2.7 interpreter to make it with")
    parser.add_argument("--reports", type=Path, help="where wstest writes (default: a temp dir)")
    args = parser.parse_args()
    wstest = ensure_venv(args.venv, args.python2)
    reports = args.reports or Path(tempfile.mkdtemp(prefix="autobahn-"))
    reports.mkdir(parents=True, exist_ok=True)
    repository = HERE.parent.parent
    echo_port, worker_port, relay_port = free_port(), free_port(), free_port()
    commands = [
        ([sys.executable, str(HERE / "echo_server.py"), str(echo_port)], echo_port),
        (
            [sys.executable, "-m", "trio_fanout", "worker", "--port", str(worker_port),
             "--backplane", "memory://autobahn", "--log-level", "warning"],
            worker_port,
        ),
        ([sys.executable, str(HERE / "welcome_relay.py"), str(relay_port), str(worker_port)],
         relay_port),
    ]  # fmt: skip
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for command, port in commands:
            processes.append(subprocess.Popen(command, cwd=repository))
            wait_for_port(port, processes[-1])
        bad = summarize(
            "trio-fanout-echo", fuzz(wstest, "trio-fanout-echo", echo_port, ["*"], reports)
        )
        bad += summarize(
            "trio-fanout-worker",
            fuzz(wstest, "trio-fanout-worker", relay_port, REAL_ENDPOINT_CASES, reports),
        )
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    print(f"\nreports: {reports}  (Autobahn|Testsuite {AUTOBAHN_VERSION})")
    if bad:
        print("not passed in sections 1-10:\n  " + "\n  ".join(bad))
        return 1
    print("sections 1-10: no FAILED and no NON-STRICT case")
    return 0


if __name__ == "__main__":
    sys.exit(main())
