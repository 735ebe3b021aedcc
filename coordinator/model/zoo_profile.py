"""A zoo model exported and its memory profile measured on this machine, once per directory.

The demo, the benchmarks and the tests all need the same two steps before a coordinator
can schedule: export the model to ONNX blocks, then measure what training its spans
costs here (edge_runtime/profiler.py). Both are kept in the directory, so a second call
reads them back.
"""
from __future__ import annotations

from pathlib import Path


def measured_profile(root: Path, model: str = "fmnist_cnn", batch_sizes=(32, 64), seed: int = 0,
                     candidates=None, log=None) -> Path:
    """root/profile.json for `model` (exported to root/model), measured now if it is not there yet."""
    from coordinator.model import export, zoo
    from edge_runtime.profiling.profiler import run_profile
    root = Path(root)
    profile = root / "profile.json"
    if not profile.exists():
        if not (root / "model" / "manifest.json").exists():
            export.export(zoo.build(model, seed=seed), root / "model")
        if log:
            log(f"measuring the memory of training {model}'s blocks on this machine (once, about 20 s)")
        run_profile(root / "model" / "manifest.json", [], sorted(batch_sizes), root / "profiling",
                    candidates=candidates, verify=False, log=lambda _: None).save(profile)
    return profile
