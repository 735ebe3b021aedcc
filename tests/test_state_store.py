"""The coordinator's durable state: duplicates counted once, nothing committed lost to kill -9, old stores
migrated, on SQLite and on a real PostgreSQL server; the leader lease of replicated coordinators."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from coordinator.state_sql import StoreError
from coordinator.state_store import SCHEMA_VERSION, TESTING, LeaseLost, StateStore
from edge_runtime.jobs.child import device_child_env
from edge_runtime.wire.protocol import Hello, Update

SHA = "cd" * 32


def _update(task, device="pi-01", round_no=1, n=100):
    return Update(task, round_no, device, SHA, 1000, n, 0.5, 10, 100 << 20, 3.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    """Where a store lives: a SQLite file, or a new database on a real PostgreSQL server."""
    if request.param == "sqlite":
        return tmp_path / "state.db"
    return request.getfixturevalue("postgres_url")


def test_round_tasks_updates_and_duplicates(location):
    s = StateStore(location)
    s.upsert_device(Hello("pi-01", "pi-zero-2w", 300 << 20, "0.1.0", 4, 10 ** 9))
    s.upsert_device(Hello("pi-02", "pi-3b-plus", 700 << 20, "0.1.0", 4, 10 ** 9))
    s.set_online("pi-02", False)
    assert [d["device_id"] for d in s.devices(online_only=True)] == ["pi-01"]
    assert s.open_round_no() is None
    s.open_round(1, deadline_at=100.0, weights_before=SHA, plan={"stage": 0}, strategy_state={"t": 0},
                 tasks=[("r1-pi-01", "pi-01", {"span": [0]}), ("r1-pi-02", "pi-02", {"span": [0, 1]})])
    assert s.open_round_no() == 1
    assert s.waiting_tasks(1) == [("r1-pi-01", "pi-01"), ("r1-pi-02", "pi-02")]
    assert s.record_update(_update("r1-pi-01")) is True
    assert s.waiting_tasks(1) == [("r1-pi-02", "pi-02")]
    assert s.record_update(_update("r1-pi-01")) is False          # a duplicate delivery changes nothing
    assert [u.task_id for u in s.updates(1)] == ["r1-pi-01"]
    assert s.task("r1-pi-01").status == "accepted" and s.task("r1-pi-02").status == "sent"
    with pytest.raises(Exception):
        s.record_update(_update("r9-unknown"))                      # not a task of any round
    s.close_round(1, weights_after="ef" * 32, strategy_state={"t": 1})
    assert s.open_round_no() is None
    assert s.claimed_examples(["pi-01"], before_round=2) == {"pi-01": [100]}
    s.record_rejections([(time.time(), "pi-01", None, "bad", "malformed")])
    assert [(r["reason"], r["kind"]) for r in s.rejections()] == [("bad", "malformed")]
    again = StateStore(location)                                    # a restarted coordinator
    r = again.current_round()
    assert (r.round, r.state, r.strategy_state, r.plan) == (1, "closed", {"t": 1}, {"stage": 0})
    with pytest.raises(ValueError, match="not open"):
        again.close_round(1, "ab" * 32, {})


def test_kill_9_loses_no_committed_update(tmp_path):
    db = tmp_path / "state.db"
    s = StateStore(db)
    tasks = [(f"r1-d{i:04d}", f"d{i:04d}", {}) for i in range(2000)]
    s.open_round(1, 1e12, SHA, {}, {}, tasks)
    s.close()
    writer = f"""
import sys
from coordinator.state_store import StateStore
from edge_runtime.wire.protocol import Update
s = StateStore({str(db)!r})
for i in range(2000):
    s.record_update(Update(f"r1-d{{i:04d}}", 1, f"d{{i:04d}}", {SHA!r}, 1, 1, 0.1, 1, 1, 0.1))
    print(i, flush=True)   # printed only after the commit returned
