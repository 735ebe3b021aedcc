"""FedIN on the device: the projection, the IN step graph against torch, a real job with shared features
(IN training, sharing its own features, refusing broken ones), and resuming it after a crash."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.train.datasets import LocalDataset
from edge_runtime.train.reconcile import combine, dot, project
from edge_runtime.wire import model_blobs
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- (a) the projection

def _vec(d: dict) -> np.ndarray:
    return np.concatenate([d[k].astype(np.float64).ravel() for k in sorted(d)])


def _random_pair(rng, conflict: bool | None = None):
    shapes = {"a": (3, 4), "b": (7,), "c": (2, 2, 2)}
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    h = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    if conflict is not None:
        sign = 1.0 if _vec(g) @ _vec(h) >= 0 else -1.0
        if (sign < 0) != conflict:
            h = {k: -v for k, v in h.items()}
    return g, h


def test_projection_never_opposes_the_local_gradient_and_is_the_closest_such_vector():
    rng = np.random.default_rng(0)
    conflicts = 0
    for trial in range(200):
        g, h = _random_pair(rng)
        h0, g0 = _vec(h), _vec(g)
        conflict = project(g, h)
        h1 = _vec(h)
        assert h1 @ g0 >= -1e-9 * np.linalg.norm(h0) * np.linalg.norm(g0) - 1e-6
        assert np.array_equal(_vec(g), g0)        # g is read, never written
        if h0 @ g0 >= 0:
            assert not conflict and np.array_equal(h1, h0)
            continue
        conflicts += 1
        assert conflict
        np.testing.assert_allclose(h1, h0 - (h0 @ g0) / (g0 @ g0) * g0, rtol=1e-5, atol=1e-6)
        # the closest feasible point: no random feasible point near it is closer to h
        best = np.linalg.norm(h1 - h0)
        for _ in range(50):
            other = h1 + rng.normal(scale=rng.choice([1e-3, 1e-1, 1.0]), size=h1.shape)
            if other @ g0 >= 0:
                assert np.linalg.norm(other - h0) >= best - 1e-6
    assert 50 < conflicts < 150


def test_projection_hand_made_cases():
    g = {"w": np.array([1.0, 0.0], np.float32)}
    h = {"w": np.array([-1.0, 1.0], np.float32)}    # opposes g: its component along g goes
    assert project(g, h)
    np.testing.assert_allclose(h["w"], [0.0, 1.0])
    h = {"w": np.array([0.5, -2.0], np.float32)}    # agrees with g: unchanged
    assert not project(g, h)
    np.testing.assert_array_equal(h["w"], [0.5, -2.0])
    h = {"w": np.array([-3.0, 0.0], np.float32)}    # exactly opposite: nothing is left of it
    assert project(g, h)
    np.testing.assert_allclose(h["w"], [0.0, 0.0])
    zero = {"w": np.zeros(2, np.float32)}
    h = {"w": np.array([-3.0, 4.0], np.float32)}    # no local gradient: nothing to oppose
    assert not project(zero, h)
    np.testing.assert_array_equal(h["w"], [-3.0, 4.0])


def test_combine_adds_the_projected_in_gradient_in_place_over_chunks():
    rng = np.random.default_rng(3)
    g = {"big": rng.normal(size=(300, 700)).astype(np.float32), "small": rng.normal(size=5).astype(np.float32)}
    h = {k: (-2 * v + rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}
    g0, h0 = _vec(g), _vec(h)
    big = g["big"]
    assert combine(g, h, in_weight=0.5)
    assert g["big"] is big                     # written in place
    want = g0 + 0.5 * (h0 - (h0 @ g0) / (g0 @ g0) * g0)
    np.testing.assert_allclose(_vec(g), want, rtol=1e-4, atol=1e-4)
    assert dot(g, g, ["small"]) == pytest.approx(float(g["small"].astype(np.float64) @ g["small"]), rel=1e-6)


# --------------------------------------------------------------------------- the family and its graphs

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """fmnist_fedin exported, every member part's graphs built: (manifest, weights, torch model)."""
    from coordinator.model import export, zoo
    from coordinator.model.part_graphs import ensure_part_graphs
    model = zoo.build("fmnist_fedin")
    m = export.export(model, tmp_path_factory.mktemp("fmnist_fedin"))
    ensure_part_graphs(m, [TrainablePart.member(m, x.name) for x in m.members])
    return m, export.load_weights(m), model


