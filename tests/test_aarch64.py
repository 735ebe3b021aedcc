"""aarch64, proven here: the device runtime on Debian 12 arm64's Python 3.11, emulated by qemu user mode.

One emulated root per session (tools/aarch64_root.py: Debian's arm64 python3.11 and a venv, run by
qemu-aarch64-static without binfmt_misc). It is built from the wheels of a real aarch64 bundle
(`edge-bundle --platform aarch64`: the project's wheel built from this tree, and the device set's
aarch64 wheels that this machine's pip downloaded), installed offline by the emulated pip with
install.sh's own command. Then, under emulation:

- the whole device runtime imports, without torch or the onnx package;
- a step graph the coordinator built here gives the loss and gradients that x86-64 onnxruntime gives;
- a real job (`python -m edge_runtime.jobs.worker`) trains a block from its prefix cache under a hard
  memory limit, and its update is the x86-64 job's;
- the bundle's install.sh checks the emulated board and installs into its venv, and the installed
  edge-device announces itself to a broker;
- an agent whose jobs start through the job_python setting takes part in a real round of the
  coordinator over loopback MQTT, and its update is accepted.

Emulation is slow (onnxruntime's convolutions about 350x, Python 6-8x): every model here is tiny.
Memory seen under emulation is qemu's process: 85-125 MB more than a board's (budgets below).
"""
from __future__ import annotations

import importlib.util
import json
import platform
import queue
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from coordinator.ops.broker import EmbeddedBroker
from edge_runtime.device.settings import ConfigError, load_settings, resolve
from edge_runtime.device.tiers import find_tier
from edge_runtime.jobs.child import device_child_env, python_child_args, run_child
from edge_runtime.jobs.worker import JobSpec, run_worker
from edge_runtime.memory import MIB
from edge_runtime.train.datasets import LocalDataset, load_fashion_mnist
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.protocol import Hello, Topics

REPO = Path(__file__).resolve().parent.parent
TIER, DEVICE, FLEET = "pi-zero-2w", "a64-board", "a64"
WAIT_S = 120.0                        # for anything emulated: an emulated start and import take 3-10 s
# Memory measured under emulation is the qemu process's: qemu's own code and the guest code it has
# translated come on top of the guest's. Measured here: VmHWM after importing onnxruntime 125 MB (native
# 45 MB), so about +85 MB; the tiny job below peaks at 183 MB emulated as a Cortex-A53 (195 MB as an A72)
# and 70 MB native, so 115-125 MB more by the end of a job (more guest code translated). A board's budget
# for that job is BOARD_JOB_BUDGET_BYTES (the x86-64 job runs under it below); the emulated job gets
# qemu's share on top.
QEMU_OVERHEAD_BYTES = 128 * MIB
BOARD_JOB_BUDGET_BYTES = 128 * MIB
EMULATED_JOB_BUDGET_BYTES = BOARD_JOB_BUDGET_BYTES + QEMU_OVERHEAD_BYTES

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux",
                                reason="emulates aarch64 on an x86-64 Linux host")


