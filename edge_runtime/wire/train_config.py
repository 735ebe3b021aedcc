"""How a part is trained: optimizer, learning rate, batch, epochs, checkpoints.

A task carries these settings to a device and its job spec to the training child, so
they live with the wire protocol; the trainer reads them.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, fields

from edge_runtime.errors import EdgeRuntimeError


@dataclass
class TrainConfig:
    optimizer: str = "adamw"          # adamw (torch.optim.AdamW's form) | sgd
    learning_rate: float = 1e-3
    weight_decay: float = 0.0         # decoupled for adamw, added to the gradient for sgd (as torch does)
    momentum: float = 0.0             # sgd only
    nesterov: bool = False            # sgd only, with momentum
    adam_eps: float = 1e-8
    batch_size: int = 64              # samples per optimizer step
    micro_batch_size: int | None = None  # samples per forward/backward; None = batch_size
    epochs: float = 1.0               # passes over the local data (fractions allowed)
    max_steps: int | None = None      # stop after this many optimizer steps (overrides epochs)
    seed: int = 0
    checkpoint_every_steps: int = 50
    # "full": the trained tensors and the optimizer's state (a resumed run continues exactly where it
    # stopped); "weights": the tensors only (half the disk for AdamW; a resumed run restarts its moments).
    # Both are streamed to disk a tensor at a time: no extra memory either way.
    checkpoint: str = "full"
    cache_fp16: bool = False          # store prefix activations as float16 (halves disk)
    threads: int = 0                  # onnxruntime intra-op threads (0 = library default)
    # the fraction of the local rows kept out of training (the same rows every task: datasets.holdout_split);
    # the job measures the accuracy of the model it received and of the one it trained on them. A personalised
    # model has no global test set: this is how its accuracy is known. 0 = train on every row, measure nothing.
    holdout: float = 0.0
    # FedIN (a family member's part): besides cross-entropy, the member's intermediate layers learn to map other
    # devices' shared extractor outputs (s_in) to their classifier inputs (s_out); the IN gradient is projected so
    # it never opposes the local one (edge_runtime/train/reconcile.py), then added with this weight (lambda).
    # 0 = no IN training.
    in_weight: float = 0.0
    in_batch_size: int = 32           # shared rows per IN step (one IN step per optimizer step)
    # rows of (s_in, s_out, labels) of this device's data, through the trained weights, put into the update for
    # other devices' IN training; 0 = share nothing
    share_rows: int = 0
    # Gaussian noise on the shared s_in and s_out: std = share_noise x that tensor's own std over the shared rows
    share_noise: float = 0.0
    # the origin (in the shared-feature file) of this device's own rows: not used for its IN training; -1 = none
    in_origin: int = -1

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
                if abs(value) > _MAX_FLOAT_INT:
                    raise EdgeRuntimeError(f"training setting {name} must be a float, not an integer beyond "
                                           f"±{sys.float_info.max:.4g} (too large for a float)")
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
        if cfg.momentum < 0 or cfg.weight_decay < 0 or cfg.adam_eps <= 0 or (cfg.nesterov and cfg.momentum <= 0):
            raise EdgeRuntimeError("momentum and weight_decay must not be negative, adam_eps must be positive, and "
                                   "nesterov needs a momentum")
        if not 0 <= cfg.holdout <= MAX_HOLDOUT:
            raise EdgeRuntimeError(f"holdout must be in [0, {MAX_HOLDOUT}] (a fraction of the local rows), "
                                   f"not {cfg.holdout}")
        if cfg.in_weight < 0 or cfg.in_batch_size < 1 or cfg.share_noise < 0:
            raise EdgeRuntimeError(f"in_weight and share_noise must not be negative and in_batch_size must be at "
                                   f"least 1 (got {cfg.in_weight}, {cfg.share_noise}, {cfg.in_batch_size})")
        if not 0 <= cfg.share_rows <= MAX_SHARE_ROWS:
            raise EdgeRuntimeError(f"share_rows must be in [0, {MAX_SHARE_ROWS}], not {cfg.share_rows}")
        if not (cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate)) or cfg.epochs <= 0:
            raise EdgeRuntimeError(f"learning_rate and epochs must be positive (got {cfg.learning_rate}, {cfg.epochs})")
        cfg.micro()
        return cfg

    def micro(self) -> int:
        m = self.micro_batch_size or self.batch_size
        if m < 1 or self.batch_size < 1:
            raise EdgeRuntimeError("batch_size and micro_batch_size must be at least 1")
        return min(m, self.batch_size)


    def optimizer_settings(self) -> dict:
        """The optimizer's own settings (edge_runtime/train/optimizers.make_optimizer)."""
        if self.optimizer == "sgd":
            return {"lr": self.learning_rate, "momentum": self.momentum, "nesterov": self.nesterov,
                    "weight_decay": self.weight_decay}
        return {"lr": self.learning_rate, "eps": self.adam_eps, "weight_decay": self.weight_decay}

    def to_dict(self) -> dict:
        """The JSON form a task and a job spec carry."""
        return asdict(self)


MAX_HOLDOUT = 0.9                  # leave something to train on
MAX_SHARE_ROWS = 256               # shared features per update: a few MB for a 32x14x14 s_in, not the dataset
_NONE = type(None)
_MAX_FLOAT_INT = int(sys.float_info.max)   # the largest float, as an integer: a larger one is no float setting
_KINDS: dict[str, tuple[type, ...]] = {
    "optimizer": (str,), "learning_rate": (float,), "weight_decay": (float,), "momentum": (float,),
    "nesterov": (bool,), "adam_eps": (float,), "batch_size": (int,),
    "micro_batch_size": (int, _NONE), "epochs": (float,), "max_steps": (int, _NONE), "seed": (int,),
    "checkpoint_every_steps": (int,), "checkpoint": (str,), "cache_fp16": (bool,), "threads": (int,),
    "holdout": (float,), "in_weight": (float,), "in_batch_size": (int,), "share_rows": (int,),
    "share_noise": (float,), "in_origin": (int,),
}
