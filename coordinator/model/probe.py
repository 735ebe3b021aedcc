"""The linear probe: how a self-supervised model is judged, as SimCLR and its successors judge it.

A model trained without labels (Manifest.contrastive) has no classifier to test. Its
representation, the output of its layers up to the one a round trained, averaged over the
spatial axes, is fed to a multinomial logistic regression fitted on labeled data the
coordinator holds and no device has ([service] validation_data); the probe's accuracy on
the test set is the round's accuracy. Fitting sees only the fitting set's labels: the
test labels are read after the probe is fixed, to score it.

The regression is L2-regularised on standardised features, so it has one optimum, found by
L-BFGS in numpy (no solver library on the coordinator), on one BLAS thread: its products are
small (rows x 64 x 10), and BLAS threads competing with a busy machine's cores made a fit
20 times slower (0.7 s against 15 s, measured beside a running fleet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from coordinator.model.graphs import GraphLibrary, forward_graph
from edge_runtime.wire.manifest import Manifest

L2 = 1e-3          # the regulariser of the probe's weights (mean loss + L2/2 |W|^2): small, only to make it unique
ITERATIONS = 500   # L-BFGS iterations at most; it stops once the gradient is negligible
TOLERANCE = 1e-6   # ... the gradient's largest entry under this


def representation(manifest: Manifest, weights: Mapping[str, np.ndarray], inputs: np.ndarray, upto_layer: int,
                   skip: Sequence[int] = (), batch_size: int = 500, threads: int = 0) -> np.ndarray:
    """The output of layers 0..upto_layer (less `skip`) for every input, averaged over its spatial axes: N x C."""
    from edge_runtime.train.ort_backend import ForwardSession
    graph = forward_graph(GraphLibrary(manifest), range(upto_layer + 1), None,
                          skip=tuple(i for i in skip if i <= upto_layer))
    session = ForwardSession(graph.SerializeToString(), threads=threads)
    params = {n: np.ascontiguousarray(weights[n], dtype=np.float32) for n in session.param_names}
    out = []
    for start in range(0, len(inputs), batch_size):
        h = session.run(np.ascontiguousarray(inputs[start:start + batch_size], dtype=np.float32), params)
        out.append(h.reshape(len(h), h.shape[1], -1).mean(axis=2) if h.ndim > 2 else h)
    return np.concatenate(out).astype(np.float32)


@dataclass(frozen=True)
class LinearProbe:
    """A fitted multinomial logistic regression on standardised features."""
    mean: np.ndarray      # C: the fitting features' mean and std (standardisation is part of the probe)
    std: np.ndarray
    weight: np.ndarray    # C x K
    bias: np.ndarray      # K

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, classes: int, l2: float = L2) -> "LinearProbe":
        """The regression minimising mean cross-entropy + l2/2 |W|^2 on these rows (and only these)."""
        x = np.asarray(features, np.float64)
        mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
        x = (x - mean) / std
        y = np.asarray(labels, np.int64)
        onehot = np.eye(classes)[y]
        c = x.shape[1]

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = theta[:c * classes].reshape(c, classes), theta[c * classes:]
            logits = x @ w + b
            logits -= logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            p = np.exp(logp)
            loss = -(onehot * logp).sum() / len(y) + 0.5 * l2 * (w * w).sum()
            d = (p - onehot) / len(y)
            return loss, np.concatenate([(x.T @ d + l2 * w).ravel(), d.sum(axis=0)])

        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=1, user_api="blas"):
            theta = _lbfgs(loss_grad, np.zeros(c * classes + classes))
        return cls(mean.astype(np.float32), std.astype(np.float32),
                   theta[:c * classes].reshape(c, classes).astype(np.float32), theta[c * classes:].astype(np.float32))

    def logits(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, np.float32) - self.mean) / self.std) @ self.weight + self.bias

    def score(self, features: np.ndarray, labels: np.ndarray) -> dict:
        """Accuracy and mean cross-entropy on labeled rows the probe was not fitted on."""
        z = self.logits(features).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        y = np.asarray(labels, np.int64)
        return {"accuracy": float((z.argmax(axis=1) == y).mean()), "loss": float(-logp[np.arange(len(y)), y].mean()),
                "samples": int(len(y))}


def probe(manifest: Manifest, weights: Mapping[str, np.ndarray], fit_on: tuple[np.ndarray, np.ndarray],
          test_on: tuple[np.ndarray, np.ndarray], upto_layer: int, skip: Sequence[int] = (), threads: int = 0) -> dict:
    """The linear probe's accuracy and loss on `test_on` of the representation after `upto_layer`, fitted on
    `fit_on` (inputs, labels); the test labels are read only to score."""
    fit_x, fit_y = fit_on
    probe_ = LinearProbe.fit(representation(manifest, weights, fit_x, upto_layer, skip, threads=threads), fit_y,
                             manifest.num_classes)
    test_x, test_y = test_on
    return probe_.score(representation(manifest, weights, test_x, upto_layer, skip, threads=threads), test_y)


def _lbfgs(loss_grad, theta: np.ndarray, memory: int = 10) -> np.ndarray:
    """Minimise a smooth convex function from `theta`: L-BFGS (two-loop recursion) with a backtracking line search."""
    loss, grad = loss_grad(theta)
    steps: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(ITERATIONS):
        if np.abs(grad).max() < TOLERANCE:
            break
        q, alphas = grad.copy(), []
        for s, y, rho in reversed(steps):
            a = rho * (s @ q)
            alphas.append(a)
            q -= a * y
        if steps:
            s, y, _ = steps[-1]
            q *= (s @ y) / (y @ y)
        for (s, y, rho), a in zip(steps, reversed(alphas)):
            q += s * (a - rho * (y @ q))
        direction = -q
        slope = grad @ direction
        if slope >= 0:              # not a descent direction (lost curvature): restart from the gradient
            steps, direction, slope = [], -grad, -(grad @ grad)
        t = 1.0 if steps else min(1.0, 1.0 / np.abs(grad).sum())
        while True:
            new_loss, new_grad = loss_grad(theta + t * direction)
            if new_loss <= loss + 1e-4 * t * slope or t < 1e-12:
                break
            t *= 0.5
        s, y = t * direction, new_grad - grad
        theta, loss, grad = theta + s, new_loss, new_grad
        if s @ y > 1e-12:
            steps = (steps + [(s, y, 1.0 / (s @ y))])[-memory:]
    return theta
