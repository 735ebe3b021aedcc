"""Child processes of the device: started under a hard memory limit, their peak measured by the kernel.

Every training job, calibration run and profiling measurement is one child. Its peak is
the child's own VmHWM, reported on stderr as it exits (report_own_peak), because
ru_maxrss carries the forked parent's high-water mark across exec.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.jobs import limits
from edge_runtime.memory import peak_rss_bytes

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


def python_child_args(module: str, *args: str, python: Sequence[str] = ()) -> list[str]:
    """argv of `python -m module args...`: started with `python`, the command that starts a job's interpreter
    (a device's job_python setting), or with this interpreter when it is empty.

    A wrapper is needed where this interpreter cannot be executed directly: an aarch64 userland run under
    qemu user mode without binfmt_misc (tools/aarch64_root.py), whose children must go through qemu again."""
    return [*(python or (sys.executable,)), "-m", module, *args]


def device_child_env(extra: dict | None = None) -> dict:
    """Environment for a device child: the repo on the path, torch never imported."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if extra:
        env.update(extra)
    return env
