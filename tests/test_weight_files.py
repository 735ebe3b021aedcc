"""Lazy weight files hash exactly as the arrays they hold (edge_runtime/wire/weights.py)."""
import numpy as np
import pytest

from edge_runtime.wire import weights as wcodec

RNG = np.random.default_rng(3)
# one tensor spans several of weights_hash's 1 MiB reads and ends mid-read; a scalar; an empty tensor
TENSORS = {"big": RNG.standard_normal((wcodec._HASH_CHUNK * 2 + 17,)).astype(np.float32).reshape(-1, 1),
           "conv.weight": RNG.standard_normal((8, 4, 3, 3)).astype(np.float32),
           "scale": np.array(0.5, np.float32), "empty": np.zeros((0, 3), np.float32)}


def test_a_lazy_file_hashes_like_its_arrays(tmp_path):
    wcodec.save(tmp_path / "w.safetensors", TENSORS)
    lazy = wcodec.WeightFile(tmp_path / "w.safetensors")
    assert wcodec.weights_hash(lazy) == wcodec.weights_hash(TENSORS)
    assert wcodec.weights_hash(lazy, ["scale", "big"]) == wcodec.weights_hash(TENSORS, ["big", "scale"])
    changed = dict(TENSORS, big=TENSORS["big"].copy())
    changed["big"][-1] += 1.0    # the last element, read in the last, short chunk
    assert wcodec.weights_hash(changed) != wcodec.weights_hash(lazy)


def test_per_layer_files_and_fp16_hash_as_their_float32_values(tmp_path):
    wcodec.save(tmp_path / "a.safetensors", {"big": TENSORS["big"], "scale": TENSORS["scale"]})
    wcodec.save(tmp_path / "b.safetensors", {"conv.weight": TENSORS["conv.weight"].astype(np.float16)})
    files = wcodec.open_weights([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    expected = {"big": TENSORS["big"], "scale": TENSORS["scale"],
                "conv.weight": TENSORS["conv.weight"].astype(np.float16).astype(np.float32)}
    assert wcodec.weights_hash(files) == wcodec.weights_hash(expected)


def test_a_missing_name_is_a_key_error(tmp_path):
    wcodec.save(tmp_path / "w.safetensors", {"scale": TENSORS["scale"]})
    with pytest.raises(KeyError):
        wcodec.weights_hash(wcodec.WeightFile(tmp_path / "w.safetensors"), ["scale", "absent"])
