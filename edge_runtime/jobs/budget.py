"""Fit training into a memory budget by measuring, never guessing.

Before a job trains, short calibration runs of the real job (same code path: artifact,
prefix cache, a few optimizer steps, a checkpoint) run in child processes at decreasing
micro-batch sizes; the largest that fits under the budget with a safety margin wins.
Each calibration child runs under a hard limit equal to the budget, so calibrating on a
board can never push the board itself out of memory. The job then runs under the same
limit.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from edge_runtime.errors import BudgetError, EdgeRuntimeError
from edge_runtime.jobs.child import ChildResult
from edge_runtime.jobs.worker import JobSpec, run_worker
from edge_runtime.memory import MIB

CALIBRATION_STEPS = 3
DEFAULT_MARGIN = 0.10


@dataclass
class Trial:
    micro_batch_size: int
    peak_rss_bytes: int
    completed: bool       # False: killed at the limit or failed
    prepared: bool = False  # this run also built the artifact or the prefix cache


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


def calibrate(spec: JobSpec, micro_batch_size: int, limit_bytes: int | None, job_dir: Path) -> Trial:
    config = dict(spec.config, micro_batch_size=micro_batch_size, max_steps=CALIBRATION_STEPS,
                  checkpoint_every_steps=2)
    task = f"calibrate-{spec.task_id}-m{micro_batch_size}"
    probe = replace(spec, task_id=task, config=config, update_out=None, scores_out=None)
    report, child = run_worker(probe, job_dir, memory_limit_bytes=limit_bytes)
    shutil.rmtree(Path(spec.state_dir) / "runs" / task, ignore_errors=True)
    if report and not report["ok"] and report.get("kind") not in (None, "InternalError"):
        raise EdgeRuntimeError(report["error"])  # a bad input, not a memory problem: say so
    ok = bool(report and report["ok"])
    prepared = ok and (report["result"]["prefix_computed"] or report["result"]["artifact_built"])
    return Trial(micro_batch_size, child.peak_rss_bytes, completed=ok, prepared=prepared)


def plan(spec: JobSpec, budget_bytes: int, job_dir: Path, margin: float = DEFAULT_MARGIN,
         ceiling_bytes: int | None = None) -> BudgetPlan:
    """The largest micro-batch whose measured peak, plus margin, fits the budget.

    Raises BudgetError with the measured need when even a micro-batch of 1 does not fit.
    """
    usable = int(budget_bytes / (1 + margin))
    trials = []
    batch = int(spec.config.get("batch_size", 64))
    for m in _candidates(batch):
        trial = calibrate(spec, m, budget_bytes, job_dir)
        trials.append(trial)
        if trial.prepared:
            # Building the cache/artifact is a phase of its own; it fitted under the limit.
            # Measure training again with them in place, as the real job will run.
            trial = calibrate(spec, m, budget_bytes, job_dir)
            trials.append(trial)
        if trial.completed and trial.peak_rss_bytes <= usable:
            return BudgetPlan(budget_bytes, margin, m, trial.peak_rss_bytes, trials)
    # Nothing fits: measure micro-batch 1 without the budget's limit (under a ceiling) to say what it needs.
    import psutil
    ceiling = ceiling_bytes or int(psutil.virtual_memory().available * 0.8)
    need = calibrate(spec, 1, ceiling, job_dir)
    needed = f"{need.peak_rss_bytes * (1 + margin) / MIB:.0f} MB" if need.completed else \
        f"more than {ceiling / MIB:.0f} MB"
    raise BudgetError(f"job {spec.task_id} does not fit a budget of {budget_bytes / MIB:.0f} MB: even micro-batch 1 "
                      f"needs {needed} (measured peak {need.peak_rss_bytes / MIB:.0f} MB + {margin:.0%} margin)")


def train_within_budget(spec: JobSpec, budget_bytes: int, job_dir: Path, margin: float = DEFAULT_MARGIN,
                        timeout: float | None = None) -> tuple[dict, ChildResult, BudgetPlan]:
    """Calibrate, then run the job under a hard limit of budget_bytes at the chosen micro-batch."""
    chosen = plan(spec, budget_bytes, job_dir, margin)
    job = replace(spec, config=dict(spec.config, micro_batch_size=chosen.micro_batch_size))
    report, child = run_worker(job, job_dir, memory_limit_bytes=budget_bytes, timeout=timeout)
    if report is None or not report["ok"]:
        why = report["error"] if report else f"exit code {child.returncode} " + \
            ("(killed at the memory limit)" if child.killed_by_oom else child.stderr[-500:])
        raise EdgeRuntimeError(f"job {spec.task_id} failed: {why}")
    report["peak_rss_bytes"] = child.peak_rss_bytes
    return report, child, chosen
