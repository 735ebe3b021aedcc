"""The device's numpy augmentations (edge_runtime/train/augment.py) on real Fashion-MNIST images:
determinism, the two-view layout NT-Xent relies on, each transform on its own, and no torch import."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edge_runtime.train.augment import AugmentSettings, augment, positive_pairs, two_views, view_rng
from edge_runtime.train.datasets import load_fashion_mnist

OFF = dict(crop_pad=0, flip=0.0, brightness=0.0, contrast=0.0, noise=0.0)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    x, _ = load_fashion_mnist("test")
    batch = np.ascontiguousarray(x[:64])
    assert batch.shape == (64, 1, 28, 28) and batch.dtype == np.float32
    return batch


def only(**kw) -> AugmentSettings:
    return AugmentSettings(**{**OFF, **kw})


def shifted(img: np.ndarray, dy: int, dx: int, fill: float) -> np.ndarray:
    """out[..., i, j] = img[..., i + dy, j + dx], `fill` where that falls outside the image."""
    h, w = img.shape[-2:]
    out = np.full_like(img, fill)
    out[..., max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)] = \
        img[..., max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)]
    return out


def find_shift(out: np.ndarray, img: np.ndarray, pad: int, fill: float) -> tuple[int, int] | None:
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            if np.array_equal(out, shifted(img, dy, dx, fill)):
                return dy, dx
    return None


# --- determinism -------------------------------------------------------------------------------

def test_same_seed_gives_bit_identical_views(images):
    a = two_views(images, view_rng(7, 3))
    b = two_views(images, view_rng(7, 3))
    assert np.array_equal(a, b)
    assert np.array_equal(augment(images, np.random.default_rng(5)), augment(images, np.random.default_rng(5)))


@pytest.mark.parametrize("other", [(8, 3), (7, 4)], ids=["seed", "step"])
def test_a_different_seed_or_step_gives_different_views(images, other):
    a = two_views(images, view_rng(7, 3))
    b = two_views(images, view_rng(*other))
    assert not np.array_equal(a, b)
    assert np.abs(a - b).mean() > 0.05          # not a rounding difference: different draws


# --- two_views ---------------------------------------------------------------------------------

def test_two_views_layout(images):
    before = images.copy()
    v = two_views(images, view_rng(0, 0))
    b = len(images)
    assert v.shape == (2 * b, 1, 28, 28) and v.dtype == np.float32
    assert np.isfinite(v).all()
    assert np.array_equal(images, before)                    # input untouched
    first, second = v[:b], v[b:]
    for i in range(b):
        assert not np.array_equal(first[i], second[i])
        assert not np.array_equal(first[i], images[i])
        assert not np.array_equal(second[i], images[i])


def test_two_views_with_everything_off_are_copies_in_order(images):
    v = two_views(images, np.random.default_rng(1), only())
    assert np.array_equal(v[:64], images) and np.array_equal(v[64:], images)
    assert not np.shares_memory(v, images)


def test_read_only_and_float64_input(images):
    ro = images.copy()
    ro.setflags(write=False)
    out = augment(ro, np.random.default_rng(2))
    assert out.dtype == np.float32 and out.shape == ro.shape
    out64 = augment(images.astype(np.float64), np.random.default_rng(2))
    assert out64.dtype == np.float32
    assert np.allclose(out, out64, atol=1e-5)


def test_other_shapes():
    rng = np.random.default_rng(3)
    for shape in [(5, 3, 32, 32), (2, 1, 7, 9), (0, 1, 28, 28)]:
        x = rng.standard_normal(shape).astype(np.float32)
        v = two_views(x, rng)
        assert v.shape == (2 * shape[0],) + shape[1:] and v.dtype == np.float32 and np.isfinite(v).all()
    with pytest.raises(ValueError, match="shaped"):
        augment(np.zeros((28, 28), np.float32), rng)


# --- each transform on its own -----------------------------------------------------------------

def test_flip_only(images):
    out = augment(images, np.random.default_rng(4), only(flip=1.0))
    assert np.array_equal(out, images[..., ::-1])
    assert np.array_equal(augment(images, np.random.default_rng(4), only(flip=0.0)), images)
    half = augment(images, np.random.default_rng(4), only(flip=0.5))
    n_flipped = sum(np.array_equal(half[i], images[i, ..., ::-1]) for i in range(64))
    assert 16 <= n_flipped <= 48


def test_crop_only_is_a_shift_filled_with_background(images):
    out = augment(images, np.random.default_rng(5), only(crop_pad=3))
    shifts = []
    for i in range(12):
        background = images[i].min()
        assert background == pytest.approx(-0.2860 / 0.3530)
        found = find_shift(out[i], images[i], 3, background)
        assert found is not None, f"image {i} is not a shift of its input by at most 3 pixels"
        shifts.append(found)
    assert len(set(shifts)) > 3                 # the offsets are random, not always the same


def test_crop_with_explicit_fill_multichannel():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 3, 10, 13)).astype(np.float32)
    out = augment(x, np.random.default_rng(7), only(crop_pad=2, fill=5.0))
    for i in range(6):
        assert find_shift(out[i], x[i], 2, 5.0) is not None
    assert (out == 5.0).any()                   # some border was filled


def test_crop_and_flip_together():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((8, 2, 9, 9)).astype(np.float32)
    out = augment(x, np.random.default_rng(9), only(crop_pad=2, flip=1.0, fill=0.0))
    for i in range(8):                          # crop first, then flip
        assert find_shift(out[i][..., ::-1], x[i], 2, 0.0) is not None


def test_noise_only(images):
    out = augment(images, np.random.default_rng(10), only(noise=0.1))
    d = (out - images).astype(np.float64)
    assert abs(d.std() - 0.1) < 0.01
    assert abs(d.mean()) < 0.005


def test_brightness_and_contrast_are_affine_per_image(images):
    b, c = 0.4, 0.4
    out = augment(images, np.random.default_rng(11), only(brightness=b, contrast=c))
    slopes, offsets = [], []
    for i in range(64):
        x = images[i].ravel().astype(np.float64)
        y = out[i].ravel().astype(np.float64)
        design = np.stack([x, np.ones_like(x)], axis=1)
        (a, off), *_ = np.linalg.lstsq(design, y, rcond=None)
        assert np.abs(design @ [a, off] - y).max() < 1e-4
        assert 1 - c - 1e-5 <= a <= 1 + c + 1e-5
        # what is left after contrast about the mean is the brightness shift: within b x std
        shift = off - x.mean() * (1 - a)
        assert abs(shift) <= b * x.std() + 1e-4
        slopes.append(a)
        offsets.append(shift)
    assert np.std(slopes) > 0.05 and np.std(offsets) > 0.05   # drawn per image, not once per batch


# --- positive pairs, settings, no torch --------------------------------------------------------

def test_positive_pairs():
    p = positive_pairs(4)
    assert p.dtype == np.int64
    assert p.tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert np.array_equal(p[p], np.arange(8))
    assert positive_pairs(0).shape == (0,)
    p64 = positive_pairs(64)
    assert np.array_equal(p64[p64], np.arange(128)) and (p64 != np.arange(128)).all()


@pytest.mark.parametrize("field, value", [
    ("crop_pad", -1), ("crop_pad", 1.5), ("flip", -0.1), ("flip", 1.5), ("brightness", -0.1),
    ("contrast", -0.1), ("contrast", 1.0), ("noise", -0.01), ("noise", float("nan")), ("fill", float("inf")),
])
def test_settings_refuse_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentSettings(**{field: value})


def test_settings_are_frozen():
    s = AugmentSettings()
    with pytest.raises(AttributeError):
        s.noise = 0.5                           # type: ignore[misc]


def test_module_does_not_import_torch():
    subprocess.run([sys.executable, "-c",
                    "import sys; import edge_runtime.train.augment; assert 'torch' not in sys.modules"],
                   check=True, cwd="/work/main")
