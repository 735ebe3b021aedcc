"""Measuring memory the way the budget promise needs it: peaks of real processes.

Peaks come from the kernel (VmHWM, ru_maxrss of a finished child, a cgroup's max usage),
never from polling (a step that holds the GIL allocates and frees between two polls).
"""
from __future__ import annotations

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


def size_text(n: int) -> str:
    """Bytes for a log line: KB below a MiB, MB above."""
    return f"{n / 1024:.0f} KB" if n < MIB else f"{n / MIB:.0f} MB"