"""
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True, env=device_child_env())
    acknowledged = -1
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reopened = StateStore(db)
    assert reopened._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    recorded = {u.task_id for u in reopened.updates(1)}
    assert {f"r1-d{i:04d}" for i in range(acknowledged + 1)} <= recorded  # every acknowledged commit survived
    assert len(recorded) < 2000


def test_a_round_closed_before_its_model_is_tested_is_read_only_once_tested(location):
    """The coordinator closes a round, opens the next and tests the closed round's model beside it: readers
    (metrics.jsonl, the exporter, the live view) see no round until it is tested, and a restart finds it."""
    s = StateStore(location)
    for r in (1, 2, 3):
        s.open_round(r, deadline_at=100.0, weights_before=SHA, plan={}, strategy_state={}, tasks=[])
        testing = r == 2
        s.close_round(r, weights_after=f"{r:02d}" * 32, strategy_state={},
                      metrics={"round": r, "accuracy": None if testing else 0.5, TESTING: testing})
        if r == 2:
            assert [m["round"] for m in s.closed_rounds()] == [1]
            assert [r for r, _ in s.closed_rounds_after(0)] == [1]
            assert [(r, w) for r, w, _ in s.untested_rounds()] == [(2, "02" * 32)]
            s.record_test(2, {"round": 2, "accuracy": 0.6})
    assert [(m["round"], m["accuracy"]) for m in StateStore(location).closed_rounds()] == [(1, .5), (2, .6), (3, .5)]
    assert s.untested_rounds() == []
    s.open_round(4, deadline_at=100.0, weights_before=SHA, plan={}, strategy_state={}, tasks=[])
    with pytest.raises(ValueError, match="not closed"):
        s.record_test(4, {"round": 4})       # a test belongs to a closed round


def test_a_diverged_evaluation_is_written_as_null_never_as_nan():
    """metrics.jsonl must stay valid JSON when the global model's loss is not finite."""
    import json
    import math

    from coordinator.round_metrics import DeviceRound, RoundMetrics
    m = RoundMetrics(round=3, accuracy=0.1, loss=float("nan"),
                     devices={"pi-01": DeviceRound(status="accepted", loss=float("inf"), num_examples=5)})
    line = json.dumps(m.to_dict(), allow_nan=False)          # raises on NaN or infinity
    back = RoundMetrics.from_dict(json.loads(line))
    assert back.loss is None and back.devices["pi-01"].loss is None and back.accuracy == 0.1
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in json.loads(line).values())


# The tables as the first release wrote them, before the schema had a version: columns were added since.
UNVERSIONED = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE devices (device_id TEXT PRIMARY KEY, tier TEXT NOT NULL, budget_bytes INTEGER NOT NULL,
    runtime_version TEXT NOT NULL, cores INTEGER NOT NULL, disk_free_bytes INTEGER NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, online INTEGER NOT NULL);
CREATE TABLE rounds (round INTEGER PRIMARY KEY, state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    opened_at REAL NOT NULL, deadline_at REAL NOT NULL, weights_before TEXT NOT NULL,
    weights_after TEXT, plan TEXT NOT NULL, strategy_state TEXT NOT NULL, closed_at REAL);
CREATE TABLE tasks (task_id TEXT PRIMARY KEY, round INTEGER NOT NULL REFERENCES rounds(round),
    device_id TEXT NOT NULL, spec TEXT NOT NULL, sent_at REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('sent', 'accepted', 'rejected', 'failed')));
CREATE TABLE updates (task_id TEXT PRIMARY KEY REFERENCES tasks(task_id), round INTEGER NOT NULL,
    device_id TEXT NOT NULL, blob_sha256 TEXT NOT NULL, num_examples INTEGER NOT NULL, loss REAL NOT NULL,
    peak_rss_bytes INTEGER NOT NULL, seconds REAL NOT NULL, received_at REAL NOT NULL);
CREATE TABLE rejections (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, device_id TEXT, task_id TEXT,
    reason TEXT NOT NULL);
INSERT INTO meta VALUES ('run', '{"tag": "abc123"}');
INSERT INTO rounds VALUES (1, 'closed', 1.0, 2.0, 'aa', 'bb', '{}', '{"t": 1}', 3.0);
INSERT INTO rounds VALUES (2, 'open', 4.0, 5.0, 'bb', NULL, '{}', '{"t": 2}', NULL);
INSERT INTO tasks VALUES ('r2-x', 2, 'pi-01', '{}', 4.0, 'sent');
INSERT INTO tasks VALUES ('r1-x', 1, 'pi-01', '{}', 1.0, 'accepted');
INSERT INTO updates VALUES ('r1-x', 1, 'pi-01', 'cc', 10, 0.5, 1000, 2.0, 1.5);
"""


def test_an_unversioned_store_of_an_earlier_release_is_migrated_with_its_rows(tmp_path):
    db = tmp_path / "state.db"
    old = sqlite3.connect(db)
    old.executescript(UNVERSIONED)
    old.close()
    with pytest.raises(StoreError, match="older than this edgeblock's.*start the coordinator on it once"):
        StateStore(db, readonly=True)               # a status tool never migrates: it says what to do
    s = StateStore(db)
    assert s.migrated == list(range(1, SCHEMA_VERSION + 1))
    assert s.meta("schema_version") == SCHEMA_VERSION and s.meta("run") == {"tag": "abc123"}
    with sqlite3.connect(db) as check:          # a round's close reads each device's answers through these
        plan = check.execute("EXPLAIN QUERY PLAN SELECT round FROM updates WHERE device_id = 'x' AND round < 3 "
                             "ORDER BY round DESC").fetchall()
    assert any("updates_by_device" in str(row) for row in plan), plan
    row = s.current_round()
    assert (row.round, row.state, row.strategy_state) == (2, "open", {"t": 2})
    [u] = s.updates(1)                              # an old row reads with the new columns' defaults
    assert (u.num_examples, u.blob_size, u.downloaded_bytes, u.agent_peak_rss_bytes) == (10, 0, 0, 0)
    assert s.task("r2-x").reason is None
    assert s.record_update(_update("r2-x", round_no=2)) is True      # the new columns are written
    s.close_round(2, "dd" * 32, {"t": 3}, metrics={"round": 2})
    assert s.closed_rounds()[-1] == {"round": 2}
    s.close()
    again = StateStore(db)
    assert again.migrated == [] and StateStore(db, readonly=True).current_round().state == "closed"


def test_a_store_from_a_newer_release_is_refused_not_damaged(location):
    s = StateStore(location)
    s.set_meta("schema_version", SCHEMA_VERSION + 1)
    s.close()
    for readonly in (False, True):
        with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer than"):
            StateStore(location, readonly=readonly)


def test_replicas_opening_one_database_together_migrate_it_once(postgres_url):
    code = f"""
