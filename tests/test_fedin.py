"""FedIN: a model per tier from one family, aggregation within architectures, shared features, over Mosquitto.

The device's side (IN training, the gradient projection, the features it computes) is tested in
tests/test_fedin_device.py; here the schedule: which member each device trains, what
aggregation may touch, how shared features are checked and pooled, and a real fleet.
"""
import numpy as np
import pytest

from coordinator.global_model import GlobalModel
from coordinator.strategies.aggregation import AggregationSettings, UpdateRejected
from coordinator.strategies.base import Device, Result
from coordinator.strategies.fedin import FedIN
from coordinator.strategies.shared_features import (
    LABELS,
    S_IN,
    S_OUT,
    assemble,
    feature_limit_bytes,
    feature_shapes,
    validate_features,
)
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.transfer import BlobStore

MB = 2 ** 20
# what each member costs in the tests' memory model: a device's budget picks its member
COST = {"small": 100 * MB, "medium": 200 * MB, "large": 300 * MB}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """fmnist_fedin exported once: (manifest, initial weights)."""
    from coordinator.model import export, zoo
    m = export.export(zoo.fmnist_fedin(), tmp_path_factory.mktemp("fmnist_fedin"))
    return m, export.load_weights(m)


@pytest.fixture()
def vault(family, tmp_path):
    m, _ = family
    return GlobalModel(m.file("manifest.json").parent, BlobStore(tmp_path / "blobs"))


def _strategy(model: GlobalModel, aggregation=AggregationSettings(), **settings) -> FedIN:
    m = model.manifest

    def predict(first, last, batch, skip=()):
        member = m.member_of(skip)
        return COST[member.name] if member else 10_000 * MB
    s = FedIN(m, predict, batch_sizes=[32], margin=0.0, aggregation=aggregation, **settings)
    s.attach(model)
    return s


def _features(m, rows: int, rng, labels=None) -> dict:
    s_in, s_out = feature_shapes(m)
    return {S_IN: rng.standard_normal((rows, *s_in)).astype(np.float32),
            S_OUT: rng.standard_normal((rows, *s_out)).astype(np.float32),
            LABELS: np.asarray(labels if labels is not None else rng.integers(0, 10, rows), dtype=np.int64)}


def test_each_device_trains_the_largest_member_its_budget_holds(vault):
    s = _strategy(vault)
    m = vault.manifest
    devices = [Device("tiny", "t", 50 * MB), Device("a", "t", 150 * MB), Device("b", "t", 250 * MB),
               Device("c", "t", 4000 * MB)]
    plan = s.plan_round(0, devices)
    chosen = {a.device_id: m.member_of(a.skip).name for a in plan.assignments}
    assert chosen == {"a": "small", "b": "medium", "c": "large"}
    assert "tiny" in plan.idle and "member small needs 100 MB" in plan.idle["tiny"]
    for a in plan.assignments:   # the extractor and the member's own layers train, and the shared classifier
        member = m.member_of(a.skip)
        assert set(a.trainable) == set(m.extractor_layers) | set(member.layers)
        assert a.head == m.final_head.index and a.train_head
    only = _strategy(vault, member="large").plan_round(0, devices)     # the FedAvg baseline of one member
    assert [a.device_id for a in only.assignments] == ["c"] and set(only.idle) == {"tiny", "a", "b"}
    assert "excluded" in only.idle["a"]


