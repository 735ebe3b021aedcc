"""Fit training into a memory budget by measuring, never guessing.

Before a job trains, short calibration runs of the real job (same code path: step graph,
prefix cache, a few optimizer steps, a checkpoint) run in child processes at decreasing
micro-batch sizes; the largest that fits under the budget with a safety margin wins.
Each calibration child runs under a hard limit equal to the budget, so calibrating on a
board can never push the board itself out of memory. The job then runs under the same
limit.

Only a run that ran out of memory (killed at the limit, or its allocation refused) makes
calibration try a smaller micro-batch. Any other failure (data that breaks the model's data
contract, an onnxruntime error, a bug) stops calibration at once with the job's own error:
no smaller micro-batch can fix it, and reporting it as a memory need would send the user
looking for memory.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

from edge_runtime.errors import BudgetError, EdgeRuntimeError
from edge_runtime.jobs.child import ChildResult
from edge_runtime.jobs.worker import OUT_OF_MEMORY, JobSpec, run_worker
from edge_runtime.memory import MIB, size_text
from edge_runtime.store import atomic_write_text, digest_of, sha256_file
from edge_runtime.train.datasets import DataError

CALIBRATION_STEPS = 3
DEFAULT_MARGIN = 0.10


@dataclass
class Trial:
    micro_batch_size: int
    peak_rss_bytes: int
    completed: bool       # False: ran out of memory (any other failure raises)
    prepared: bool = False  # this run also built the prefix cache


@dataclass
class BudgetPlan:
    budget_bytes: int
    margin: float
    micro_batch_size: int
    measured_peak_bytes: int          # training with artifact and prefix cache in place
    trials: list[Trial] = field(default_factory=list)


def _candidates(batch_size: int) -> list[int]:
    out, m = [], batch_size
    while m >= 1:
        out.append(m)
        m //= 2
    return out


def calibrate(spec: JobSpec, micro_batch_size: int, limit_bytes: int | None, job_dir: Path,
              python: Sequence[str] = ()) -> Trial:
    """One calibration run: a Trial when it completed or ran out of memory, else the job's own error (raised)."""
    config = replace(spec.config, micro_batch_size=micro_batch_size, max_steps=CALIBRATION_STEPS,
                     checkpoint_every_steps=2)
    task = f"calibrate-{spec.task_id}-m{micro_batch_size}"
    probe = replace(spec, task_id=task, config=config, update_out=None, scores_out=None)
    report, child = run_worker(probe, job_dir, memory_limit_bytes=limit_bytes, python=python)
    shutil.rmtree(Path(spec.state_dir) / "runs" / task, ignore_errors=True)
    ok = bool(report and report["ok"])
    if not ok and not out_of_memory(report, child):
        raise job_error(spec, report, child, f" while calibrating at micro-batch {micro_batch_size}")
    prepared = ok and report["result"]["prefix_computed"]
    return Trial(micro_batch_size, child.peak_rss_bytes, completed=ok, prepared=prepared)


def plan(spec: JobSpec, budget_bytes: int, job_dir: Path, margin: float = DEFAULT_MARGIN,
         ceiling_bytes: int | None = None, python: Sequence[str] = ()) -> BudgetPlan:
    """The largest micro-batch whose measured peak, plus margin, fits the budget.

    Raises BudgetError with the measured need when even a micro-batch of 1 does not fit.
    python: the command that starts a job's interpreter (child.python_child_args); () = this one.
    """
    usable = int(budget_bytes / (1 + margin))
    trials = []
    batch = spec.config.batch_size
    for m in _candidates(batch):
        trial = calibrate(spec, m, budget_bytes, job_dir, python)
        trials.append(trial)
        if trial.prepared:
            # Building the cache/artifact is a phase of its own; it fitted under the limit.
            # Measure training again with them in place, as the real job will run.
            trial = calibrate(spec, m, budget_bytes, job_dir, python)
            trials.append(trial)
        if trial.completed and trial.peak_rss_bytes <= usable:
            return BudgetPlan(budget_bytes, margin, m, trial.peak_rss_bytes, trials)
    # Nothing fits: measure micro-batch 1 without the budget's limit (under a ceiling) to say what it needs.
    import psutil
    ceiling = ceiling_bytes or int(psutil.virtual_memory().available * 0.8)
    need = calibrate(spec, 1, ceiling, job_dir, python)
    needed_bytes = int(need.peak_rss_bytes * (1 + margin)) if need.completed else ceiling
    needed = f"{needed_bytes / MIB:.0f} MB" if need.completed else f"more than {ceiling / MIB:.0f} MB"
    raise BudgetError(f"job {spec.task_id} does not fit a budget of {budget_bytes / MIB:.0f} MB: even micro-batch 1 "
                      f"needs {needed} (measured peak {need.peak_rss_bytes / MIB:.0f} MB + {margin:.0%} margin)",
                      needed_bytes=needed_bytes, budget_bytes=budget_bytes)


