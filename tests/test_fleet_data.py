"""The simulated fleet's data: held-out pretraining pool, non-IID split and the domain shift."""
import numpy as np
import pytest

from coordinator.local.data import dirichlet_split, shift_exposure, split_pool
from edge_runtime.train.datasets import FMNIST_MEAN, FMNIST_STD, load_fashion_mnist


def test_the_held_out_pool_never_overlaps_the_fleets_data():
    pool, held = split_pool(50000, 10000, seed=3)
    assert len(pool) == 50000 and len(held) == 10000
    assert len(np.intersect1d(pool, held)) == 0 and len(np.unique(held)) == 10000
    again, _ = split_pool(50000, 0, seed=3)
    assert np.array_equal(pool, again)                 # holding data out does not change the fleet's draw
    with pytest.raises(ValueError, match="exceed"):
        split_pool(55000, 6000)


def test_the_exposure_shift_washes_images_out_and_keeps_them_in_range():
    x, _ = load_fashion_mnist("test")
    x = x[:500]
    s = shift_exposure(x, contrast=0.5, brightness=0.35)
    raw, raw_s = x * FMNIST_STD + FMNIST_MEAN, s * FMNIST_STD + FMNIST_MEAN
    assert s.dtype == np.float32 and s.shape == x.shape
    assert raw_s.min() >= 0.35 - 1e-5 and raw_s.max() <= 0.85 + 1e-5       # brighter, half the range
    assert raw_s.std() == pytest.approx(0.5 * raw.std(), rel=1e-3)
    assert np.allclose(raw_s, 0.5 * raw + 0.35, atol=1e-5)


def test_every_device_gets_data_and_every_sample_goes_somewhere_once():
    _, y = load_fashion_mnist("test")
    parts = dirichlet_split(y[:4000], 5, alpha=0.5, seed=1)
    joined = np.concatenate(parts)
    assert min(len(p) for p in parts) >= 64 and np.array_equal(np.sort(joined), np.arange(4000))
