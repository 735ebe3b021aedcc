"""Measuring memory the way the budget promise needs it: peaks of real processes.

Peaks come from the kernel (VmHWM, ru_maxrss of a finished child, a cgroup's max usage),
never from polling (a step that holds the GIL allocates and frees between two polls).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


def _status_kib(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def peak_rss_bytes(pid: int | str = "self") -> int:
    """High-water mark of resident memory (VmHWM) of a live process."""
    return _status_kib("VmHWM", pid) * 1024


def current_rss_bytes(pid: int | str = "self") -> int:
    return _status_kib("VmRSS", pid) * 1024


def release_free_heap() -> None:
    """Give freed heap memory back to the kernel (glibc malloc_trim); a no-op elsewhere.

    glibc keeps freed memory in the heap for reuse. After the weights are loaded, that
    memory (a block's worth) would stay resident for the whole training run.
    """
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux clear_refs '5'); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


PEAK_MARKER = "EDGEBLOCK_VMHWM_BYTES="


def report_own_peak() -> None:
    """Print this process's VmHWM on stderr for a parent's run_child to pick up (call last)."""
    sys.stderr.write(f"\n{PEAK_MARKER}{peak_rss_bytes()}\n")
    sys.stderr.flush()


@dataclass
class ChildResult:
    returncode: int
    # The child's own VmHWM when it reported one (report_own_peak), else ru_maxrss. ru_maxrss
    # alone is not enough: the kernel carries the high-water mark of the forked copy of the
    # parent across exec, so a child of a 300 MB parent never reports less than 300 MB.
    peak_rss_bytes: int
    seconds: float
    stdout: str
    stderr: str
    limit_hits: int = 0                   # times the hard limit was reached (cgroup failcnt)
    group_peak_bytes: int | None = None   # the cgroup's own peak, page cache included

    @property
    def killed_by_oom(self) -> bool:
        return self.returncode in (-9, 137)


def run_child(args: list[str], env: dict | None = None, timeout: float | None = None,
              memory_limit_bytes: int | None = None, cwd: Path | None = None) -> ChildResult:
    """Run a command in a fresh process; report its exit status and kernel-measured peak RSS.

    The child is reaped with wait4 so that ru_maxrss is this child's own peak. With
    memory_limit_bytes it runs under a hard limit (limits.HardLimit): a child that would
    exceed the limit is killed instead.
    """
    from . import limits
    guard = limits.HardLimit(memory_limit_bytes) if memory_limit_bytes else None
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            proc = subprocess.Popen(args, stdout=out, stderr=err, env=env, cwd=cwd,
                                    preexec_fn=guard.enter_child if guard else None)
            if guard:
                guard.watch(proc.pid)
            timer = threading.Timer(timeout, proc.kill) if timeout else None
            if timer:
                timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                if timer:
                    timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if guard:
                guard.close()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        peak = usage.ru_maxrss * 1024
        reported = [l for l in stderr.splitlines() if l.startswith(PEAK_MARKER)]
        if reported:
            peak = int(reported[-1][len(PEAK_MARKER):])
        return ChildResult(proc.returncode, peak, time.monotonic() - t0, stdout, stderr,
                           limit_hits=guard.hits if guard else 0,
                           group_peak_bytes=guard.group_peak_bytes if guard else None)


def python_child_args(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def device_child_env(extra: dict | None = None) -> dict:
    """Environment for a device child: the repo on the path, torch never imported."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if extra:
        env.update(extra)
    return env