@pytest.fixture(scope="module")
def local_data(fmnist, tmp_path_factory) -> LocalDataset:
    x, y, _, _ = fmnist
    idx = np.random.default_rng(5).choice(len(y), 300, replace=False)
    return LocalDataset.write(tmp_path_factory.mktemp("fedin_local"), x[idx], y[idx])


def test_member_parts_get_their_in_graphs_and_other_parts_do_not(family):
    m, _, _ = family
    for x in m.members:
        part = TrainablePart.member(m, x.name)
        assert model_blobs.trained_member(m, part) == x
        folder = model_blobs.part_folder(m, part)
        hashes = json.loads((folder / model_blobs.GRAPH_HASHES).read_text())
        for path in model_blobs.member_graph_paths(m, part):
            model_blobs.read_part_graph(path)      # hash-checked
            assert path.name in hashes
    plain = TrainablePart.for_layers(m, [0, 1])
    assert model_blobs.trained_member(m, plain) is None


def test_the_mse_loss_is_built_from_standard_ops_only(family, tmp_path):
    """What the gradient builder emits for the IN loss (before any rewrite) is default-domain ONNX: nothing of
    it depends on a rewrite in gradient_rewrites.py."""
    from coordinator.model.part_graphs import ensure_builder
    m, _, _ = family
    script = f"""
import numpy as np
from coordinator.model import step_graph as sg
from coordinator.model.graphs import GraphLibrary, compose
from edge_runtime.wire.manifest import Manifest
m = Manifest.load({str(m.root / 'manifest.json')!r})
specs = m.param_specs()
names = m.param_names([4, 5, 6])
fwd = compose(GraphLibrary(m), range(1, 7), None, {{n: np.zeros(specs[n].shape, np.float32) for n in names}},
              skip=(1, 2, 3))
training, _ = sg._training_block(fwd, m.param_names([4, 5, 6], kind="param"), [], sg.MSE)
print(sorted({{(n.domain, n.op_type) for n in training.graph.node if n.name.startswith("step_graph/")}}))
print(sorted({{n.op_type for n in training.graph.node if n.name.startswith("step_graph/") and not sg._is_standard(n)}}))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ensure_builder()), str(REPO)]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loss_ops, nonstandard = done.stdout.strip().splitlines()[-2:]
    assert "ReduceSum" in loss_ops and "Sub" in loss_ops
    assert nonstandard == "[]", loss_ops


# --------------------------------------------------------------------------- (b) the IN step graph vs torch

@pytest.mark.parametrize("member", ["small", "large"])
def test_in_step_graph_matches_torch_autograd(family, member):
    import torch

    from edge_runtime.train.ort_backend import StepSession
    m, weights, model = family
    part = TrainablePart.member(m, member)
    session = StepSession(model_blobs.read_part_graph(model_blobs.member_graph_paths(m, part)[0]))
    itf = session.interface
    own = m.member(member).layers
    assert itf.float_target and set(itf.trainable) == set(m.param_names(sorted(own), kind="param"))
    assert not itf.frozen and not itf.stat_inputs

    rng = np.random.default_rng(7)
    s_in = rng.normal(size=(5, 32, 14, 14)).astype(np.float32)
    target = rng.normal(size=(5, 32, 14, 14)).astype(np.float32)
    scale = 0.2
    tensors = {n: np.ascontiguousarray(weights[n]) for n in itf.param_inputs}
    grads = {n: np.empty_like(tensors[n]) for n in itf.trainable}
    loss, stats = session.run(s_in, target, scale, tensors, grads)
    assert stats == {}

    modules = dict(model.named_modules())
    x = torch.from_numpy(s_in)
    for i in own:
        x = modules[m.layers[i].name](x)
    t = torch.from_numpy(target)
    ref = scale * ((x - t) ** 2).flatten(1).mean(dim=1).sum()
    model.zero_grad()
    ref.backward()
    params = dict(model.named_parameters())
    assert loss == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-5)
    for name in itf.trainable:
        np.testing.assert_allclose(grads[name], params[name].grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


# --------------------------------------------------------------------------- (c) a real job

def _features_file(path: Path, s_in, s_out, origin, labels=None) -> Path:
    labels = np.zeros(len(origin), np.int64) if labels is None else labels
    save_file({"s_in": np.ascontiguousarray(s_in, np.float32), "s_out": np.ascontiguousarray(s_out, np.float32),
               "labels": np.asarray(labels, np.int64), "origin": np.asarray(origin, np.int32)}, str(path))
    return path


def _job(m, weights_file, data, state, task, member, features=None, **config):
    from edge_runtime.jobs.worker import JobSpec
    settings = dict(batch_size=32, max_steps=6, learning_rate=1e-3, checkpoint_every_steps=50, seed=3)
    settings.update(config)
    return JobSpec(manifest=str(m.root / "manifest.json"), weights=[str(weights_file)], dataset=str(data.root),
                   state_dir=str(state), task_id=task, part=TrainablePart.member(m, member),
                   config=TrainConfig.from_dict(settings), update_out=str(Path(state) / f"{task}.safetensors"),
                   features=None if features is None else str(features))


@pytest.fixture(scope="module")
def weights_file(family, tmp_path_factory):
    m, weights, _ = family
    path = tmp_path_factory.mktemp("fedin_weights") / "w.safetensors"
    wcodec.save(path, weights)
    return path


@pytest.fixture(scope="module")
def shared_by_medium(family, weights_file, local_data, tmp_path_factory):
    """What a medium-member device shares after training: its update's features/* tensors."""
    from edge_runtime.jobs.worker import run_job
    m, _, _ = family
    state = tmp_path_factory.mktemp("fedin_medium")
    report = run_job(_job(m, weights_file, local_data, state, "medium", "medium", share_rows=48, share_noise=0.1))
    assert report["result"]["shared_rows"] == 48 and report["result"]["in_steps"] == 0
    update = wcodec.WeightFile(report["update"])
    return {name: update[name] for name in update}


