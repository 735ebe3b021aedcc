"""Coordinator replicas on one real PostgreSQL and one real Mosquitto: intake spread over them by shared
subscriptions, one leader by a lease; the leader SIGKILLed mid-round, the other finishes the round with no
accepted update lost or counted twice."""
import json
import subprocess
import sys

import pytest
from fleet_helpers import LocalFleet, read_metrics, settings, three_device_env, wait_for

from coordinator.ops.broker import EmbeddedBroker
from coordinator.state_store import StateStore

LEASE_S = 4.0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return three_device_env(tmp_path_factory.mktemp("replicas"))


def _updates(store: StateStore) -> list[tuple]:
    return [(u.round, u.device_id, u.task_id) for r in range(1, 10) for u in store.updates(r)]


def _partly_accepted(store: StateStore, round_no: int, devices: int = 3) -> list[tuple] | None:
    row = store.current_round()
    if row is None or row.state != "open" or row.round != round_no:
        return None
    done = [u for u in _updates(store) if u[0] == round_no]
    return done if 1 <= len(done) < devices else None


def test_two_replicas_share_intake_and_the_standby_finishes_a_round_the_killed_leader_left(env, tmp_path,
                                                                                           postgres_url):
    with EmbeddedBroker(tmp_path / "broker") as broker, LocalFleet(tmp_path, broker.url, "replicas") as fleet:
        work = tmp_path / "coordinator"         # one workdir both replicas use (on hosts: a shared volume)
        config = settings(work, env["profile"], "fedavg", min_devices=3, state=postgres_url, lease_s=LEASE_S)
        config["fedavg"]["rounds"] = 3
        for name in ("a", "b"):
            fleet.start_coordinator({**config, "service": {**config["service"], "replica": name}}, f"replica-{name}")
        for spec in env["specs"]:
            fleet.start_device(spec, ["--ack-timeout", "5"])
        store = StateStore(postgres_url)
        before = wait_for(lambda: _partly_accepted(store, 2), 240, "round 2 to hold some accepted updates", fleet,
                          0.02)
        leader = store.lease("leader")["holder"]
        standby = "b" if leader == "a" else "a"
        epoch = store.lease("leader")["epoch"]
        fleet.kill(f"replica-{leader}")
        wait_for(lambda: store.lease("leader")["holder"] == standby, LEASE_S + 30, "the standby to take the lease",
                 fleet)
        assert fleet.wait(f"replica-{standby}", 300) == 0, fleet.log_tail(f"replica-{standby}")
        took_over = fleet.log_tail(f"replica-{standby}", 400)
        accepted = {name: fleet.log_tail(f"replica-{name}", 5000).count(" accepted (") for name in "ab"}
    assert f"replica {standby} leads the fleet (lease epoch {epoch + 1})" in took_over
    assert "round 2 continues" in took_over
    metrics = read_metrics(work)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    rows = _updates(store)
    assert len(rows) == len(set(rows)) == 9                       # three devices, three rounds, each once
    assert set(before) <= set(rows)                               # accepted before the kill, still there
    assert all(m["updates"] == 3 and m["aggregated"] for m in metrics)
    # both replicas took updates: the broker shared the device topics between them
    assert all(accepted.values()), accepted
    # the tools beside a run find its database from the workdir (state.url: the URL, never a password)
    status = subprocess.run([sys.executable, "-m", "coordinator.cli", "status", "--json", str(work)],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["rounds_closed"] == 3
    assert (work / "state.url").read_text().strip() == postgres_url
