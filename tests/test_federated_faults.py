"""Faults over a real Mosquitto: killed devices, a killed coordinator, a restarted broker, bad updates.

Each test runs the real coordinator service and real device agents as processes on
fmnist_cnn with a small non-IID dataset, and checks what the state store and the metrics
say afterwards: which updates were accepted, once each, in which round.
"""
import json
import sqlite3

import numpy as np
import pytest
from fleet_helpers import LocalFleet, Rogue, open_round, read_metrics, settings, three_device_env, wait_for

from coordinator.ops.broker import EmbeddedBroker
from coordinator.state_store import TESTING
from edge_runtime.wire.mqtt_link import MqttLink
from edge_runtime.wire.protocol import Topics


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return three_device_env(tmp_path_factory.mktemp("faults"))


def _fedavg(work, env, rounds, **service):
    s = settings(work, env["profile"], "fedavg", **{"min_devices": 3, **service})
    s["fedavg"]["rounds"] = rounds
    return s


def _updates(work) -> list[tuple]:
    with sqlite3.connect(work / "state.db") as db:
        return db.execute("SELECT round, device_id, task_id FROM updates ORDER BY round, device_id").fetchall()


def _partly_accepted(work, round_no: int, devices: int = 3) -> list[tuple] | None:
    """The updates accepted so far in round `round_no` while it is open and still owes some; else None."""
    row = open_round(work)
    if row is None or row.round != round_no:
        return None
    done = [u for u in _updates(work) if u[0] == round_no]
    return done if 1 <= len(done) < devices else None


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
        # progressive, killed in its second round of block 0: the restart must restore the freezing record
        config = settings(work, env["profile"], "progressive", min_devices=3, max_rounds=3)
        config["progressive"].update(shrink_rounds=0)
        fleet.start_run(config, env["specs"])
        before = wait_for(lambda: _partly_accepted(work, 2), 180, "round 2 to hold some accepted updates", fleet, 0.02)
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


def test_a_round_closed_but_not_yet_tested_when_the_coordinator_stopped_is_tested_at_its_restart(env, tmp_path):
    """A round's model is tested beside the next round's start; a stop in between leaves the round closed with
    its test to do, and the restart does it: the same record, never a line without an accuracy."""
    with EmbeddedBroker(tmp_path / "broker") as broker, LocalFleet(tmp_path, broker.url, "untested") as fleet:
        work = tmp_path / "coordinator"
        config = _fedavg(work, env, rounds=2)
        fleet.start_run(config, env["specs"])
        assert fleet.wait("coordinator", 300) == 0, fleet.log_tail("coordinator")
        metrics = read_metrics(work)
        assert [m["round"] for m in metrics] == [1, 2]
        assert all(isinstance(m["accuracy"], float) and TESTING not in m for m in metrics)
        with sqlite3.connect(work / "state.db") as db:       # as a stop between round 2's close and test leaves it
            db.execute("UPDATE rounds SET metrics = ? WHERE round = 2",
                       (json.dumps({**metrics[1], "accuracy": None, "loss": None, TESTING: True}),))
        (work / "metrics.jsonl").write_text(json.dumps(metrics[0]) + "\n")
        fleet.start_coordinator(config)
        assert fleet.wait("coordinator", 300) == 0, fleet.log_tail("coordinator")
        restarted = fleet.log_tail("coordinator", 200)
    assert "round 2, closed before the last stop, tested" in restarted
    again = read_metrics(work)
    assert [m["round"] for m in again] == [1, 2]
    assert again[1]["accuracy"] == metrics[1]["accuracy"] and again[1]["loss"] == metrics[1]["loss"]
    assert again[1]["closed_at"] == metrics[1]["closed_at"] and again[1]["devices"] == metrics[1]["devices"]


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
    assert m["rejected"] >= 4 and "not a UTF-8 JSON object" in log     # a device's refusals: one line a minute
    with sqlite3.connect(work / "state.db") as db:                       # and every one of them stored, with why
        reasons = [r for (r,) in db.execute("SELECT reason FROM rejections WHERE device_id = 'rogue-good'")]
    assert any("not a UTF-8 JSON object" in r for r in reasons), reasons
    assert any("sent on the topic of device" in r for r in reasons), reasons


