"""Support for tests/test_step_graph.py: the export recipe, the torch float64 reference, and the two
children the tests need, because one process cannot hold both onnxruntime builds.

- The builder child (`python step_graph_harness.py builder JOBS RESULTS`) has onnxruntime-training
  1.19.2 first on its path, as coordinator/model/part_graphs.py arranges it. It runs a batch of jobs
  in one process: build a step graph, return onnxruntime-training's own gradient graph, run a graph
  of training ops on onnxruntime-training's kernels, or take one step with an onnxruntime-training
  session (`api.Module`) over the same part.
- The device child (`python step_graph_harness.py device MODEL`) has the maintained onnxruntime and
  neither onnx nor torch importable, as on a board, and reads a step graph's interface.

The test process itself runs the rewritten graphs on the maintained onnxruntime (1.32).
This module imports only the standard library and numpy at its top, so that each child
decides what it may import.
"""
from __future__ import annotations

import copy
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
JOB_MARK = "step-graph-harness job "      # the builder child names each job on stderr before running it
TRAINING_VERSION = "1.19.2"
RUNTIME_SERIES = "1.32."

# |a - e| <= RTOL * max|e| + FLOOR * scale (test_step_graph.py's docstring says why the floor)
RTOL = 1e-4
FLOOR = 1e-6
FLOOR_USED: list[str] = []   # comparisons that needed the float32 floor, printed after the module


# --------------------------------------------------------------------------- comparing

def assert_close(actual, expected, what: str, scale: float) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    own = float(np.max(np.abs(expected))) if expected.size else 0.0
    assert err <= RTOL * own + FLOOR * scale, \
        f"{what}: max abs error {err:.3e}, max |expected| {own:.3e}, scale {scale:.3e}"
    if err > RTOL * own:
        FLOOR_USED.append(what)


# --------------------------------------------------------------------------- torch side (test process)

def export_forward(module, input_shape: Sequence[int], opset: int = 17):
    """coordinator/model/export.py's recipe on a whole module: legacy exporter, training mode, no constant
    folding, dynamic batch, a deep copy (the export runs a forward pass that would move BatchNorm statistics).
    Inputs `x`, output `logits`, parameters keep their state-dict names."""
    import onnx
    import torch

    module = copy.deepcopy(module).train()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, *input_shape),), buf, dynamo=False, opset_version=opset,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                          input_names=["x"], output_names=["logits"], export_params=True,
                          keep_initializers_as_inputs=False,
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    model = onnx.load_from_string(buf.getvalue())
    inits = {t.name for t in model.graph.initializer}
    missing = [n for n, _ in module.named_parameters() if n not in inits]
    if missing:
        raise RuntimeError(f"parameters {missing} did not survive export as initializers")
    return model


def state_arrays(module) -> dict[str, np.ndarray]:
    """Parameters and BatchNorm running statistics as float32 arrays, by state-dict name."""
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()
            if v.dtype.is_floating_point}


@dataclass
class StepResult:
    loss: float
    grads: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]


def torch_step(module, x: np.ndarray, labels: np.ndarray, loss_scale: float, trainable: Sequence[str]) -> StepResult:
    """loss_scale * summed cross-entropy and its gradients by torch autograd, in float64.

    float64 makes the reference exact to ~1e-12, so a float32 graph's error is its own.
    Running statistics are those after this forward pass (train mode).
    """
    import torch

    m = copy.deepcopy(module).double().train()
    params = dict(m.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in trainable)
    logits = m(torch.from_numpy(x.astype(np.float64)))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels), reduction="sum") * loss_scale
    loss.backward()
    grads = {n: params[n].grad.numpy().astype(np.float32) for n in trainable}
    stats = {k: v.numpy().astype(np.float32) for k, v in m.state_dict().items()
             if k.endswith(("running_mean", "running_var"))}
    return StepResult(float(loss.detach()), grads, stats)


# --------------------------------------------------------------------------- the maintained onnxruntime (test process)

def standard_session(model):
    """An InferenceSession of the maintained onnxruntime, as a device opens a step graph."""
    import onnxruntime as ort

    assert ort.__version__.startswith(RUNTIME_SERIES), f"the test process has onnxruntime {ort.__version__}"
    return ort.InferenceSession(model.SerializeToString(), _session_options(ort), providers=["CPUExecutionProvider"])


def _session_options(ort):
    """One intra-op thread on either onnxruntime: the graphs are tiny, the cores loaded, and sums come out the
    same on every run."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return so


def run_standard(model_or_session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of a graph (or an open session) on the maintained onnxruntime, by name."""
    sess = model_or_session if hasattr(model_or_session, "get_outputs") else standard_session(model_or_session)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def step_feeds(iface, weights: dict[str, np.ndarray], x: np.ndarray, labels: np.ndarray,
               loss_scale: float) -> dict[str, np.ndarray]:
    """Feeds for a step graph, by the interface's names."""
    feeds = {iface.batch_input: x.astype(np.float32), iface.labels_input: labels.astype(np.int64),
             iface.loss_scale_input: np.asarray(loss_scale, np.float32)}
    for name in iface.param_inputs + iface.stat_inputs:
        feeds[name] = np.ascontiguousarray(weights[name], dtype=np.float32)
    return feeds


