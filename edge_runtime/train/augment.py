"""Random views of a device's images for the contrastive (NT-Xent) objective.

Two augmented views of every image differ from one another at every step, so they cannot reuse
a cached prefix activation: the device runs the frozen layers on each augmented batch instead.
Everything here is numpy, a batch at a time, so the device never imports torch and the views
cost a few batch-sized arrays; a seeded generator (view_rng) makes the views reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AugmentSettings:
    """How strong each transform is; 0 (or False-like) turns a transform off.

    crop_pad: pad each side by this many pixels with `fill`, then crop back to H x W at a random
        offset per image (a shift of up to crop_pad pixels in each direction).
    fill: the value of the padding; None uses each image's minimum, i.e. its background.
    flip: probability of a horizontal flip, per image.
    brightness: add U(-brightness, brightness) x the image's std to every pixel, per image.
    contrast: scale each pixel's deviation from the image mean by U(1 - contrast, 1 + contrast).
    noise: std of the Gaussian noise added to every pixel, in normalised units.
    """
    crop_pad: int = 3
    fill: float | None = None
    flip: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    noise: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.crop_pad, bool) or not isinstance(self.crop_pad, (int, np.integer)) or self.crop_pad < 0:
            raise ValueError(f"crop_pad must be an integer >= 0, not {self.crop_pad!r}")
        if self.fill is not None and not math.isfinite(self.fill):
            raise ValueError(f"fill must be a finite number or None, not {self.fill!r}")
        if not 0 <= self.flip <= 1:
            raise ValueError(f"flip is a probability and must be in [0, 1], not {self.flip!r}")
        if not (math.isfinite(self.brightness) and self.brightness >= 0):
            raise ValueError(f"brightness must be a finite number >= 0, not {self.brightness!r}")
        if not 0 <= self.contrast < 1:
            raise ValueError(f"contrast must be in [0, 1) so the scale 1 - contrast stays positive, "
                             f"not {self.contrast!r}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"noise must be a finite number >= 0, not {self.noise!r}")


DEFAULT_SETTINGS = AugmentSettings()


def _views(images: np.ndarray, rng: np.random.Generator, settings: AugmentSettings, copies: int) -> np.ndarray:
    """`copies` independent views of the batch, stacked copy after copy: row k*B + i is a view of image i.

    The crop and the flip are one gather from the input (no padded copy, no concatenated input), and the
    remaining transforms work in place on that output, so the peak is about one output plus the noise.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be shaped (B, C, H, W), not {images.shape}")
    src = images if images.dtype == np.float32 else images.astype(np.float32)
    b, c, h, w = src.shape
    n = b * copies
    if n == 0:
        return np.empty((n, c, h, w), np.float32)
    source = np.tile(np.arange(b, dtype=np.intp), copies)            # which image each output row views

    p = settings.crop_pad
    rows = np.broadcast_to(np.arange(h, dtype=np.intp), (n, h))
    cols = np.broadcast_to(np.arange(w, dtype=np.intp), (n, w))
    if p > 0:
        rows = rows + rng.integers(-p, p + 1, size=(n, 1))           # output row i shows input row i + dy
        cols = cols + rng.integers(-p, p + 1, size=(n, 1))
    if settings.flip > 0:
        flipped = rng.random(n) < settings.flip
        cols = np.where(flipped[:, None], cols[:, ::-1], cols)        # flip after the crop: read columns backwards
    out = src[source[:, None, None, None], np.arange(c, dtype=np.intp)[None, :, None, None],
              np.clip(rows, 0, h - 1)[:, None, :, None], np.clip(cols, 0, w - 1)[:, None, None, :]]
    if p > 0:
        outside = ~(((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :])
        if settings.fill is None:
            fill = src.min(axis=(1, 2, 3))[source]
        else:
            fill = np.full(n, settings.fill, np.float32)
        np.copyto(out, fill[:, None, None, None], where=outside)

    if settings.contrast > 0 or settings.brightness > 0:
        mean = out.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float32)
        std = out.std(axis=(1, 2, 3), keepdims=True, dtype=np.float32)   # before contrast: brightness is independent of it
        if settings.contrast > 0:
            c_ = settings.contrast
            scale = rng.uniform(1 - c_, 1 + c_, size=(n, 1, 1, 1)).astype(np.float32)
            out -= mean
            out *= scale
            out += mean
        if settings.brightness > 0:
            shift = rng.uniform(-settings.brightness, settings.brightness, size=(n, 1, 1, 1)).astype(np.float32)
            out += shift * std
    if settings.noise > 0:
        noise = rng.standard_normal(out.shape, dtype=np.float32)
        noise *= np.float32(settings.noise)
        out += noise
    return out


def augment(images: np.ndarray, rng: np.random.Generator,
            settings: AugmentSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """One random view of every image of a (B, C, H, W) batch: crop, flip, contrast, brightness, noise.

    Returns a new float32 array of the same shape; the input is only read (it may be read-only).
    """
    return _views(images, rng, settings, copies=1)


def two_views(images: np.ndarray, rng: np.random.Generator,
              settings: AugmentSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """(2B, C, H, W): rows 0..B-1 a first view of images 0..B-1, rows B..2B-1 a second, independent view.

    This is the layout positive_pairs() describes, so the 2B rows go through the layer as one batch.
    """
    return _views(images, rng, settings, copies=2)


def positive_pairs(batch: int) -> np.ndarray:
    """Row of each row's other view in a two_views batch: [B, ..., 2B-1, 0, ..., B-1].

    These are the targets of NT-Xent written as a cross entropy over the 2B x 2B similarity logits.
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, not {batch}")
    return (np.arange(2 * batch, dtype=np.int64) + batch) % max(2 * batch, 1)


def view_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of one training step's views: the same task seed and step give the same views, so a job
    resumed from a checkpoint sees what it would have seen, and every step (and every task: the coordinator gives
    each its own seed) sees fresh ones."""
    return np.random.default_rng([seed, step])
