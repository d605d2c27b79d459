"""What `pip install trio-fanout` puts on a user's machine: one top-level package, typed, whose
every import that the docs and examples show works from the built wheel alone."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import trio_fanout

ROOT = Path(__file__).parent.parent

# Building the wheel and making a virtualenv take a few seconds each when things are well.
BUILD_TIMEOUT = 120

_FENCED_PYTHON = re.compile(r"```python\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(out), str(ROOT)],
        check=True, timeout=BUILD_TIMEOUT, capture_output=True,
    )  # fmt: skip
    (built,) = out.glob("trio_fanout-*.whl")
    return built


def test_the_wheel_installs_only_trio_fanout(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    metadata = {name for name in top_level if name.endswith(".dist-info")}
    assert top_level - metadata == {"trio_fanout"}
    assert "trio_fanout/backplane/zmq.py" in names
    assert "trio_fanout/static/chat.html" in names
    assert "trio_fanout/static/client.js" in names
    assert "trio_fanout/static/client.d.ts" in names
    assert "trio_fanout/static/status.html" in names


def test_the_wheel_ships_type_information_for_each_package(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    assert "trio_fanout/py.typed" in names
    assert "trio_fanout/backplane/py.typed" in names


def test_the_version_is_the_packages_metadata(wheel: Path):
    (metadata,) = (
        name for name in zipfile.ZipFile(wheel).namelist() if name.endswith("dist-info/METADATA")
    )
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert f"\nVersion: {trio_fanout.__version__}\n" in text


def documented_imports() -> Iterator[str]:
    """Every import statement in the Python of README.md, docs/ and examples/."""
    sources = [
        *(
            block
            for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
            for block in _FENCED_PYTHON.findall(page.read_text())
        ),
        *(path.read_text() for path in sorted((ROOT / "examples").rglob("*.py"))),
    ]
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
                yield ast.unparse(node)


def test_docs_and_examples_import_what_the_wheel_installs(wheel: Path, tmp_path: Path):
    statements = sorted(set(documented_imports()))
    assert any("trio_fanout.backplane" in statement for statement in statements)
    # The dependencies come from this interpreter; trio_fanout itself only from the unpacked
    # wheel, put first on the path, and run away from the repository (-I: no current directory,
    # no PYTHONPATH), so that its sources cannot be found instead.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = "\n".join(
        [f"import sys; sys.path.insert(0, {str(site)!r})", *statements,
         "import trio_fanout", "print(trio_fanout.__file__)"]
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(site))
