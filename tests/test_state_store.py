"""The coordinator's durable state: duplicates counted once, nothing committed lost to kill -9."""
import os
import signal
import subprocess
import sys

import pytest

from coordinator.state_store import StateStore
from edge_runtime.jobs.child import device_child_env
from edge_runtime.wire.protocol import Hello, Update

SHA = "cd" * 32


def _update(task, device="pi-01", round_no=1, n=100):
    return Update(task, round_no, device, SHA, 1000, n, 0.5, 10, 100 << 20, 3.0)


def test_round_tasks_updates_and_duplicates(tmp_path):
    s = StateStore(tmp_path / "state.db")
    s.upsert_device(Hello("pi-01", "pi-zero-2w", 300 << 20, "0.1.0", 4, 10 ** 9))
    s.upsert_device(Hello("pi-02", "pi-3b-plus", 700 << 20, "0.1.0", 4, 10 ** 9))
    s.set_online("pi-02", False)
    assert [d["device_id"] for d in s.devices(online_only=True)] == ["pi-01"]
    s.open_round(1, deadline_at=100.0, weights_before=SHA, plan={"stage": 0}, strategy_state={"t": 0},
                 tasks=[("r1-pi-01", "pi-01", {"span": [0]}), ("r1-pi-02", "pi-02", {"span": [0, 1]})])
    assert s.record_update(_update("r1-pi-01")) is True
    assert s.record_update(_update("r1-pi-01")) is False          # a duplicate delivery changes nothing
    assert [u.task_id for u in s.updates(1)] == ["r1-pi-01"]
    assert s.task("r1-pi-01").status == "accepted" and s.task("r1-pi-02").status == "sent"
    with pytest.raises(Exception):
        s.record_update(_update("r9-unknown"))                      # not a task of any round
    s.close_round(1, weights_after="ef" * 32, strategy_state={"t": 1})
    again = StateStore(tmp_path / "state.db")                       # a restarted coordinator
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
