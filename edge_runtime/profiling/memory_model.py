"""The memory model: peak RSS of training a span of layers, fitted from measurements.

Two fits, both plain least squares over measured peaks (never parameter counts alone):

- per candidate (a span that was measured at several batch sizes):
      peak = baseline + fixed + per_sample x batch
- per model (every measurement of every candidate), so that any span can be predicted
  from what the manifest says about it, its trainable parameter bytes P and its
  activation bytes per sample A:
      peak = baseline + a x P + c + (k x A + d) x batch

A measured span is predicted by its own fit; any other span by the model fit.

A span may skip layers (`skip`): a model family's member (FedIN) trains the shared extractor, its own
layers and the classifier, and every other member's layers are replaced by identity. Skipped layers
cost neither parameters nor activations, and a measured (first, last, skip) has its own fit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Measurement:
    first: int                 # first layer of the trained span
    last: int                  # last layer (inclusive); the head attaches after it
    head: int
    batch_size: int
    peak_bytes: int            # the training process's own VmHWM
    step_seconds: float
    param_bytes: int           # trainable parameter bytes (span less skipped layers, + head)
    activation_bytes_per_sample: int  # span layers less skipped ones, + head, from the manifest
    skip: tuple[int, ...] = ()  # span layers replaced by identity (a family member's part); () for a plain span

    def __post_init__(self):
        object.__setattr__(self, "skip", _layer_tuple(self.skip))   # a profile file's JSON list


@dataclass(frozen=True)
class CandidateFit:
    first: int
    last: int
    fixed_bytes: float
    per_sample_bytes: float
    max_rel_error: float       # largest |predicted - measured| / measured over the fitted points
    skip: tuple[int, ...] = ()  # as the measurements it was fitted to

    def __post_init__(self):
        object.__setattr__(self, "skip", _layer_tuple(self.skip))

    @property
    def key(self) -> tuple[int, int, tuple[int, ...]]:
        return self.first, self.last, self.skip

    def predict(self, baseline_bytes: int, batch_size: int) -> float:
        return baseline_bytes + self.fixed_bytes + self.per_sample_bytes * batch_size


@dataclass(frozen=True)
class SpanModel:
    baseline_bytes: int
    per_param_byte: float      # a
    fixed_bytes: float         # c
    per_activation_byte: float  # k
    per_sample_bytes: float    # d
    max_rel_error: float

    def predict(self, param_bytes: int, activation_bytes_per_sample: int, batch_size: int) -> float:
        return (self.baseline_bytes + self.per_param_byte * param_bytes + self.fixed_bytes
                + (self.per_activation_byte * activation_bytes_per_sample + self.per_sample_bytes) * batch_size)


def _rel_errors(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    return np.abs(pred - actual) / actual


def fit_candidate(points: list[Measurement], baseline_bytes: int) -> CandidateFit:
    """Least-squares line through one span's peaks against batch size (needs two batch sizes)."""
    first = points[0]
    if any((p.first, p.last, p.skip) != (first.first, first.last, first.skip) for p in points):
        raise ValueError("fit_candidate fits the measurements of one span (first, last, skip) at a time")
    batches = np.array([p.batch_size for p in points], dtype=np.float64)
    if len(set(batches)) < 2:
        raise ValueError(f"span {first.first}-{first.last}{_skip_text(first.skip)} needs measurements at two "
                         f"batch sizes to fit")
    peaks = np.array([p.peak_bytes for p in points], dtype=np.float64)
    per_sample, intercept = np.polyfit(batches, peaks - baseline_bytes, 1)
    fit = CandidateFit(first.first, first.last, float(intercept), float(per_sample), 0.0, first.skip)
    err = _rel_errors(np.array([fit.predict(baseline_bytes, b) for b in batches]), peaks)
    return replace(fit, max_rel_error=float(err.max()))


