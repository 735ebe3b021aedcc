"""edge-profile: measure what this device can train, fit the memory model, cut the model per tier.

Each measurement trains a candidate span of layers (each block, and each pair of
neighbouring blocks, by default) for a few real steps at one batch size, in a fresh child
process whose own peak RSS is the number recorded; a preparatory job first builds the
span's prefix cache so that the measured process only trains. The runtime's
baseline (a process that only imports it) is measured apart. From these, a memory model
predicts every span at every batch (edge_runtime/profiling/memory_model.py), and a dynamic program
over the layer boundaries chooses each tier's stages (edge_runtime/profiling/partition.py). With
verification on (the default), every chosen stage is then measured at its chosen batch.

A model family (FedIN: Manifest.members) is not cut into stages. Its candidates are its members'
parts (the shared extractor, the member's own layers and the classifier, every other member's layers
skipped), and each tier trains the largest member that fits, at the largest batch at which it fits
(edge_runtime/profiling/partition.py: choose_member).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime.device.probe import probe
from edge_runtime.device.tiers import DEFAULT_PROFILES_DIR, find_tier, load_tiers
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.jobs.child import device_child_env, run_child
from edge_runtime.jobs.worker import JobSpec, run_worker
from edge_runtime.memory import MIB
from edge_runtime.profiling.memory_model import (
    Measurement,
    Predictor,
    fit_candidate,
    fit_span_model,
    span_features,
    to_dict,
)
from edge_runtime.profiling.partition import NoPartition, choose_member, choose_partition
from edge_runtime.profiling.profile_file import Profile, StagePlan, TierPlan
from edge_runtime.store import sha256_file
from edge_runtime.train.datasets import LocalDataset
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.part import TrainablePart

DEFAULT_BATCHES = (16, 32, 64)
BASELINE_SCRIPT = ("from edge_runtime.train import ort_backend, trainer; ort_backend._import_onnxruntime(); "
                   "from edge_runtime.jobs.child import report_own_peak; report_own_peak()")


def measure_baseline() -> int:
    """Peak RSS of a process that only imports the device runtime (its fixed cost)."""
    child = run_child([sys.executable, "-c", BASELINE_SCRIPT], env=device_child_env())
    if child.returncode != 0:
        raise EdgeRuntimeError(f"the runtime does not import: {child.stderr[-500:]}")
    return child.peak_rss_bytes


def default_candidates(manifest: Manifest) -> list[tuple[int, int]]:
    """Each block and each pair of neighbouring blocks, as (first layer, last layer), less the model's frozen
    prefix: a block inside it never trains, and one that straddles it trains from its first trainable layer."""
    start = manifest.frozen_prefix
    spans = [(max(b.layers[0], start), b.layers[-1]) for b in manifest.blocks if b.layers[-1] >= start]
    return spans + [(a[0], b[1]) for a, b in zip(spans, spans[1:])]


def candidate_part(manifest: Manifest, first: int, last: int, skip=()) -> TrainablePart:
    """Layers first..last less `skip`, all trainable, with the head after last (a family member's part when
    `skip` is every other member's layers); refused (ManifestError, an EdgeRuntimeError) for a span that
    reaches into the frozen prefix or skips a layer it may not, before any child runs."""
    skipped = set(skip)
    part = TrainablePart(span=tuple(range(first, last + 1)),
                         trainable_layers=tuple(i for i in range(first, last + 1) if i not in skipped),
                         head=manifest.head_for_boundary(last), skip=tuple(sorted(skipped)))
    part.validate(manifest)
    return part


def part_text(part: TrainablePart, manifest: Manifest) -> str:
    """A candidate in words, for progress lines and errors: 'layers 1-2', or 'member small (layers 0-6 less 2-6)'."""
    first, last = part.span[0], part.span[-1]
    layers = f"layers {first}-{last}"
    if not part.skip:
        return layers
    less = f"{layers} less {_runs(part.skip)}"
    member = manifest.member_of(part.skip)
    return f"member {member.name} ({less})" if member is not None else less


def _runs(layers) -> str:
    """Sorted layer indices as runs: (1, 4, 5, 6) -> '1,4-6'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


def member_parts(manifest: Manifest) -> list[tuple[str, TrainablePart]]:
    """A model family's members and the part each trains (TrainablePart.member), smallest first; [] for a model
    that is not a family."""
    return [(x.name, TrainablePart.member(manifest, x.name)) for x in manifest.members]


PART_GRAPH_BUILDERS = "edgeblock.part_graphs"


def part_graph_builder() -> Callable | None:
    """The coordinator's builder of a part's graphs (entry point group `edgeblock.part_graphs`) when it is
    installed here; None on a board, which profiles with the graphs its export came with."""
    from importlib.metadata import entry_points
    for found in entry_points(group=PART_GRAPH_BUILDERS):
        try:
            return found.load()
        except ImportError:     # named by the package metadata, but its code is not importable here
            return None
    return None


class Profiler:
    """Measures spans of one manifest on this device, each in a fresh child process."""

    def __init__(self, manifest_path: Path, workdir: Path, max_batch: int, steps: int = 6,
                 log: Callable[[str], None] = print):
        self.build_graphs = part_graph_builder()
        self.manifest_path = Path(manifest_path).resolve()
        self.manifest = Manifest.load(self.manifest_path)
        if self.manifest.weights is None:
            raise EdgeRuntimeError("the manifest names no weights file to train from")
        self.workdir = Path(workdir).resolve()
        self.steps = max(steps, 4)
        self.log = log
        self._cache: dict[tuple[int, int, tuple[int, ...], int], Measurement] = {}
        # Synthetic local data: memory depends on shapes, not values.
        rng = np.random.default_rng(0)
        n = max_batch * 2
        self.dataset = LocalDataset.write(
            self.workdir / "data", rng.standard_normal((n,) + tuple(self.manifest.input_shape)).astype(np.float32),
            rng.integers(0, self.manifest.num_classes, n))

    def _part(self, first: int, last: int, skip=()) -> TrainablePart:
        """candidate_part of this profiler's manifest (refused before any child runs)."""
        return candidate_part(self.manifest, first, last, skip)

    def _spec(self, task: str, part: TrainablePart, batch: int, steps: int) -> JobSpec:
        return JobSpec(manifest=str(self.manifest_path), weights=str(self.manifest.graph_path(self.manifest.weights)),
                       dataset=str(self.dataset.root), state_dir=str(self.workdir / "state"), task_id=task,
                       part=part.to_dict(),
                       config={"batch_size": batch, "max_steps": steps, "epochs": 1000.0,
                               "checkpoint_every_steps": max(2, steps // 2)})

    def measure(self, first: int, last: int, batch: int, skip=()) -> Measurement:
        """Peak and step time of training layers first..last less `skip` at `batch`, in a fresh child process."""
        return self.measure_part(self._part(first, last, skip), batch)

    def measure_part(self, part: TrainablePart, batch: int) -> Measurement:
        """measure() of a part as profile candidates are: every layer of its span that is not skipped trains, and
        so does its head (a family member's part, TrainablePart.member, is one)."""
        first, last, skip = part.span[0], part.span[-1], tuple(part.skip)
        if tuple(part.trainable_layers) != tuple(i for i in part.span if i not in skip) or not part.train_head:
            raise EdgeRuntimeError(f"the profiler measures parts whose every layer trains, less skipped ones, "
                                   f"and their head; not {part}")
        key = (first, last, skip, batch)
        if key in self._cache:
            return self._cache[key]
        what = part_text(part, self.manifest)
        jobs = self.workdir / "jobs"
        if self.build_graphs is not None:
            self.build_graphs(self.manifest, [part])
        stamp = f"{first}-{last}" + (f"-skip{'.'.join(map(str, skip))}" if skip else "") \
            + f"-b{batch}-{time.monotonic_ns()}"
        report, child = run_worker(self._spec(f"prep-{stamp}", part, batch, 1), jobs)
        if not report or not report["ok"]:
            raise EdgeRuntimeError(f"preparing {what} failed: "
                                   f"{report['error'] if report else child.stderr[-500:]}")
        report, child = run_worker(self._spec(f"measure-{stamp}", part, batch, self.steps), jobs)
        if not report or not report["ok"]:
            raise EdgeRuntimeError(f"measuring {what} at batch {batch} failed: "
                                   f"{report['error'] if report else child.stderr[-500:]}")
        result = report["result"]
        if result["prefix_computed"]:
            raise EdgeRuntimeError("the measured run had to compute its prefix cache; its peak would not be "
                                   "training alone")
        params, acts = span_features(self.manifest, first, last, skip)
        m = Measurement(first, last, part.head, batch, child.peak_rss_bytes, result["step_seconds"], params, acts,
                        skip)
        self._cache[key] = m
        return m


SPAN_MODEL_POINTS = 4   # the span model fits four coefficients (memory_model.fit_span_model)


def _enough_batches(batches: list[int], candidates: int) -> list[int]:
    """The batch sizes to measure: the given ones, plus halves and doubles when a model with few trainable
    spans (one block, or one after a frozen prefix) would give the span model fewer points than it fits.
    The partition still chooses among the given batch sizes only."""
    measured = sorted(set(batches))
    while candidates * len(measured) < SPAN_MODEL_POINTS:
        smaller = measured[0] // 2
        measured = sorted(set(measured) | ({smaller} if smaller >= 1 and smaller not in measured
                                           else {measured[-1] * 2}))
    return measured


def run_profile(manifest_path: Path, tiers: list, batches: list[int], workdir: Path, margin: float = 0.10,
                candidates: list[tuple[int, int]] | None = None, verify: bool = True, steps: int = 6,
                log: Callable[[str], None] = print) -> Profile:
    """Measure, fit, choose per tier (a partition, or a model family's member), and (with verify) measure the choice.

    candidates: the spans (first, last) to measure, default each block and each pair of neighbouring blocks. A model
    family's candidates are always its members' parts (a family is not cut into stages), so it takes none."""
    manifest = Manifest.load(Path(manifest_path))
    members = member_parts(manifest)
    if members and candidates:
        raise EdgeRuntimeError(f"{manifest.model} is a model family: its candidates are its members' parts "
                               f"({', '.join(name for name, _ in members)}), not given spans")
    parts = [part for _, part in members] or [candidate_part(manifest, a, z)
                                              for a, z in candidates or default_candidates(manifest)]
    measured_batches = _enough_batches(batches, len(parts))
    prof = Profiler(manifest_path, workdir, max(measured_batches), steps, log)
    m = prof.manifest
    log("runtime baseline: measuring a process that only imports the runtime")
    baseline = measure_baseline()
    log(f"runtime baseline: {baseline / MIB:.0f} MB")
    points, total, k = [], len(parts) * len(measured_batches), 0
    t0 = time.monotonic()
    for part in parts:
        for b in measured_batches:
            k += 1
            point = prof.measure_part(part, b)
            points.append(point)
            eta = (time.monotonic() - t0) / k * (total - k)
            log(f"[{k}/{total}] {part_text(part, m)} batch {b}: peak {point.peak_bytes / MIB:.0f} MB, "
                f"step {point.step_seconds * 1000:.0f} ms  (about {eta:.0f} s left)")
    keys = list(dict.fromkeys((p.first, p.last, p.skip) for p in points))
    fits = [fit_candidate([p for p in points if (p.first, p.last, p.skip) == key], baseline) for key in keys]
    span_model = fit_span_model(points, baseline)
    predictor = Predictor(m, baseline, fits, span_model)
    log(f"memory model: worst fit error {predictor.max_rel_error():.1%} (per-candidate and span model)")

    plans = []
    for tier in tiers:
        usable = int(tier.budget_bytes / (1 + margin))
        if tier.budget_bytes <= baseline:
            plans.append(TierPlan(tier.name, tier.budget_bytes, usable, False,
                                  f"budget {tier.budget_bytes / MIB:.0f} MB is below the runtime's own baseline "
                                  f"of {baseline / MIB:.0f} MB: nothing can train"))
            continue
        try:
            member, batch, chosen = (_choose_member(members, predictor, batches, usable) if members
                                     else _choose_stages(m, predictor, batches, usable))
        except NoPartition as exc:
            plans.append(TierPlan(tier.name, tier.budget_bytes, usable, False, str(exc)))
            if members:
                log(f"{tier.name}: trains no member: {exc}")
            continue
        if member is not None:
            log(f"{tier.name}: trains member {member} at batch {batch}, predicted "
                f"{chosen[0][1] / MIB:.0f} MB of a usable {usable / MIB:.0f} MB")
        stages = []
        for part, predicted in chosen:
            measured = step = None
            if verify:
                point = prof.measure_part(part, batch)
                measured, step = point.peak_bytes, point.step_seconds
                log(f"{tier.name}: verified {part_text(part, m)} at batch {batch}: "
                    f"{measured / MIB:.0f} MB (predicted {predicted / MIB:.0f} MB)")
            stages.append(StagePlan(part.span[0], part.span[-1], part.head, predicted, measured, step))
        plans.append(TierPlan(tier.name, tier.budget_bytes, usable, True, None, batch, tuple(stages), member))
    return Profile(model=m.model, manifest_sha256=sha256_file(prof.manifest_path),
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   device=probe(prof.workdir, margin).to_dict(), baseline_bytes=baseline, margin=margin,
                   measurements=[to_dict(p) for p in points], fits=[to_dict(f) for f in fits],
                   span_model=asdict(span_model), tiers=plans, frozen_prefix=m.frozen_prefix)


Chosen = tuple[str | None, int, list[tuple[TrainablePart, int]]]   # (member, batch, [(stage part, predicted peak)])


def _choose_stages(manifest: Manifest, predictor: Predictor, batches: list[int], usable: int) -> Chosen:
    """The fewest stages that fit, then the largest batch, then the most headroom (partition.choose_partition)."""
    part = choose_partition(len(manifest.layers), manifest.cut_points(), batches, predictor.predict, usable,
                            first=manifest.frozen_prefix)
    return None, part.batch_size, [(candidate_part(manifest, s.first, s.last), s.predicted_peak_bytes)
                                   for s in part.stages]


def _choose_member(members: list[tuple[str, TrainablePart]], predictor: Predictor, batches: list[int],
                   usable: int) -> Chosen:
    """The largest member that fits, at the largest batch at which it does (partition.choose_member)."""
    def peak(part: TrainablePart) -> Callable[[int], float]:
        return lambda batch: predictor.predict(part.span[0], part.span[-1], batch, skip=part.skip)
    choice = choose_member([(name, peak(part)) for name, part in members], batches, usable)
    return choice.member, choice.batch_size, [(dict(members)[choice.member], choice.predicted_peak_bytes)]


def format_profile(profile: Profile) -> str:
    """One table per tier: stages, batch, predicted and measured peaks, headroom, step time."""
    out = [f"model {profile.model}; runtime baseline {profile.baseline_bytes / MIB:.0f} MB; margin {profile.margin:.0%}"]
    for t in profile.tiers:
        out.append(f"\n{t.tier}: budget {t.budget_bytes / MIB:.0f} MB")
        if not t.feasible:
            out.append(f"  cannot train: {t.reason}")
            continue
        out.append(f"  member {t.member}, trained whole at batch {t.batch_size}" if t.member
                   else f"  {len(t.stages)} stage(s) at batch {t.batch_size}")
        out.append(f"  {'stage':>5} {'layers':>7} {'predicted MB':>12} {'measured MB':>11} {'headroom MB':>11} "
                   f"{'step ms':>7}")
        for i, s in enumerate(t.stages):
            measured = s.measured_peak_bytes
            head = (t.budget_bytes - (measured or s.predicted_peak_bytes)) / MIB
            out.append(f"  {i:>5} {f'{s.first}-{s.last}':>7} {s.predicted_peak_bytes / MIB:>12.0f} "
                       f"{(f'{measured / MIB:.0f}' if measured else '-'):>11} {head:>11.0f} "
                       f"{(f'{s.step_seconds * 1000:.0f}' if s.step_seconds else '-'):>7}")
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-profile", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="""examples:
  edge-profile probe                                  # this device's RAM, cgroup limit, swap, disk, usable budget
  edge-profile measure --model fmnist_cnn             # every tier in profiles/, batches 16,32,64 -> profile.json
  edge-profile measure --manifest model/manifest.json --tier pi-zero-2w --batches 8,16,32
  edge-profile show profile.json                      # the tables again
  edge-profile plot profile.json -o profile.png       # peak vs batch per candidate, tier budgets as lines""")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("probe", help="print this device's memory, storage and usable training budget")
    pr.add_argument("--cache-dir", type=Path, default=Path("."), help="where the activation cache would live")
    pr.add_argument("--margin", type=float, default=0.10, help="share of memory kept free (default 0.10)")
    me = sub.add_parser("measure", help="measure candidate spans, fit the memory model, choose partitions per tier")
    src = me.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="an exported model's manifest.json (what a board has)")
    src.add_argument("--model", help="export this model first: a zoo name or FILE.py[:NAME] building a BlockModel "
                                     "(needs the server install: torch)")
    me.add_argument("--tiers", type=Path, default=DEFAULT_PROFILES_DIR,
                    help="directory of tier TOML files (default: the repo's profiles/)")
    me.add_argument("--tier", action="append", help="only this tier (repeatable); default: every tier")
    me.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)),
                    help="batch sizes to measure and choose from (default 16,32,64)")
    me.add_argument("--margin", type=float, default=0.10, help="safety margin over predicted peaks (default 0.10)")
    me.add_argument("--steps", type=int, default=6, help="training steps per measurement (default 6)")
    me.add_argument("--no-verify", action="store_true", help="do not measure the chosen stages")
    me.add_argument("--workdir", type=Path, default=Path("runs/profile"), help="scratch space (default runs/profile)")
    me.add_argument("--out", type=Path, default=Path("profile.json"), help="the profile the coordinator reads")
    me.add_argument("--plot", type=Path, help="also save the plot here (needs matplotlib)")
    sh = sub.add_parser("show", help="print the tables of a profile file")
    sh.add_argument("profile", type=Path)
    pl = sub.add_parser("plot", help="plot a profile file to PNG (needs matplotlib)")
    pl.add_argument("profile", type=Path)
    pl.add_argument("-o", "--out", type=Path, default=Path("profile.png"))
    return p