# --------------------------------------------------------------------------- builder jobs (test process)

def build_job(forward, trainable: Sequence[str], frozen: Sequence[str], form: str = "taps") -> dict[str, Any]:
    """build_step_graph(forward, trainable, frozen, conv_weight_grad=form) -> the step graph."""
    return {"kind": "build", "forward": forward.SerializeToString(), "trainable": list(trainable),
            "frozen": list(frozen), "form": form}


def gradient_graph_job(forward, trainable: Sequence[str], frozen: Sequence[str]) -> dict[str, Any]:
    """gradient_graph(forward, trainable, frozen) -> onnxruntime-training's graph before any rewrite."""
    return {"kind": "gradient_graph", "forward": forward.SerializeToString(), "trainable": list(trainable),
            "frozen": list(frozen)}


def kernel_job(model, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Every output of a graph of training ops on onnxruntime-training's own kernels."""
    return {"kind": "kernel", "model": model.SerializeToString(), "feeds": feeds}


def session_job(forward, trainable: Sequence[str], frozen: Sequence[str], weights: dict[str, np.ndarray],
                x: np.ndarray, labels: np.ndarray, loss_scale: float) -> dict[str, Any]:
    """One forward+backward of an onnxruntime-training session (api.Module) over the same part and loss:
    loss and the trainable parameters' gradients."""
    return {"kind": "session", "forward": forward.SerializeToString(), "trainable": list(trainable),
            "frozen": list(frozen), "weights": weights, "x": x, "labels": labels, "loss_scale": loss_scale}


class BuilderResults:
    """What one builder child returned, by job key. A job's failure comes back as the error it raised
    in the child: StepGraphError and UnsupportedOpError (with op_type, node_name) as themselves."""

    def __init__(self, values: dict[str, dict], failure: str | None = None) -> None:
        self._values = values
        self.failure = failure

    def value(self, key: str) -> Any:
        import pytest

        if self.failure:
            pytest.fail(self.failure, pytrace=False)
        if key not in self._values:
            raise KeyError(f"no builder job {key!r} was run")
        reply = self._values[key]
        if reply["ok"]:
            return reply["value"]
        from coordinator.model import step_graph as sg

        err = reply["error"]
        if err["type"] == "UnsupportedOpError":
            raise sg.UnsupportedOpError(err["op_type"], err["node_name"], err["reason"])
        if err["type"] == "StepGraphError":
            raise sg.StepGraphError(err["message"])
        raise RuntimeError(f"builder job {key!r} failed in the child:\n{err['traceback']}")

    def model(self, key: str):
        import onnx

        return onnx.load_from_string(self.value(key))


def run_builder(jobs: dict[str, dict[str, Any]]) -> BuilderResults:
    """Run the jobs in order, in one child with onnxruntime-training first on its path."""
    from coordinator.model.part_graphs import builder_dir

    where = builder_dir()
    if not (where / "onnxruntime" / "training").is_dir():
        return BuilderResults({}, f"onnxruntime-training's gradient builder is not installed in {where} "
                                  f"(EDGEBLOCK_GRADIENT_BUILDER or <venv>/gradient-builder): run tools/bootstrap.sh, "
                                  f"which installs onnxruntime-training-cpu=={TRAINING_VERSION} there")
    with tempfile.TemporaryDirectory(prefix="step-graph-tests-") as tmp:
        jobs_file, results_file = Path(tmp) / "jobs.pkl", Path(tmp) / "results.pkl"
        jobs_file.write_bytes(pickle.dumps(list(jobs.items()), protocol=pickle.HIGHEST_PROTOCOL))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(where), str(REPO)]), OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "builder", str(jobs_file),
                               str(results_file)], env=env, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0 or not results_file.exists():
            last = [line[len(JOB_MARK):] for line in done.stderr.splitlines() if line.startswith(JOB_MARK)]
            tail = "\n".join(line for line in done.stderr.splitlines() if not line.startswith(JOB_MARK))[-1500:]
            how = f"was killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0 \
                else f"exited with {done.returncode}"
            return BuilderResults({}, f"the builder child (onnxruntime-training) {how} "
                                      f"during job {last[-1] if last else '(none started)'!r} of {len(jobs)}:\n{tail}")
        out = pickle.loads(results_file.read_bytes())
    runtime = out["runtime"]
    if runtime["version"] != TRAINING_VERSION or not runtime["training"]:
        return BuilderResults({}, f"the builder child imported onnxruntime {runtime['version']} from "
                                  f"{runtime['path']}, not onnxruntime-training {TRAINING_VERSION} from {where}")
    return BuilderResults(out["results"])


