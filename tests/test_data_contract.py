"""The data contract, checked where the data is: bad data is named as such (file, rows, fix), never as a memory
problem, a negative loss or a learning rate, and a device with bad data answers its tasks with why and serves on."""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.ops.broker import EmbeddedBroker
from edge_runtime.device.agent import Agent, budgeted_jobs
from edge_runtime.device.cli import connect
from edge_runtime.device.settings import resolve
from edge_runtime.errors import BudgetError, EdgeRuntimeError
from edge_runtime.jobs import budget
from edge_runtime.jobs.worker import JobSpec
from edge_runtime.memory import MIB
from edge_runtime.train.datasets import (
    DATA_CHECK_FILE,
    DataError,
    DataSummary,
    LocalDataset,
    check_arrays,
    check_batch,
)
from edge_runtime.train.trainer import train
from edge_runtime.wire.model_blobs import part_graph_paths, publish_weights, task_blobs
from edge_runtime.wire.mqtt_link import MqttLink
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.protocol import Ack, Failed, Task, Topics, Update, decode_any
from edge_runtime.wire.train_config import TrainConfig
from edge_runtime.wire.transfer import BlobStore

SHAPE, CLASSES = (1, 28, 28), 10


@pytest.fixture(scope="module")
def real(small_dataset):
    """200 real Fashion-MNIST images and their labels, as the model takes them."""
    return np.load(small_dataset.inputs_path)[:200].copy(), np.load(small_dataset.labels_path)[:200].copy()


def _files(root: Path, inputs: np.ndarray, labels: np.ndarray) -> LocalDataset:
    """A device's data directory holding exactly these arrays (np.save, no conversion, as a user writes it)."""
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "inputs.npy", inputs)
    np.save(root / "labels.npy", labels)
    return LocalDataset(root)


def _rewrite_behind_the_check(ds: LocalDataset, inputs: np.ndarray, labels: np.ndarray) -> None:
    """Change the data without changing its fingerprint (same size, same mtime): the cached check still matches,
    so only the trainer's own look at a failing batch can find what is wrong."""
    for path, arr in ((ds.inputs_path, inputs), (ds.labels_path, labels)):
        st = path.stat()
        with open(path, "r+b") as f:
            f.seek(st.st_size - arr.nbytes)
            f.write(np.ascontiguousarray(arr).tobytes())
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# -- the check itself ----------------------------------------------------------------------------

def test_valid_data_is_summarised_as_numpy_sees_it(small_dataset, tmp_path):
    x, y = np.load(small_dataset.inputs_path), np.load(small_dataset.labels_path)
    cache = tmp_path / DATA_CHECK_FILE
    summary = small_dataset.check(SHAPE, CLASSES, cache_file=cache)   # 2,000 rows: read in 6 chunks
    assert summary.rows == 2000 and summary.fingerprint == small_dataset.fingerprint()
    assert summary.input_mean == pytest.approx(x.astype(np.float64).mean(), rel=1e-6, abs=1e-9)
    assert summary.input_std == pytest.approx(x.astype(np.float64).std(), rel=1e-6)
    assert summary.label_counts == tuple(np.bincount(y, minlength=CLASSES))
    # the same on memory-mapped arrays, as the coordinator checks its evaluation set; and read back from the cache
    mapped = check_arrays(np.load(small_dataset.inputs_path, mmap_mode="r"),
                          np.load(small_dataset.labels_path, mmap_mode="r"), SHAPE, CLASSES, "the evaluation set")
    assert (mapped.rows, mapped.label_counts) == (summary.rows, summary.label_counts)
    assert (mapped.input_mean, mapped.input_std) == pytest.approx((summary.input_mean, summary.input_std))
    assert cache.exists() and small_dataset.check(SHAPE, CLASSES, cache_file=cache) == summary
    assert DataSummary.from_dict(summary.to_dict()) == summary


