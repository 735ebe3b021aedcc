"""The interface of a training step graph: what a device feeds and reads, by name.

No onnx, no onnxruntime, no numpy: a board reads it from the model's metadata with the
runtime it already has (`InferenceSession(...).get_modelmeta().custom_metadata_map`).

    inputs : <batch input> (float32, [N, ...]), "labels" (int64, [N]),
             "loss_scale" (float32 scalar), every trainable then every frozen parameter
             (in the order given), then BatchNorm running statistics not listed as frozen
    outputs: "loss" (float32 scalar) = loss_scale * sum of per-sample cross-entropy,
             "<param>_grad" for each trainable parameter (in the order given),
             "<stat>_updated" for each BatchNorm running statistic (the value torch would
             hold after this forward pass: momentum update, unbiased variance)

An IN step graph (FedIN: a family member's intermediate layers trained to map shared s_in to s_out) has
loss = "mse": it reads a float32 "target" shaped like its output in place of the labels, and its loss is
loss_scale * sum over samples of the mean over elements of (output - target)^2.

Feeding loss_scale = 1/batch to every micro-batch and summing the returned gradients gives
exactly the gradient of the batch-mean loss, whatever the micro-batch split.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Mapping

LABELS = "labels"
TARGET = "target"           # an IN step graph's float target (in place of the labels)
CROSS_ENTROPY, MSE = "cross_entropy", "mse"   # the losses a step graph computes
LOSS_SCALE = "loss_scale"
LOSS = "loss"
GRAD_SUFFIX = "_grad"       # onnxruntime-training's own naming, kept
STAT_SUFFIX = "_updated"
METADATA_KEY = "edgeblock.step_graph"


class InterfaceError(Exception):
    """The model carries no (or an unreadable) step-graph interface."""


@dataclass(frozen=True)
class StepGraphInterface:
    """Names the device feeds and reads, in graph order."""

    batch_input: str
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    stat_inputs: tuple[str, ...]                 # running statistics, fed like frozen parameters
    stat_updates: tuple[tuple[str, str], ...]    # (output name, running-statistic input it replaces)
    labels_input: str = LABELS
    loss_scale_input: str = LOSS_SCALE
    loss_output: str = LOSS
    loss: str = CROSS_ENTROPY                    # CROSS_ENTROPY (int64 labels) | MSE (a float32 target)

    @property
    def float_target(self) -> bool:
        """Whether labels_input takes a float32 target (MSE) rather than int64 class labels."""
        return self.loss == MSE

    @property
    def param_inputs(self) -> tuple[str, ...]:
        return self.trainable + self.frozen

    @property
    def grad_outputs(self) -> tuple[str, ...]:
        """Gradient output names, aligned with `trainable`."""
        return tuple(p + GRAD_SUFFIX for p in self.trainable)

    @property
    def input_names(self) -> tuple[str, ...]:
        return (self.batch_input, self.labels_input, self.loss_scale_input) + self.param_inputs + self.stat_inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self.loss_output,) + self.grad_outputs + tuple(o for o, _ in self.stat_updates)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StepGraphInterface":
        d = json.loads(text)
        for key in ("trainable", "frozen", "stat_inputs"):
            d[key] = tuple(d[key])
        d["stat_updates"] = tuple((o, s) for o, s in d["stat_updates"])
        if d.get("loss", CROSS_ENTROPY) not in (CROSS_ENTROPY, MSE):
            raise ValueError(f"unknown loss {d['loss']!r}")
        return cls(**d)


def interface_from_metadata(metadata: Mapping[str, str]) -> StepGraphInterface:
    """The interface from a model's metadata map (onnx metadata_props or onnxruntime's custom_metadata_map)."""
    if METADATA_KEY not in metadata:
        raise InterfaceError(f"model has no {METADATA_KEY} metadata: not a step graph")
    try:
        return StepGraphInterface.from_json(metadata[METADATA_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise InterfaceError(f"unreadable {METADATA_KEY} metadata: {exc}") from None
