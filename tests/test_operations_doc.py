"""docs/operations.md stays true: every log line at info and above, and every error and close
code, is documented.

Log lines. The test reads ``trio_fanout/`` and ``backplane/`` with ``ast`` and takes every call
``logger.info/warning/error/exception/critical(FORMAT, ...)`` and ``logger.log(LEVEL, FORMAT,
...)`` (whatever ``LEVEL`` is: a level chosen at run time may be info or above). Each module's
logger is named ``logger`` (checked below), so these calls are all of them. A format string is
cut at its %-placeholders (``%d``, ``%.1f``, ``%r`` ...); what remains are its literal
fragments, and the message counts as documented when a code span (text in backquotes) in a
table row of the section "Every log line at info and above" holds every fragment, stripped of
surrounding white space, in order, and begins (ends) with the first (last) fragment when the
format does. Only table rows count: a sample log in the section must not stand in for a missing
row. The documentation can so write placeholders its own way (``worker N (pid P)`` for
``worker %d (pid %d)``), but cannot drop or reword the fixed text, and a short format
(``"stopped"``) is not taken as documented by a longer message that contains it.

A format with no literal text (``"%s"``: the message is built elsewhere) cannot be matched that
way; for those, a table row of the section must name the function that logs it and its module
(``keep_in_touch`` and ``backplane/zmq.py``), where a reader finds the texts it logs.

Codes. Every error code constant of ``protocol.py`` (a string constant equal to its lower-cased
name) and every ``CLOSE_*`` constant of ``websocket.py`` and ``protocol.py`` must begin a table
row of the section "Codes" (``| `bad_json` |``, ``| `1000` |``): a code mentioned in passing
is not documented.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
# trio_fanout/backplane is a symbolic link to backplane/: each directory is read on its own,
# without descending into it.
SOURCE_DIRECTORIES = ("trio_fanout", "backplane")
LEVELS_AT_INFO_AND_ABOVE = {"info", "warning", "error", "exception", "critical"}
PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa%]")
LOG_SECTION = "## Every log line at info and above"
CODES_SECTION = "## Codes"


@dataclass(frozen=True)
class LogCall:
    module: str  # e.g. "backplane/zmq.py"
    line: int
    function: str
    format: str

    def fragments(self) -> list[str]:
        return [part.strip() for part in PLACEHOLDER.split(self.format) if part.strip()]


def source_files() -> Iterator[Path]:
    for directory in SOURCE_DIRECTORIES:
        yield from sorted((ROOT / directory).glob("*.py"))


def log_calls(path: Path) -> Iterator[LogCall]:
    """The logging calls at info and above in ``path``, with the function they are in."""
    module = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Each node's innermost enclosing function: ast.walk visits outer functions first.
    enclosing: dict[ast.AST, str] = {}
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(function):
                enclosing[inner] = function.name
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "logger"
        ):
            continue
        method = node.func.attr
        if method in LEVELS_AT_INFO_AND_ABOVE:
            format_node = node.args[0]
        elif method == "log":
            format_node = node.args[1]
        else:
            continue
        assert isinstance(format_node, ast.Constant) and isinstance(format_node.value, str), (
            f"{module}:{node.lineno}: a log format that is not a string literal"
        )
        yield LogCall(module, node.lineno, enclosing.get(node, "<module>"), format_node.value)


def all_log_calls() -> list[LogCall]:
    calls = {(call.module, call.line): call for path in source_files() for call in log_calls(path)}
    return sorted(calls.values(), key=lambda call: (call.module, call.line))


def section(heading: str) -> str:
    """The text of ``docs/operations.md`` from ``heading`` to the next heading of its level."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def code_spans(row: str) -> list[str]:
    return re.findall(r"`([^`]*)`", row)


def matches(call: LogCall, span: str) -> bool:
    """Whether ``span`` holds the fixed text of ``call``'s format (see the module's
    docstring)."""
    parts = PLACEHOLDER.split(call.format)
    fragments = call.fragments()
    if parts[0].strip() and not span.startswith(fragments[0]):
        return False
    if parts[-1].strip() and not span.endswith(fragments[-1]):
        return False
    position = 0
    for fragment in fragments:
        found = span.find(fragment, position)
        if found == -1:
            return False
        position = found + len(fragment)
    return True


def is_documented(call: LogCall, lines: list[str]) -> bool:
    fragments = call.fragments()
    if fragments:
        return any(matches(call, span) for line in lines for span in code_spans(line))
    return any(f"`{call.function}`" in line and call.module in line for line in lines)


def test_every_module_logs_through_a_logger_named_logger() -> None:
    """Otherwise the search for logging calls below would miss that module's lines."""
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and ast.unparse(node.value.func) == "logging.getLogger"
            ):
                assert [ast.unparse(target) for target in node.targets] == ["logger"], path


def test_the_search_finds_the_logging_calls() -> None:
    """A guard for the guard: a search that found nothing would pass every check below."""
    formats = {call.format for call in all_log_calls()}
    assert "worker %d (pid %d) %s; restarting it in %.1f s" in formats
    assert "Redis %s link: cannot connect to %s (%s); retrying in %.2f s" in formats  # .log()
    assert len(formats) > 50


@pytest.mark.parametrize(
    "call", all_log_calls(), ids=lambda call: f"{call.module}:{call.line}:{call.format}"
)
def test_log_line_is_documented(call: LogCall) -> None:
    rows = [line for line in section(LOG_SECTION).splitlines() if line.startswith("|")]
    assert is_documented(call, rows), (
        f"docs/operations.md, {LOG_SECTION!r}, has no line for {call.format!r} "
        f"({call.module}:{call.line}, in {call.function}): "
        + (
            f"document it with its fixed text {call.fragments()} in this order, in one code "
            "span of a table row"
            if call.fragments()
            else f"name `{call.function}` and {call.module} in the table row that documents it"
        )
    )


def module_constants(path: Path) -> dict[str, object]:
    constants: dict[str, object] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)
        ):
            constants[node.targets[0].id] = node.value.value
    return constants


def error_codes() -> list[str]:
    constants = module_constants(ROOT / "trio_fanout" / "protocol.py")
    return [value for name, value in constants.items() if value == name.lower()]


def close_codes() -> list[int]:
    codes: list[int] = []
    for module in ("websocket.py", "protocol.py"):
        for name, value in module_constants(ROOT / "trio_fanout" / module).items():
            if name.startswith("CLOSE_") and isinstance(value, int):
                codes.append(value)
    return sorted(codes)


def test_every_error_code_is_documented() -> None:
    codes = error_codes()
    assert "bad_json" in codes and "backplane_unavailable" in codes  # the search works
    text = section(CODES_SECTION)
    missing = [code for code in codes if f"\n| `{code}` |" not in text]
    assert not missing, f"docs/operations.md, {CODES_SECTION!r}, lacks error codes {missing}"


def test_every_close_code_is_documented() -> None:
    codes = close_codes()
    assert 1000 in codes and 4001 in codes  # the search works
    text = section(CODES_SECTION)
    missing = [code for code in codes if f"\n| `{code}` |" not in text]
    assert not missing, f"docs/operations.md, {CODES_SECTION!r}, lacks close codes {missing}"
