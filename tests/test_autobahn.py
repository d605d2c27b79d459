"""The Autobahn|Testsuite against the server's own RFC 6455 codec: bench/autobahn/run.py.

Slow: a few minutes, more on first use, when the script makes its Python 2.7 virtualenv
(it needs a Python 2.7 interpreter; see docs/conformance.md). Skipped by default; run it with
``python -m pytest -m slow``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUN_SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "autobahn" / "run.py"
# Setting up the virtualenv and running every case; both take minutes on two cores.
RUN_TIMEOUT_SECONDS = 3600


@pytest.mark.slow
def test_autobahn_sections_1_to_10_have_no_failed_and_no_non_strict_case(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, str(RUN_SCRIPT), "--reports", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "sections 1-10: no FAILED and no NON-STRICT case" in finished.stdout
    # Both runs reported: the echo fixture with every case, the real worker with its cases.
    assert "trio-fanout-echo: 517 cases" in finished.stdout
    assert "trio-fanout-worker: 71 cases" in finished.stdout