def train_within_budget(spec: JobSpec, budget_bytes: int, job_dir: Path, margin: float = DEFAULT_MARGIN,
                        timeout: float | None = None) -> tuple[dict, ChildResult, BudgetPlan]:
    """Calibrate, then run the job under a hard limit of budget_bytes at the chosen micro-batch."""
    chosen = plan(spec, budget_bytes, job_dir, margin)
    job = replace(spec, config=replace(spec.config, micro_batch_size=chosen.micro_batch_size))
    report, child = checked(spec, *run_worker(job, job_dir, memory_limit_bytes=budget_bytes, timeout=timeout))
    report["peak_rss_bytes"] = child.peak_rss_bytes
    return report, child, chosen


class JobRunner(Protocol):
    """What runs a device's jobs. The agent takes one: the real one below, or a simulator's.

    run() returns the job's report ({"ok": True, "mode", "result", ...}) and what its child
    measured, or raises EdgeRuntimeError (BudgetError when nothing fits, DataError when the
    data breaks the model's data contract) saying why not.

    A runner whose jobs read the device's data says so with `reads_device_data = True` (the
    real one does; a simulator's do not): the agent then checks that data before each task.
    """
    budget_bytes: int

    def run(self, spec: JobSpec) -> tuple[dict, ChildResult]: ...


# A cached plan serves job budgets this close to the one it was measured for: the agent's RSS,
# subtracted from the device budget, differs by a few pages from one start to the next.
PLAN_BUDGET_TOLERANCE = 0.02


