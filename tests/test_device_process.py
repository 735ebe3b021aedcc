"""The device runtime as a board runs it: child processes, no torch, crashes, bad files, budgets."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import BudgetError, IntegrityError, ManifestError, UnsupportedOpError
from edge_runtime.jobs import budget
from edge_runtime.jobs.child import device_child_env
from edge_runtime.jobs.worker import JobSpec, run_worker
from edge_runtime.memory import MIB
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.part import TrainablePart


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def _spec(m, dataset, state_dir, task_id, part, **config) -> JobSpec:
    cfg = {"batch_size": 32, "threads": 1, **config}
    return JobSpec(manifest=str(m.root / "manifest.json"), weights=str(m.graph_path(m.weights)),
                   dataset=str(dataset.root), state_dir=str(state_dir), task_id=task_id,
                   part=part.to_dict(), config=cfg)


# What a board does not have: importing any of them fails in the child below.
NOT_ON_A_BOARD = ("torch", "onnx", "onnxruntime.training")
BOARD_BLOCKER = f"""
import importlib.abc, sys
class _NotOnABoard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == m or name.startswith(m + ".") for m in {NOT_ON_A_BOARD!r}):
            raise ImportError(name + " is not installed on this board")
sys.meta_path.insert(0, _NotOnABoard())
"""


def test_the_device_path_needs_no_torch_onnx_or_onnxruntime_training(fmnist_model, small_dataset, tmp_path, fmnist):
    """Train a block from the cache, score layers, read and write weights in a process where torch, the onnx
    package and onnxruntime-training cannot import; the update then scores on the coordinator."""
    from coordinator.model.graphs import evaluate
    m, weights = fmnist_model
    spec = _spec(m, small_dataset, tmp_path / "state", "board", TrainablePart.block(m, 2), max_steps=3)
    spec.update_out = str(tmp_path / "update.safetensors")
    spec.save(tmp_path / "spec.json")
    score = _spec(m, small_dataset, tmp_path / "state", "board-score", TrainablePart.block(m, 2), max_steps=2)
    score.mode = "score"
    score.save(tmp_path / "score.json")
    script = BOARD_BLOCKER + f"""