def _bad(name, real):
    """(inputs, labels) breaking the contract one way, and what the message must say."""
    x, y = real
    if name == "shape":
        return x[:, 0], y, [r"inputs have shape \(200, 28, 28\), the model takes \(200, 1, 28, 28\)",
                            r"reshape them: inputs.reshape\(200, 1, 28, 28\)", "inputs.npy"]
    if name == "input dtype":
        return (x * 255).astype(np.uint8), y, ["inputs are uint8, the model takes float32", "astype", "200 rows"]
    if name == "label dtype":
        return x, y.astype(np.float32), ["labels are float32", "labels.npy: labels", "int64"]
    if name == "label count":
        return x, y[:199], ["holds 199 labels for the 200 rows", "labels.npy"]
    if name == "labels out of range":
        y = y.copy()
        y[[3, 5, 7, 9]] = [10, 12, 1000, -1]
        return x, y, [r"4 of 200 labels are outside 0..9", "row 3 is 10", "row 5 is 12", "row 7 is 1000",
                      "row 9 is -1", "labels.npy"]
    if name == "nan":
        x = x.copy()
        x[4, 0, 3, 3] = np.nan
        x[150, 0, 0, 0] = np.inf
        return x, y, ["2 of 200 rows hold values that are not finite \\(NaN and inf\\): rows 4, 150", "inputs.npy"]
    if name == "empty":
        return x[:0], y[:0], ["0 rows", "at least one"]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["shape", "input dtype", "label dtype", "label count", "labels out of range",
                                  "nan", "empty"])
def test_data_breaking_the_contract_is_named_with_its_file_rows_and_fix(real, tmp_path, name):
    inputs, labels, says = _bad(name, real)
    ds = _files(tmp_path / "data", inputs, labels)
    with pytest.raises(DataError) as caught:
        ds.check(SHAPE, CLASSES)
    for pattern in says:
        assert re.search(pattern, str(caught.value)), (pattern, str(caught.value))
    assert str(tmp_path / "data") in str(caught.value)
    # the same arrays in memory: the same finding, named by the source given
    with pytest.raises(DataError, match=says[0]) as in_memory:
        check_arrays(inputs, labels, SHAPE, CLASSES, "the evaluation set")
    assert "the evaluation set" in str(in_memory.value)


def test_missing_and_foreign_files_are_named(real, tmp_path):
    x, y = real
    (tmp_path / "missing").mkdir()
    np.save(tmp_path / "missing" / "inputs.npy", x)
    with pytest.raises(DataError, match=r"missing: no labels.npy; a device's data directory holds"):
        LocalDataset(tmp_path / "missing").check(SHAPE, CLASSES)
    foreign = _files(tmp_path / "foreign", x, y)
    with open(foreign.inputs_path, "wb") as f:
        np.savez(f, x=x)               # a zip archive under the .npy name
    with pytest.raises(DataError, match=r"inputs.npy is not a .npy file .*numpy.save"):
        foreign.check(SHAPE, CLASSES)


def test_a_batch_is_blamed_by_its_rows_as_numbered_in_the_files(real):
    x, y = real
    rows = np.array([17, 40, 41])
    batch_x, batch_y = x[rows].copy(), y[rows].copy()
    batch_x[1, 0, 0, 0] = np.nan
    batch_y[2] = 10
    with pytest.raises(DataError) as caught:
        check_batch(batch_x, batch_y, rows, CLASSES, "in.npy", "lab.npy")
    assert "lab.npy: 1 of the batch's 3 labels are outside 0..9" in str(caught.value)
    assert "row 41 is 10" in str(caught.value)
    assert "in.npy: 1 of the batch's 3 rows hold values that are not finite (NaN): row 40" in str(caught.value)
    check_batch(x[rows], y[rows], rows, CLASSES, "in.npy", "lab.npy")   # clean: nothing to say


# -- real jobs: the cause named, at once ---------------------------------------------------------

