"""A model exported once per directory, and its memory profile measured on this machine once.

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
    """model_dir/manifest.json: the export already there, else `model` (a zoo name or any source
    coordinator/model/sources.py takes) exported now (torch only then)."""
    manifest = Path(model_dir) / "manifest.json"
    if manifest.exists():
        return manifest
    from coordinator.model import sources
    return sources.install(model, Path(model_dir), seed)


def export_zoo_model(name: str, directory: Path) -> Path:
    """The exporter `edge-profile measure --model` finds through the `edgeblock.model_exporters` entry point:
    the device side names a model, the coordinator's install (which has torch) exports it."""
    return ensure_export(Path(directory) / "model", name)


def profile_parts(manifest) -> list:
    """Every part a profiler may train on a board: each span that starts at the model's input or after a cut
    point and ends at a cut point, all of it trainable, with the head there (candidates and chosen stages),
    and a model family's member parts (its candidates, TrainablePart.member)."""
    from edge_runtime.wire.part import TrainablePart
    cuts = manifest.cut_points()   # only those at or after a frozen prefix (layers that never train)
    spans = [TrainablePart(tuple(range(a, b + 1)), tuple(range(a, b + 1)), manifest.head_for_boundary(b))
             for a in manifest.stage_starts() for b in cuts if b >= a]
    return spans + [TrainablePart.member(manifest, x.name) for x in manifest.members]


def export_for_boards(model: str, model_dir: Path, seed: int = 0) -> Path:
    """An export a board can profile: the model and the graphs of every part its profiler may train."""
    from coordinator.model.part_graphs import ensure_part_graphs
    from edge_runtime.wire.manifest import Manifest
    manifest_path = ensure_export(model_dir, model, seed)
    manifest = Manifest.load(manifest_path)
    ensure_part_graphs(manifest, profile_parts(manifest))
    return manifest_path


def measured_profile(root: Path, model: str = "fmnist_cnn", batch_sizes=(32, 64), seed: int = 0,
                     candidates=None, margin: float = 0.10, log=None) -> Path:
    """root/profile.json for `model` (exported to root/model), measured now if it is not there yet."""
    from edge_runtime.profiling.profiler import run_profile
    root = Path(root)
    profile = root / "profile.json"
    if not profile.exists():
        manifest = ensure_export(root / "model", model, seed)
        if log:
            log(f"measuring the memory of training {model}'s blocks (a model family's members) on this machine "
                f"(once, about 20 s)")
        run_profile(manifest, [], sorted(batch_sizes), root / "profiling", margin=margin,
                    candidates=candidates, verify=False, log=lambda _: None).save(profile)
    return profile


def member_budgets(profile: Path, manifest_path: Path, batch: int, margin: float = 0.10,
                   slack: float = 0.06) -> dict[str, float]:
    """For a model family on this machine: per member, a device budget in MB (the agent's reserve included) that
    holds the member at `batch` with the margin, plus `slack`, and not the next member; so a one-machine fleet can
    give each tier its own member. SystemExit when two members' measured needs are too close for that."""
    from edge_runtime.device.tiers import AGENT_RESERVE_MB
    from edge_runtime.profiling.memory_model import Predictor
    from edge_runtime.profiling.profile_file import Profile
    from edge_runtime.wire.manifest import Manifest
    from edge_runtime.wire.part import TrainablePart
    m = Manifest.load(manifest_path)
    predictor = Predictor.from_profile(m, Profile.load(profile))
    needs = {}
    for member in m.members:
        part = TrainablePart.member(m, member.name)
        needs[member.name] = predictor.predict(part.span[0], part.span[-1], batch, skip=part.skip) * (1 + margin)
    names = list(needs)
    for a, b in zip(names, names[1:]):
        if needs[a] * (1 + slack) >= needs[b]:
            raise SystemExit(f"members {a} and {b} need {needs[a] / 2**20:.0f} and {needs[b] / 2**20:.0f} MB at "
                             f"batch {batch}: too close for a budget between them on this machine")
    return {n: needs[n] * (1 + slack) / 2**20 + AGENT_RESERVE_MB for n in names}