def test_an_update_is_uploaded_when_granted_and_lost_chunks_are_asked_for_again(env, tmp_path):
    """The update message goes first; the coordinator grants its upload by naming the chunks it lacks (Resend), the
    device sends those alone. Chunks lost under the grant (a broker's full queue): the update comes again, and
    the coordinator names only what is still missing."""
    from edge_runtime.wire import weights as wcodec
    from edge_runtime.wire.blob_exchange import send_blob
    from edge_runtime.wire.protocol import Ack, Resend, Update, decode_any
    with EmbeddedBroker(tmp_path / "broker") as broker, LocalFleet(tmp_path, broker.url, "lossy") as fleet:
        work = tmp_path / "coordinator"
        fleet.start_coordinator(_fedavg(work, env, rounds=1, min_devices=2))
        fleet.start_device(env["specs"][0])
        wait_for(_log_says(fleet, "coordinator", "device d0 online"), 60, "the coordinator to hear hellos", fleet)
        rogue = Rogue(broker, "lossy", "rogue-lossy", tmp_path / "rl")
        task = rogue.task()
        sha = rogue.store.put_bytes(wcodec.encode(rogue.trained_values(task)))
        size = rogue.store.path(sha).stat().st_size
        count = -(-size // 4096)
        assert count >= 4
        upload = rogue.topics.device(rogue.id, "upload")
        update = Update(task.task_id, task.round, rogue.id, sha, size, num_examples=100, loss=0.1, steps=1,
                        peak_rss_bytes=1 << 20, seconds=0.1)
        topic = rogue.topics.device(rogue.id, "update")

        def answer(wait_s):
            msg = rogue.link.get(wait_s)
            return None if msg is None else decode_any(msg.payload, (Ack, Resend))
        rogue.link.publish(topic, update.encode())
        grant = answer(30.0)
        assert isinstance(grant, Resend) and grant.task_id == task.task_id and grant.blob_sha256 == sha
        assert grant.chunks is None                     # nothing of it yet: all of it
        # half the chunks get through, the rest are lost; the device, unanswered, sends its update again
        send_blob(rogue.link, upload, rogue.store, sha, chunk_bytes=4096, indices=list(range(0, count, 2)))
        assert answer(3.0) is None                      # an incomplete blob is never judged
        rogue.link.publish(topic, update.encode())
        again = answer(30.0)
        assert isinstance(again, Resend) and again.chunks == list(range(1, count, 2))
        send_blob(rogue.link, upload, rogue.store, sha, chunk_bytes=4096, indices=again.chunks)
        ack = answer(30.0)
        assert isinstance(ack, Ack) and ack.accepted, ack
        assert fleet.wait("coordinator", 300) == 0, fleet.log_tail("coordinator")
    (m,) = read_metrics(work)
    assert m["devices"]["rogue-lossy"]["status"] == "accepted" and m["devices"]["d0"]["status"] == "accepted"
    assert [u[1] for u in _updates(work)].count("rogue-lossy") == 1
    with sqlite3.connect(work / "state.db") as db:
        assert db.execute("SELECT COUNT(*) FROM rejections WHERE device_id = 'rogue-lossy'").fetchone() == (0,)


def test_a_device_that_goes_offline_holding_the_upload_slot_gives_it_to_the_next(env, tmp_path):
    """One upload slot, two devices waiting: the first is granted and goes offline before sending its blob. Its
    slot goes to the second at once, not when the grant expires (30 s): a fleet would wait behind every board that
    dropped off. Back online, the first sends its update again, queues again, and both are taken once."""
    from edge_runtime.wire import weights as wcodec
    from edge_runtime.wire.blob_exchange import send_blob
    from edge_runtime.wire.protocol import Ack, Resend, Status, Update, decode_any
    with EmbeddedBroker(tmp_path / "broker") as broker, LocalFleet(tmp_path, broker.url, "slots") as fleet:
        work = tmp_path / "coordinator"
        fleet.start_coordinator(_fedavg(work, env, rounds=1, min_devices=2, upload_slots=1, offline_grace_s=120.0))
        watcher = MqttLink("watcher", broker.host, broker.port, [(Topics("slots").coordinator_status, 1)]).start()
        wait_for(lambda: (msg := watcher.get(0.2)) is not None and Status.decode(msg.payload).state == "online", 120,
                 "the coordinator online (it hears hellos from then on)", fleet)
        watcher.stop()
        first, second = (Rogue(broker, "slots", name, tmp_path / name) for name in ("first", "second"))
        updates = {}
        for step, rogue in enumerate((first, second), 1):
            task = rogue.task()      # each a blob of its own (the same one would be uploaded once for both)
            values = {k: v + np.float32(step * 1e-4) for k, v in rogue.trained_values(task).items()}
            sha = rogue.store.put_bytes(wcodec.encode(values))
            updates[rogue.id] = Update(task.task_id, task.round, rogue.id, sha, rogue.store.path(sha).stat().st_size,
                                       num_examples=100, loss=0.1, steps=1, peak_rss_bytes=1 << 20, seconds=0.1)

        def answer(rogue, wait_s):
            msg = rogue.link.get(wait_s)
            return None if msg is None else decode_any(msg.payload, (Ack, Resend))

        def send_update(rogue):
            rogue.link.publish(rogue.topics.device(rogue.id, "update"), updates[rogue.id].encode())

        def upload(rogue, grant):
            assert isinstance(grant, Resend) and grant.task_id == updates[rogue.id].task_id, grant
            send_blob(rogue.link, rogue.topics.device(rogue.id, "upload"), rogue.store,
                      updates[rogue.id].blob_sha256, indices=grant.chunks)
            ack = answer(rogue, 30.0)
            assert isinstance(ack, Ack) and ack.accepted, ack

        send_update(first)
        granted = answer(first, 30.0)
        assert isinstance(granted, Resend)
        send_update(second)
        assert answer(second, 3.0) is None              # the one slot is the first's
        first.link.publish(first.topics.device(first.id, "status"), Status("offline").encode(), retain=True)
        upload(second, answer(second, 20.0))            # granted once the first is offline, long before 30 s
        wait_for(_log_says(fleet, "coordinator", "device first went offline with 1 update(s) waiting"), 10,
                 "the coordinator to say why", fleet)
        first.link.publish(first.topics.device(first.id, "status"), Status("online").encode(), retain=True)
        send_update(first)                              # back: its update again, and it queues again
        upload(first, answer(first, 30.0))
        assert fleet.wait("coordinator", 300) == 0, fleet.log_tail("coordinator")
    (m,) = read_metrics(work)
    assert {d: m["devices"][d]["status"] for d in ("first", "second")} == {"first": "accepted", "second": "accepted"}
    assert sorted(u[1] for u in _updates(work)) == ["first", "second"]


def test_one_poisoned_device_claiming_a_billion_samples_does_not_wreck_the_model(env, tmp_path):
    """A compromised board sends the global weights flipped and scaled 8x (a change of 9x their norm: inside the
    default 10x bound, so every check of one update passes) and claims 10^9 samples, every round. The default
    aggregation weighs it at most like the fleet (its claim capped) and drops each coordinate's extremes (the
    trimmed mean), so the three honest devices still decide the model. Measured when written: the three honest devices alone reached
    30.9 / 55.7 / 62.5 %, with the rogue 25.7 / 53.0 / 55.4 %; with plain FedAvg (rule "mean", claims trusted) the
    rogue's run ended at 6.6 %."""
    with EmbeddedBroker(tmp_path / "broker") as broker, LocalFleet(tmp_path, broker.url, "poison") as fleet:
        work = tmp_path / "coordinator"
        fleet.start_coordinator(_fedavg(work, env, rounds=3, min_devices=4))
        for spec in env["specs"]:
            fleet.start_device(spec)
        wait_for(_log_says(fleet, "coordinator", "device d0 online"), 60, "the coordinator to hear hellos", fleet)
        rogue = Rogue(broker, "poison", "rogue", tmp_path / "rogue")
        done = 0
        for _ in range(3):
            task = rogue.task(after_round=done, timeout_s=300)
            poisoned = {k: -8 * v for k, v in rogue.trained_values(task).items()}
            ack = rogue.send(task, poisoned, num_examples=10 ** 9)
            assert ack is not None and ack.accepted, ack
            done = task.round
        assert fleet.wait("coordinator", 600) == 0, fleet.log_tail("coordinator")
        log = fleet.log_tail("coordinator", 400)
    metrics = read_metrics(work)
    accuracy = [round(m["accuracy"], 3) for m in metrics]
    assert accuracy[-1] >= 0.45 and accuracy[-1] > accuracy[0], accuracy
    assert [m["devices"]["rogue"]["status"] for m in metrics] == ["accepted"] * 3
    assert "rogue claimed 1000000000 samples, weighs" in log


def test_a_personalised_run_killed_mid_round_continues_with_every_devices_own_state(env, tmp_path):
    """pFedLA keeps each device's own layers and hypernetwork as blobs named in the round's state: a restart
    resends the open round's tasks with the same per-device weights and folds in the updates already accepted."""
    def sent_weights(round_no):
        with sqlite3.connect(work / "state.db") as db:
            rows = db.execute("SELECT device_id, spec FROM tasks WHERE round = ?", (round_no,)).fetchall()
        return {d: json.loads(spec)["weights"] for d, spec in rows}

    with EmbeddedBroker(tmp_path / "broker") as broker, LocalFleet(tmp_path, broker.url, "kill-pfedla") as fleet:
        work = tmp_path / "coordinator"
        config = settings(work, env["profile"], "pfedla", min_devices=3)
        config["pfedla"] = {"rounds": 3}
        fleet.start_run(config, env["specs"])
        before = wait_for(lambda: _partly_accepted(work, 2), 180, "round 2 to hold some accepted updates", fleet, 0.02)
        sent_before = sent_weights(2)
        fleet.kill("coordinator")
        fleet.start_coordinator(config)
        assert fleet.wait("coordinator", 300) == 0, fleet.log_tail("coordinator")
    assert sent_weights(2) == sent_before and len(set(sent_before.values())) == 3   # each device its own, kept
    rows = _updates(work)
    assert len(rows) == len(set(rows)) == 9 and set(before) <= set(rows)
    metrics = read_metrics(work)
    assert [m["round"] for m in metrics] == [1, 2, 3] and all(m["updates"] == 3 for m in metrics)
    assert all(r["holdout_accuracy"] is not None for m in metrics for r in m["devices"].values())
    # every device's own layers and hypernetwork named by the final state are in the blob store, whole
    from coordinator.global_model import GlobalModel
    from edge_runtime.wire.transfer import BlobStore
    with sqlite3.connect(work / "state.db") as db:
        state = json.loads(db.execute("SELECT strategy_state FROM rounds ORDER BY round DESC").fetchone()[0])
    model = GlobalModel(work / "model", BlobStore(work / "blobs"))
    assert sorted(state["own"]) == sorted(state["hn"]) == ["d0", "d1", "d2"]
    for device in state["own"]:
        assert model.load(state["own"][device]) and model.get_bytes(state["hn"][device])


def test_a_sites_bridge_coming_back_brings_the_open_rounds_tasks_again(env, tmp_path):
    """A site's bridge keeps no session on the core: a task published while it was down never reached the site.
    Its connection state ("1" on the site's state topic, which the bridge publishes on the core) makes the
    coordinator publish the open round's unsettled tasks again."""
    from coordinator.ops.broker_acl import site_state_topic
    from edge_runtime.wire.protocol import Task
    with EmbeddedBroker(tmp_path / "broker") as broker, LocalFleet(tmp_path, broker.url, "sites-back") as fleet:
        work = tmp_path / "coordinator"
        fleet.start_coordinator(_fedavg(work, env, rounds=1, min_devices=1))
        wait_for(_log_says(fleet, "coordinator", "coordinator for fleet"), 120, "the coordinator to serve", fleet)
        rogue = Rogue(broker, "sites-back", "far-0", tmp_path / "rogue")
        first = rogue.task()
        bridge = MqttLink("bridge-north", broker.host, broker.port, []).start()
        topic = site_state_topic(Topics("sites-back"), "north")
        try:
            bridge.publish(topic, b"0", retain=True, wait_s=5)        # the bridge's will: the site is cut off
            bridge.publish(topic, b"1", retain=True, wait_s=5)        # and back
            again = wait_for(lambda: _task_msg(rogue), 60, "the task again", fleet)
        finally:
            bridge.publish(topic, b"", retain=True, wait_s=5)
            bridge.stop()
        assert Task.decode(again.payload).task_id == first.task_id
        log = fleet.log_tail("coordinator", 200)
    assert "site north's bridge is down" in log and "site north's bridge is connected" in log


def _task_msg(rogue):
    msg = rogue.link.get(0.1)
    return msg if msg is not None and msg.topic.endswith("/task") else None