def _spec(m, ds: LocalDataset, where: Path, task_id: str, block: int, **config) -> JobSpec:
    return JobSpec(manifest=str(m.root / "manifest.json"), weights=str(m.graph_path(m.weights)),
                   dataset=str(ds.root), state_dir=str(where / "state"), task_id=task_id,
                   part=TrainablePart.block(m, block).to_dict(),
                   config={"batch_size": 32, "threads": 1, "max_steps": 4, **config})


def _children(jobs_dir: Path) -> list[str]:
    """The job children run, by the spec each was given (one file per child run)."""
    return sorted(p.name for p in jobs_dir.glob("*.json"))


def test_a_job_on_data_of_the_wrong_shape_fails_at_once_naming_the_shape(fmnist_model, real, tmp_path):
    m, _ = fmnist_model
    x, y = real
    ds = _files(tmp_path / "data", x[:, 0], y)
    with pytest.raises(DataError) as caught:
        budget.train_within_budget(_spec(m, ds, tmp_path, "shape", 0), 296 * MIB, tmp_path / "jobs")
    text = str(caught.value)
    assert "inputs have shape (200, 28, 28), the model takes (200, 1, 28, 28)" in text and "inputs.npy" in text
    assert "budget" not in text and "MB" not in text
    assert _children(tmp_path / "jobs") == ["calibrate-shape-m32.json"]      # one calibration run, not eight


@pytest.mark.parametrize("fault", ["nan", "labels out of range"])
def test_a_job_on_nan_inputs_or_bad_labels_names_the_data_not_the_learning_rate(fmnist_model, real, tmp_path, fault):
    m, _ = fmnist_model
    inputs, labels, says = _bad(fault, real)
    ds = _files(tmp_path / "data", inputs, labels)
    with pytest.raises(DataError) as caught:
        budget.train_within_budget(_spec(m, ds, tmp_path, "bad", 1), 296 * MIB, tmp_path / "jobs")
    assert says[0].replace("\\", "") in str(caught.value) and "learning rate" not in str(caught.value)
    assert len(_children(tmp_path / "jobs")) == 1


def test_calibration_stops_at_a_failure_that_is_not_memory_and_passes_its_text_through(fmnist_model, small_dataset,
                                                                                        tmp_path):
    m, _ = fmnist_model
    spec = _spec(m, small_dataset, tmp_path, "broken", 0)
    spec.weights = str(tmp_path)          # a directory where the weights file should be: the job's own error
    with pytest.raises(EdgeRuntimeError) as caught:
        budget.train_within_budget(spec, 296 * MIB, tmp_path / "jobs")
    assert not isinstance(caught.value, BudgetError)
    assert "while calibrating at micro-batch 32" in str(caught.value) and "Is a directory" in str(caught.value)
    assert _children(tmp_path / "jobs") == ["calibrate-broken-m32.json"]


def test_a_diverged_loss_is_put_down_to_the_rows_that_caused_it(fmnist_model, real, tmp_path):
    """Data that changed after it was checked: the trainer looks at the failing batch before blaming anything."""
    m, w = fmnist_model
    x, y = real
    for fault, block in (("nan", 1), ("labels", 0)):
        ds = _files(tmp_path / fault, x, y)
        state = tmp_path / f"{fault}-state"
        ds.check(m.input_shape, m.num_classes, cache_file=state / DATA_CHECK_FILE)
        bad_x, bad_y = x.copy(), y.copy()
        if fault == "nan":
            bad_x[3] = np.nan
        else:
            bad_y[[1, 2, 5]] = [10, 12, 1000]
        _rewrite_behind_the_check(ds, bad_x, bad_y)
        with pytest.raises(DataError) as caught:
            train(m, w, ds, TrainablePart.block(m, block), TrainConfig(batch_size=200, max_steps=2), state, fault)
        text = str(caught.value)
        assert text.startswith("training step 0 ") and "because of the data" in text and "learning rate" not in text
        if fault == "nan":
            assert f"{ds.inputs_path}: 1 of the batch's 200 rows hold values that are not finite (NaN): row 3" \
                in text
        else:
            assert f"{ds.labels_path}: 3 of the batch's 200 labels are outside 0..9" in text
            assert "row 1 is 10, row 2 is 12, row 5 is 1000" in text