def _load_tool():
    spec = importlib.util.spec_from_file_location("aarch64_root", REPO / "tools" / "aarch64_root.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


aarch64_root = _load_tool()


# -- the emulated board ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with EmbeddedBroker(tmp_path_factory.mktemp("a64-broker")) as running:
        yield running


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Path:
    """The board's disks: its data (64 real Fashion-MNIST images), state, config and bundle live here."""
    root = tmp_path_factory.mktemp("a64-board")
    x, y = load_fashion_mnist("test")
    LocalDataset.write(root / "data", x[:64], y[:64])
    return root


@pytest.fixture(scope="module")
def bundle(broker, board) -> Path:
    """A real aarch64 bundle: the project's wheel from this tree and the device set's aarch64 wheels."""
    args = {"--tier": TIER, "--device-id": DEVICE, "--broker": broker.url, "--fleet": FLEET, "--platform": "aarch64",
            "--out": board / "bundles", "--data-dir": board / "data", "--state-dir": board / "state"}
    done = subprocess.run([sys.executable, "-m", "coordinator.ops.bundle",
                           *[str(part) for item in args.items() for part in item]],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    [directory] = [p for p in (board / "bundles").iterdir() if p.is_dir()]
    return directory


@pytest.fixture(scope="module")
def root(bundle, tmp_path_factory):
    """The emulated board's Python with the bundle installed, offline, as install.sh installs it:
    pip install --no-index --find-links wheels edgeblock-*.whl, run by the emulated pip."""
    project = next((bundle / "wheels").glob("edgeblock-*.whl"))
    return aarch64_root.build(tmp_path_factory.mktemp("a64") / "root", [bundle / "wheels"], [str(project)],
                              cpu="cortex-a53")   # the tier's board, a Pi Zero 2 W, has Cortex-A53 cores


def guest(root, args: list, timeout: float = 600) -> subprocess.CompletedProcess:
    """The root's python with args, the way a board runs it: no PYTHONPATH and not in this checkout (`-c` and
    `-m` put the working directory first on sys.path), so the installed wheel is what runs."""
    done = root.run(args, cwd=root.path, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode} under emulation:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


# -- a tiny model, exported and given step graphs by the coordinator (x86-64, torch) ---------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A Fashion-MNIST model of two small convolutions and a linear layer, 7 k parameters (an emulated
    convolution costs about 350 native ones), with the step graphs of the whole model and of block 1
    (which trains from block 0's cached output)."""
    import torch
    from torch import nn

    from coordinator.model import export
    from coordinator.model.block_model import BlockModel
    from coordinator.model.part_graphs import ensure_part_graphs
    torch.manual_seed(0)
    conv = lambda cin, cout: nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # noqa: E731
    gap = lambda c: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))                  # noqa: E731
    model = BlockModel("tiny_fmnist", (1, 28, 28), 10,
                       blocks=[[conv(1, 4)], [conv(4, 8)], [nn.Sequential(nn.Flatten(), nn.Linear(8 * 7 * 7, 16),
                                                                          nn.ReLU())]],
                       heads=[gap(4), gap(8), nn.Linear(16, 10)])
    m = export.export(model, tmp_path_factory.mktemp("tiny"))
    whole, block1 = TrainablePart.blocks(m, 0, 2), TrainablePart.block(m, 1)
    ensure_part_graphs(m, [whole, block1])
    return m, whole, block1


# -- the tests --------------------------------------------------------------------------------------

IMPORT_ALL = """
import json, pkgutil, platform, sys, importlib
import edge_runtime
names = sorted(m.name for m in pkgutil.walk_packages(edge_runtime.__path__, "edge_runtime."))
for name in names:
    importlib.import_module(name)
from edge_runtime.train.ort_backend import runtime_versions
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "modules": names,
                  "file": edge_runtime.__file__, "onnxruntime": runtime_versions()["onnxruntime"],
                  "loaded": sorted(m for m in ("torch", "onnx", "onnxruntime.training") if m in sys.modules)}))
"""


def test_the_device_runtime_imports_on_aarch64(root):
    """Every edge_runtime module imports from the installed wheel, on the board's Python, without torch or onnx."""
    report = json.loads(guest(root, ["-c", IMPORT_ALL]).stdout.strip().splitlines()[-1])
    assert report["machine"] == "aarch64" and report["python"].startswith("3.11.")
    assert report["file"].startswith(str(root.site_packages))        # the bundle's wheel, not this checkout
    assert report["onnxruntime"].startswith("1.32.")
    assert report["loaded"] == []
    assert {"edge_runtime.train.trainer", "edge_runtime.device.agent", "edge_runtime.jobs.worker"} <= \
        set(report["modules"])


