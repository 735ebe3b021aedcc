"""Hard memory limits for device processes: a cgroup where the machine allows it, else a watchdog.

Boards use the same kernel mechanism through systemd (MemoryMax=) or cgroup v2 memory.max;
tests and the demo create a child group per process tree. Where no cgroup is writable, an
RSS watchdog kills the child when its resident set passes the limit (a weaker guarantee:
polling can miss a short spike, which is why it is only the fallback).
"""
from __future__ import annotations

import os
import signal
import threading
import uuid
from pathlib import Path

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")
WATCHDOG_PERIOD_S = 0.01


def _writable_dir(p: Path) -> bool:
    return p.is_dir() and os.access(p, os.W_OK)


def detect_mechanism() -> str:
    """'cgroup1', 'cgroup2' or 'watchdog': what this machine lets us use to cap a child."""
    if _writable_dir(CGROUP_V1) and (CGROUP_V1 / "memory.limit_in_bytes").exists():
        return "cgroup1"
    ctl = CGROUP_V2 / "cgroup.subtree_control"
    if _writable_dir(CGROUP_V2) and ctl.exists() and "memory" in ctl.read_text().split():
        return "cgroup2"
    return "watchdog"


def current_cgroup_limit_bytes() -> int | None:
    """The memory limit of the cgroup this process is in, if any (v2 memory.max or v1 limit)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "" and (CGROUP_V2 / rel / "memory.max").exists():
            raw = (CGROUP_V2 / rel / "memory.max").read_text().strip()
            return None if raw == "max" else int(raw)
        if "memory" in controllers.split(","):
            f = CGROUP_V1 / rel / "memory.limit_in_bytes"
            if f.exists():
                value = int(f.read_text().strip())
                return None if value >= (1 << 60) else value
    return None


class HardLimit:
    """Cap one child process (and anything it forks) at limit_bytes of memory.

    Use: pass `enter_child` as Popen's preexec_fn (the child joins the group before it
    executes anything), call `watch(pid)` after start, `close()` after it ends. After close,
    `group_peak_bytes` holds the cgroup's peak (None for the watchdog) and `hits` how often
    the limit was reached.
    """

    def __init__(self, limit_bytes: int, mechanism: str | None = None):
        self.limit_bytes = int(limit_bytes)
        self.mechanism = mechanism or detect_mechanism()
        self.group_peak_bytes: int | None = None
        self.hits = 0
        self.watchdog_killed = False
        self._stop = threading.Event()
        self._thread = None
        self.path: Path | None = None
        if self.mechanism == "cgroup1":
            self.path = CGROUP_V1 / "edgeblock" / uuid.uuid4().hex[:12]
            self.path.mkdir(parents=True)
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # no escaping the limit into swap
                memsw.write_text(str(self.limit_bytes))
        elif self.mechanism == "cgroup2":
            parent = CGROUP_V2 / "edgeblock"
            parent.mkdir(exist_ok=True)
            (parent / "cgroup.subtree_control").write_text("+memory")
            self.path = parent / uuid.uuid4().hex[:12]
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(self.limit_bytes))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")

    def enter_child(self) -> None:
        """Runs in the forked child before exec: move itself into the group."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def watch(self, pid: int) -> None:
        if self.mechanism != "watchdog":
            return

        def poll():
            from edge_runtime.memory import current_rss_bytes
            while not self._stop.wait(WATCHDOG_PERIOD_S):
                try:
                    if current_rss_bytes(pid) > self.limit_bytes:
                        self.watchdog_killed = True
                        self.hits += 1
                        os.kill(pid, signal.SIGKILL)
                        return
                except (OSError, RuntimeError):
                    return
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.path is None:
            return
        if self.mechanism == "cgroup1":
            self.group_peak_bytes = int((self.path / "memory.max_usage_in_bytes").read_text())
            self.hits = max(int(f.read_text()) for f in self.path.glob("memory*.failcnt") if "kmem" not in f.name)
        else:
            peak = self.path / "memory.peak"
            self.group_peak_bytes = int(peak.read_text()) if peak.exists() else None
            for line in (self.path / "memory.events").read_text().splitlines():
                key, value = line.split()
                if key == "max":
                    self.hits = int(value)
        try:
            self.path.rmdir()
        except OSError:
            pass  # a straggling process still inside; the group is removed with the next cleanup