EXPORTERS = "edgeblock.model_exporters"


def export_model(name: str, workdir: Path) -> Path:
    """The manifest of a model known by name, exported by an installed exporter (entry point group
    `edgeblock.model_exporters`: the coordinator's zoo). The device side never imports the coordinator:
    on a board there is none, and the error says to pass --manifest instead."""
    from importlib.metadata import entry_points
    exporters = list(entry_points(group=EXPORTERS))
    if not exporters:
        raise EdgeRuntimeError(f"--model {name}: no model exporter is installed (exporting needs the coordinator's "
                               f"install, with torch); pass --manifest of a model exported there")
    errors = []
    for exporter in exporters:
        try:
            return Path(exporter.load()(name, workdir))
        except (KeyError, ValueError, ImportError) as exc:
            errors.append(f"{exporter.name}: {exc}")
    raise EdgeRuntimeError(f"--model {name}: no exporter could export it ({'; '.join(errors)})")


def _tiers(args) -> list:
    if args.tier:
        return sorted((find_tier(name, args.tiers) for name in args.tier), key=lambda t: t.budget_bytes)
    return load_tiers(args.tiers)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "probe":
            d = probe(args.cache_dir, args.margin)
            for key, value in d.to_dict().items():
                shown = f"{value / MIB:.0f} MB" if key.endswith("_bytes") and value is not None else value
                print(f"{key:22s} {shown}")
            return 0
        if args.command in ("show", "plot"):
            profile = Profile.load(args.profile)
            if args.command == "show":
                print(format_profile(profile))
            else:
                from edge_runtime.profiling.profile_plot import plot
                plot(profile, args.out)
                print(f"wrote {args.out}")
            return 0
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
        if not batches or batches[0] < 1:
            raise EdgeRuntimeError(f"--batches needs positive integers, not {args.batches!r}")
        tiers = _tiers(args)
        manifest = args.manifest
        if args.model:
            manifest = export_model(args.model, args.workdir)
        profile = run_profile(manifest, tiers, batches, args.workdir, args.margin, verify=not args.no_verify,
                              steps=args.steps, log=lambda s: print(s, file=sys.stderr, flush=True))
        profile.save(args.out)
        print(format_profile(profile))
        print(f"\nwrote {args.out}")
        if args.plot:
            from edge_runtime.profiling.profile_plot import plot
            plot(profile, args.plot)
            print(f"wrote {args.plot}")
        return 0
    except EdgeRuntimeError as exc:
        print(f"edge-profile: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader (head, less) went away: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