def fit_span_model(points: list[Measurement], baseline_bytes: int) -> SpanModel:
    """Least squares of (peak - baseline) on [P, 1, A x batch, batch] over every measurement."""
    if len(points) < 4:
        raise ValueError("the span model needs at least four measurements")
    X = np.array([[p.param_bytes, 1.0, p.activation_bytes_per_sample * p.batch_size, p.batch_size]
                  for p in points], dtype=np.float64)
    y = np.array([p.peak_bytes - baseline_bytes for p in points], dtype=np.float64)
    scale = np.abs(X).max(axis=0)
    scale[scale == 0] = 1.0
    coef, *_ = np.linalg.lstsq(X / scale, y, rcond=None)
    a, c, k, d = (coef / scale).tolist()
    model = SpanModel(baseline_bytes, a, c, k, d, 0.0)
    pred = np.array([model.predict(p.param_bytes, p.activation_bytes_per_sample, p.batch_size) for p in points])
    err = _rel_errors(pred, np.array([p.peak_bytes for p in points], dtype=np.float64))
    return SpanModel(baseline_bytes, a, c, k, d, float(err.max()))


class Predictor:
    """Peak of any span at any batch: its own fit where it was measured, the span model elsewhere."""

    def __init__(self, manifest, baseline_bytes: int, fits: list[CandidateFit], span_model: SpanModel):
        self.manifest = manifest
        self.baseline_bytes = baseline_bytes
        self.fits = {f.key: f for f in fits}
        self.span_model = span_model

    @classmethod
    def from_profile(cls, manifest, profile) -> "Predictor":
        """The predictor a saved profile (edgeblock-profile/1) describes, for the coordinator's schedules."""
        return cls(manifest, profile.baseline_bytes, [CandidateFit(**f) for f in profile.fits],
                   SpanModel(**profile.span_model))

    def features(self, first: int, last: int, skip=()) -> tuple[int, int]:
        return span_features(self.manifest, first, last, skip)

    def predict(self, first: int, last: int, batch_size: int, skip=()) -> float:
        """Peak bytes of training layers first..last, less the layers in `skip`, with the head after last."""
        skip = _layer_tuple(skip)
        fit = self.fits.get((first, last, skip))
        if fit is not None:
            return fit.predict(self.baseline_bytes, batch_size)
        p, a = self.features(first, last, skip)
        return self.span_model.predict(p, a, batch_size)

    def max_rel_error(self) -> float:
        return max([self.span_model.max_rel_error] + [f.max_rel_error for f in self.fits.values()])


def span_features(manifest, first: int, last: int, skip=()) -> tuple[int, int]:
    """(trainable parameter bytes, activation bytes per sample) of layers first..last less `skip`, plus their head.

    A skipped layer runs as identity: it holds no parameters and no activations. The layers that remain train
    (less any of the model's frozen prefix, which never does), so a family member's part counts the extractor,
    the member's own layers and the classifier, as TrainablePart.member trains them."""
    skipped = set(skip)
    head = manifest.heads[manifest.head_for_boundary(last)]
    layers = [manifest.layers[i] for i in range(first, last + 1) if i not in skipped]
    params = sum(l.param_bytes for l in layers if l.index >= manifest.frozen_prefix) + head.param_bytes
    acts = sum(l.activation_bytes_per_sample for l in layers) + head.activation_bytes_per_sample
    return params, acts


def to_dict(obj) -> dict:
    """A Measurement or CandidateFit as a profile file holds it: `skip` only when the span skips a layer, so a
    model without members keeps the file it always had."""
    d = asdict(obj)
    if "skip" in d:
        d["skip"] = list(d["skip"])
        if not d["skip"]:
            d.pop("skip")
    return d


def _layer_tuple(values) -> tuple[int, ...]:
    """Layer indices as a sorted tuple without repeats: equal sets are one key."""
    return tuple(sorted({int(i) for i in values}))


def _skip_text(skip: tuple[int, ...]) -> str:
    return f" less layers {', '.join(map(str, skip))}" if skip else ""