def test_aggregation_touches_intermediate_layers_only_within_an_architecture(vault, family):
    m, w0 = family
    s = _strategy(vault, AggregationSettings(rule="mean", max_share=1.0))   # plain FedAvg weights, to read them
    plan = s.plan_round(0, [Device("a", "t", 150 * MB), Device("b", "t", 150 * MB), Device("c", "t", 4000 * MB)])
    rng = np.random.default_rng(0)
    results = []
    for a, n in zip(plan.assignments, (100, 300, 600)):
        trained = {k: (w0[k] + rng.standard_normal(w0[k].shape)).astype(np.float32) for k in a.trained_names(m)}
        results.append(Result(a, trained, n, 1.0))
    new = s.aggregate(plan, results, {}, w0)
    by_device = {r.assignment.device_id: r for r in results}
    small, large = m.member("small").layers, m.member("large").layers
    for name, value in new.items():
        layer = next((l.index for l in m.layers if any(p.name == name for p in l.params)), None)
        if layer in m.extractor_layers or name in {p.name for p in m.final_head.params}:
            # shared: every device, weighted by samples
            weights = {"a": 100, "b": 300, "c": 600}
            expected = sum(weights[d] * by_device[d].update[name] for d in weights) / 1000
        elif layer in small:        # a and b trained the small member: only their values mix
            expected = (100 * by_device["a"].update[name] + 300 * by_device["b"].update[name]) / 400
        elif layer in large:        # c alone trained the large member
            expected = by_device["c"].update[name]
        else:                       # the medium member and the unused heads: nobody trained them
            expected = w0[name]
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_shared_features_are_checked_like_updates(family):
    m, _ = family
    rng = np.random.default_rng(1)
    good = _features(m, 8, rng)
    validate_features(good, m, share_rows=8)
    validate_features({}, m, share_rows=8)                  # a device may withhold its features
    cases = {
        "did not ask": (good, 0),
        "wrong names": ({**good, "features/extra": good[LABELS]}, 8),
        "rows": (_features(m, 9, rng), 8),
        "dtype": ({**good, S_IN: good[S_IN].astype(np.float64)}, 8),
        "shape": ({**good, S_OUT: good[S_OUT][:, :3]}, 8),
        "row count": ({**good, S_IN: good[S_IN][:7]}, 8),
        "NaN": ({**good, S_IN: np.where(np.arange(good[S_IN].size).reshape(good[S_IN].shape) == 5, np.nan,
                                        good[S_IN]).astype(np.float32)}, 8),
        "label": ({**good, LABELS: np.array([0, 1, 2, 3, 4, 5, 6, 10])}, 8),
        "label dtype": ({**good, LABELS: good[LABELS].astype(np.float32)}, 8),
    }
    for what, (features, rows) in cases.items():
        with pytest.raises(UpdateRejected):
            validate_features(features, m, share_rows=rows)
            pytest.fail(f"accepted: {what}")
    s_in, s_out = feature_shapes(m)
    assert feature_limit_bytes(m, 8) == 8 * (4 * (np.prod(s_in) + np.prod(s_out)) + 8)


def test_the_shared_batch_gives_each_device_an_equal_share_tagged_with_its_origin(family):
    m, _ = family
    rng = np.random.default_rng(2)
    shared = [(0, _features(m, 32, rng)), (1, _features(m, 5, rng)), (2, _features(m, 32, rng)), (3, {})]
    batch = assemble(shared, max_rows=30, seed=0)
    assert sorted(batch) == ["labels", "origin", "s_in", "s_out"]
    counts = np.bincount(batch["origin"], minlength=4)
    assert counts.tolist() == [10, 5, 10, 0]
    for origin, f in shared[:3]:   # every row is one of its device's own rows, s_in, s_out and label together
        mine = batch["origin"] == origin
        for s_in, s_out, y in zip(batch["s_in"][mine], batch["s_out"][mine], batch["labels"][mine]):
            k = int(np.flatnonzero((f[S_IN] == s_in).all(axis=(1, 2, 3)))[0])
            assert np.array_equal(f[S_OUT][k], s_out) and f[LABELS][k] == y
    assert assemble([(0, {})], 10, 0) is None


def test_the_schedule_keeps_its_shared_batch_and_origins_across_a_restart(vault, family):
    m, w0 = family
    s = _strategy(vault, rounds=3)
    plan = s.plan_round(0, [Device("a", "t", 150 * MB), Device("b", "t", 4000 * MB)])
    assert all(s.train_settings(a)["in_weight"] == 0 for a in plan.assignments)   # nothing shared yet
    rng = np.random.default_rng(3)
    results = [Result(a, {k: w0[k] for k in a.trained_names(m)}, 100, 1.0, features=_features(m, 4, rng))
               for a in plan.assignments]
    s.aggregate(plan, results, {}, w0)
    s.advance(plan, w0, w0, results)
    assert s.shared is not None and s.blobs_in_use()[1] == {s.shared}
    batch = wcodec.decode(vault.get_bytes(s.shared), integers=lambda n: n in ("labels", "origin"))
    assert len(batch["labels"]) == 8 and set(batch["origin"].tolist()) == {0, 1}
    again = _strategy(vault, rounds=3)
    again.load_state(s.state())
    nxt = again.plan_round(1, [Device("a", "t", 150 * MB), Device("b", "t", 4000 * MB)])
    settings = {a.device_id: again.train_settings(a) for a in nxt.assignments}
    assert settings["a"]["in_weight"] == 1.0 and settings["a"]["in_origin"] == s.origins["a"]
    assert settings["b"]["in_origin"] == s.origins["b"] != settings["a"]["in_origin"]
    assert all(again.task_features(a) == s.shared for a in nxt.assignments)
    assert again.rounds_left() == (2, 2)
    off = _strategy(vault, share_features=False)
    assert off.train_settings(nxt.assignments[0])["share_rows"] == 0 and off.task_features(nxt.assignments[0]) is None


