"""One training or scoring job in its own process: `python -m edge_runtime.jobs.worker SPEC.json`.

The device runs every training job (and every calibration) as a child process, so its
peak memory is measured by the kernel (ru_maxrss) and can be held under a hard limit,
apart from the agent process that talks to the network. The last line of stdout is a
JSON object: {"ok": true, "mode": "train", "result": {...}, "update": path} or
{"ok": false, "error": ..., "kind": ...}, where kind is the error's class (DataError: the data
breaks the model's data contract, checked before anything trains on it), OUT_OF_MEMORY when
an allocation was refused (MemoryError, or onnxruntime's own allocation failure: only then can
a smaller micro-batch help), or InternalError for anything else unexpected.

A spec with "mode": "score" scores the part's trainable layers instead of training them
(one pass of forward/backward, no optimizer step, weights untouched):
{"ok": true, "mode": "score", "result": {"scores": {"<layer>": s, "head": s}, "samples": n,
"batches": k, "peak_rss_bytes": ...}, "update": null, "scores_out": path}.
"""
from __future__ import annotations

import json
import re
import sys
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.jobs.child import ChildResult
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.train_config import TrainConfig


@dataclass
class JobSpec:
    manifest: str                 # path to manifest.json
    weights: str | list           # safetensors file(s) with (at least) every weight the part and its prefix need
    dataset: str                  # LocalDataset directory
    state_dir: str
    task_id: str
    part: TrainablePart           # a dict of its fields is accepted and converted
    config: TrainConfig           # likewise
    update_out: str | None = None  # where to copy the trained weights (safetensors)
    progress_file: str | None = None  # where to publish {"phase", "done", "total"} for a watcher
    extra: dict = field(default_factory=dict)
    mode: str = "train"           # "train" | "score" (layer gradient scores, no weight change)
    scores_out: str | None = None  # score mode: where to write the score result (JSON)
    features: str | None = None   # FedIN: other devices' shared features (safetensors), for IN training

    def __post_init__(self):
        if isinstance(self.part, dict):
            self.part = TrainablePart.from_dict(self.part)
        if isinstance(self.config, dict):
            self.config = TrainConfig.from_dict(self.config)

    def save(self, path: Path) -> None:
        from edge_runtime.store import atomic_write_text
        atomic_write_text(Path(path), json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "JobSpec":
        return cls(**json.loads(Path(path).read_text()))


def _progress_writer(path: str, every_s: float = 0.5):
    """A progress callback that rewrites a small JSON file at most every `every_s` seconds."""
    import time

    from edge_runtime.store import atomic_write_text
    last = [0.0]

    def write(phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or done == total:
            last[0] = now
            atomic_write_text(Path(path), json.dumps({"phase": phase, "done": done, "total": total}))
    return write


MODES = ("train", "score")
OUT_OF_MEMORY = "OutOfMemory"   # the report's kind when the job ran out of memory rather than failed
# how onnxruntime (its arena, or a C++ std::bad_alloc), numpy and the kernel (ENOMEM) say an allocation was refused
_ALLOCATION_FAILED = re.compile(r"bad_alloc|Failed to allocate memory|Unable to allocate|Cannot allocate memory",
                                re.IGNORECASE)


def error_kind(exc: BaseException) -> str:
    """The report's kind of a job's error: OUT_OF_MEMORY, the EdgeRuntimeError's class, or InternalError."""
    if isinstance(exc, MemoryError) or _ALLOCATION_FAILED.search(str(exc)):
        return OUT_OF_MEMORY
    return type(exc).__name__ if isinstance(exc, EdgeRuntimeError) else "InternalError"


def run_job(spec: JobSpec, progress=None) -> dict:
    """Run one job in this process. progress(phase, done, total) overrides spec.progress_file."""
    from edge_runtime.train.datasets import LocalDataset
    from edge_runtime.train.trainer import train
    from edge_runtime.wire import weights as wcodec
    from edge_runtime.wire.manifest import Manifest

    if spec.mode not in MODES:
        raise EdgeRuntimeError(f"unknown job mode {spec.mode!r}; choose one of {', '.join(MODES)}")
    manifest = Manifest.load(Path(spec.manifest))
    part, config = spec.part, spec.config
    part.validate(manifest)
    progress = progress or (_progress_writer(spec.progress_file) if spec.progress_file else None)
    # only the prefix, the span and the head: a later block never loads the rest of the model
    weights = wcodec.open_weights(spec.weights, part.required_names(manifest))
    if spec.mode == "score":
        from edge_runtime.store import atomic_write_text
        from edge_runtime.train.layer_scores import score_layers
        result = score_layers(manifest, weights, LocalDataset(Path(spec.dataset)), part, config,
                              Path(spec.state_dir), progress=progress)
        if spec.scores_out:
            atomic_write_text(Path(spec.scores_out), json.dumps(result))
        return {"ok": True, "mode": "score", "result": result, "update": None, "scores_out": spec.scores_out}
    _, result = train(manifest, weights, LocalDataset(Path(spec.dataset)), part, config,
                      Path(spec.state_dir), spec.task_id, progress=progress, return_weights=False,
                      features=spec.features)
    if spec.update_out:
        import shutil
        update = Path(spec.state_dir) / "runs" / spec.task_id / "update.safetensors"
        tmp = Path(spec.update_out).with_name(Path(spec.update_out).name + ".tmp")
        shutil.copyfile(update, tmp)
        tmp.replace(spec.update_out)
    return {"ok": True, "mode": "train", "result": asdict(result), "update": spec.update_out}


def run_worker(spec: JobSpec, job_dir: Path, memory_limit_bytes: int | None = None,
               timeout: float | None = None, python: Sequence[str] = ()) -> tuple[dict | None, ChildResult]:
    """Run one job in a fresh child; return its JSON report (None if it died) and its measurements.

    python: the command that starts the child's interpreter (child.python_child_args); () = this one."""
    from edge_runtime.jobs.child import device_child_env, python_child_args, run_child
    job_dir.mkdir(parents=True, exist_ok=True)
    spec_path = job_dir / f"{spec.task_id}.json"
    spec.save(spec_path)
    child = run_child(python_child_args("edge_runtime.jobs.worker", str(spec_path), python=python),
                      env=device_child_env(), memory_limit_bytes=memory_limit_bytes, timeout=timeout)
    report = None
    lines = [l for l in child.stdout.strip().splitlines() if l.startswith("{")]
    if lines:
        try:
            report = json.loads(lines[-1])
        except json.JSONDecodeError:
            report = None
    return report, child


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    try:
        out = run_job(JobSpec.load(Path(argv[0])))
        code = 0
    except EdgeRuntimeError as exc:
        out, code = {"ok": False, "error": str(exc), "kind": error_kind(exc)}, 1
    except Exception as exc:  # report, never hang the parent
        traceback.print_exc()
        out, code = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": error_kind(exc)}, 1
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    from edge_runtime.jobs.child import report_own_peak
    report_own_peak()
    return code


if __name__ == "__main__":
    sys.exit(main())
