"""The global model as the coordinator keeps it: a manifest, its graphs, and per-layer weight blobs.

Everything a device may fetch lives in one content-addressed BlobStore (the manifest file,
every graph, every weight group of every round), so serving a Fetch is a file read. The
global weights of a round are an index {group: sha256}, itself stored as a blob whose hash
the state store records with the round: a restarted coordinator finds the exact weights
of the last closed round from that one hash.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from coordinator.model.graphs import evaluate
from coordinator.model.part_graphs import ensure_part_graphs
from edge_runtime.errors import IntegrityError
from edge_runtime.store import read_verified
from edge_runtime.wire import model_blobs
from edge_runtime.wire.manifest import Manifest
from edge_runtime.wire.transfer import BlobStore


class GlobalModel:
    def __init__(self, model_dir: Path, store: BlobStore):
        self.manifest_path = Path(model_dir) / "manifest.json"
        self.manifest = Manifest.load(self.manifest_path)
        self.store = store
        self.manifest_sha = store.put_file(self.manifest_path)

    # -- weights by index ---------------------------------------------------------------------
    def save(self, weights: Mapping[str, np.ndarray]) -> str:
        """Store the weights one group per blob; return the hash of the index that names them."""
        index = model_blobs.publish_weights(self.manifest, weights, self.store)
        return self.store.put_bytes(json.dumps(index, sort_keys=True).encode())

    def index(self, index_sha: str) -> dict[str, str]:
        return json.loads(self.store.path(index_sha).read_bytes())

    def load(self, index_sha: str) -> dict[str, np.ndarray]:
        return model_blobs.load_index(self.index(index_sha), self.store)

    # -- a schedule's own blobs (strategies/base.WeightVault) ----------------------------------
    def put_bytes(self, data: bytes) -> str:
        return self.store.put_bytes(data)

    def get_bytes(self, sha: str) -> bytes:
        return read_verified(self.store.path(sha), sha, "a schedule's blob")

    # -- what a task names ------------------------------------------------------------------
    def manifest_ref(self) -> dict:
        return {"sha256": self.manifest_sha, "size": self.store.path(self.manifest_sha).stat().st_size}

    def prepare_parts(self, parts) -> None:
        """Build the graphs of parts not trained before (one builder child for all of a round's parts)."""
        ensure_part_graphs(self.manifest, parts)

    def task_blobs(self, part, index_sha: str, evaluation: bool = False, fedin: bool = False,
                   features_sha: str | None = None) -> list[dict]:
        """Every blob a task for `part` names: its graphs (stored as blobs here) and its weight groups.
        evaluation: the part's eval graph too (a task that holds rows out measures accuracy with it).
        fedin: a family member's IN step, s_in and s_out graphs too (built by prepare_parts; IntegrityError when
        the part is no member's); features_sha: the shared-feature blob (already in the store), named
        features/<sha256>, for the device's IN training."""
        step, prefix = model_blobs.part_graph_paths(self.manifest, part)
        graphs = {model_blobs.STEP_GRAPH: self.store.put_file(step)}
        if prefix is not None:
            graphs[model_blobs.PREFIX_GRAPH] = self.store.put_file(prefix)
        if evaluation:
            graphs[model_blobs.EVAL_GRAPH] = self.store.put_file(model_blobs.part_eval_graph_path(self.manifest, part))
        if fedin:
            for path in model_blobs.member_graph_paths(self.manifest, part):
                graphs[path.name] = self.store.put_file(path)
        if features_sha is not None and not self.store.has(features_sha):
            raise IntegrityError(f"shared features {features_sha} are not in the blob store")
        return model_blobs.task_blobs(self.manifest, part, self.index(index_sha), self.store, graphs,
                                      features_sha=features_sha)

    def collect_garbage(self, keep_indexes, keep_blobs=()) -> int:
        """Delete every blob but the manifest, the given weight indexes and the groups they name, and the other
        blobs given (a schedule's own); how many.

        Each round stores the weight groups it changed, so a long run would fill the disk with weights no
        one can ask for any more. Part graphs are stored again from the export when a task names them.
        """
        keep = {self.manifest_sha, *keep_blobs}
        for index in keep_indexes:
            keep.add(index)
            keep.update(self.index(index).values())
        removed = 0
        for path in self.store.root.iterdir():
            if path.is_file() and len(path.name) == 64 and path.name not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def param_bytes(self, names) -> int:
        specs = self.manifest.param_specs()
        return sum(specs[n].nbytes for n in names)

    def evaluate(self, weights: Mapping[str, np.ndarray], inputs: np.ndarray, labels: np.ndarray,
                 upto_layer: int | None = None, skip: tuple[int, ...] = (), threads: int = 0,
                 fit_on: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
        """Accuracy and mean loss (graphs.evaluate); `threads` 0: onnxruntime's default, every core. A model trained
        without labels (Manifest.contrastive) has no classifier: a linear probe of its representation after
        `upto_layer` is fitted on `fit_on` (labeled inputs no device holds) and scored on inputs, labels."""
        if self.manifest.contrastive:
            from coordinator.model.probe import probe
            if fit_on is None:
                raise ValueError(f"{self.manifest.model} learns without labels: its linear probe needs labeled data "
                                 f"to fit on")
            last = len(self.manifest.layers) - 1 if upto_layer is None else upto_layer
            return probe(self.manifest, weights, fit_on, (inputs, labels), last, skip=skip, threads=threads)
        return evaluate(self.manifest, weights, inputs, labels, upto_layer=upto_layer, skip=skip, threads=threads)
