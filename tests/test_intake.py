"""Every kind of bad update is refused with its reason before it can touch the global model.

Real parts: a real SQLite state store with a scheduled round, real safetensors blobs in a
real BlobStore, the real fmnist_cnn manifest. End-to-end rejection over MQTT is in
tests/test_federated_faults.py.
"""
from dataclasses import asdict

import numpy as np
import pytest

from coordinator import intake
from coordinator.state_store import StateStore
from coordinator.strategies.aggregation import UpdateCheck
from coordinator.strategies.base import Assignment
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.protocol import Failed, Hello, Update
from edge_runtime.wire.transfer import BlobStore


@pytest.fixture
def setup(tmp_path, fmnist_model):
    m, w = fmnist_model
    state = StateStore(tmp_path / "state.db")
    for dev in ("pi-01", "pi-02"):
        state.upsert_device(Hello(dev, "pi-zero-2w", 200 << 20, "0.1", 1, 10 ** 9))
    block = m.blocks[1]
    a = Assignment("pi-01", block.layers[0], block.layers[-1], tuple(block.layers), block.head, 32, 90 << 20)
    b = Assignment("pi-02", 0, 0, (0,), m.blocks[0].head, 32, 80 << 20)
    state.open_round(1, 1e12, "ab" * 32, {}, {}, [("r1-pi-01", "pi-01", {"assignment": asdict(a)}),
                                                  ("r1-pi-02", "pi-02", {"assignment": asdict(b)})])
    names = m.param_names(a.trainable, [a.head])
    good = {n: w[n] + np.float32(0.01) for n in names}
    return m, w, state, BlobStore(tmp_path / "incoming"), good


def _judge(setup, values=None, raw=None, **fields):
    m, w, state, incoming, good = setup
    data = raw if raw is not None else wcodec.encode(good if values is None else values)
    sha = incoming.put_bytes(data)
    sender = fields.pop("sender", "pi-01")
    base = dict(task_id="r1-pi-01", round=1, device_id="pi-01", blob_sha256=sha, blob_size=len(data),
                num_examples=100, loss=0.5, steps=10, peak_rss_bytes=80 << 20, seconds=1.0)
    base.update(fields)
    return intake.judge_update(Update(**base), sender, state, 1, incoming, m, lambda task: w, UpdateCheck(max_relative_change=1.0))


def test_a_good_update_is_accepted_and_a_second_copy_is_a_duplicate(setup):
    assert _judge(setup).status == "accepted"
    m, w, state, incoming, good = setup
    data = wcodec.encode(good)
    state.record_update(Update("r1-pi-01", 1, "pi-01", incoming.put_bytes(data), len(data), 100, 0.5, 10, 1, 1.0))
    assert _judge(setup).status == "duplicate"


@pytest.mark.parametrize("case, fields, reason, kind", [
    ("sender is not the device named in the update", {"sender": "pi-02"}, "sent on the topic of device",
     "wrong_identity"),
    ("unknown device", {"sender": "ghost", "device_id": "ghost"}, "unknown device 'ghost'", "unknown_device"),
    ("task of another device", {"sender": "pi-02", "device_id": "pi-02"}, "was scheduled to pi-01", "wrong_task"),
    ("unknown task", {"task_id": "r7-pi-01"}, "unknown task", "unknown_task"),
    ("wrong round", {"round": 2}, "says round 2", "wrong_task"),
    ("declared size differs from the blob", {"blob_size": 1234}, "declared size 1234", "integrity"),
    ("oversize", {"blob_size": 50 << 20}, "exceeds", "oversize"),
])
def test_message_level_rejections(setup, case, fields, reason, kind):
    v = _judge(setup, **fields)
    assert v.status == "rejected" and reason in v.reason and v.kind == kind, (case, v)


