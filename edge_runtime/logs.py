"""Log lines that say what happened, one line each, whatever a message from the network held.

A device id, a reason or a version string comes from the wire; written to a log as is, a
newline in it would forge a line of its own. Every command configures logging through
`configure`, whose filter escapes control characters in the formatted message, so one
record is one line (a traceback, added by the formatter after the message, stays readable).
"""
from __future__ import annotations

import logging
import sys


def printable(text, limit: int = 300) -> str:
    """Untrusted text for a log line: control characters escaped, and cut short."""
    text = str(text)
    escaped = text.encode("unicode_escape", errors="backslashreplace").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + f"… ({len(text)} characters)"


class OneLine(logging.Filter):
    """Escapes control characters of a record's message (not of its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(ord(c) < 32 or ord(c) == 127 for c in message):
            record.msg = "".join(c if 32 <= ord(c) != 127 else c.encode("unicode_escape").decode("ascii")
                                 for c in message)
            record.args = None
        return True


def configure(level: str | int, fmt: str) -> None:
    """Log to stderr at `level` with `fmt`, one line per record."""
    logging.basicConfig(level=level, stream=sys.stderr, format=fmt)
    for handler in logging.getLogger().handlers:
        handler.addFilter(OneLine())
