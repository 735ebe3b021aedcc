"""Faults over a real Mosquitto: killed devices, a killed coordinator, a restarted broker, bad updates.

Each test runs the real coordinator service and real device agents as processes on
fmnist_cnn with a small non-IID dataset, and checks what the state store and the metrics
say afterwards: which updates were accepted, once each, in which round.
"""
import json
import sqlite3

import numpy as np
import pytest
from fleet_helpers import BIG_MB, LocalFleet, open_round, read_metrics, settings, wait_for

from coordinator.local.data import write_fleet_data
from coordinator.local.fleet import DeviceSpec
from coordinator.ops.broker import EmbeddedBroker
from edge_runtime.wire import model_blobs
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.blob_exchange import fetch_blob, send_blob
from edge_runtime.wire.mqtt_link import MqttLink
from edge_runtime.wire.protocol import Ack, Hello, Status, Task, Topics, Update
from edge_runtime.wire.transfer import BlobStore


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from coordinator.model.zoo_profile import measured_profile
    root = tmp_path_factory.mktemp("faults")
    measured_profile(root, "fmnist_cnn", [32, 64])
    ids = ["d0", "d1", "d2"]
    dirs = write_fleet_data(root / "data", ids, samples=6000, alpha=0.5)
    return {"root": root, "profile": root / "profile.json",
            "specs": [DeviceSpec(d, "pi-zero-2w", BIG_MB, dirs[d]) for d in ids]}


def _fedavg(work, env, rounds, **service):
    s = settings(work, env["profile"], "fedavg", min_devices=3, **service)
    s["fedavg"]["rounds"] = rounds
    return s


def _updates(work) -> list[tuple]:
    with sqlite3.connect(work / "state.db") as db:
        return db.execute("SELECT round, device_id, task_id FROM updates ORDER BY round, device_id").fetchall()


def _log_says(fleet, name, text):
    return lambda: text in fleet.log_tail(name, 200)


def test_a_device_killed_mid_round_does_not_stall_it_and_rejoins(env, tmp_path):
    with EmbeddedBroker(tmp_path / "broker") as broker, LocalFleet(tmp_path, broker.url, "kill-device") as fleet:
        work = tmp_path / "coordinator"
        fleet.start_run(_fedavg(work, env, rounds=3), env["specs"])
        wait_for(_log_says(fleet, "d2", ": training"), 120, "d2 to start training", fleet)
        fleet.kill("d2")                                    # its last will says offline
        wait_for(lambda: open_round(work) is None or open_round(work).round > 1, 120, "round 1 to close", fleet)
        fleet.start_device(env["specs"][2])                 # the board comes back
        assert fleet.wait("coordinator", 300) == 0, fleet.log_tail("coordinator")
    metrics = read_metrics(work)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    first = metrics[0]
    assert first["devices"]["d2"]["status"] == "failed" and "went offline" in first["closed_because"]
    assert {d for d, r in first["devices"].items() if r["status"] == "accepted"} == {"d0", "d1"}
    assert all(m["devices"]["d2"]["status"] == "accepted" for m in metrics[1:]), "d2 did not rejoin"


def test_a_coordinator_killed_mid_round_continues_it_without_losing_or_repeating_updates(env, tmp_path):
    with EmbeddedBroker(tmp_path / "broker") as broker, LocalFleet(tmp_path, broker.url, "kill-coord") as fleet:
        work = tmp_path / "coordinator"
        # progressive, killed in its second round of block 0: the restart must rebuild the freezing window
        config = settings(work, env["profile"], "progressive", min_devices=3, max_rounds=3)
        config["progressive"].update(shrink_rounds=0)
        fleet.start_run(config, env["specs"])

        def some_but_not_all_accepted():
            row = open_round(work)
            if row is None or row.round != 2:
                return None
            done = [u for u in _updates(work) if u[0] == row.round]
            return 1 <= len(done) < 3 and done
        before = wait_for(some_but_not_all_accepted, 180, "round 2 to hold some accepted updates", fleet, 0.02)
        fleet.kill("coordinator")
        fleet.start_coordinator(config)
        assert fleet.wait("coordinator", 300) == 0, fleet.log_tail("coordinator")
        restarted = fleet.log_tail("coordinator", 400)
    assert "round 2 continues" in restarted
    metrics = read_metrics(work)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert all(m["stage"]["phase"] == "growing" for m in metrics)
    rows = _updates(work)
    assert len(rows) == len(set(rows)) == 9                          # three devices, three rounds, each once
    assert set(before) <= set(rows)                                  # accepted before the kill, still there
    assert all(m["updates"] == 3 and m["aggregated"] for m in metrics)


def test_a_broker_restart_mid_round_loses_nothing(env, tmp_path):
    with EmbeddedBroker(tmp_path / "broker") as broker, LocalFleet(tmp_path, broker.url, "broker-restart") as fleet:
        work = tmp_path / "coordinator"
        fleet.start_run(_fedavg(work, env, rounds=2, update_fp16=True), env["specs"])   # and updates as fp16
        wait_for(lambda: open_round(work) is not None, 120, "round 1 to open", fleet)
        wait_for(_log_says(fleet, "d0", "training"), 120, "d0 to train", fleet)
        broker.restart()                                             # same port, persistent sessions
        assert fleet.wait("coordinator", 300) == 0, fleet.log_tail("coordinator")
    metrics = read_metrics(work)
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(m["updates"] == 3 for m in metrics), [m["closed_because"] for m in metrics]
    for row in (r for m in metrics for r in m["devices"].values()):   # fp16 halves what goes up
        assert row["uploaded_bytes"] <= row["trained_bytes"] / 2 + 1024