import json
from pathlib import Path
from edge_runtime.jobs.worker import run_job, JobSpec
trained = run_job(JobSpec.load(Path({str(tmp_path / 'spec.json')!r})))
scored = run_job(JobSpec.load(Path({str(tmp_path / 'score.json')!r})))
loaded = sorted(m for m in {NOT_ON_A_BOARD!r} if m in sys.modules)
print(json.dumps({{"ok": trained["ok"] and scored["ok"], "loaded": loaded, "scores": len(scored["result"]["scores"])}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=device_child_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"ok": True, "loaded": [], "scores": 2}
    _, _, xt, yt = fmnist
    trained = {**weights, **wcodec.load(tmp_path / "update.safetensors")}
    assert 0.0 <= evaluate(m, trained, xt[:500], yt[:500])["accuracy"] <= 1.0


@pytest.mark.parametrize("checkpoint", ["weights", "full"])
def test_kill_9_mid_training_resumes_from_checkpoint(fmnist_model, small_dataset, tmp_path, checkpoint):
    m, _ = fmnist_model
    part = TrainablePart.block(m, 1)
    state = tmp_path / "state"
    steps, every = 60, 5
    spec = _spec(m, small_dataset, state, "crashy", part, max_steps=steps, checkpoint_every_steps=every,
                 checkpoint=checkpoint)
    spec.update_out = str(tmp_path / "crashy.safetensors")
    spec.save(tmp_path / "crashy.json")
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.jobs.worker", str(tmp_path / "crashy.json")],
                            env=device_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = state / "runs" / "crashy" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if progress.exists() and json.loads(progress.read_text())["step"] >= 2 * every:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(progress.read_text())["step"]
    assert every * 2 <= killed_at < steps, "the run must be killed mid-way, after a checkpoint"
    assert not (state / "runs" / "crashy" / "result.json").exists()

    report, child = run_worker(spec, tmp_path / "jobs")
    assert report["ok"], child.stderr[-2000:]
    resumed_at = report["result"]["resumed_from_step"]
    assert resumed_at >= killed_at
    assert report["result"]["steps"] == steps and len(report["result"]["losses"]) == steps

    clean = _spec(m, small_dataset, tmp_path / "state2", "clean", part, max_steps=steps, checkpoint_every_steps=every,
                  checkpoint=checkpoint)
    clean.update_out = str(tmp_path / "clean.safetensors")
    report2, _ = run_worker(clean, tmp_path / "jobs")
    assert report2["result"]["resumed_from_step"] == 0
    losses, clean_losses = report["result"]["losses"], report2["result"]["losses"]
    # the first step after the restart sees exactly the weights of the uninterrupted run at that step
    assert losses[resumed_at] == pytest.approx(clean_losses[resumed_at], abs=1e-5)
    resumed, uninterrupted = wcodec.load(Path(spec.update_out)), wcodec.load(Path(clean.update_out))
    if checkpoint == "full":  # optimizer state too: the resumed run ends exactly where the clean run ends
        for name in uninterrupted:
            np.testing.assert_allclose(resumed[name], uninterrupted[name], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(losses, clean_losses, atol=1e-5)
    else:  # AdamW moments restart, so later steps differ a little, but training carries on from the checkpoint
        assert np.mean(losses[-10:]) == pytest.approx(np.mean(clean_losses[-10:]), rel=0.1)


def test_unsupported_op_is_named_at_export(tmp_path):
    from torch import nn

    from coordinator.model import export
    from coordinator.model.block_model import BlockModel
    model = BlockModel("with_groupnorm", (1, 8, 8), 3,
                       blocks=[[nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU())]],
                       heads=[nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))])
    with pytest.raises(UnsupportedOpError, match="InstanceNormalization"):
        export.export(model, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_corrupted_graph_is_rejected_and_nothing_half_written(fmnist_model, small_dataset, tmp_path):
    import shutil

    from edge_runtime.train.trainer import train
    from edge_runtime.wire.manifest import Manifest
    from edge_runtime.wire.train_config import TrainConfig
    m, weights = fmnist_model
    copy = tmp_path / "model"
    shutil.copytree(m.root, copy)
    broken = Manifest.load(copy / "manifest.json")
    part = TrainablePart.block(broken, 1)
    graph = broken.file(f"parts/{part.key(broken)}/step.onnx")   # the graph a device trains with
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    state = tmp_path / "state"
    with pytest.raises(IntegrityError, match="sha256"):
        train(broken, weights, small_dataset, part, TrainConfig(max_steps=1), state, "x")
    assert [f for f in files_under(state) if not f.startswith("runs")] == []
    assert not list(state.rglob("*.onnx")) and not list(state.rglob("*.npy")) and not list(state.rglob("result.json"))


def test_manifest_that_does_not_match_its_graphs_is_rejected(fmnist_model, small_dataset, tmp_path):
    import shutil

    from edge_runtime.train.trainer import train
    from edge_runtime.wire.manifest import Manifest
    from edge_runtime.wire.train_config import TrainConfig
    m, weights = fmnist_model
    copy = tmp_path / "model"
    shutil.copytree(m.root, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    param = raw["layers"][1]["params"][0]
    param["shape"] = [param["shape"][0] + 1] + param["shape"][1:]   # the graph still has the old shape
    raw["layers"][2]["params"][0]["name"] = "blocks.1.1.0.renamed"  # and this name is not in the graph
    (copy / "manifest.json").write_text(json.dumps(raw))
    broken = Manifest.load(copy / "manifest.json")
    w = dict(weights)
    w[param["name"]] = np.zeros(param["shape"], np.float32)
    w["blocks.1.1.0.renamed"] = np.zeros(raw["layers"][2]["params"][0]["shape"], np.float32)
    with pytest.raises(ManifestError, match="shape|not in the graph"):
        train(broken, w, small_dataset, TrainablePart.block(broken, 1), TrainConfig(max_steps=1), tmp_path / "s", "x")
    assert not list((tmp_path / "s").rglob("*.onnx"))


def test_budget_picks_a_fitting_micro_batch_and_holds_to_it(fmnist_model, small_dataset, tmp_path):
    m, _ = fmnist_model
    spec = _spec(m, small_dataset, tmp_path / "state", "budgeted", TrainablePart.block(m, 1), batch_size=64,
                 epochs=1)
    spec.update_out = str(tmp_path / "u.safetensors")
    # a generous budget: the full batch fits
    report, child, plan = budget.train_within_budget(spec, 400 * MIB, tmp_path / "jobs")
    assert plan.micro_batch_size == 64
    assert report["result"]["steps"] == int(np.ceil(len(small_dataset) / 64))
    assert child.peak_rss_bytes <= 400 * MIB and child.limit_hits == 0
    # a budget between micro-batch 1 and the full batch's need: a smaller micro-batch, same batch size
    full_peak = plan.measured_peak_bytes
    tight = int(full_peak * 1.1 * 0.97)  # just below what the full batch needs with the margin
    spec2 = _spec(m, small_dataset, tmp_path / "state", "tight", TrainablePart.block(m, 1), batch_size=64, epochs=1)
    report2, child2, plan2 = budget.train_within_budget(spec2, tight, tmp_path / "jobs")
    assert plan2.micro_batch_size < 64
    assert child2.peak_rss_bytes <= tight
    assert report2["result"]["micro_batch_size"] == plan2.micro_batch_size


def test_budget_too_small_is_refused_with_what_it_needs(fmnist_model, small_dataset, tmp_path):
    m, _ = fmnist_model
    spec = _spec(m, small_dataset, tmp_path / "state", "toosmall", TrainablePart.block(m, 1))
    with pytest.raises(BudgetError, match=r"does not fit a budget of 30 MB: even micro-batch 1 needs \d+ MB"):
        budget.train_within_budget(spec, 30 * MIB, tmp_path / "jobs")
    assert not list((tmp_path / "state" / "runs").glob("toosmall*/result.json"))


def test_reading_a_large_cache_does_not_grow_resident_memory(tmp_path):
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(20000, 64, 7, 7))
    big[:] = 1.0
    big.flush()
    del big
    script = f"""
import numpy as np
from pathlib import Path
from edge_runtime.train.datasets import ArrayReader
from edge_runtime.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
r = ArrayReader(Path({str(tmp_path / 'big.npy')!r}))
reset_peak_rss(); before = current_rss_bytes()
for start in range(0, 20000, 64):
    r.take(np.random.default_rng(start).permutation(20000)[:64])
print(peak_rss_bytes() - before)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=device_child_env())
    grown = int(out.stdout.strip())
    assert (tmp_path / "big.npy").stat().st_size > 230 * MIB
    assert grown < 20 * MIB, f"resident memory grew by {grown / MIB:.0f} MB reading a 250 MB cache"
