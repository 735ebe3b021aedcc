"""The baseline the device runtime is compared with: the same model trained end to end in torch."""
from __future__ import annotations

import numpy as np
import torch

from coordinator.model.block_model import BlockModel


def train_end_to_end(model: BlockModel, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray,
                     epochs: float, batch_size: int, learning_rate: float, seed: int = 0) -> float:
    """Train every layer with AdamW and the final head; return test accuracy."""
    torch.manual_seed(seed)
    trained = [p for n, p in model.named_parameters()
               if n.startswith("blocks.") or n.startswith(f"heads.{len(model.heads) - 1}.")]
    opt = torch.optim.AdamW(trained,
                            lr=learning_rate, eps=1e-6, weight_decay=0.0)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    n = len(ys)
    steps = int(np.ceil(n / batch_size) * epochs)
    rng = np.random.default_rng(seed)
    perm, k = rng.permutation(n), 0
    model.train()
    for _ in range(steps):
        if k * batch_size >= n:
            perm, k = rng.permutation(n), 0
        idx = torch.from_numpy(perm[k * batch_size:(k + 1) * batch_size])
        k += 1
        loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return accuracy(model, xt, yt)


def accuracy(model: BlockModel, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the whole model (final head) in eval mode."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(np.ascontiguousarray(x[i:i + 1000]))).argmax(1)
                          for i in range(0, len(y), 1000)])
    return float((pred.numpy() == y).mean())
