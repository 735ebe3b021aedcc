"""What the benchmark scripts share: a description of the machine, and their section of docs/benchmarks.md."""
from __future__ import annotations

import os
import platform
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:")), 0)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor() or "unknown CPU")
    return f"{len(os.sched_getaffinity(0))} CPUs (nproc), {mem / (1 << 20):.1f} GiB RAM, {cpu}, " \
           f"{platform.system()} {platform.release()}, Python {platform.python_version()}"


def write_section(name: str, section: str) -> None:
    """Replace the section between <!-- name:start --> and <!-- name:end --> (append it if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{start}\n{section.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


def command_line(script: str, argv: list[str]) -> str:
    """How to run a benchmark again, as its docs section shows it: its arguments less --workdir (and its value),
    which names a scratch directory of the run that made the section."""
    shown, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workdir":
            skip = True
        elif not a.startswith("--workdir="):
            shown.append(a)
    return " ".join([f".venv/bin/python tools/{script}", *shown])