STEP = """
import sys
import numpy as np
from edge_runtime.train.ort_backend import StepSession
from edge_runtime.wire import weights
graph, feeds, out = sys.argv[1:]
given = weights.load(feeds)
session = StepSession(graph, threads=1)
itf = session.interface
grads = {n: np.zeros_like(given[n]) for n in itf.trainable}
labels = given["labels"].astype(np.int64)
loss, _ = session.run(given["batch"], labels, 1.0 / len(labels), given, grads)
weights.save(out, {"loss": np.array([loss], np.float32), **{"grad." + n: g for n, g in grads.items()}})
"""


def test_a_step_graph_built_here_gives_the_same_loss_and_gradients_on_aarch64(root, tiny, tmp_path, board):
    """The whole tiny model's step graph (Conv, ReLU, MaxPool and Gemm forward and backward, softmax
    cross-entropy) on the aarch64 onnxruntime 1.32 and on this machine's: within 1e-5 of each tensor's scale."""
    from coordinator.model.export import load_weights
    from edge_runtime.wire.model_blobs import STEP_GRAPH, part_folder
    m, whole, _ = tiny
    data = LocalDataset(board / "data")
    feeds = {**load_weights(m), "batch": np.load(data.inputs_path)[:8],
             "labels": data.labels()[:8].astype(np.float32)}     # safetensors carries float32 only
    wcodec.save(tmp_path / "feeds.safetensors", feeds)
    graph = part_folder(m, whole) / STEP_GRAPH
    args = ["-c", STEP, graph, tmp_path / "feeds.safetensors"]
    native = subprocess.run([sys.executable, *map(str, args), tmp_path / "x86.safetensors"],
                            env=device_child_env(), capture_output=True, text=True, timeout=300)
    assert native.returncode == 0, native.stderr
    guest(root, [*args, tmp_path / "aarch64.safetensors"])
    x86, arm = wcodec.load(tmp_path / "x86.safetensors"), wcodec.load(tmp_path / "aarch64.safetensors")
    assert sorted(x86) == sorted(arm) and len(x86) == 1 + len(whole.trainable_names(m))
    for name, expected in x86.items():
        scale = float(np.abs(expected).max())
        assert scale > 0, name
        assert float(np.abs(arm[name] - expected).max()) <= 1e-5 * scale, name


def _job(m, part, data: Path, state: Path, task_id: str, out: Path) -> JobSpec:
    config = {"optimizer": "sgd", "learning_rate": 0.1, "batch_size": 16, "max_steps": 3, "threads": 1, "seed": 0}
    return JobSpec(manifest=str(m.root / "manifest.json"), weights=str(m.graph_path(m.weights)), dataset=str(data),
                   state_dir=str(state), task_id=task_id, part=part.to_dict(), config=config, update_out=str(out))


