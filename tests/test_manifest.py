"""The block manifest: what export writes, and the clear rejections of what is wrong with one."""
import json

import pytest

from edge_runtime.errors import ManifestError
from edge_runtime.wire.manifest import Manifest


def _raw(m):
    return json.loads(m.to_json())


def test_export_describes_blocks_layers_and_costs(fmnist_model):
    m, weights = fmnist_model
    assert len(m.blocks) >= 4
    assert [i for b in m.blocks for i in b.layers] == list(range(len(m.layers)))
    for b in m.blocks:  # shapes chain across every block boundary, heads sit at block ends
        assert m.heads[b.head].attach_after_layer == b.layers[-1]
    for a, b in zip(m.layers, m.layers[1:]):
        assert a.output_shape == b.input_shape
    # parameter bytes and shapes in the manifest are those of the exported weights
    for name, spec in m.param_specs().items():
        assert weights[name].shape == spec.shape
        assert weights[name].nbytes == spec.nbytes
    assert all(l.activation_bytes_per_sample > 0 for l in m.layers)
    # conv output (32x28x28 floats) is at least part of layer 0's activation bytes
    assert m.layers[0].activation_bytes_per_sample >= 32 * 28 * 28 * 4


def test_round_trip(fmnist_model, tmp_path):
    m, _ = fmnist_model
    path = tmp_path / "manifest.json"
    m.save(path)
    again = Manifest.load(path)
    assert again.layers == m.layers and again.blocks == m.blocks and again.heads == m.heads


@pytest.mark.parametrize("breakage, message", [
    (lambda r: r.update(format="other/9"), "format"),
    (lambda r: r["layers"][1].update(input_shape=[3, 3]), "expects"),
    (lambda r: r["blocks"][1].update(layers=[1, 3]), "contiguous"),
    (lambda r: r["blocks"][0].update(head=99), "head 99"),
    (lambda r: r["layers"][0]["params"][0].update(name=r["layers"][1]["params"][0]["name"]), "not unique"),
    (lambda r: r["layers"][0]["graph"].update(file="../../etc/passwd"), "bad graph reference"),
    (lambda r: r["layers"][0].pop("params"), "malformed"),
])
def test_malformed_manifest_is_rejected_with_reason(fmnist_model, tmp_path, breakage, message):
    m, _ = fmnist_model
    raw = _raw(m)
    breakage(raw)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=message):
        Manifest.load(path)


def test_not_json_is_rejected(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path / "manifest.json")


@pytest.mark.parametrize("name, blocks, params_m", [("vgg_cifar", 5, (9.0, 10.0)), ("resnet_small", 4, (0.2, 0.4)),
                                                    ("resnet18_cifar", 4, (11.0, 11.4)),
                                                    ("resnet34_cifar", 4, (21.1, 21.5)), ("vit_cifar", 4, (21.3, 21.5))])
def test_zoo_models_export_with_their_structure(tmp_path, name, blocks, params_m):
    from coordinator.model import export, zoo
    m = export.export(zoo.build(name), tmp_path)
    assert len(m.blocks) == blocks
    n = sum(spec.nbytes for spec in m.param_specs().values()) / 4 / 1e6
    assert params_m[0] <= n <= params_m[1]
    if name == "resnet_small":  # residual layers keep their shape and may be skipped (depth dropout)
        skippable = [l for l in m.layers if l.skippable]
        assert len(skippable) >= 4 and all(l.input_shape == l.output_shape for l in skippable)
        assert not m.layers[0].skippable
    if name == "resnet18_cifar":  # the basic blocks that keep their shape; a projection shortcut is no identity
        assert [l.index for l in m.layers if l.skippable] == [1, 2, 4, 6, 8]
        assert [l.output_shape for l in m.layers[2::2]] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    if name == "resnet34_cifar":  # stages of 3, 4, 6 and 3 basic blocks, each but the first opening with a projection
        assert [len(b.layers) for b in m.blocks] == [4, 4, 6, 3]
        assert [l.index for l in m.layers if not l.skippable] == [0, 4, 8, 14]
    if name == "vit_cifar":  # the patch embedding, then 12 encoder layers on 64 tokens of 384
        assert [len(b.layers) for b in m.blocks] == [4, 3, 3, 3]
        assert all(l.output_shape == (64, 384) for l in m.layers)
        assert len({l.param_bytes for l in m.layers[1:]}) == 1     # its layers are alike


@pytest.mark.parametrize("name, prefix, batch", [("resnet18_cifar", 4, 3), ("vit_cifar", 3, 2)])
def test_an_exported_zoo_graph_computes_what_torch_does(tmp_path, name, prefix, batch):
    """Exported, the whole model and a part ending inside a block (its boundary head) give torch's logits (eval
    mode). resnet18_cifar: projection shortcuts and BatchNorm's running statistics (its first `prefix` layers:
    the stem, two blocks, the first projection). vit_cifar: multi-head attention, LayerNorm, GELU, the learned
    positions and the token-mean head (the patch embedding and two encoder layers)."""
    import numpy as np
    import torch

    from coordinator.model import export, zoo
    from coordinator.model.graphs import GraphLibrary, forward_graph
    from edge_runtime.train.ort_backend import ForwardSession
    model = zoo.build(name).eval()
    m = export.export(model, tmp_path)
    w, lib = export.load_weights(m), GraphLibrary(m)
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        whole = model(torch.from_numpy(x)).numpy()
        features = torch.from_numpy(x)
        for layer in [l for b in model.blocks for l in b][:prefix]:
            features = layer(features)
        part = model.boundary_heads[str(prefix - 1)](features).numpy()
    ours = ForwardSession(forward_graph(lib, range(len(m.layers)), m.final_head.index).SerializeToString()).run(x, w)
    np.testing.assert_allclose(ours, whole, rtol=1e-4, atol=1e-4)
    ours = ForwardSession(forward_graph(lib, range(prefix), m.head_for_boundary(prefix - 1)).SerializeToString()).run(x, w)
    np.testing.assert_allclose(ours, part, rtol=1e-4, atol=1e-4)


def test_skipping_a_residual_layer_is_identity_and_non_residual_is_refused(tmp_path):
    import numpy as np

    from coordinator.model import export, zoo
    from coordinator.model.graphs import GraphLibrary, compose, forward_graph
    from edge_runtime.train.ort_backend import ForwardSession
    m = export.export(zoo.resnet_small(), tmp_path)
    w, lib = export.load_weights(m), GraphLibrary(m)
    x = np.random.default_rng(0).standard_normal((4,) + tuple(m.layers[1].input_shape)).astype(np.float32)

    def run(layers, skip=()):
        return ForwardSession(forward_graph(lib, layers, None, skip=skip).SerializeToString()).run(x, w)
    skipped, only_second, both = run([1, 2], skip=[1]), run([2]), run([1, 2])
    np.testing.assert_allclose(skipped, only_second, atol=1e-6)
    assert not np.allclose(skipped, both)
    with pytest.raises(ManifestError, match="cannot be skipped"):
        compose(lib, [0, 1], None, w, skip=[0])
