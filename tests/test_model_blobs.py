"""Per-layer weight blobs: only what changed gets a new name, and a device lays a task out safely."""
import numpy as np
import pytest

from edge_runtime.errors import IntegrityError
from edge_runtime.jobs.worker import JobSpec, run_job
from edge_runtime.wire import model_blobs
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.protocol import ProtocolError
from edge_runtime.wire.transfer import BlobStore


def _server(tmp_path, m, w):
    store = BlobStore(tmp_path / "server")
    store.put_file(m.root / "manifest.json")
    return store


def _task_blobs(m, part, index, store):
    """What the coordinator names in a task: the part's graphs (as blobs), then its weight groups."""
    step, prefix = model_blobs.part_graph_paths(m, part)
    graphs = {"step.onnx": store.put_file(step)} | ({"prefix.onnx": store.put_file(prefix)} if prefix else {})
    return model_blobs.task_blobs(m, part, index, store, graphs)


def test_only_changed_groups_get_new_blobs_and_a_task_names_only_its_part(tmp_path, fmnist_model):
    m, w = fmnist_model
    store = _server(tmp_path, m, w)
    before = model_blobs.publish_weights(m, w, store)
    assert set(before) == {f"layer.{l.index}" for l in m.layers if l.params} | {f"head.{h.index}" for h in m.heads}
    part = TrainablePart.block(m, 1)
    changed = dict(w, **{n: w[n] + 1 for n in part.trainable_names(m)})
    after = model_blobs.publish_weights(m, changed, store)
    differs = sorted(g for g in before if before[g] != after[g])
    assert differs == sorted([f"layer.{i}" for i in part.span if m.layers[i].params] + [f"head.{part.head}"])
    blobs = _task_blobs(m, part, after, store)
    names = [b["name"] for b in blobs]
    # the frozen prefix, the span and its head: nothing after the span, no other head
    assert [n for n in names if n.startswith("weights/")] == [f"weights/{g}" for g in model_blobs.part_groups(m, part)]
    assert f"weights/layer.{part.span[-1] + 1}" not in names
    # two graphs, composed for this part: its step graph and its prefix's forward graph
    assert [n for n in names if n.startswith("parts/")] == [f"parts/{part.key(m)}/prefix.onnx",
                                                             f"parts/{part.key(m)}/step.onnx"]
    back = model_blobs.load_index(after, store)
    assert all(np.array_equal(back[n], changed[n]) for n in changed)


def test_a_device_trains_from_the_laid_out_blobs(tmp_path, fmnist_model, small_dataset):
    m, w = fmnist_model
    server = _server(tmp_path, m, w)
    index = model_blobs.publish_weights(m, w, server)
    part = TrainablePart.block(m, 2)
    blobs = _task_blobs(m, part, index, server)
    device = BlobStore(tmp_path / "device")
    manifest_sha = device.put_file(server.path(server.put_file(m.root / "manifest.json")))
    for b in blobs:
        device.put_file(server.path(b["sha256"]))
    manifest_path, files = model_blobs.materialize(manifest_sha, blobs, device, tmp_path / "models", part=part)
    spec = JobSpec(manifest=str(manifest_path), weights=files, dataset=str(small_dataset.root),
                   state_dir=str(tmp_path / "state"), task_id="t1", part=part.to_dict(),
                   config={"max_steps": 3, "batch_size": 32}, update_out=str(tmp_path / "update.safetensors"))
    out = run_job(spec)
    assert out["ok"] and out["result"]["steps"] == 3
    update = wcodec.load(tmp_path / "update.safetensors")
    assert sorted(update) == sorted(part.trainable_names(m))
    assert not list((tmp_path / "models").rglob("graphs"))   # the per-layer graphs stay on the coordinator


def test_bad_task_layouts_are_refused(tmp_path, fmnist_model):
    m, w = fmnist_model
    server = _server(tmp_path, m, w)
    index = model_blobs.publish_weights(m, w, server)
    part = TrainablePart.block(m, 0)
    blobs = _task_blobs(m, part, index, server)
    manifest_sha = server.put_file(m.root / "manifest.json")
    for name in ("../../etc/passwd", "graphs/../x.onnx", "weights/layer.1/../../x", f"parts/{'0' * 32}/../x.onnx",
                 f"parts/{'0' * 32}/optimizer.onnx", f"graphs/{'0' * 64}.onnx"):
        with pytest.raises(ProtocolError, match="neither"):
            model_blobs.check_blob_names([dict(blobs[0], name=name)])
    other = TrainablePart.block(m, 1)   # another part's step graph, sent for this part
    with pytest.raises(IntegrityError, match="not of its part"):
        model_blobs.materialize(manifest_sha, [dict(blobs[0], name=f"parts/{other.key(m)}/step.onnx")],
                                server, tmp_path / "models", part=part)
    layer0 = server.path(index["layer.0"])
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(layer0.read_bytes())
    with pytest.raises(IntegrityError, match="is in both"):   # two blobs may not hold the same parameter
        wcodec.WeightFiles([layer0, server.path(index["head.0"]), copy])


def test_the_coordinator_collects_weights_no_round_needs(tmp_path, fmnist_model):
    """Each round stores the groups it changed; collect_garbage keeps the manifest and the named indexes' blobs."""
    from coordinator.global_model import GlobalModel
    m, w = fmnist_model
    model = GlobalModel(m.root, BlobStore(tmp_path / "server"))
    indexes = []
    for k in range(4):   # four rounds, each changing block 1
        w = dict(w, **{n: w[n] + np.float32(0.1) for n in TrainablePart.block(m, 1).trainable_names(m)})
        indexes.append(model.save(w))
    stored = {p.name for p in model.store.root.iterdir() if p.is_file()}
    removed = model.collect_garbage(indexes[-2:])
    left = {p.name for p in model.store.root.iterdir() if p.is_file()}
    assert removed == len(stored) - len(left) > 0
    assert model.manifest_sha in left
    for kept in indexes[-2:]:
        assert kept in left and set(model.index(kept).values()) <= left
        back = model.load(kept)
        assert set(back) == set(w)
    for gone in indexes[:2]:
        assert gone not in left