def test_fedin_refuses_a_model_that_is_not_a_family(fmnist_model):
    m, _ = fmnist_model
    with pytest.raises(ValueError, match="model family"):
        FedIN(m, lambda *a, **k: 0, batch_sizes=[32])


FLOOR_TIER_ACCURACY = 0.72   # Dirichlet(0.5), 9,000 images, 3 rounds from scratch: measured 79.9-80.0 % per member


def test_fedin_over_mosquitto_trains_a_member_per_tier_within_their_budgets(tmp_path_factory):
    """Three tiers, each on its own member, over a real Mosquitto: features shared and trained on from round 1,
    every device within its budget, every member above the floor on the test set, and the views name them."""
    from fleet_helpers import LocalFleet, read_metrics, settings

    from coordinator.local.data import write_fleet_data
    from coordinator.local.fleet import DeviceSpec
    from coordinator.model.zoo_profile import measured_profile, member_budgets
    from coordinator.ops.broker import EmbeddedBroker
    root = tmp_path_factory.mktemp("fedin")
    profile = measured_profile(root, "fmnist_fedin", [32, 64])
    budgets = member_budgets(profile, root / "model" / "manifest.json", batch=32)
    ids = [f"{member}-{i}" for member in budgets for i in range(2)]
    dirs = write_fleet_data(root / "data", ids, 9000, 0.5, 0)
    specs = [DeviceSpec(d, f"tier-{d.split('-')[0]}", budgets[d.split("-")[0]], dirs[d]) for d in ids]
    with EmbeddedBroker(root / "broker") as broker, LocalFleet(root / "run", broker.url, fleet="fedin") as fleet:
        cfg = settings(root / "run" / "coordinator", profile, "fedin", model="fmnist_fedin", min_devices=len(ids))
        cfg["train"]["batch_sizes"] = [32]
        cfg["fedin"] = {"rounds": 3, "share_rows": 16}
        fleet.start_run(cfg, specs)
        assert fleet.wait("coordinator", timeout_s=900) == 0, fleet.log_tail("coordinator")
    metrics = read_metrics(root / "run" / "coordinator")
    assert len(metrics) == 3 and metrics[-1]["finished"]
    for m in metrics:
        for device, row in m["devices"].items():
            assert row["status"] == "accepted", (m["round"], device, row)
            assert row["member"] == device.split("-")[0], (device, row["member"])     # each tier its own member
            assert row["peak_rss_bytes"] + row["agent_peak_rss_bytes"] <= budgets[device.split("-")[0]] * MB, \
                (m["round"], device, row)
        assert set(m["models"]) == {"small", "medium", "large"}
    # the first round has nothing shared yet; from the second every task carried the batch of the others' rows
    from coordinator.state_store import StateStore
    state = StateStore(root / "run" / "coordinator" / "state.db", readonly=True)
    rounds = [m["round"] for m in metrics]
    for r in rounds:
        configs = [t.task.config for t in state.tasks(r)]
        assert len(configs) == len(ids) and all(c.share_rows == 16 for c in configs)
        assert all((c.in_weight > 0) == (r > rounds[0]) for c in configs), r
        names = [b["name"] for t in state.tasks(r) for b in t.task.blobs if b["name"].startswith("features/")]
        assert len(names) == (len(ids) if r > rounds[0] else 0) and len(set(names)) <= 1
    origins = {t.device_id: t.task.config.in_origin for t in state.tasks(rounds[-1])}
    assert sorted(origins.values()) == list(range(len(ids)))      # each device skips its own rows, and only them
    last = metrics[-1]["models"]
    assert all(e["accuracy"] >= FLOOR_TIER_ACCURACY for e in last.values()), last
    from coordinator.observe.run_status import snapshot, status_lines
    status = "\n".join(status_lines(snapshot(root / "run" / "coordinator"), []))
    assert f"large {last['large']['accuracy']:.2%} (tier-large)" in status, status


