#!/usr/bin/env python3
"""Benchmark: the profiler on the VGG-style model for every device tier in profiles/.

Records, in one run, what the profiler measures and chooses for vgg_cifar (9.2 M
parameters, 10 layers in 5 blocks): the runtime baseline; every candidate span (each
block, each pair of neighbouring blocks) at every batch size, measured in a fresh
process; the memory model's fit error; and for each tier its chosen stages and batch,
with each stage's predicted peak next to its measured peak. The baseline that the
partition is compared with is whole-model training (layers 0-9 at the same batch),
measured in the same run.

    python tools/bench_profile_tiers.py --write-docs      # about 4 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

from benchdocs import machine, write_section

from edge_runtime.device.tiers import load_tiers
from edge_runtime.memory import MIB
from edge_runtime.profiling.profiler import format_profile, run_profile

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="16,32,64,128", help="batch sizes to measure (default 16,32,64,128)")
    p.add_argument("--sweep", default="128,160,200,240",
                   help="extra budgets in MB, between the shipped tiers, to show how stages follow the budget")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    p.add_argument("--write-docs", action="store_true", help="write the results into docs/benchmarks.md")
    a = p.parse_args(argv)
    batches = sorted(int(b) for b in a.batches.split(","))
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-profile-tiers-"))
    from coordinator.model import export, zoo
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log("exporting vgg_cifar")
    manifest = export.export(zoo.vgg_cifar(), work / "model")
    t0 = time.monotonic()
    from edge_runtime.device.tiers import Tier
    sweep = [Tier(name=f"sweep-{mb}mb", description="budget sweep", ram_mb=4096, budget_mb=float(mb), storage_gb=8,
                  cores=4, cpu="-", source="benchmark", path=Path("-"))
             for mb in (int(x) for x in a.sweep.split(",") if x.strip())]
    tiers = sorted(load_tiers(REPO / "profiles") + sweep, key=lambda t: t.budget_bytes)
    profile = run_profile(manifest.root / "manifest.json", tiers, batches, work / "profile", log=log)
    profile.save(work / "profile.json")
    from edge_runtime.profiling.profiler import Profiler
    whole = {b: Profiler(manifest.root / "manifest.json", work / "whole", max(batches)).measure(0, 9, b)
             for b in batches}
    minutes = (time.monotonic() - t0) / 60
    print(format_profile(profile))

    rows = ["| tier | budget MB | stages (layers) | batch | predicted MB | measured MB | worst stage / whole model |",
            "|---|---:|---|---:|---|---|---:|"]
    for t in profile.tiers:
        if not t.feasible:
            rows.append(f"| {t.tier} | {t.budget_bytes / MIB:.0f} | cannot train: {t.reason} | | | | |")
            continue
        worst = max(s.measured_peak_bytes for s in t.stages)
        rows.append(f"| {t.tier} | {t.budget_bytes / MIB:.0f} | "
                    f"{' / '.join(f'{s.first}-{s.last}' for s in t.stages)} | {t.batch_size} | "
                    f"{' / '.join(f'{s.predicted_peak_bytes / MIB:.0f}' for s in t.stages)} | "
                    f"{' / '.join(f'{s.measured_peak_bytes / MIB:.0f}' for s in t.stages)} | "
                    f"{worst / whole[t.batch_size].peak_bytes:.2f}x |")
    errors = [abs(s.predicted_peak_bytes - s.measured_peak_bytes) / s.measured_peak_bytes
              for t in profile.tiers if t.feasible for s in t.stages]
    over = [(t.tier, s) for t in profile.tiers if t.feasible for s in t.stages
            if s.measured_peak_bytes > t.budget_bytes]
    meas = ["| layers | " + " | ".join(f"batch {b} MB" for b in batches) + " |",
            "|---|" + "---:|" * len(batches)]
    spans = sorted({(m["first"], m["last"]) for m in profile.measurements})
    for span in spans:
        by_batch = {m["batch_size"]: m["peak_bytes"] for m in profile.measurements
                    if (m["first"], m["last"]) == span}
        meas.append(f"| {span[0]}-{span[1]} | " + " | ".join(f"{by_batch[b] / MIB:.0f}" for b in batches) + " |")
    meas.append("| 0-9 (whole model, baseline) | " + " | ".join(f"{whole[b].peak_bytes / MIB:.0f}" for b in batches)
                + " |")
    summary = [
        f"- Memory model: worst fit error {max(f['max_rel_error'] for f in profile.fits):.1%} per candidate, "
        f"{profile.span_model['max_rel_error']:.1%} for the span model across candidates.",
        f"- Chosen stages: predicted vs measured peak within {max(errors):.1%} (worst).",
        f"- Stages measured over their tier's budget: {len(over)}" + (f" ({over})" if over else "."),
    ]
    print("\n".join(summary))
    if a.write_docs:
        write_section("bench_profile_tiers", "\n".join([
            "## Partitions per device tier (bench_profile_tiers)", "",
            f"Run {datetime.date.today().isoformat()} on {machine()}. Profiling took {minutes:.1f} min.", "",
            "Reproduce: `python tools/bench_profile_tiers.py --write-docs`", "",
            f"vgg_cifar (9.2 M parameters, 10 layers, 5 blocks), AdamW, synthetic data, runtime baseline "
            f"{profile.baseline_bytes / MIB:.0f} MB, margin {profile.margin:.0%}. Each peak comes from its own "
            "fresh process (VmHWM). The stages are chosen by dynamic programming over all 10 layer boundaries, "
            "using predictions; each chosen stage was then measured at the chosen batch. The last column "
            "compares the worst stage with whole-model training at the same batch, measured in the same run. "
            "Rows named sweep-N are budgets between the shipped tiers (`--sweep`), not boards.", "",
            *rows, "", "Measured candidates (peak MB):", "", *meas, "", *summary]))
        print(f"wrote {REPO / 'docs' / 'benchmarks.md'}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