def test_a_member_job_shares_features_of_the_right_shapes_and_dtypes(family, shared_by_medium):
    m, _, _ = family
    u = shared_by_medium
    assert u["features/s_in"].dtype == np.float32 and u["features/s_in"].shape == (48, 32, 14, 14)
    assert u["features/s_out"].dtype == np.float32 and u["features/s_out"].shape == (48, 32, 14, 14)
    assert u["features/labels"].dtype == np.int64 and u["features/labels"].shape == (48,)
    assert set(u["features/labels"]) <= set(range(10)) and np.isfinite(u["features/s_in"]).all()
    trained = set(TrainablePart.member(m, "medium").update_names(m))
    assert set(u) == trained | {"features/s_in", "features/s_out", "features/labels"}


def test_fp16_reencoding_keeps_shared_labels_int64(shared_by_medium, tmp_path):
    from edge_runtime.device.agent import _reencode_fp16
    path = tmp_path / "u.safetensors"
    wcodec.save_streaming(path, list(shared_by_medium), shared_by_medium.__getitem__)
    _reencode_fp16(path)
    again = wcodec.WeightFile(path)
    assert again._entries["features/labels"][0] == np.int64
    assert again._entries["features/s_in"][0] == np.float16
    np.testing.assert_array_equal(again["features/labels"], shared_by_medium["features/labels"])


def test_in_training_trains_on_other_devices_rows_only(family, weights_file, local_data, shared_by_medium, tmp_path):
    from edge_runtime.jobs.worker import run_job
    m, weights, _ = family
    others = (shared_by_medium["features/s_in"], shared_by_medium["features/s_out"])
    k = len(others[0])
    rng = np.random.default_rng(11)
    junk = rng.normal(scale=50.0, size=(20, 32, 14, 14)).astype(np.float32)
    mixed = _features_file(tmp_path / "mixed.safetensors", np.concatenate([junk, others[0]]),
                           np.concatenate([-junk, others[1]]), [7] * 20 + [1] * k)
    clean = _features_file(tmp_path / "clean.safetensors", *others, [1] * k)
    settings = dict(in_weight=1.0, in_batch_size=16, in_origin=7, share_rows=20)
    a = run_job(_job(m, weights_file, local_data, tmp_path / "a", "a", "large", mixed, **settings))
    b = run_job(_job(m, weights_file, local_data, tmp_path / "b", "b", "large", clean, **settings))
    plain = run_job(_job(m, weights_file, local_data, tmp_path / "c", "c", "large", clean,
                         **dict(settings, in_weight=0.0)))
    assert a["result"]["in_steps"] == 6 and b["result"]["in_steps"] == 6 and plain["result"]["in_steps"] == 0
    assert a["result"]["shared_rows"] == 20
    ua, ub, uc = (wcodec.WeightFile(r["update"]) for r in (a, b, plain))
    large = m.param_names(list(m.member("large").layers), kind="param")
    for name in ua:   # the own-origin rows (junk) were left out: the same run as without them
        np.testing.assert_array_equal(ua[name], ub[name], err_msg=name)
    assert any(not np.allclose(ua[n], uc[n]) for n in large)      # and the IN step moved the member's layers
    assert 0 <= a["result"]["in_conflicts"] <= 6
    assert ua["features/labels"].dtype == np.int64 and ua["features/s_in"].shape == (20, 32, 14, 14)


