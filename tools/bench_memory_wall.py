#!/usr/bin/env python3
"""Benchmark: the memory wall. Whole-model training against greedy layer-wise training on a large model.

Why this exists: federated layer-wise learning's claim is that training one layer at a time needs
several times less memory than training the whole model, so a board too small for the model can
still train it. This measures that claim on the device runtime itself, on the zoo's ResNet-34
(`coordinator.model.zoo.resnet34_cifar`, 21.3 M parameters, 17 layers, 3x32x32; --model another, such as
vit_cifar, a small vision transformer of the same size whose layers are alike):
the device job (edge_runtime.jobs.worker.run_job, the code a device runs) training the whole model,
and training every layer alone with the small head right after it (what
coordinator/strategies/layerwise.py asks of a device), from the cached activations of the frozen
prefix, at each batch size.

Every measurement is a fresh process whose peak is its kernel high-water mark (VmHWM), as in
tools/bench_block_memory.py, whose children and setup this reuses (the step graphs and prefix
caches are built before anything is measured). The whole model and, at each batch, the layer
with the largest peak are measured a second time, minutes later; a cell shows the larger peak.

Check (exit status 1 when it fails): at every batch, the largest single layer's peak is at most
0.2x the whole model's (a 5x ratio).
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_block_memory import OURS, Bench, log
from benchdocs import command_line, machine, write_section

from edge_runtime.memory import MIB

MODEL = "resnet34_cifar"
TARGET = 0.2


class Wall(Bench):
    """Bench without the other runtimes: the whole model and every layer, on the device runtime only."""
    runtimes = (OURS,)

    def parts(self):
        return [p for p in super().parts() if not p[0].startswith("block")]

    def run(self) -> None:
        self.prepare()
        self.measure_import()
        self.prepare_parts()
        parts = dict(self.parts())
        todo = [(b, name) for b in self.batches for name in parts]
        for k, (batch, name) in enumerate(todo, 1):
            self._measure(name, parts[name], batch, f"[{k}/{len(todo)}]")
        for batch in self.batches:   # round 2: the two cells the ratio is made of
            for name in ("whole", self.largest(batch)["name"]):
                self._measure(name, parts[name], batch, "[again]")

    def _measure(self, name: str, part, batch: int, tag: str) -> None:
        t0 = time.monotonic()
        r = self.measure_ours(name, part, batch)
        self.runs.setdefault((name, batch, OURS), []).append(r)
        log(f"{tag} batch {batch}: {name}: peak {r['peak'] / MIB:.0f} MB (before step 1 {r['before_step'] / MIB:.0f}), "
            f"step {r['cpu_ms']:.0f} ms CPU ({time.monotonic() - t0:.0f} s)")

    def largest(self, batch: int) -> dict:
        return max((self.get(n, batch) | {"name": n} for n in self.names() if n != "whole"), key=lambda r: r["peak"])

    def table(self) -> str:
        m = self.manifest
        head = ["part", "parameters (M)"] + [f"peak @{b} MB" for b in self.batches] + \
               [f"whole / part @{b}" for b in self.batches] + [f"step CPU @{b} ms" for b in self.batches]
        rows = []
        for name in self.names():
            span = range(len(m.layers)) if name == "whole" else [int(name.split()[1])]
            params = sum(m.layers[i].param_bytes for i in span) / 4e6
            cells = [self.get(name, b) for b in self.batches]
            whole = [self.get("whole", b) for b in self.batches]
            rows.append([name, f"{params:.2f}"] + [f"{c['peak'] / MIB:.0f}" for c in cells]
                        + [f"{w['peak'] / c['peak']:.1f}" for w, c in zip(whole, cells)]
                        + [f"{c['cpu_ms']:.0f}" for c in cells])
        return self._table(head, rows)

    def checks(self) -> list[tuple[bool, str]]:
        parts, ok = [], True
        for b in self.batches:
            worst, whole = self.largest(b), self.get("whole", b)
            ratio = worst["peak"] / whole["peak"]
            ok &= ratio <= TARGET
            parts.append(f"batch {b}: {ratio:.3f}x, whole / largest {whole['peak'] / worst['peak']:.2f}x "
                         f"({worst['name']} {worst['peak'] / MIB:.1f} MB, whole {whole['peak'] / MIB:.1f} MB)")
        return [(ok, f"largest single layer <= {TARGET}x the whole model: " + "; ".join(parts))]

    def breakdown(self) -> list[str]:
        """Where the largest layer's bytes go: what no layer can shed (the runtime's import and session) and
        what it holds (weights, gradients, AdamW's two moments)."""
        out = []
        for b in self.batches:
            worst = self.largest(b)
            layer = int(worst["name"].split()[1])
            head = self.manifest.heads[self.manifest.head_for_boundary(layer)]
            state = 4 * (self.manifest.layers[layer].param_bytes + head.param_bytes) / MIB
            out.append(f"batch {b}: {worst['name']} {worst['peak'] / MIB:.0f} MB = runtime import "
                       f"{self.import_peak / MIB:.0f} MB + before step 1 the rest of its set-up "
                       f"{(worst['before_step'] - self.import_peak) / MIB:.0f} MB (of which weights, gradients and "
                       f"AdamW moments {state:.0f} MB) + the steps and saves "
                       f"{(worst['peak'] - worst['before_step']) / MIB:.0f} MB")
        return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="32,64,128", help="comma-separated batch sizes (default: 32,64,128)")
    p.add_argument("--steps", type=int, default=6,
                   help="optimizer steps per measured process, a checkpoint halfway (default: 6)")
    p.add_argument("--model", default=MODEL, help=f"a zoo model (default {MODEL})")
    p.add_argument("--workdir", type=Path, help="where the export, data, graphs and caches go "
                                                "(default: a temporary directory, removed afterwards)")
    p.add_argument("--write-docs", action="store_true", help="write the results into docs/benchmarks.md")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",") if b.strip()]
    if a.steps < 4 or not batches or min(batches) < 1 or max(batches) > 256:
        p.error("--steps must be at least 4 and batch sizes 1 to 256 (the synthetic dataset's size)")

    t0 = time.monotonic()
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="bench-memory-wall-"))
    workdir.mkdir(parents=True, exist_ok=True)
    wall = Wall(workdir.resolve(), batches, a.steps, layerwise=True, repeats=1, model=a.model)
    try:
        wall.run()
    finally:
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    minutes = (time.monotonic() - t0) / 60
    checks = wall.checks()
    verdicts = [f"{'PASS' if ok else 'FAIL'}: {text}" for ok, text in checks]
    intro = (f"Model {wall.model} ({wall.parameters() / 1e6:.1f} M parameters, {len(wall.manifest.layers)} layers, "
             f"{'x'.join(map(str, wall.manifest.input_shape))} input), AdamW, cross-entropy, one intra-op thread, "
             f"{a.steps} steps with a checkpoint after step {Bench.checkpoint_step(a.steps)} and the update saved "
             f"at the end, as a device job runs. 'whole' is the whole model from the images; 'layer l' is layer l "
             f"and the small head after it, from the cached activations of the frozen prefix (greedy layer-wise "
             f"training). Every cell is a fresh process's VmHWM; the whole model and each batch's largest layer "
             f"were measured twice and show the larger peak. Synthetic data (random inputs and labels). "
             f"Device runtime import only: {wall.import_peak / MIB:.1f} MB.")
    print(intro, "", wall.table(), "", *wall.breakdown(), "", *verdicts, sep="\n")
    print(f"\nruntime {minutes:.1f} min")
    if a.write_docs:
        versions = ", ".join(f"{k} {v}" for k, v in sorted(wall.versions.items()))
        section = "\n".join([
            f"## The memory wall: whole-model against layer-wise training of {wall.model} (bench_memory_wall)", "",
            f"Run {datetime.date.today().isoformat()} on {machine()}; {versions}. Whole run: {minutes:.1f} min.", "",
            f"Reproduce: `{command_line('bench_memory_wall.py', argv)}`", "",
            intro, "", wall.table(), "",
            *(f"- {line}" for line in wall.breakdown()), "",
            *(f"- **{v.split(':', 1)[0]}**:{v.split(':', 1)[1]}" for v in verdicts), ""])
        write_section(f"bench_memory_wall-{wall.model}", section)   # a section per model
        log("wrote docs/benchmarks.md")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
