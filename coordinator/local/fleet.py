"""A fleet on one machine: the coordinator service and device agents as real processes on one broker.

What the integration tests, the benchmark and the demo run: every device is its own
`edge-device` process with its own state directory, local data and memory budget (its
training jobs run under a hard limit of that budget), and the coordinator is its own
`edge-coordinator` process, so any of them can be killed and restarted the way a board
or a server would be. Logs go to WORKDIR/logs/<name>.log.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.round_metrics import RoundMetrics
from edge_runtime.jobs.child import device_child_env


@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    tier: str
    budget_mb: float | None   # None: the tier file's (profiles/<tier>.toml), as a flashed board runs
    data_dir: Path

    @property
    def budget_bytes(self) -> int:
        """Everything the device may use, agent and jobs together (what its peaks are held to)."""
        if self.budget_mb:
            return int(self.budget_mb * 2**20)
        from edge_runtime.device.tiers import find_tier
        return find_tier(self.tier).device_budget_bytes


def to_toml(settings: dict) -> str:
    """Settings tables of scalars and lists as TOML (what load_config reads back)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))
    out = []
    for table, values in settings.items():
        out.append(f"[{table}]")
        out += [f"{k} = {value(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


class LocalFleet:
    def __init__(self, workdir: Path, broker_url: str, fleet: str = "default"):
        self.work = Path(workdir).resolve()
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.broker_url, self.fleet = broker_url, fleet
        self.devices: dict[str, DeviceSpec] = {}
        self.procs: dict[str, subprocess.Popen] = {}

    # -- processes ----------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is already running")
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=device_child_env(),
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_device(self, spec: DeviceSpec, extra: list[str] = ()) -> subprocess.Popen:
        self.devices[spec.device_id] = spec
        return self._spawn(spec.device_id, [
            sys.executable, "-m", "edge_runtime.device.cli", "--id", spec.device_id, "--tier", spec.tier,
            "--broker", self.broker_url, "--fleet", self.fleet, "--data", str(spec.data_dir),
            "--state", str(self.work / "devices" / spec.device_id),
            *(["--budget-mb", str(spec.budget_mb)] if spec.budget_mb else []), "--threads", "1", *extra])

    def start_coordinator(self, settings: dict, name: str = "coordinator") -> subprocess.Popen:
        """Run `edge-coordinator run` with these settings (written to WORKDIR/<name>.toml)."""
        settings = {k: dict(v) for k, v in settings.items()}
        settings.setdefault("service", {}).update(broker=self.broker_url, fleet=self.fleet)
        config = self.work / f"{name}.toml"
        config.write_text(to_toml(settings))
        return self._spawn(name, [sys.executable, "-m", "coordinator.cli", "run", "--config", str(config)])

    def start_run(self, coordinator_settings: dict, devices: list[DeviceSpec]) -> None:
        """The coordinator, then every device (they say hello again when the coordinator comes online)."""
        self.start_coordinator(coordinator_settings)
        for spec in devices:
            self.start_device(spec)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)   # the process and its training job
            proc.wait(timeout=30)

    def wait(self, name: str, timeout_s: float) -> int:
        """Exit code of a process; TimeoutError (with the log's tail) if it is still running."""
        try:
            return self.procs[name].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{name} still running after {timeout_s:.0f} s; log tail:\n{self.log_tail(name)}") \
                from None

    def follow(self, metrics_dir: Path, on_round, seen: int = 0, every_s: float = 1.0, on_tick=None,
               name: str = "coordinator") -> int:
        """Wait for the coordinator to exit; call on_round(m) with the RoundMetrics of each round closed after
        the first `seen` (and on_tick() between polls); return its exit code. What the demo and the benchmarks
        watch with."""
        proc = self.procs[name]
        while True:
            exited = proc.poll() is not None
            metrics = read_metrics(metrics_dir)
            for m in metrics[seen:]:
                on_round(RoundMetrics.from_dict(m))
            seen = max(seen, len(metrics))
            if exited:
                return proc.returncode
            if on_tick is not None:
                on_tick()
            time.sleep(every_s)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM everything, then SIGKILL whatever is left after the grace period."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:   # whatever of its group is left (a training job outliving its agent, say)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def __enter__(self) -> "LocalFleet":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def wait_until(predicate, timeout_s: float, every_s: float = 0.2):
    """The first true value `predicate()` returns within timeout_s, polled every every_s; None if none came."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    return None


def read_metrics(workdir: Path) -> list[dict]:
    """metrics.jsonl as JSON objects, one per closed round (RoundMetrics.from_dict reads one typed). A last line
    that does not parse is one the coordinator is still writing (at 1,000 devices a line is about 300 KB), and is
    left for the next read; a bad line before it is an error."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    lines = [l for l in text.splitlines() if l.strip()]
    if lines and not text.endswith("\n"):
        lines.pop()                        # no newline yet: the line being written
    return [json.loads(l) for l in lines]