class Rogue:
    """A client speaking the protocol by hand, to send what a correct agent never would."""

    def __init__(self, broker, fleet, device_id, store_dir):
        self.topics, self.id = Topics(fleet), device_id
        self.link = MqttLink(f"rogue-{device_id}", broker.host, broker.port,
                             [(self.topics.device(device_id, k), 1) for k in ("task", "blob", "ack")]).start()
        self.store = BlobStore(store_dir)
        self.link.publish(self.topics.device(device_id, "status"), Status("online").encode(), retain=True)
        self.link.publish(self.topics.device(device_id, "hello"),
                          Hello(device_id, "pi-zero-2w", 200 << 20, "rogue").encode())

    def task(self) -> Task:
        msg = wait_for(lambda: self.link.get(0.1), 120, f"a task for {self.id}")
        return Task.decode(msg.payload)

    def trained_values(self, task: Task) -> dict:
        """The global values of the parameters the task trains (a valid, zero-change update)."""
        fetch_blob(self.link, self.topics, self.id, self.store, task.manifest["sha256"])
        for b in task.blobs:
            fetch_blob(self.link, self.topics, self.id, self.store, b["sha256"])
        manifest_path, files = model_blobs.materialize(task.manifest["sha256"], task.blobs, self.store,
                                                       self.store.root / "models")
        from edge_runtime.wire.manifest import Manifest
        m = Manifest.load(manifest_path)
        names = m.param_names(task.part.trainable_layers, [task.part.head])
        weights = wcodec.WeightFiles(files, names)
        return {n: weights[n] for n in names}

    def send(self, task: Task, values: dict | None = None, raw: bytes | None = None, wait_s: float = 10.0,
             **fields) -> Ack | None:
        if raw is None:
            sha = self.store.put_bytes(wcodec.encode(values))
            send_blob(self.link, self.topics.device(self.id, "upload"), self.store, sha)
            size = self.store.path(sha).stat().st_size
            update = dict(task_id=task.task_id, round=task.round, device_id=self.id, blob_sha256=sha, blob_size=size,
                          num_examples=100, loss=0.1, steps=1, peak_rss_bytes=1 << 20, seconds=0.1)
            update.update(fields)
            raw = Update(**update).encode()
        self.link.publish(self.topics.device(self.id, "update"), raw)
        msg = self.link.get(wait_s)
        return Ack.decode(msg.payload) if msg is not None else None


def test_duplicates_and_malformed_updates_are_refused_with_reasons_and_the_round_goes_on(env, tmp_path):
    with EmbeddedBroker(tmp_path / "broker") as broker, LocalFleet(tmp_path, broker.url, "rogues") as fleet:
        work = tmp_path / "coordinator"
        fleet.start_coordinator(_fedavg(work, env, rounds=1))
        fleet.start_device(env["specs"][0])
        wait_for(_log_says(fleet, "coordinator", "device d0 online"), 60, "the coordinator to hear hellos", fleet)
        good = Rogue(broker, "rogues", "rogue-good", tmp_path / "rg")
        bad = Rogue(broker, "rogues", "rogue-bad", tmp_path / "rb")
        t_good, t_bad = good.task(), bad.task()
        values = good.trained_values(t_good)
        assert good.send(t_good, raw=b"{not json", wait_s=2.0) is None           # no Ack for a message with no task in it
        assert not good.send(t_good, values, device_id="rogue-bad").accepted   # claims another identity
        unknown = good.send(t_good, values, task_id="r9-nosuchtask")
        assert not unknown.accepted and "unknown task" in unknown.reason
        first, again = good.send(t_good, values), good.send(t_good, values)
        assert first.accepted and again.accepted and again.reason == "already stored"
        nan = {k: np.full_like(v, np.nan) for k, v in bad.trained_values(t_bad).items()}
        refused = bad.send(t_bad, nan)
        assert not refused.accepted and "NaN" in refused.reason
        assert fleet.wait("coordinator", 300) == 0, fleet.log_tail("coordinator")
        log = fleet.log_tail("coordinator", 400)
        watcher = MqttLink("watcher", broker.host, broker.port, [(Topics("rogues").coordinator_metrics, 1)]).start()
        published = json.loads(wait_for(lambda: watcher.get(0.1), 10, "the retained round metrics").payload)
        watcher.stop()
    (m,) = read_metrics(work)
    assert published == m
    assert m["devices"]["rogue-good"]["status"] == "accepted" and m["devices"]["d0"]["status"] == "accepted"
    assert m["devices"]["rogue-bad"]["status"] == "rejected" and "NaN" in m["devices"]["rogue-bad"]["reason"]
    assert [u[1] for u in _updates(work)].count("rogue-good") == 1     # the duplicate counted once
    assert m["rejected"] >= 4 and "not a UTF-8 JSON object" in log and "sent on the topic of device" in log