def test_only_own_rows_means_no_in_training(family, weights_file, local_data, shared_by_medium, tmp_path):
    from edge_runtime.jobs.worker import run_job
    m, _, _ = family
    own = _features_file(tmp_path / "own.safetensors", shared_by_medium["features/s_in"],
                         shared_by_medium["features/s_out"], [4] * 48)
    r = run_job(_job(m, weights_file, local_data, tmp_path / "s", "own", "small", own, in_weight=1.0, in_origin=4))
    assert r["result"]["in_steps"] == 0 and r["result"]["steps"] == 6


@pytest.mark.parametrize("problem", ["nan", "s_in shape", "s_out shape", "no origin", "origin length"])
def test_broken_shared_features_are_refused_with_a_clear_error(family, weights_file, local_data, tmp_path, problem):
    from edge_runtime.jobs.worker import run_job
    m, _, _ = family
    rng = np.random.default_rng(2)
    s_in = rng.normal(size=(10, 32, 14, 14)).astype(np.float32)
    s_out = rng.normal(size=(10, 32, 14, 14)).astype(np.float32)
    origin = np.ones(10, np.int32)
    tensors = {"s_in": s_in, "s_out": s_out, "labels": np.zeros(10, np.int64), "origin": origin}
    if problem == "nan":
        s_out[6, 3, 2, 1] = np.nan
    elif problem == "s_in shape":
        tensors["s_in"] = s_in[:, :16]
    elif problem == "s_out shape":
        tensors["s_out"] = s_out.reshape(10, 32, 196)
    elif problem == "no origin":
        del tensors["origin"]
    else:
        tensors["origin"] = origin[:7]
    path = tmp_path / "broken.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    expected = {"nan": r"s_out of row 6 is not finite", "s_in shape": r"s_in is float32 \[10, 16, 14, 14\]",
                "s_out shape": r"s_out is float32 \[10, 32, 196\]", "no origin": r"lack tensor\(s\) \['origin'\]",
                "origin length": r"s_in is float32 \[10, 32, 14, 14\].*one row per origin \(7\)"}[problem]
    with pytest.raises(EdgeRuntimeError, match=expected):
        run_job(_job(m, weights_file, local_data, tmp_path / "x", "broken", "small", path, in_weight=1.0))


def test_in_training_needs_a_member_part(family, weights_file, local_data, shared_by_medium, tmp_path):
    from edge_runtime.train.trainer import train
    m, weights, _ = family
    path = _features_file(tmp_path / "f.safetensors", shared_by_medium["features/s_in"],
                          shared_by_medium["features/s_out"], [1] * 48)
    part = TrainablePart.for_layers(m, [0, 1, 2, 3, 4, 5, 6])
    with pytest.raises(EdgeRuntimeError, match="needs a family member's part"):
        train(m, weights, local_data, part, TrainConfig(in_weight=1.0, max_steps=1), tmp_path, "t", features=path)


# --------------------------------------------------------------------------- (d) resuming

class _Crash(Exception):
    pass


def test_resume_after_a_checkpoint_matches_an_uninterrupted_run(family, local_data, shared_by_medium, tmp_path):
    from edge_runtime.train.trainer import train
    m, weights, _ = family
    features = _features_file(tmp_path / "f.safetensors", shared_by_medium["features/s_in"],
                              shared_by_medium["features/s_out"], [1] * 48)
    part = TrainablePart.member(m, "medium")
    config = TrainConfig(batch_size=32, max_steps=9, checkpoint_every_steps=3, seed=5, in_weight=2.0,
                         in_batch_size=20, share_rows=8)

    def crash_at_7(phase, done, total):
        if phase == "train" and done == 7:
            raise _Crash()
    with pytest.raises(_Crash):
        train(m, weights, local_data, part, config, tmp_path / "s1", "t", progress=crash_at_7, features=features)
    resumed_weights, resumed = train(m, weights, local_data, part, config, tmp_path / "s1", "t", features=features)
    clean_weights, clean = train(m, weights, local_data, part, config, tmp_path / "s2", "t", features=features)
    assert resumed.resumed_from_step == 6 and clean.resumed_from_step == 0
    assert resumed.in_steps == clean.in_steps == 9 and resumed.in_conflicts == clean.in_conflicts
    np.testing.assert_allclose(resumed.losses, clean.losses, atol=1e-5)
    assert set(resumed_weights) == set(clean_weights)
    for name in clean_weights:
        np.testing.assert_allclose(resumed_weights[name], clean_weights[name], atol=1e-5, err_msg=name)


