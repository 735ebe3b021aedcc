"""Simulation mode against the real coordinator and a real Mosquitto: 40 devices in 2 processes, 2 FedAvg rounds.

Simulated devices exist to load a coordinator and a broker as a real fleet would, so
their updates must be real ones: accepted by the coordinator's intake, counted and
aggregated in the round, moving the global weights, and exactly as large as what the
real trainer writes for the same part.
"""
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from coordinator.local.fleet import LocalFleet, read_metrics
from coordinator.local.simulation import SimError, job_budget, main, plan_devices
from coordinator.ops.broker import EmbeddedBroker
from edge_runtime.device.tiers import find_tier
from edge_runtime.jobs.child import device_child_env
from edge_runtime.memory import MIB
from edge_runtime.wire import weights as wcodec

N, PROCESSES, ROUNDS = 40, 2, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The coordinator's run over the simulated fleet: its workdir, metrics, exit codes and the shards' summaries."""
    from coordinator.model.zoo_profile import measured_profile
    root = tmp_path_factory.mktemp("sim")
    # FedAvg plans whole-model parts only; the memory model needs four measurements: two spans at two batches
    measured_profile(root, "fmnist_cnn", [16, 32], candidates=[(0, 4), (4, 4)])
    work = root / "coordinator"
    shutil.copytree(root / "model", work / "model")      # the coordinator's own export, made once
    settings = {"service": {"workdir": str(work), "strategy": "fedavg", "profile": str(root / "profile.json"),
                            "min_devices": N, "round_deadline_s": 120.0, "offline_grace_s": 5.0,
                            "eval_samples": 1000},
                "train": {"batch_sizes": [32]}, "fedavg": {"rounds": ROUNDS}}
    with EmbeddedBroker(root / "broker") as broker, LocalFleet(root, broker.url, fleet="sim") as fleet:
        fleet.start_coordinator(settings)
        with open(root / "logs" / "sim.log", "ab") as out:
            sim = subprocess.Popen([sys.executable, "-m", "coordinator.local.simulation", "--broker", broker.url,
                                    "--fleet", "sim", "--devices", str(N), "--processes", str(PROCESSES),
                                    "--compute-s", "1", "--compute-jitter", "0.5", "--workdir", str(root / "sim")],
                                   stdout=out, stderr=subprocess.STDOUT, env=device_child_env(),
                                   start_new_session=True)
        try:
            coordinator_code = fleet.wait("coordinator", timeout_s=150)
        finally:
            sim.send_signal(signal.SIGTERM)
            sim_code = sim.wait(timeout=60)
    shards = [json.loads(p.read_text()) for p in sorted((root / "sim").glob("shard-*.json"))]
    return {"root": root, "work": work, "metrics": read_metrics(work), "coordinator_code": coordinator_code,
            "sim_code": sim_code, "shards": shards, "coordinator_log": fleet.log_tail("coordinator"),
            "sim_log": (root / "logs" / "sim.log").read_text(errors="replace")[-3000:]}


def _fedavg_trained(manifest) -> list[str]:
    """What a FedAvg task trains and sends back: every layer and the final head (not the early-exit heads)."""
    return manifest.param_names(range(len(manifest.layers)), [manifest.final_head.index])


def test_every_simulated_update_is_accepted_and_counted_in_the_round(run):
    assert run["coordinator_code"] == 0, run["coordinator_log"]
    metrics = run["metrics"]
    assert [m["round"] for m in metrics] == [1, 2] and metrics[-1]["finished"]
    for m in metrics:
        assert m["closed_because"] == "every task settled" and m["aggregated"], m["closed_because"]
        assert (m["updates"], m["rejected"], m["failed"], len(m["devices"])) == (N, 0, 0, N)
        assert all(row["status"] == "accepted" and row["num_examples"] == 500 for row in m["devices"].values())
    # the devices really ran in several processes, and each counted its own tasks as accepted
    assert run["sim_code"] == 0, run["sim_log"]
    assert len(run["shards"]) == PROCESSES and [s["devices"] for s in run["shards"]] == [N // PROCESSES] * PROCESSES
    assert sum(s["accepted"] for s in run["shards"]) == sum(s["tasks"] for s in run["shards"]) == N * ROUNDS
    ids = {d for s in run["shards"] for d in s["per_device"]}
    assert ids == set(metrics[0]["devices"]) == set(metrics[1]["devices"])


def test_the_global_weights_move_a_little(run, tmp_path):
    from coordinator.cli import main as coordinator_cli
    from coordinator.model import export
    from edge_runtime.wire.manifest import Manifest
    assert coordinator_cli(["weights", str(run["work"]), str(tmp_path / "w.safetensors")]) == 0
    after = wcodec.load(tmp_path / "w.safetensors")
    before = export.load_weights(Manifest.load(run["work"] / "model" / "manifest.json"))
    trained = set(_fedavg_trained(Manifest.load(run["work"] / "model" / "manifest.json")))
    assert set(after) == set(before) and trained < set(before)
    for name in before:
        change = np.linalg.norm(after[name] - before[name])
        if name not in trained:      # the heads that FedAvg does not train keep their weights
            assert change == 0, name
            continue
        assert 0 < change <= 0.01 * max(np.linalg.norm(before[name]), 1e-3 * np.sqrt(before[name].size)), name


def test_simulated_updates_have_the_real_trained_part_size(run, tmp_path):
    """The bytes a real job's update of the whole model takes: the trainer's writer, the same names and shapes."""
    from edge_runtime.wire.manifest import Manifest
    manifest = Manifest.load(run["work"] / "model" / "manifest.json")
    specs = manifest.param_specs()
    names = _fedavg_trained(manifest)
    wcodec.save_streaming(tmp_path / "real.safetensors", names, lambda n: np.zeros(specs[n].shape, np.float32))
    real_size = (tmp_path / "real.safetensors").stat().st_size
    first, second = run["metrics"]
    for device, row in first["devices"].items():
        assert row["trained_bytes"] == sum(specs[n].nbytes for n in names)
        assert row["uploaded_bytes"] == real_size, device
        # round 2 fetches only the weights (the graphs and the manifest were kept), never less than them
        again = second["devices"][device]
        assert again["uploaded_bytes"] == real_size
        assert row["trained_bytes"] <= again["downloaded_bytes"] < row["downloaded_bytes"], device


def test_devices_take_their_budget_from_the_tier_files():
    devices = plan_devices(["pi-zero-2w=3", "pi-4b-2gb=2"], None, 0.0, "sim")
    assert [d.tier for d in devices] == ["pi-zero-2w"] * 3 + ["pi-4b-2gb"] * 2
    assert len({d.device_id for d in devices}) == 5
    zero = find_tier("pi-zero-2w")
    assert devices[0].budget_bytes == zero.device_budget_bytes and devices[0].cores == zero.cores
    # like a real agent of the tier, it announces the tier's job budget: the agent fits the tier's reserve (to within
    # 2 MB), and leaves at most 4 MB of it unused. A fresh agent's RSS is 37.3-39.6 MB on this machine: about 17 MB of
    # it are pages of its libraries, and how many of those a start-up maps depends on what the page cache holds
    # (after the whole suite it measured 37.3 MB three times, minutes later 38.5-39.6 MB)
    assert -2 * MIB <= job_budget(devices[0]) - zero.budget_bytes <= 4 * MIB
    assert plan_devices(["sensor"], 4, 180.0, "sim")[0].budget_bytes == 180 * MIB
    with pytest.raises(SimError, match="give --budget-mb"):
        plan_devices(["sensor"], 4, 0.0, "sim")
    with pytest.raises(SimError, match="add up to 5"):
        plan_devices(["pi-zero-2w=3", "pi-4b-2gb=2"], 4, 0.0, "sim")


def test_bad_settings_exit_2_naming_them(capsys):
    assert main(["--broker", "ftp://x", "--devices", "3"]) == 2
    assert "scheme 'ftp' is not supported" in capsys.readouterr().err
    assert main(["--broker", "localhost", "--tier", "pi-zero-2w=2", "--tier", "pi-4b-2gb"]) == 2
    assert "give every --tier a count" in capsys.readouterr().err
    assert main(["--broker", "mqtts://broker.lan", "--devices", "3"]) == 2
    assert "without TLS or a login" in capsys.readouterr().err


def test_metrics_read_while_a_line_is_being_written_leave_that_line_for_later(tmp_path):
    """A watcher (the fleet benchmark, the tests) reads metrics.jsonl while the coordinator appends a round's line
    (about 300 KB at 1,000 devices): the line without its newline yet is left out, a broken earlier line is not."""
    whole = json.dumps({"round": 1, "accuracy": 0.5})
    (tmp_path / "metrics.jsonl").write_text(whole + "\n" + json.dumps({"round": 2, "accuracy": 0.6})[:20])
    assert read_metrics(tmp_path) == [{"round": 1, "accuracy": 0.5}]
    (tmp_path / "metrics.jsonl").write_text(whole[:20] + "\n" + whole + "\n")
    with pytest.raises(json.JSONDecodeError):
        read_metrics(tmp_path)