def test_a_replayed_update_for_a_closed_round_is_rejected(setup):
    m, w, state, incoming, good = setup
    data = wcodec.encode(good)
    u = Update("r1-pi-01", 1, "pi-01", incoming.put_bytes(data), len(data), 100, 0.5, 10, 1, 1.0)
    v = intake.judge_update(u, "pi-01", state, 2, incoming, m, lambda task: w)   # round 2 is open now
    assert v.status == "rejected" and "round 1 is closed" in v.reason and v.kind == "stale"


def test_tensor_level_rejections(setup):
    m, w, state, incoming, good = setup
    name = sorted(good)[0]
    cases = {
        "missing parameter": ({k: v for k, v in good.items() if k != name}, "wrong parameters"),
        "extra parameter": (dict(good, **{m.param_names([0])[0]: w[m.param_names([0])[0]]}), "wrong parameters"),
        "wrong shape": (dict(good, **{name: np.zeros((3, 3), np.float32)}), "has shape (3, 3)"),
        "NaN": (dict(good, **{name: np.full_like(good[name], np.nan)}), "NaN or infinite"),
        "norm beyond the bound": ({k: v * 50 for k, v in good.items()}, "more than the bound"),
    }
    for case, (values, reason) in cases.items():
        v = _judge(setup, values=values)
        assert v.status == "rejected" and reason in v.reason and v.settles_task and v.kind == "bad_update", (case, v)
    ints = _judge(setup, raw=_safetensors_with_int(good))
    assert ints.status == "rejected" and "dtype int32" in ints.reason and ints.kind == "bad_update"
    garbage = _judge(setup, raw=b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert garbage.status == "rejected" and "not a valid safetensors" in garbage.reason
    assert garbage.kind == "bad_update"            # it matched its hash: what it holds is no update


def test_an_incomplete_blob_waits_and_a_failure_report_settles_its_task(setup):
    m, w, state, incoming, good = setup
    u = Update("r1-pi-01", 1, "pi-01", "ee" * 32, 1000, 100, 0.5, 10, 1, 1.0)
    assert intake.judge_update(u, "pi-01", state, 1, incoming, m, lambda task: w).status == "pending"
    ok = intake.judge_failure(Failed("r1-pi-02", 1, "pi-02", "needs 120 MB"), "pi-02", state, 1)
    assert ok.status == "accepted" and ok.settles_task
    forged = intake.judge_failure(Failed("r1-pi-01", 1, "pi-01", "no"), "pi-02", state, 1)
    assert forged.status == "rejected" and forged.kind == "wrong_identity"


def _safetensors_with_int(good):
    from safetensors.numpy import save
    return save({k: np.zeros(v.shape, np.int32) for k, v in good.items()})


@pytest.mark.parametrize("loss, reason", [
    (-0.42, "is negative, which a cross-entropy cannot be"),        # labels past the logits read garbage
    (23.5, "is implausible for this task"),                           # far above chance (3 x ln 10 = 6.9)
])
def test_an_implausible_loss_is_refused_before_the_blob_is_read(setup, loss, reason):
    v = _judge(setup, raw=b"not even a blob", loss=loss)
    assert v.status == "rejected" and reason in v.reason and v.settles_task and v.kind == "implausible_loss"


def test_the_loss_ceiling_follows_the_fleets_recent_losses(setup):
    m, w, state, incoming, good = setup
    data = wcodec.encode(good)
    chance = 3 * np.log(10)
    assert intake.loss_ceiling(10, []) == pytest.approx(chance)
    # a fleet at 2.5 (an early round) lets a device report 9.5, above chance, but not 10.5
    assert intake.loss_ceiling(10, [2.4, 2.5, 2.6]) == pytest.approx(10.0)
    state.record_update(Update("r1-pi-02", 1, "pi-02", incoming.put_bytes(data), len(data), 100, 2.5, 10, 1, 1.0))
    recent = state.recent_losses(1)
    assert recent == [2.5]
    assert intake.implausible_loss(9.5, 10, recent) is None
    assert "4 x the fleet's median recent loss (2.5)" in intake.implausible_loss(10.5, 10, recent)
    assert state.recent_losses(5) == []          # rounds 3..5 hold no updates
