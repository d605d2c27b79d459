"""The command line's log output: plain text for people, or one JSON object a line for log
shippers; both name the process that wrote each line (master, worker N, proxy).

Modules log through their own ``logging.getLogger(__name__)``; a line about a message on its way
through the cluster passes its structured fields (``room``, ``offset``, ``connection``, ...) as
``extra``, which the JSON format writes as keys of their own.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# Whatever the code logs, these never reach the output: the password of a URL
# (``redis://user:password@host``), and anything shaped like a JSON Web Token (three base64url
# parts, the first two JSON objects, which always start "eyJ"). A last guard, cheap because a
# log line is rare outside debug: the code itself does not log secrets.
_SECRETS = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s\"']*):[^@/\s]*@"
    r"|eyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"
)
REDACTED = "[redacted]"

# Line breaks and other control characters in a message, which could make text from outside
# (a hook's reason, a client's header) pass for log lines of its own.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def redact(text: str) -> str:
    """``text`` with URL passwords and JWT-shaped strings replaced by ``[redacted]``."""
    return _SECRETS.sub(_redaction, text)


def _redaction(match: re.Match[str]) -> str:
    scheme_and_user = match.group("scheme")
    if scheme_and_user is not None:
        return f"{scheme_and_user}:{REDACTED}@"
    return REDACTED


# The attributes every LogRecord has; any other attribute came from ``extra`` and is written
# as a field of its own by the JSON format.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class TextFormatter(logging.Formatter):
    """``TIME LEVEL ROLE (pid PID) LOGGER: MESSAGE``, with secrets redacted."""

    def __init__(self, role: str) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(role)s (pid %(process)d) %(name)s: %(message)s",
            defaults={"role": role},
        )

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line, with the message on it: control characters in the message are written as
        escapes (``\\n``), so that a message is one line whatever text it holds. A traceback,
        which follows the line, keeps its lines."""
        record.message = _CONTROL_CHARACTERS.sub(_escaped, record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _escaped(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (UTC, ISO 8601), ``level``,
    ``logger``, ``role``, ``pid``, ``message``, then the record's structured fields, and
    ``exception`` (the traceback) if any; with secrets redacted."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "role": self.role,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # json.dumps escapes line breaks (one line whatever the text) and non-ASCII text.
        return redact(json.dumps(entry, default=str))


def setup_logging(level: str, log_format: str, role: str) -> None:
    """Send every logger's records at ``level`` and above to standard error, as ``log_format``
    (``text`` or ``json``) says, each line naming ``role``."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter(role) if log_format == "json" else TextFormatter(role)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler])