def test_a_job_on_aarch64_trains_a_block_from_its_prefix_cache_under_a_hard_limit_like_x86(root, tiny, board,
                                                                                         tmp_path):
    """`python -m edge_runtime.jobs.worker SPEC.json` in the emulated root, under a hard memory limit, builds
    block 0's activation cache and trains block 1 on it for 3 SGD steps; the update is the x86-64 job's."""
    m, _, block1 = tiny
    native, x86_child = run_worker(_job(m, block1, board / "data", tmp_path / "x86", "x86",
                                        tmp_path / "x86.safetensors"),
                                   tmp_path / "jobs-x86", memory_limit_bytes=BOARD_JOB_BUDGET_BYTES)
    assert native and native["ok"], x86_child.stderr[-3000:]

    spec = _job(m, block1, board / "data", tmp_path / "a64", "a64", tmp_path / "a64.safetensors")
    spec.save(tmp_path / "a64.json")
    child = run_child(root.python_command() + ["-m", "edge_runtime.jobs.worker", str(tmp_path / "a64.json")],
                      env=root.environ(), memory_limit_bytes=EMULATED_JOB_BUDGET_BYTES, timeout=600, cwd=tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["result"]["prefix_computed"] and report["result"]["steps"] == 3, report
    assert child.limit_hits == 0 and child.peak_rss_bytes <= EMULATED_JOB_BUDGET_BYTES, child.peak_rss_bytes / MIB
    if child.group_peak_bytes is not None:          # a cgroup held it (else the RSS watchdog did)
        assert 0 < child.group_peak_bytes <= EMULATED_JOB_BUDGET_BYTES

    np.testing.assert_allclose(report["result"]["losses"], native["result"]["losses"], rtol=1e-5)
    x86, arm = wcodec.load(tmp_path / "x86.safetensors"), wcodec.load(tmp_path / "a64.safetensors")
    assert sorted(arm) == sorted(x86) == sorted(block1.update_names(m))
    start = wcodec.load(m.graph_path(m.weights))
    for name in x86:
        assert not np.array_equal(x86[name], start[name]), f"{name} did not train"
        np.testing.assert_allclose(arm[name], x86[name], rtol=1e-4, atol=1e-4 * float(np.abs(x86[name]).max()),
                                   err_msg=name)


class Subscriber:
    """A paho client that queues every message under a topic filter."""

    def __init__(self, broker: EmbeddedBroker, topic_filter: str):
        self.messages: queue.Queue = queue.Queue()
        subscribed: queue.Queue = queue.Queue()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="a64-test-subscriber", protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, msg: self.messages.put((msg.topic, msg.payload))
        self.client.on_subscribe = lambda c, u, mid, codes, p: subscribed.put(codes)
        self.client.on_connect = lambda c, u, flags, rc, p: c.subscribe(topic_filter, qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert not subscribed.get(timeout=10)[0].is_failure

    def next(self, topic: str, timeout: float = WAIT_S) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            got, payload = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            if got == topic:
                return payload

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_the_bundle_installs_on_aarch64_and_its_agent_says_hello(root, bundle, board, broker):
    """install.sh, on the emulated board: it checks the machine (CPython 3.11, aarch64, 64-bit, glibc), installs
    from the bundle's wheels only into the venv (the root's, which the build filled with the same command),
    runs edge-device --help and imports onnxruntime, and writes device.toml; the installed agent then says
    Hello with the tier's budget, less what qemu adds to its own memory."""
    config = board / "etc"
    done = subprocess.run(["bash", str(bundle / "install.sh"), "--venv", str(root.path / "venv"), "--python",
                           str(root.launcher), "--config-dir", str(config), "--no-systemd"],
                          env=root.environ(), cwd=board, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"venv {root.path / 'venv'}: reused" in done.stdout
    assert "the training runtime loads: onnxruntime 1.32." in done.stdout
    settings = tomllib.loads((config / "device.toml").read_text())["device"]
    assert settings["tier"] == str(config / f"{TIER}.toml") and settings["broker"] == broker.url

    topics = Topics(FLEET)
    subscriber = Subscriber(broker, f"{topics.root}/device/{DEVICE}/#")
    log_path = board / "agent.log"
    with open(log_path, "w") as log:
        agent = subprocess.Popen([root.bin / "edge-device", "--config", config / "device.toml"], stdout=log,
                                 stderr=subprocess.STDOUT, env=root.environ(), cwd=board)
    try:
        hello = Hello.decode(subscriber.next(topics.device(DEVICE, "hello")))
        assert (hello.device_id, hello.tier) == (DEVICE, TIER), log_path.read_text()
        # the tier's jobs share, less what qemu adds to the agent's own RSS (91 MB measured, native 40 MB),
        # which comes out of the device budget
        tier_jobs = find_tier(TIER).budget_bytes
        assert tier_jobs - QEMU_OVERHEAD_BYTES <= hello.budget_bytes <= tier_jobs + 12 * MIB, \
            (hello.budget_bytes / MIB, log_path.read_text())
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        subscriber.close()


def test_job_python_is_checked_and_starts_job_children(board, tmp_path):
    """The job_python setting: split as a shell would, its program checked before anything connects,
    and the interpreter a job child starts with (the agent's own when it is empty)."""
    base = {"id": "d", "broker": "127.0.0.1", "data": str(board / "data"), "state": str(tmp_path / "state")}
    assert resolve(base).job_python == ()
    assert python_child_args("m", "x") == [sys.executable, "-m", "m", "x"]
    command = f"{shlex.quote(sys.executable)} -X utf8"
    (tmp_path / "device.toml").write_text(f"[device]\njob_python = {json.dumps(command)}\n")   # or --job-python
    cfg = resolve(load_settings(tmp_path / "device.toml", {key: None for key in base}) | base)
    assert cfg.job_python == (sys.executable, "-X", "utf8")
    assert python_child_args("m", "x", python=cfg.job_python) == [sys.executable, "-X", "utf8", "-m", "m", "x"]
    with pytest.raises(ConfigError, match="/nowhere/python is not an executable file"):
        resolve({**base, "job_python": "/nowhere/python"})
    with pytest.raises(ConfigError, match="--job-python"):
        resolve({**base, "job_python": "'unclosed"})


def test_an_aarch64_agent_takes_part_in_a_round_of_the_coordinator(root, broker, board, tmp_path):
    """The coordinator (x86-64) and an agent in the emulated root on one loopback Mosquitto: a round of
    progressive training assigns block 0 of fmnist_cnn to the agent, which calibrates and trains it in job
    children, and its update is accepted. The agent runs as qemu runs a board's python, without the
    launcher, so its sys.executable is the aarch64 ELF, which the kernel cannot start: its jobs start
    through --job-python (the root's launcher), or not at all."""
    from coordinator.local.fleet import LocalFleet, read_metrics
    fleet_name = "a64round"
    settings = {
        "service": {"workdir": str(tmp_path / "coordinator"), "strategy": "progressive", "min_devices": 1,
                    "max_rounds": 1, "round_deadline_s": 600.0, "eval_samples": 200},
        "train": {"optimizer": "sgd", "learning_rate": 0.05, "local_epochs": 1.0, "batch_sizes": [16, 32]},
        "progressive": {"shrink_rounds": 0, "min_rounds_per_block": 1, "max_rounds_per_block": 1,
                        "max_extra_blocks": 0},
    }
    bare = [root.qemu, "-cpu", root.cpu, "-L", str(root.path), str(root.elf)]   # no -0: sys.executable is the ELF
    agent = bare + ["-m", "edge_runtime.device.cli", "--id", "a64-agent", "--broker", broker.url, "--fleet",
                    fleet_name, "--data", str(board / "data"), "--state", str(tmp_path / "agent"), "--budget-mb",
                    "600", "--threads", "1", "--job-python", str(root.launcher)]
    with LocalFleet(tmp_path, broker.url, fleet=fleet_name) as fleet:
        coordinator = fleet.start_coordinator(settings)
        with open(fleet.logs / "a64-agent.log", "wb") as log:
            fleet.procs["a64-agent"] = device = subprocess.Popen(agent, stdout=log, stderr=subprocess.STDOUT,
                                                                 env=root.environ(), cwd=tmp_path,
                                                                 start_new_session=True)

        def tails() -> str:
            return f"--- coordinator\n{fleet.log_tail('coordinator')}\n--- agent\n{fleet.log_tail('a64-agent')}"
        deadline = time.monotonic() + 600      # measured: 30-60 s, most of it the coordinator's own start-up
        while coordinator.poll() is None:      # the coordinator leaves after its one round
            assert device.poll() is None, f"the emulated agent exited ({device.returncode}):\n{tails()}"
            assert time.monotonic() < deadline, f"no round closed within 600 s:\n{tails()}"
            time.sleep(0.5)
        logs = tails()
        assert coordinator.returncode == 0, logs
    [metrics] = read_metrics(tmp_path / "coordinator")
    row = metrics["devices"]["a64-agent"]
    assert row["status"] == "accepted", (row, logs)
    assert row["layers"][0] == 0 and row["num_examples"] == 64, row
    assert row["peak_rss_bytes"] <= row["budget_bytes"], row
    assert f"training jobs start with: {root.launcher}" in logs