def test_only_a_divergence_on_clean_data_blames_the_learning_rate(fmnist_model, real, tmp_path):
    m, w = fmnist_model
    ds = _files(tmp_path / "data", *real)
    with pytest.raises(EdgeRuntimeError, match=r"diverged at step \d+: loss is nan although the batch's inputs are "
                                               r"finite and its labels in 0..9; lower the learning rate") as caught:
        train(m, w, ds, TrainablePart.block(m, 1), TrainConfig(optimizer="sgd", learning_rate=1e8, batch_size=32,
                                                               max_steps=6), tmp_path / "state", "lr")
    assert not isinstance(caught.value, DataError)


# -- the agent ----------------------------------------------------------------------------------

def _device(tmp_path: Path, data: LocalDataset, port: int = 1883):
    return resolve({"id": "pi-01", "fleet": "contract", "broker": f"mqtt://127.0.0.1:{port}", "data": str(data.root),
                    "state": str(tmp_path / "state"), "budget_mb": 900.0, "ack_timeout_s": 10.0})


def test_the_agent_checks_its_data_at_start_up_and_again_when_it_changes(real, tmp_path, caplog):
    x, y = real
    inputs, labels, _ = _bad("labels out of range", real)
    data = _files(tmp_path / "data", inputs, labels)
    cfg = _device(tmp_path, data)
    (cfg.state / "data_contract.json").write_text('{"input_shape": [1, 28, 28], "num_classes": 10}')  # a past task's
    agent = Agent(cfg, None, budgeted_jobs(cfg, 500 * MIB), threading.Event())
    with caplog.at_level(logging.INFO, logger="edge_runtime.device"):
        agent._check_data_at_start()
    assert "data check failed" in caplog.text and "row 3 is 10" in caplog.text
    with pytest.raises(DataError, match="row 3 is 10"):   # the outcome is kept: no reading again
        agent.check_data(SHAPE, CLASSES)
    LocalDataset.write(data.root, x, y)                  # fixed: a new fingerprint, checked again
    summary = agent.check_data(SHAPE, CLASSES)
    assert summary.rows == 200 and summary.fingerprint == data.fingerprint()
    assert summary.input_mean == pytest.approx(x.astype(np.float64).mean(), rel=1e-6)