class BudgetedJobs:
    """Jobs in children under a hard limit of the budget, at the micro-batch calibration chose.

    The chosen micro-batch is kept per part, batch and margin in plans_file, and stored before
    the long run, not after: a job killed mid-way then resumes at the same micro-batch, which
    its checkpoint requires, without calibrating again.
    """
    reads_device_data = True

    def __init__(self, jobs_dir: Path, budget_bytes: int, margin: float = DEFAULT_MARGIN,
                 plans_file: Path | None = None, log: Callable[[str], None] = lambda text: None,
                 python: Sequence[str] = ()):
        self.jobs_dir, self.budget_bytes, self.margin = Path(jobs_dir), int(budget_bytes), margin
        self.plans_file = plans_file
        # the command that starts a job's interpreter (the device's job_python setting); () = this one
        self.python: tuple[str, ...] = tuple(python)
        self.log = log
        self.plans: dict = {}
        if plans_file is not None and plans_file.exists():
            try:
                self.plans = json.loads(plans_file.read_text())
            except ValueError:  # a cache: measuring again is the cost of losing it
                log(f"{plans_file} is unreadable; calibrating again")

    def key(self, spec: JobSpec) -> str:
        """What a plan depends on: the part, the batch, and whether the job also trains on shared features (FedIN's
        IN step holds its own gradients and activations) or computes features to share."""
        c = spec.config
        fedin = f"in:{c.in_batch_size}" if c.in_weight > 0 and spec.features else "in:off"
        return digest_of(spec.mode, sha256_file(Path(spec.manifest)), json.dumps(spec.part.to_dict(), sort_keys=True),
                         str(c.batch_size), repr(self.margin), fedin, f"share:{c.share_rows}")

    def run(self, spec: JobSpec) -> tuple[dict, ChildResult]:
        """Train at the cached micro-batch when this part was planned before, else calibrate first."""
        key = self.key(spec)
        cached = self.plans.get(key)
        if cached and abs(cached["budget_bytes"] - self.budget_bytes) <= PLAN_BUDGET_TOLERANCE * self.budget_bytes:
            micro = cached["micro_batch_size"]
            self.log(f"task {spec.task_id}: training at micro-batch {micro} (plan cached) under a hard limit of "
                     f"{size_text(self.budget_bytes)}")
            report, child = self._run_at(spec, micro)
            if (report is not None and report["ok"]) or not out_of_memory(report, child):
                return checked(spec, report, child)
            self.log(f"task {spec.task_id}: killed at the memory limit at cached micro-batch {micro}; "
                     f"calibrating again")
        micro = self._plan(spec, key)
        self.log(f"task {spec.task_id}: training at micro-batch {micro} under a hard limit of "
                 f"{size_text(self.budget_bytes)}")
        return checked(spec, *self._run_at(spec, micro))

    def _plan(self, spec: JobSpec, key: str) -> int:
        self.log(f"task {spec.task_id}: calibrating: which micro-batch fits {size_text(self.budget_bytes)} "
                 f"with a {self.margin:.0%} margin")
        self.plans.pop(key, None)
        chosen = plan(spec, self.budget_bytes, self.jobs_dir, self.margin, python=self.python)
        self.plans[key] = {"micro_batch_size": chosen.micro_batch_size, "budget_bytes": self.budget_bytes}
        if self.plans_file is not None:
            atomic_write_text(self.plans_file, json.dumps(self.plans, indent=1))
        self.log(f"task {spec.task_id}: micro-batch {chosen.micro_batch_size} fits "
                 f"(measured peak {size_text(chosen.measured_peak_bytes)})")
        return chosen.micro_batch_size

    def _run_at(self, spec: JobSpec, micro: int) -> tuple[dict | None, ChildResult]:
        job = replace(spec, config=replace(spec.config, micro_batch_size=micro))
        return run_worker(job, self.jobs_dir, memory_limit_bytes=self.budget_bytes, python=self.python)


def checked(spec: JobSpec, report: dict | None, child: ChildResult) -> tuple[dict, ChildResult]:
    """The job's report, or an EdgeRuntimeError saying why it failed."""
    if report is None or not report["ok"]:
        raise job_error(spec, report, child)
    return report, child


def out_of_memory(report: dict | None, child: ChildResult) -> bool:
    """Whether a failed job ran out of memory: its worker said an allocation was refused, or it died without a
    report, killed (SIGKILL: the cgroup's OOM killer or the watchdog) or after reaching its hard limit."""
    if report is not None:
        # an unexpected error in a child that reached its hard limit is taken as memory too: under a cgroup
        # limit an allocation can fail in words the worker does not know
        return not report["ok"] and (report.get("kind") == OUT_OF_MEMORY or
                                     (report.get("kind") == "InternalError" and child.limit_hits > 0))
    return child.killed_by_oom or child.limit_hits > 0


def job_error(spec: JobSpec, report: dict | None, child: ChildResult, when: str = "") -> EdgeRuntimeError:
    """The error a failed job raises in this process: its own text, as a DataError when its data was at fault."""
    kind = DataError if report is not None and report.get("kind") == "DataError" else EdgeRuntimeError
    return kind(f"job {spec.task_id} failed{when}: {failure_text(report, child)}")


def failure_text(report: dict | None, child: ChildResult) -> str:
    """Why a job failed: its own error, else how its child ended."""
    if report is not None:
        return report["error"]
    return f"exit code {child.returncode} " + ("(killed at the memory limit)" if child.killed_by_oom
                                               else child.stderr[-500:])