def test_intake_judges_shared_features_with_the_update_blob(tmp_path, family):
    """The update blob with its features goes through intake as a device sends it: good rows are accepted; bad ones,
    unasked ones or a blob larger than the parameters and the asked rows can take reject the whole update."""
    from dataclasses import asdict

    from coordinator import intake
    from coordinator.state_store import StateStore
    from edge_runtime.wire.protocol import Hello, Update
    m, w0 = family
    state = StateStore(tmp_path / "state.db")
    plan = _strategy(GlobalModel(m.file("manifest.json").parent, BlobStore(tmp_path / "blobs"))).plan_round(
        1, [Device("pi-01", "t", 150 * MB), Device("pi-02", "t", 150 * MB)])
    specs = []
    for a, rows in zip(plan.assignments, (8, 0)):
        state.upsert_device(Hello(a.device_id, "t", 150 * MB, "0.1", 1, 10 ** 9))
        specs.append((f"r1-{a.device_id}", a.device_id, {"assignment": asdict(a), "task": {"config": {"share_rows": rows}}}))
    state.open_round(1, 1e12, "ab" * 32, {}, {}, specs)
    incoming = BlobStore(tmp_path / "incoming")
    params = {n: w0[n] + np.float32(0.01) for n in plan.assignments[0].trained_names(m)}
    rng = np.random.default_rng(4)

    def judge(features, device="pi-01", size=None):
        data = wcodec.encode({**params, **features})
        sha = incoming.put_bytes(data)
        u = Update(f"r1-{device}", 1, device, sha, size or len(data), 100, 0.5, 10, 80 * MB, 1.0)
        return intake.judge_update(u, device, state, 1, incoming, m, lambda task: w0)

    good = _features(m, 8, rng)
    assert judge(good).status == "accepted"
    nan = {**good, S_OUT: good[S_OUT].copy()}
    nan[S_OUT][3, 0, 0, 0] = np.inf
    limit = intake.update_limit_bytes(m, state.task("r1-pi-01"))
    for what, v, reason in [
        ("non-finite", judge(nan), "NaN or infinite"),
        ("too many rows", judge(_features(m, 9, rng)), "at most 8"),
        ("float labels", judge({**good, LABELS: good[LABELS].astype(np.float32)}), "int64"),
        ("unasked", judge(_features(m, 1, rng), device="pi-02"), "did not ask for"),
        ("oversize", judge(good, size=limit + 1), "exceeds"),
    ]:
        assert v.status == "rejected" and reason in v.reason, (what, v)
    # the limit is the parameters' bytes plus exactly what the asked rows can take
    assert limit - intake.update_limit_bytes(m, state.task("r1-pi-02")) == feature_limit_bytes(m, 8)


@pytest.mark.parametrize("name", ["fmnist_fedin", "cifar_fedin"])
def test_each_members_exported_graph_is_that_members_torch_model(name, tmp_path):
    """A member's model is the extractor, its own layers and the classifier: the ONNX graph that skips the other
    members' layers computes what the torch family computes for that member, and the members differ."""
    import torch

    from coordinator.model import export, zoo
    from coordinator.model.graphs import GraphLibrary, forward_graph
    from edge_runtime.train.ort_backend import ForwardSession
    model = zoo.build(name)
    m = export.export(model, tmp_path / name)
    weights = export.load_weights(m)
    assert [x.name for x in m.members] == ["small", "medium", "large"]
    x = np.random.default_rng(5).standard_normal((4, *m.input_shape)).astype(np.float32)
    outputs = {}
    for member in m.members:
        graph = forward_graph(GraphLibrary(m), range(len(m.layers)), m.final_head.index, skip=m.member_skip(member.name))
        session = ForwardSession(graph.SerializeToString())
        got = session.run(x, {n: weights[n] for n in session.param_names})
        with torch.no_grad():
            want = model(torch.from_numpy(x), member=member.name).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=member.name)
        outputs[member.name] = got
    assert not np.allclose(outputs["small"], outputs["large"])