def test_an_agent_with_bad_data_answers_failed_serves_on_and_reports_its_input_statistics(fmnist_model, real,
                                                                                           tmp_path):
    """A real agent over a real Mosquitto: the task's blobs are already in its store (no fetch), the test plays
    the coordinator's part of the protocol."""
    m, w = fmnist_model
    x, y = real
    inputs, labels, _ = _bad("labels out of range", real)
    data = _files(tmp_path / "data", inputs, labels)
    part = TrainablePart.block(m, 0)
    topics = Topics("contract")
    with EmbeddedBroker(tmp_path / "broker") as broker:
        cfg = _device(tmp_path, data, broker.port)
        store = BlobStore(cfg.state / "blobs")
        manifest_sha = store.put_file(m.root / "manifest.json")
        step, _ = part_graph_paths(m, part)
        blobs = task_blobs(m, part, publish_weights(m, w, store), store, {"step.onnx": store.put_file(step)})

        def task(task_id: str, round_: int) -> Task:
            return Task(task_id, round_, {"sha256": manifest_sha, "size": store.path(manifest_sha).stat().st_size},
                        blobs, part, TrainConfig(batch_size=32, epochs=1.0, threads=1), deadline_s=120.0)

        coordinator = MqttLink("coordinator", broker.host, broker.port,
                               [(topics.device("pi-01", kind), 1) for kind in ("hello", "update")]).start()
        stop = threading.Event()
        link = connect(cfg, stop)
        agent = Agent(cfg, link, budgeted_jobs(cfg, 500 * MIB), stop)
        serving = threading.Thread(target=agent.serve, daemon=True)
        serving.start()
        try:
            def answer(kind: str = "update", timeout_s: float = 120.0):
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    msg = coordinator.get(timeout_s=0.5)
                    if msg is not None and msg.topic.endswith("/" + kind):
                        return decode_any(msg.payload, (Failed, Update)) if kind == "update" else msg
                raise AssertionError(f"no {kind} from the agent")

            answer("hello")     # the agent is subscribed to its tasks
            coordinator.publish(topics.device("pi-01", "task"), task("t1", 1).encode())
            failed = answer()
            assert isinstance(failed, Failed) and failed.task_id == "t1"
            assert "labels.npy: 4 of 200 labels are outside 0..9" in failed.reason
            assert "row 3 is 10" in failed.reason and "row 9 is -1" in failed.reason

            LocalDataset.write(data.root, x, y)       # the user fixes the data; the same agent trains the next task
            coordinator.publish(topics.device("pi-01", "task"), task("t2", 2).encode())
            update = answer()
            assert isinstance(update, Update) and update.task_id == "t2" and update.num_examples == 200
            assert update.input_mean == pytest.approx(x.astype(np.float64).mean(), rel=1e-5)
            assert update.input_std == pytest.approx(x.astype(np.float64).std(), rel=1e-5)
            coordinator.publish(topics.device("pi-01", "ack"), Ack("t2", True).encode())
            deadline = time.monotonic() + 10
            while "t2" not in agent.done and time.monotonic() < deadline:
                time.sleep(0.1)
            assert agent.done["t1"]["accepted"] is False and agent.done["t2"]["accepted"] is True
            assert serving.is_alive()
        finally:
            stop.set()
            serving.join(10)
            link.stop()
            coordinator.stop()