# --------------------------------------------------------------------------- blobs of a FedIN task

def test_a_fedin_task_names_the_member_graphs_and_the_features(family, tmp_path, shared_by_medium):
    from coordinator.global_model import GlobalModel
    from edge_runtime.wire.transfer import BlobStore
    m, weights, _ = family
    store = BlobStore(tmp_path / "blobs")
    gm = GlobalModel(m.root, store)
    index = gm.save(weights)
    feats = store.put_file(_features_file(tmp_path / "f.safetensors", shared_by_medium["features/s_in"],
                                          shared_by_medium["features/s_out"], [1] * 48))
    part = TrainablePart.member(m, "small")
    blobs = gm.task_blobs(part, index, fedin=True, features_sha=feats)
    names = [b["name"] for b in blobs]
    key = part.key(m)
    for graph in (model_blobs.IN_STEP_GRAPH, model_blobs.S_IN_GRAPH, model_blobs.S_OUT_GRAPH):
        assert f"parts/{key}/{graph}" in names
    assert f"features/{feats}" in names
    model_blobs.check_blob_names(blobs)
    assert [b["name"] for b in gm.task_blobs(part, index)] == [n for n in names if "/s_" not in n
                                                               and "in_step" not in n and "features" not in n]
    manifest_path, weight_files = model_blobs.materialize(gm.manifest_sha, blobs, store, tmp_path / "models",
                                                          part=part)
    features = model_blobs.task_features_path(manifest_path, blobs)
    assert features == str(manifest_path.parent / "features" / f"{feats}.safetensors")
    assert Path(features).exists() and str(store.path(feats)) not in weight_files
    assert model_blobs.task_features_path(manifest_path.parent, blobs) == features
    assert model_blobs.task_features_path(manifest_path, [b for b in blobs if "features" not in b["name"]]) is None
    from edge_runtime.wire.manifest import Manifest
    model_blobs.member_graph_paths(Manifest.load(manifest_path), part)   # laid out, and hash-recorded
    with pytest.raises(Exception, match="blob name"):
        model_blobs.check_blob_names([{"name": "features/../x", "sha256": feats, "size": 1}])
    plain = TrainablePart.for_layers(m, [0, 1])
    gm.prepare_parts([plain])
    with pytest.raises(Exception, match="no in_step.onnx"):    # no member's part: no IN graphs were built
        gm.task_blobs(plain, index, fedin=True)


def test_share_noise_adds_gaussian_noise_scaled_to_each_features_own_spread(family, weights_file, local_data,
                                                                          tmp_path):
    """The same job with and without share_noise shares the same rows and labels; the noised features differ from
    the clean ones by noise of share_noise x each tensor's own std, seeded (a second run gives the same bytes)."""
    from edge_runtime.jobs.worker import run_job
    m, _, _ = family
    shared = {}
    for tag, noise in (("clean", 0.0), ("noised", 0.5), ("again", 0.5)):
        report = run_job(_job(m, weights_file, local_data, tmp_path / tag, tag, "small", max_steps=2, share_rows=64,
                              share_noise=noise))
        update = wcodec.WeightFile(report["update"])
        shared[tag] = {n: update[n] for n in update if n.startswith("features/")}
    clean, noised = shared["clean"], shared["noised"]
    np.testing.assert_array_equal(clean["features/labels"], noised["features/labels"])
    for name in ("features/s_in", "features/s_out"):
        spread = float(np.std(clean[name]))
        added = noised[name] - clean[name]
        assert abs(float(np.mean(added))) < 0.05 * spread, name
        assert float(np.std(added)) == pytest.approx(0.5 * spread, rel=0.05), name
        np.testing.assert_array_equal(noised[name], shared["again"][name])
