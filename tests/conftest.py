"""Shared fixtures: real exports of zoo models and real Fashion-MNIST, built once per session."""
from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.train.datasets import LocalDataset, load_fashion_mnist


@pytest.fixture(scope="session")
def fmnist():
    """(train_x, train_y, test_x, test_y) of the real Fashion-MNIST."""
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    return x, y, xt, yt


@pytest.fixture(scope="session")
def fmnist_model(tmp_path_factory):
    """The zoo's Fashion-MNIST CNN exported once: (manifest, initial weights)."""
    from coordinator.model import export, zoo
    m = export.export(zoo.fmnist_cnn(), tmp_path_factory.mktemp("fmnist_cnn"))
    return m, export.load_weights(m)


@pytest.fixture(scope="session")
def small_dataset(fmnist, tmp_path_factory) -> LocalDataset:
    """2,000 real training images as a device's local dataset."""
    x, y, _, _ = fmnist
    rng = np.random.default_rng(1)
    idx = rng.choice(len(y), 2000, replace=False)
    return LocalDataset.write(tmp_path_factory.mktemp("local2k"), x[idx], y[idx])
