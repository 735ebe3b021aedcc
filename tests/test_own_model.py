"""The README's "Bring your own model" path, run as written: the user's file, their data, the commands.

The model file is the README's own code block, and the coordinator and device commands are
the README's shell lines (fewer rounds, plus a device whose labels are broken and one whose
inputs are scaled unlike the rest), run by bash beside a link to this checkout's .venv, on
data this project does not ship: a synthetic 4-class 8x8 task made here. Then `--fresh`
keeps the user's model, another `--model` is refused, and bad evaluation data stops the
coordinator before any round with the real cause named.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.local.data import dirichlet_split
from coordinator.local.fleet import read_metrics
from edge_runtime.jobs.child import device_child_env
from edge_runtime.train.datasets import LocalDataset

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SECTION = README[README.index("## Bring your own model"):]
MODEL_CODE = re.search(r"```python\n(# mine\.py\n.*?)```", SECTION, re.S).group(1)
COMMANDS = re.search(r"```sh\n(.*?)```", SECTION, re.S).group(1).replace("\\\n", " ").strip().splitlines()
ROUNDS = 3


def _task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes of 8x8 images: a fixed random prototype per class under noise of the same scale."""
    protos = np.random.default_rng(1234).normal(0, 1, (4, 1, 8, 8)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    return (protos[y] + rng.normal(0, 0.8, (n, 1, 8, 8))).astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A user's directory: mine.py from the README, two devices' data, a third with broken labels, a fourth
    scaled unlike the rest, held-out data."""
    root = tmp_path_factory.mktemp("mine")
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])
    (root / "mine.py").write_text(MODEL_CODE)
    x, y = _task(900, seed=1)
    for i, idx in enumerate(dirichlet_split(y, 2, alpha=0.5, seed=0, min_samples=100)):
        LocalDataset.write(root / f"dev-{i + 1}", x[idx], y[idx])
    bad_y = y[:300].copy()
    bad_y[::10] = 12                                  # a labelling bug: 10 % of the rows name a 13th class
    LocalDataset.write(root / "dev-3", x[:300], bad_y)
    LocalDataset.write(root / "dev-4", x[300:600] / 10, y[300:600])   # scaled unlike everyone else's
    LocalDataset.write(root / "heldout", *_task(400, seed=2))
    return root


def _bash(root: Path, command: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(["bash", "-c", command], cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                env=device_child_env(), start_new_session=True)


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _run_readme(root: Path, coordinator: str, devices: list[str], name: str, timeout_s: float = 420) -> int:
    """The coordinator's command, then (once its broker is up) each device's; the coordinator's exit code."""
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    (root / "runs/mine/broker.url").unlink(missing_ok=True)
    coord = _bash(root, coordinator, logs / f"{name}-coordinator.log")
    procs = []
    try:
        deadline = time.monotonic() + 120
        while not (root / "runs/mine/broker.url").exists():
            assert coord.poll() is None, (logs / f"{name}-coordinator.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the coordinator's broker did not come up"
            time.sleep(0.2)
        procs = [_bash(root, d, logs / f"{name}-device-{i}.log") for i, d in enumerate(devices)]
        return coord.wait(timeout=timeout_s)
    finally:
        _stop([coord, *procs])


def _device_command(i: int) -> str:
    return COMMANDS[1].replace("dev-1", f"dev-{i}")


def test_the_readmes_own_model_path_trains_keeps_its_model_and_names_bad_data(site):
    assert COMMANDS[0].startswith(".venv/bin/edge-coordinator run --model mine.py:build --eval-data heldout/")
    coordinator = COMMANDS[0].replace("--rounds 10", f"--rounds {ROUNDS}").replace("--min-devices 2",
                                                                                   "--min-devices 4")
    code = _run_readme(site, coordinator, [COMMANDS[1], COMMANDS[2], _device_command(3), _device_command(4)], "first")
    log = (site / "logs/first-coordinator.log").read_text()
    assert code == 0, log[-3000:]
    rounds = read_metrics(site / "runs/mine")
    assert len(rounds) == ROUNDS and rounds[-1]["accuracy"] >= 0.9, [r["accuracy"] for r in rounds]
    for r in rounds:
        assert r["devices"]["dev-1"]["status"] == r["devices"]["dev-2"]["status"] == "accepted"
        broken = r["devices"].get("dev-3")
        if broken is not None:   # the broken device refuses its data, naming it; nothing of it is averaged in
            assert broken["status"] == "failed" and "labels" in broken["reason"] and "12" in broken["reason"], broken
    assert any("dev-3" in r["devices"] for r in rounds)
    # the device whose inputs are scaled unlike the evaluation set's is trained on, and named once
    warnings = [line for line in log.splitlines() if "normalised differently" in line]
    assert len(warnings) == 1 and "device dev-4's inputs" in warnings[0], warnings
    manifest = json.loads((site / "runs/mine/model/manifest.json").read_text())
    assert manifest["model"] == "mine" and manifest["input_shape"] == [1, 8, 8]

    # --fresh without --model starts over with the run's own model, never the zoo's default
    fresh = (".venv/bin/edge-coordinator run --workdir runs/mine --eval-data heldout/ --fresh --strategy fedavg "
             "--rounds 1 --min-devices 2")
    code = _run_readme(site, fresh, [COMMANDS[1], COMMANDS[2]], "fresh")
    assert code == 0, (site / "logs/fresh-coordinator.log").read_text()[-3000:]
    assert len(read_metrics(site / "runs/mine")) == 1
    assert json.loads((site / "runs/mine/model/manifest.json").read_text())["model"] == "mine"
    assert "fmnist" not in (site / "logs/fresh-coordinator.log").read_text()

    # another model in the same workdir is refused, naming both; the run's model is untouched
    other = subprocess.run([".venv/bin/edge-coordinator", "run", "--workdir", "runs/mine", "--model", "fmnist_cnn"],
                           cwd=site, capture_output=True, text=True, timeout=120, env=device_child_env())
    assert other.returncode == 2
    assert "holds a run of" in other.stderr and "zoo model fmnist_cnn" in other.stderr, other.stderr
    assert json.loads((site / "runs/mine/model/manifest.json").read_text())["model"] == "mine"


@pytest.fixture(scope="module")
def exported(site) -> str:
    """`edge-coordinator export mine.py:build exported/`, as the README gives it for profiling on a board."""
    r = subprocess.run([".venv/bin/edge-coordinator", "export", "mine.py:build", "exported"], cwd=site,
                       capture_output=True, text=True, timeout=300, env=device_child_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert (site / r.stdout.strip()).resolve() == site / "exported" / "manifest.json"
    assert json.loads((site / "exported/manifest.json").read_text())["model"] == "mine"
    return "exported"


def _start(site: Path, model: str, workdir: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([".venv/bin/edge-coordinator", "run", "--workdir", workdir, "--model", model,
                           "--broker", "mqtt://127.0.0.1:1", *flags],
                          cwd=site, capture_output=True, text=True, timeout=300, env=device_child_env())


def test_an_unknown_model_is_refused_with_the_forms_that_work(site):
    r = subprocess.run([".venv/bin/edge-coordinator", "run", "--workdir", "runs/unknown", "--model", "digits_cnn",
                        "--broker", "mqtt://127.0.0.1:1"], cwd=site, capture_output=True, text=True, timeout=120,
                       env=device_child_env())
    assert r.returncode == 2 and "unknown model 'digits_cnn'" in r.stderr
    assert "export directory" in r.stderr and "FILE.py[:NAME]" in r.stderr


@pytest.mark.parametrize("case, make, cause", [
    ("no evaluation data for a model that is not Fashion-MNIST's shape", None, "--eval-data DIR"),
    ("evaluation data of another shape",
     lambda d: LocalDataset.write(d, np.zeros((20, 1, 28, 28), np.float32), np.zeros(20, np.int64)), "shape"),
    ("labels outside the model's classes",
     lambda d: LocalDataset.write(d, np.zeros((20, 1, 8, 8), np.float32), np.arange(20) % 7), "labels"),
    ("NaN in the inputs",
     lambda d: LocalDataset.write(d, np.full((20, 1, 8, 8), np.nan, np.float32), np.zeros(20, np.int64)), "finite"),
])
def test_bad_evaluation_data_stops_the_coordinator_before_any_round_naming_the_cause(site, exported, case, make,
                                                                                    cause):
    flags = []
    if make is not None:
        make(site / f"eval-{cause}")
        flags = ["--eval-data", f"eval-{cause}"]
    r = _start(site, exported, f"runs/bad-eval-{cause}", *flags)
    assert r.returncode == 2, (case, r.stderr[-2000:])   # a refusal: the service unit does not restart it
    assert cause in r.stderr, (case, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, (case, r.stderr[-2000:])
    assert not (site / f"runs/bad-eval-{cause}/state.db").exists()   # stopped before any round


def test_a_bad_settings_file_is_a_refusal_naming_the_key(site):
    (site / "bad.toml").write_text('[service]\nmodle = "mine.py:build"\n')
    r = subprocess.run([".venv/bin/edge-coordinator", "run", "--config", "bad.toml"], cwd=site, capture_output=True,
                       text=True, timeout=120, env=device_child_env())
    assert r.returncode == 2 and "unknown setting service.modle" in r.stderr, r.stderr[-2000:]
