"""Training artifacts for a trainable part, built once per structure and cached by content.

The key covers what shapes the artifact (the graphs of the span, which parameters train,
the optimizer) and not the weights: new global weights are loaded by name into a cached
artifact, so a repeated selection of the same part costs nothing to build.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from edge_runtime.store import digest_of
from edge_runtime.train import ort_backend
from edge_runtime.train.graphs import GraphLibrary, compose
from edge_runtime.wire.part import TrainablePart

_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


class ArtifactCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.builds = 0

    def key(self, lib: GraphLibrary, part: TrainablePart, optimizer: str, weight_decay: float) -> str:
        m = lib.manifest
        graphs = [m.layers[i].graph.sha256 for i in part.span] + [m.heads[part.head].graph.sha256]
        # skip only enters when non-empty, so the keys of artifacts without skipping are unchanged
        skip = ["skip:" + ",".join(map(str, sorted(set(part.skip))))] if part.skip else []
        return digest_of(*graphs, "train:" + ",".join(map(str, sorted(part.trainable_layers))),
                         f"head:{part.train_head}", *skip, optimizer, repr(float(weight_decay)),
                         ort_backend.__name__, "v2-scaled-sum-ce")

    def get_or_build(self, lib: GraphLibrary, part: TrainablePart, weights: dict, optimizer: str,
                     weight_decay: float = 0.0) -> Path:
        """Directory holding the artifact; built into a scratch dir and renamed, so never half-written."""
        part.validate(lib.manifest)
        final = self.root / self.key(lib, part, optimizer, weight_decay)[:32]
        if all((final / f).exists() for f in _FILES):
            return final
        scratch = ort_backend.scratch_dir(self.root)
        try:
            model = compose(lib, part.span, part.head, weights, skip=part.skip)
            ort_backend.generate_training_artifacts(
                model, requires_grad=part.trainable_names(lib.manifest), frozen_params=part.frozen_names(lib.manifest),
                optimizer=optimizer, out_dir=scratch, weight_decay=weight_decay)
            if final.exists():
                shutil.rmtree(final)
            scratch.rename(final)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        self.builds += 1
        return final