class _AgentUnderTest:
    """A real agent on a real broker, one task sent to it, and the coordinator's side played by hand: `until`
    reads what the coordinator's topics got into `seen`, (kind, message) in order."""

    def __init__(self, fmnist_model, real, tmp_path: Path, ack_timeout_s: float):
        m, w = fmnist_model
        x, y = real
        data = _files(tmp_path / "data", x, y)
        part = TrainablePart.block(m, 0)
        self.topics = topics = Topics("contract")
        self._broker = EmbeddedBroker(tmp_path / "broker").__enter__()
        broker = self._broker
        cfg = resolve({"id": "pi-01", "fleet": "contract", "broker": f"mqtt://127.0.0.1:{broker.port}",
                       "data": str(data.root), "state": str(tmp_path / "state"), "budget_mb": 900.0,
                       "ack_timeout_s": ack_timeout_s})
        store = BlobStore(cfg.state / "blobs")
        manifest_sha = store.put_file(m.root / "manifest.json")
        step, _ = part_graph_paths(m, part)
        blobs = task_blobs(m, part, publish_weights(m, w, store), store, {"step.onnx": store.put_file(step)})
        self.task = Task("t1", 1, {"sha256": manifest_sha, "size": store.path(manifest_sha).stat().st_size}, blobs,
                         part, TrainConfig(batch_size=32, epochs=1.0, threads=1), deadline_s=120.0)
        self.coordinator = MqttLink("coordinator", broker.host, broker.port,
                                    [(topics.device("pi-01", kind), 1) for kind in ("hello", "update", "upload")]
                                    ).start()
        self.stop = threading.Event()
        self.link = connect(cfg, self.stop)
        self.agent = Agent(cfg, self.link, budgeted_jobs(cfg, 500 * MIB), self.stop)
        self.serving = threading.Thread(target=self.agent.serve, daemon=True)
        self.serving.start()
        self.seen: list = []

    def until(self, predicate, timeout_s: float = 120.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not predicate():
            msg = self.coordinator.get(timeout_s=0.2)
            if msg is not None:
                kind = msg.topic.rsplit("/", 1)[-1]
                self.seen.append((kind, msg if kind == "upload" else decode_any(msg.payload, (Failed, Update))
                                  if kind == "update" else msg))
        assert predicate(), f"timed out; seen {[k for k, _ in self.seen]}"

    def updates(self) -> list:
        return [u for k, u in self.seen if k == "update"]

    def send(self, kind: str, message) -> None:
        self.coordinator.publish(self.topics.device("pi-01", kind), message.encode())

    def start_task(self) -> None:
        self.until(lambda: any(k == "hello" for k, _ in self.seen))
        self.send("task", self.task)

    def close(self) -> None:
        self.stop.set()
        self.serving.join(10)
        self.link.stop()
        self.coordinator.stop()
        self._broker.__exit__(None, None, None)


def test_the_agent_sends_its_update_first_its_chunks_when_asked_and_waits_in_line_until_the_deadline(
        fmnist_model, real, tmp_path):
    """The upload is pulled: the update message goes alone, again and again while the coordinator keeps it waiting
    (past the agent's ten attempts: its round's deadline is what bounds the wait), and the blob's chunks go only
    when a Resend asks for them, exactly those it names."""
    from edge_runtime.device.agent import SEND_ATTEMPTS
    from edge_runtime.wire.protocol import Resend
    from edge_runtime.wire.transfer import ChunkHeader
    t = _AgentUnderTest(fmnist_model, real, tmp_path, ack_timeout_s=0.3)
    try:
        t.start_task()
        t.until(lambda: len(t.updates()) > SEND_ATTEMPTS)     # kept waiting: it asks again, past ten attempts
        assert all(isinstance(u, Update) and u.task_id == "t1" for u in t.updates())
        assert not [k for k, _ in t.seen if k == "upload"]  # and sends no chunk unasked
        blob = t.updates()[0].blob_sha256
        t.send("ack", Resend("t1", blob, None))

        def chunks():
            return [ChunkHeader.from_properties(msg.user_properties) for k, msg in t.seen if k == "upload"]
        t.until(lambda: chunks() and len(chunks()) == chunks()[0].count)
        assert sorted(h.index for h in chunks()) == list(range(chunks()[0].count))
        assert {h.blob for h in chunks()} == {blob}
        t.send("ack", Ack("t1", True))
        t.until(lambda: "t1" in t.agent.done, 30)
        assert t.agent.done["t1"]["accepted"] is True and t.serving.is_alive()
    finally:
        t.close()


def test_an_agent_that_reconnects_while_waiting_for_its_ack_sends_its_update_again_at_once(
        fmnist_model, real, tmp_path):
    """The connection drops while the agent waits for the coordinator's answer (here it would wait 600 s): what
    was in flight may be lost, and the coordinator gives an offline device's upload slot to the next, so the
    update goes again as soon as the link is back."""
    import socket
    t = _AgentUnderTest(fmnist_model, real, tmp_path, ack_timeout_s=600.0)
    try:
        t.start_task()
        t.until(lambda: len(t.updates()) == 1)
        connects = t.link.connects
        t.link._client.socket().shutdown(socket.SHUT_RDWR)       # the network drops; paho reconnects
        t.until(lambda: len(t.updates()) == 2, 60)
        assert t.link.connects > connects
        assert t.updates()[1].task_id == "t1" and t.updates()[1].blob_sha256 == t.updates()[0].blob_sha256
        assert not [k for k, _ in t.seen if k == "upload"]        # still the update alone: no chunk unasked
        t.send("ack", Ack("t1", True))
        t.until(lambda: "t1" in t.agent.done, 30)
        assert t.agent.done["t1"]["accepted"] is True
    finally:
        t.close()