from coordinator.state_store import StateStore
print(StateStore({postgres_url!r}).migrated)
"""
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    migrated = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert sorted(migrated, key=len) == [[]] * 3 + [list(range(1, SCHEMA_VERSION + 1))]


def test_the_leader_lease_has_one_holder_and_a_new_epoch_per_leader(location):
    a, b = StateStore(location), StateStore(location)
    first = a.hold_lease("leader", "a", ttl_s=0.5)
    assert first is not None and b.hold_lease("leader", "b", ttl_s=0.5) is None
    assert a.hold_lease("leader", "a", ttl_s=0.5) == first           # renewing keeps the epoch
    a.open_round(1, 1e12, SHA, {}, {}, [], fence=("leader", "a", first))
    time.sleep(0.7)                                                  # a's lease ran out
    second = b.hold_lease("leader", "b", ttl_s=30)
    assert second == first + 1 and a.hold_lease("leader", "a", ttl_s=30) is None
    with pytest.raises(LeaseLost):                                   # the old leader cannot close the round
        a.close_round(1, "ef" * 32, {}, fence=("leader", "a", first))
    assert b.current_round().state == "open"
    b.close_round(1, "ef" * 32, {}, fence=("leader", "b", second))
    b.release_lease("leader", "b")                                   # a clean stop hands over at once
    assert a.hold_lease("leader", "a", ttl_s=30) == second + 1
    assert a.lease("leader")["holder"] == "a"


def test_a_schema_2_store_migrates_its_rejections_to_kind_other_and_totals_outlive_the_trim(location, monkeypatch):
    """Schema 3 gives each rejection a kind and keeps a running total per kind: the rows of a schema-2 store count
    as 'other' (those its trim had dropped too, by their ids), and a total never shrinks when the table is trimmed."""
    from coordinator import state_store
    from coordinator.state_sql import connect
    db = connect(location)
    with db.transaction():                                   # the store as the release with schema 2 left it
        for _number, _what, step in state_store.MIGRATIONS[:2]:
            step(db)
        db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
        for i in range(5):
            db.execute("INSERT INTO rejections (at, device_id, task_id, reason) VALUES (?, 'pi-01', NULL, ?)",
                       (float(i), f"old {i}"))
        db.execute("DELETE FROM rejections WHERE id <= 2")  # its trim had dropped the oldest
    db.close()
    with pytest.raises(StoreError, match="schema version 2, older than"):
        StateStore(location, readonly=True)
    s = StateStore(location)
    assert s.migrated == list(range(3, SCHEMA_VERSION + 1))
    assert [(r["reason"], r["kind"]) for r in s.rejections()] == [(f"old {i}", "other") for i in (2, 3, 4)]
    assert s.rejection_totals() == {"other": 5}
    monkeypatch.setattr(state_store, "MAX_REJECTIONS", 4)
    s.record_rejections([(10.0, None, None, "garbage", "malformed")] * 3 + [(11.0, "pi-01", "t", "NaN", "bad_update")])
    s.record_rejection("pi-01", None, "unknown task", "unknown_task")
    assert [r["kind"] for r in s.rejections()] == ["malformed", "malformed", "bad_update", "unknown_task"]  # trimmed
    assert s.rejection_totals() == {"other": 5, "malformed": 3, "bad_update": 1, "unknown_task": 1}
    again = StateStore(location, readonly=True)              # what a status tool or the metrics endpoint reads
    assert again.rejection_totals() == s.rejection_totals()