def describe_on_device(model_path: Path) -> dict[str, Any]:
    """What a board sees: the interface read from onnxruntime's metadata with edge_runtime's reader,
    in a child where neither onnx nor torch can be imported, and the session's own input/output names."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "device", str(model_path)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"the device child failed:\n{done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the builder child

def _builder_child(jobs_file: str, results_file: str) -> None:
    from coordinator.model import step_graph as sg

    ort, onnxblock = sg._import_ort_training()
    import onnx

    jobs = pickle.loads(Path(jobs_file).read_bytes())
    results: dict[str, dict] = {}
    for key, job in jobs:
        print(JOB_MARK + key, file=sys.stderr, flush=True)
        try:
            results[key] = {"ok": True, "value": _run_job(sg, ort, onnxblock, onnx, job)}
        except sg.UnsupportedOpError as exc:
            results[key] = {"ok": False, "error": {"type": "UnsupportedOpError", "op_type": exc.op_type,
                                                   "node_name": exc.node_name, "reason": exc.reason}}
        except sg.StepGraphError as exc:
            results[key] = {"ok": False, "error": {"type": "StepGraphError", "message": str(exc)}}
        except Exception as exc:  # noqa: BLE001  (reported to the test that asked; the other jobs still run)
            results[key] = {"ok": False, "error": {"type": type(exc).__name__, "traceback": traceback.format_exc()}}
    runtime = {"version": ort.__version__, "path": ort.__file__,
               "training": hasattr(sys.modules.get("onnxruntime.training"), "onnxblock")}
    Path(results_file).write_bytes(pickle.dumps({"runtime": runtime, "results": results},
                                                protocol=pickle.HIGHEST_PROTOCOL))


def _run_job(sg, ort, onnxblock, onnx, job: dict[str, Any]) -> Any:
    kind = job["kind"]
    if kind == "build":
        return sg.build_step_graph(onnx.load_from_string(job["forward"]), job["trainable"], job["frozen"],
                                   conv_weight_grad=job["form"]).SerializeToString()
    if kind == "gradient_graph":
        return sg.gradient_graph(onnx.load_from_string(job["forward"]), job["trainable"],
                                 job["frozen"]).SerializeToString()
    if kind == "kernel":
        sess = ort.InferenceSession(job["model"], _session_options(ort), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, job["feeds"])))
    if kind == "session":
        return _training_session_step(sg, ort, onnxblock, onnx, job)
    raise ValueError(f"unknown job kind {kind!r}")


def _training_session_step(sg, ort, onnxblock, onnx, job: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime-training's artifacts for the part and loss build_step_graph uses (no optimizer), and
    one step of api.Module over them. Running statistics are passed as frozen parameters, exactly as
    build_step_graph does (left as initializers, onnxruntime ties equal small ones across layers)."""
    from onnxruntime.training import api

    forward = onnx.load_from_string(job["forward"])
    trainable, frozen = job["trainable"], job["frozen"]
    sg._check_forward(forward, trainable, frozen)
    stats = sg._prepare_forward(forward)
    training, params = sg._training_block(forward, trainable, frozen + [s for s in stats if s not in frozen])
    with tempfile.TemporaryDirectory() as tmp:
        model_path, ckpt_path = Path(tmp) / "training_model.onnx", Path(tmp) / "checkpoint"
        onnx.save(training, model_path)
        onnxblock.save_checkpoint(params, str(ckpt_path))
        state = api.CheckpointState.load_checkpoint(str(ckpt_path))
        module = api.Module(str(model_path), state, None, device="cpu", session_options=_session_options(ort))
        module.train()
        for name in state.parameters:
            if name in job["weights"]:
                state.parameters[name] = np.ascontiguousarray(job["weights"][name], dtype=np.float32)
        module.lazy_reset_grad()
        loss = module(job["x"].astype(np.float32), job["labels"].astype(np.int64),
                      np.asarray(job["loss_scale"], np.float32))
        grads = {n: np.array(state.parameters[n].grad) for n in trainable}
    return {"loss": float(np.asarray(loss)), "grads": grads}


# --------------------------------------------------------------------------- the device child

def _device_child(model_path: str) -> None:
    sys.modules["onnx"] = None      # type: ignore[assignment]  # a board has neither
    sys.modules["torch"] = None     # type: ignore[assignment]
    import onnxruntime as ort

    from edge_runtime.wire.step_interface import interface_from_metadata

    ort.set_default_logger_severity(3)
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    iface = interface_from_metadata(sess.get_modelmeta().custom_metadata_map)
    loaded = sorted(m for m, mod in sys.modules.items()
                    if mod is not None and m.split(".")[0] in ("onnx", "torch", "coordinator"))
    print(json.dumps({"onnxruntime": ort.__version__, "loaded": loaded,
                      "inputs": list(iface.input_names), "outputs": list(iface.output_names),
                      "stat_updates": [list(p) for p in iface.stat_updates],
                      "session_inputs": [i.name for i in sess.get_inputs()],
                      "session_outputs": [o.name for o in sess.get_outputs()]}))


if __name__ == "__main__":
    if sys.argv[1] == "builder":
        _builder_child(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "device":
        _device_child(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} builder JOBS RESULTS | device MODEL")
