"""Update validation and FedAvg per parameter (the freezing rule: test_freezing.py)."""
from dataclasses import asdict

import numpy as np
import pytest

from coordinator.strategies.aggregation import (
    AggregationSettings,
    UpdateCheck,
    UpdateRejected,
    aggregate_updates,
    validate_update,
)

FEDAVG = AggregationSettings(rule="mean", max_share=1.0)    # the weighted mean, no share cap


def weighted_average(updates):
    """FedAvg as the service runs it with the plain mean: aggregate_updates, the one aggregation there is."""
    return aggregate_updates(updates, {}, FEDAVG)

RNG = np.random.default_rng(0)
GLOBAL = {"a": RNG.standard_normal((4, 3)).astype(np.float32), "b": RNG.standard_normal(3).astype(np.float32)}
SHAPES = {k: v.shape for k, v in GLOBAL.items()}


def test_a_sound_update_passes():
    validate_update({k: v + 0.01 for k, v in GLOBAL.items()}, SHAPES, GLOBAL)


@pytest.mark.parametrize("update, reason", [
    ({"a": GLOBAL["a"]}, "missing"),
    ({**GLOBAL, "c": GLOBAL["b"]}, "unexpected"),
    ({**GLOBAL, "b": GLOBAL["b"].astype(np.float64)}, "dtype float64"),
    ({**GLOBAL, "b": np.zeros(4, np.float32)}, r"shape \(4,\)"),
    ({**GLOBAL, "a": np.where(np.eye(4, 3) > 0, np.nan, GLOBAL["a"]).astype(np.float32)}, "NaN or infinite"),
    ({**GLOBAL, "a": (GLOBAL["a"] * 1e6).astype(np.float32)}, "more than the bound"),
])
def test_bad_updates_are_rejected_with_the_reason(update, reason):
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(update, SHAPES, GLOBAL, UpdateCheck(max_relative_change=10))


def test_fedavg_weights_by_samples_and_averages_each_parameter_over_its_own_trainers():
    one = {"a": np.ones((2,), np.float32), "b": np.full((1,), 10, np.float32)}
    two = {"a": np.full((2,), 4, np.float32)}          # trained only "a"
    avg = weighted_average([(one, 100), (two, 300)])
    np.testing.assert_allclose(avg["a"], 1 * 0.25 + 4 * 0.75)
    np.testing.assert_allclose(avg["b"], 10)           # only the device that trained it
    assert avg["a"].dtype == np.float32


def test_a_round_reads_stored_updates_lazily_and_leaves_out_lost_or_altered_ones(tmp_path, caplog):
    """The close of a round: hash-checked, read a tensor at a time, a damaged update left out with a log line."""
    from coordinator.service import stored_results
    from coordinator.state_store import TaskRow, UpdateRow
    from coordinator.strategies.base import Assignment
    from edge_runtime.wire import weights as wcodec
    from edge_runtime.wire.transfer import BlobStore

    store = BlobStore(tmp_path / "incoming")
    rng = np.random.default_rng(0)
    tensors = {d: {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
               for d in ("a", "b", "c", "d")}
    rows, by_task = [], {}
    for i, (device, values) in enumerate(tensors.items()):
        wcodec.save(tmp_path / f"{device}.safetensors", values)
        sha = store.put_file(tmp_path / f"{device}.safetensors")
        rows.append(UpdateRow(f"t-{device}", 1, device, sha, 10 * (i + 1), 0.5, 1, 1.0, 0.0))
        by_task[f"t-{device}"] = TaskRow(f"t-{device}", 1, device,
                                         {"assignment": asdict(Assignment(device, 0, 1, (0, 1), 0, 32, 1))}, "accepted")
    raw = bytearray(store.path(rows[1].blob_sha256).read_bytes())
    raw[-1] ^= 0xFF                                         # b's update altered on disk
    store.path(rows[1].blob_sha256).write_bytes(bytes(raw))
    store.path(rows[2].blob_sha256).unlink()                # c's update lost
    with caplog.at_level("ERROR"):
        results = stored_results(1, rows, by_task, store, load_index=lambda sha: {})   # no task carries own weights
    assert [r.assignment.device_id for r in results] == ["a", "d"]
    assert all(isinstance(r.update, wcodec.WeightFile) for r in results)   # nothing read yet
    assert "update of b is unreadable" in caplog.text and "update of c is unreadable" in caplog.text
    averaged = weighted_average([(r.update, r.num_examples) for r in results])
    expected = (tensors["a"]["w"] * 10 + tensors["d"]["w"] * 40) / 50
    assert np.allclose(averaged["w"], expected, atol=1e-6)
