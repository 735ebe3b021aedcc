"""How a part is trained: optimizer, learning rate, batch, epochs, checkpoints.

A task carries these settings to a device and its job spec to the training child, so
they live with the wire protocol; the trainer reads them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from edge_runtime.errors import EdgeRuntimeError


@dataclass
class TrainConfig:
    optimizer: str = "adamw"          # adamw | sgd
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64              # samples per optimizer step
    micro_batch_size: int | None = None  # samples per forward/backward; None = batch_size
    epochs: float = 1.0               # passes over the local data (fractions allowed)
    max_steps: int | None = None      # stop after this many optimizer steps (overrides epochs)
    seed: int = 0
    checkpoint_every_steps: int = 50
    # "weights": trainable parameters streamed from the session (no extra memory; a resumed
    # AdamW run restarts its moment estimates). "full": onnxruntime's checkpoint with optimizer
    # state (bit-exact resume, but it builds the whole checkpoint in memory: +114 MB transient
    # for vgg_cifar block 3, whose state is 71 MB).
    checkpoint: str = "weights"
    cache_fp16: bool = False          # store prefix activations as float16 (halves disk)
    threads: int = 0                  # onnxruntime intra-op threads (0 = library default)

    @classmethod
    def from_dict(cls, raw) -> "TrainConfig":
        """Strict: an unknown setting or a value of the wrong type is an error naming it, never ignored."""
        if not isinstance(raw, dict):
            raise EdgeRuntimeError(f"training settings must be an object, not {type(raw).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise EdgeRuntimeError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        values = {}
        for name, value in raw.items():
            kinds = _KINDS[name]
            if isinstance(value, int) and not isinstance(value, bool) and float in kinds:
                value = float(value)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise EdgeRuntimeError(f"training setting {name} must be "
                                       f"{' or '.join(k.__name__ for k in kinds)}, not {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise EdgeRuntimeError(f"training setting {name} must be finite, not {value}")
            values[name] = value
        cfg = cls(**values)
        if cfg.checkpoint not in ("weights", "full"):
            raise EdgeRuntimeError(f"checkpoint must be 'weights' or 'full', not {cfg.checkpoint!r}")
        if cfg.optimizer not in ("adamw", "sgd"):
            raise EdgeRuntimeError(f"optimizer must be adamw or sgd, not {cfg.optimizer!r}")
        if not (cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate)) or cfg.epochs <= 0:
            raise EdgeRuntimeError(f"learning_rate and epochs must be positive (got {cfg.learning_rate}, {cfg.epochs})")
        cfg.micro()
        return cfg

    def micro(self) -> int:
        m = self.micro_batch_size or self.batch_size
        if m < 1 or self.batch_size < 1:
            raise EdgeRuntimeError("batch_size and micro_batch_size must be at least 1")
        return min(m, self.batch_size)


    def to_dict(self) -> dict:
        """The JSON form a task and a job spec carry."""
        return asdict(self)


_NONE = type(None)
_KINDS: dict[str, tuple[type, ...]] = {
    "optimizer": (str,), "learning_rate": (float,), "weight_decay": (float,), "batch_size": (int,),
    "micro_batch_size": (int, _NONE), "epochs": (float,), "max_steps": (int, _NONE), "seed": (int,),
    "checkpoint_every_steps": (int,), "checkpoint": (str,), "cache_fp16": (bool,), "threads": (int,),
}
