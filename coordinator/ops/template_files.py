"""The text files edge-bundle writes, kept as files in templates/ (package data), not as strings in code.

A template's placeholders are `@@name` (or `@@{name}` where a letter follows), filled by
string.Template with `@@` for its delimiter: bash's and systemd's own `$` stay as written, so a
template reads as the file it becomes. The lines that open a template with `@@#` say what it is
and what it is filled with; they are dropped. Filling is strict: a placeholder without a value,
or a stray `@@`, raises rather than leave a hole in a board's installer.
"""
from __future__ import annotations

import string
from collections.abc import Mapping
from importlib.resources import files

COMMENT = "@@#"


class _AtTemplate(string.Template):
    delimiter = "@@"


def fill(name: str, values: Mapping[str, str]) -> str:
    """templates/<name> without its `@@#` head, its placeholders replaced by `values`."""
    text = (files("coordinator.ops") / "templates" / name).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    head = 0
    while head < len(lines) and lines[head].startswith(COMMENT):
        head += 1
    return _AtTemplate("".join(lines[head:])).substitute(values)
