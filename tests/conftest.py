"""Shared fixtures: real exports of zoo models and real Fashion-MNIST, built once per session."""
from __future__ import annotations

import numpy as np
import pytest
from postgres_helpers import postgres_server, postgres_url  # noqa: F401  (a real PostgreSQL for tests that ask)

from edge_runtime.train.datasets import LocalDataset, load_fashion_mnist


@pytest.fixture(scope="session")
def fmnist():
    """(train_x, train_y, test_x, test_y) of the real Fashion-MNIST."""
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    return x, y, xt, yt


@pytest.fixture(scope="session")
def fmnist_model(tmp_path_factory):
    """The zoo's Fashion-MNIST CNN exported once: (manifest, initial weights), with the step graphs of every
    block and every run of neighbouring blocks built (a test of another part builds its own: build_graphs)."""
    from coordinator.model import export, zoo
    from edge_runtime.wire.part import TrainablePart
    m = export.export(zoo.fmnist_cnn(), tmp_path_factory.mktemp("fmnist_cnn"))
    n = len(m.blocks)
    build_graphs(m, *[TrainablePart.blocks(m, a, b) for a in range(n) for b in range(a, n)])
    return m, export.load_weights(m)


def build_graphs(manifest, *parts) -> None:
    """What the coordinator does before it sends a task: build the parts' step and prefix graphs."""
    from coordinator.model.part_graphs import ensure_part_graphs
    ensure_part_graphs(manifest, parts)


@pytest.fixture(scope="session")
def small_dataset(fmnist, tmp_path_factory) -> LocalDataset:
    """2,000 real training images as a device's local dataset."""
    x, y, _, _ = fmnist
    rng = np.random.default_rng(1)
    idx = rng.choice(len(y), 2000, replace=False)
    return LocalDataset.write(tmp_path_factory.mktemp("local2k"), x[idx], y[idx])
