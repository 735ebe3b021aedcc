"""A zoo model exported once per directory, and its memory profile measured on this machine once.

The coordinator, the demo, the benchmarks, the tests and `edge-profile measure --model`
all need the same two steps before anything can be scheduled: export the model to ONNX
blocks, then measure what training its spans costs here (edge_runtime/profiling/profiler.py).
Both results are kept in the directory, so a second call reads them back.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def ensure_export(model_dir: Path, model: str = "fmnist_cnn", seed: int = 0) -> Path:
    """model_dir/manifest.json of the zoo `model`, exported now if it is not there yet (torch only then)."""
    model_dir = Path(model_dir)
    manifest = model_dir / "manifest.json"
    if not manifest.exists():
        from coordinator.model import export, zoo
        log.info("exporting %s to ONNX blocks in %s", model, model_dir)
        export.export(zoo.build(model, seed=seed), model_dir)
    return manifest


def export_zoo_model(name: str, directory: Path) -> Path:
    """The exporter `edge-profile measure --model` finds through the `edgeblock.model_exporters` entry point:
    the device side names a model, the coordinator's install (which has torch) exports it."""
    return ensure_export(Path(directory) / "model", name)


def measured_profile(root: Path, model: str = "fmnist_cnn", batch_sizes=(32, 64), seed: int = 0,
                     candidates=None, margin: float = 0.10, log=None) -> Path:
    """root/profile.json for `model` (exported to root/model), measured now if it is not there yet."""
    from edge_runtime.profiling.profiler import run_profile
    root = Path(root)
    profile = root / "profile.json"
    if not profile.exists():
        manifest = ensure_export(root / "model", model, seed)
        if log:
            log(f"measuring the memory of training {model}'s blocks on this machine (once, about 20 s)")
        run_profile(manifest, [], sorted(batch_sizes), root / "profiling", margin=margin,
                    candidates=candidates, verify=False, log=lambda _: None).save(profile)
    return profile
